"""The numpy filters and k-means that OpenCV and scikit-learn replaced, kept
as the references the speed benchmarks and equivalence tests compare against.

They are the implementations wbclib shipped before (restore.median3x3,
restore.bilateral, morphology._kmeans, sada.kmeans), unchanged.
"""
from __future__ import annotations

import numpy as np

#: Devillard's 19-exchange sorting network for the median of 9 values.
_MEDIAN9 = [(1, 2), (4, 5), (7, 8), (0, 1), (3, 4), (6, 7), (1, 2), (4, 5), (7, 8), (0, 3), (5, 8), (4, 7),
            (3, 6), (1, 4), (2, 5), (4, 7), (4, 2), (6, 4), (4, 2)]


def median3x3_numpy(image: np.ndarray) -> np.ndarray:
    """3x3 median of each channel, borders mirrored (scipy's mode="mirror"),
    by a sorting network over the nine shifted views."""
    pad = ((1, 1), (1, 1)) + ((0, 0),) * (image.ndim - 2)
    padded = np.pad(image, pad, mode="reflect")
    h, w = image.shape[:2]
    p = [padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)]
    for i, j in _MEDIAN9:
        lo = np.minimum(p[i], p[j])
        p[j] = np.maximum(p[i], p[j])
        p[i] = lo
    return np.ascontiguousarray(p[4])


def bilateral_numpy(image: np.ndarray, sigma_color: float = 30.0, sigma_spatial: float = 1.5,
                    radius: int = 2) -> np.ndarray:
    """Bilateral filter of an RGB uint8 image over the full (2 radius + 1)^2
    square, Euclidean colour distance over the three channels, mirrored borders."""
    x = image.astype(np.float32)
    h, w = image.shape[:2]
    padded = np.pad(x, ((radius, radius), (radius, radius), (0, 0)), mode="reflect")
    num = np.zeros_like(x)
    den = np.zeros((h, w, 1), np.float32)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            shifted = padded[radius + dy:radius + dy + h, radius + dx:radius + dx + w]
            colour = np.square(shifted - x).sum(-1, keepdims=True)
            weight = np.exp(colour * np.float32(-1 / (2 * sigma_color ** 2))
                            + np.float32(-(dy * dy + dx * dx) / (2 * sigma_spatial ** 2)))
            num += weight * shifted
            den += weight
    return np.clip(np.rint(num / den), 0, 255).astype(np.uint8)


def _nearest(values: np.ndarray, centres: np.ndarray) -> np.ndarray:
    return np.argmin(((values[:, None, :] - centres[None]) ** 2).sum(-1), axis=1)


def kmeans_numpy(values: np.ndarray, k: int, seed: int, iterations: int = 50, max_fit: int = 20000) -> np.ndarray:
    """Cluster labels of ``values`` (n, d): Lloyd's algorithm from a k-means++
    start, fitted on at most ``max_fit`` random rows."""
    rng = np.random.default_rng(seed)
    fit_on = values if len(values) <= max_fit else values[rng.choice(len(values), max_fit, replace=False)]
    centres = [fit_on[rng.integers(len(fit_on))]]
    for _ in range(1, k):
        d2 = np.min([((fit_on - c) ** 2).sum(1) for c in centres], axis=0)
        total = d2.sum()
        centres.append(fit_on[rng.choice(len(fit_on), p=d2 / total)] if total > 0 else centres[-1])
    centres = np.array(centres, dtype=float)
    labels = None
    for _ in range(iterations):
        new = _nearest(fit_on, centres)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        for c in range(k):
            if (labels == c).any():
                centres[c] = fit_on[labels == c].mean(0)
    return _nearest(values, centres)


def kmeans_torch(points, k: int, n_init: int = 5, n_iter: int = 100, generator=None):
    """The torch k-means of wbclib.sada (Lloyd from k-means++ seeding, n_init
    restarts, lowest inertia wins): labels (N,) and centroids (k, D)."""
    import torch

    points = points.float()
    n = len(points)
    if n <= k:
        return torch.arange(n, device=points.device), points.clone()
    best = (float("inf"), None, None)
    for _ in range(n_init):
        first = int(torch.randint(n, (1,), generator=generator))
        centres = [points[first]]
        for _ in range(1, k):
            d2 = torch.cdist(points, torch.stack(centres)).pow(2).min(1).values
            weights = d2.cpu() if float(d2.sum()) > 0 else torch.ones(n)
            centres.append(points[int(torch.multinomial(weights, 1, generator=generator))])
        centres = torch.stack(centres)
        for _ in range(n_iter):
            labels = torch.cdist(points, centres).argmin(1)
            counts = torch.bincount(labels, minlength=k).float()
            sums = torch.zeros_like(centres).index_add_(0, labels, points)
            updated = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centres)
            if torch.equal(updated, centres):
                break
            centres = updated
        labels = torch.cdist(points, centres).argmin(1)
        inertia = float((points - centres[labels]).pow(2).sum())
        if inertia < best[0]:
            best = (inertia, labels, centres)
    return best[1], best[2]
