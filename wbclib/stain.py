"""Stain normalisation and stain augmentation, batched in torch.

Blood smears from different labs differ mostly in stain colour (May-Grünwald-
Giemsa vs Wright, staining time, scanner). Under the Beer-Lambert law the
optical density (OD) of a pixel is a non-negative mix of a few stain colours,
``od = stain_matrix @ concentrations``, so colour can be changed by keeping an
image's concentrations and swapping its stain matrix for a reference one.

* :class:`MacenkoNormalizer` estimates the two stain vectors geometrically
  (Macenko et al., ISBI 2009), exactly as ``torchstain`` does, but for a whole
  batch at once so it is cheap enough to run inside a data pipeline.
* :class:`VahadaneNormalizer` estimates them by sparse non-negative matrix
  factorisation (Vahadane et al., IEEE TMI 2016), solved per image with exact
  two-stain block updates, again batched.
* :func:`restain` re-stains images with any (per-image) target stain matrices,
  the building block for stain-adversarial / SADA-style augmentation.
* :class:`StainAugmentor` jitters each image's own stain concentrations.

Every public entry point takes one RGB ``uint8`` image (H, W, 3) or a batch
(N, H, W, 3) as a numpy array or torch tensor and returns images of the same
kind and shape; computation happens on the input tensor's device. Stain
matrices are (3, 2) with RGB rows and the hematoxylin-like (nuclear, blue)
stain first, the eosin-like (cytoplasm / red cell) stain second.
"""
from __future__ import annotations

import math
import threading
from abc import ABC, abstractmethod
from typing import Callable, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch

Images = Union[np.ndarray, torch.Tensor]

#: Percentile used to measure an image's "maximum" stain concentration; the
#: 99th rather than the max so a few dark artefacts do not set the scale.
MAX_CONCENTRATION_PERCENTILE = 99.0


# --------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------


class NoStainError(ValueError):
    """An image with fewer than 2 stained pixels (blank or overexposed): no stain to estimate."""


def _as_uint8_batch(images: Images, name: str = "images") -> Tuple[torch.Tensor, Callable[[torch.Tensor], Images]]:
    """Validate ``images`` and view them as an (N, H, W, 3) uint8 tensor.

    Also returns the function that turns an (N, H, W, 3) uint8 result back
    into the caller's kind (numpy or torch) and shape (single or batch).
    """
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise ValueError(
                f"{name} must be uint8 RGB in 0-255, got dtype {images.dtype}; "
                "convert float images in [0, 1] with (x * 255).round().astype(np.uint8)"
            )
        # torch warns about read-only arrays (np.asarray of a PIL image is one);
        # a copy is cheaper than the noise and we never write to the input.
        batch = torch.from_numpy(images if images.flags.writeable else images.copy())
    elif isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8:
            raise ValueError(
                f"{name} must be uint8 RGB in 0-255, got dtype {images.dtype}; "
                "convert float images in [0, 1] with (x * 255).round().to(torch.uint8)"
            )
        batch = images
    else:
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(images).__name__}")

    shape = tuple(images.shape)
    if batch.ndim not in (3, 4) or shape[-1] != 3:
        hint = ""
        if batch.ndim in (3, 4) and shape[-3] == 3:
            hint = "; channels-first input? permute to channels-last (..., H, W, 3)"
        elif batch.ndim == 2 or shape[-1] == 1:
            hint = "; grayscale images carry no stain colour to normalise"
        raise ValueError(f"{name} must be RGB of shape (H, W, 3) or (N, H, W, 3), got shape {shape}{hint}")
    single = batch.ndim == 3
    if single:
        batch = batch.unsqueeze(0)
    if batch.shape[0] == 0 or batch.shape[1] == 0 or batch.shape[2] == 0:
        raise ValueError(f"{name} is empty (shape {shape})")
    as_numpy = isinstance(images, np.ndarray)

    def restore(result: torch.Tensor) -> Images:
        if single:
            result = result[0]
        return result.cpu().numpy() if as_numpy else result

    return batch, restore


def _as_matrices(matrices: Union[np.ndarray, torch.Tensor], n: int, device: torch.device, name: str) -> torch.Tensor:
    """A (3, 2) or (N, 3, 2) stain matrix argument as an (N, 3, 2) float32 tensor."""
    matrices = torch.as_tensor(matrices, dtype=torch.float32, device=device)
    if matrices.shape == (3, 2):
        matrices = matrices.expand(n, 3, 2)
    if matrices.shape != (n, 3, 2):
        raise ValueError(f"{name} must have shape (3, 2) or ({n}, 3, 2), got {tuple(matrices.shape)}")
    return matrices


def _as_max_concentrations(values: Union[np.ndarray, torch.Tensor], n: int, device: torch.device, name: str) -> torch.Tensor:
    """A (2,) or (N, 2) max-concentration argument as an (N, 2) float32 tensor."""
    values = torch.as_tensor(values, dtype=torch.float32, device=device)
    if values.shape == (2,):
        values = values.expand(n, 2)
    if values.shape != (n, 2):
        raise ValueError(f"{name} must have shape (2,) or ({n}, 2), got {tuple(values.shape)}")
    return values


# --------------------------------------------------------------------------
# Batched building blocks
# --------------------------------------------------------------------------


def _masked_percentile(values: torch.Tensor, mask: Optional[torch.Tensor], q: float) -> torch.Tensor:
    """Per-row ``q``-th percentile over the last dimension, among entries where ``mask``.

    Nearest-rank, as torchstain's ``percentile`` (the value at 0-based sorted
    position ``round(q / 100 * (count - 1))``, ties to even) so results agree.
    Rows keep different numbers of entries, so instead of sorting every row
    one ``topk`` fetches the smallest (or largest) ``k`` values, ``k`` the
    deepest rank any row needs, and each row gathers its own rank. For the
    1st/99th percentiles that touches about 1% of each row: several times
    faster than a full sort.
    """
    if mask is None:
        count = torch.full(values.shape[:-1], values.shape[-1], device=values.device)
    else:
        count = mask.sum(-1)
    rank = torch.round(0.01 * q * (count - 1).double()).long()
    largest = q > 50
    if largest:
        rank = count - 1 - rank
    if mask is not None:
        values = torch.where(mask, values, float("-inf") if largest else float("inf"))
    extremes = values.topk(int(rank.max()) + 1, dim=-1, largest=largest).values
    return extremes.gather(-1, rank.unsqueeze(-1)).squeeze(-1)


def _macenko_stain_matrices(od: torch.Tensor, stained: torch.Tensor, alpha: float) -> torch.Tensor:
    """Macenko stain vectors of each image from its stained pixels:
    (N, 3, P) OD and (N, P) mask -> (N, 3, 2)."""
    count = stained.sum(-1)
    if bool((count < 2).any()):
        bad = torch.nonzero(count < 2).flatten().tolist()
        raise NoStainError(
            f"image(s) {bad} of the batch have fewer than 2 stained pixels (OD >= beta in all "
            "channels); blank or overexposed images have no stain to estimate"
        )
    count = count.to(od.dtype).view(-1, 1, 1)
    # Covariance of each image's stained pixels, from masked sums so every
    # image keeps its own pixel count without indexing.
    stained_od = od * stained.unsqueeze(1)
    mean = stained_od.sum(-1, keepdim=True) / count
    plane = _stain_plane((stained_od @ stained_od.mT - count * mean @ mean.mT) / (count - 1))

    # Angles of the stained pixels within the plane; the robust extremes
    # (alpha and 100 - alpha percentiles) are the two pure-stain directions.
    projected = plane.mT @ od
    angle = torch.atan2(projected[:, 1], projected[:, 0])
    angle_min = _masked_percentile(angle, stained, alpha)
    angle_max = _masked_percentile(angle, stained, 100 - alpha)
    return _stain_vectors(plane, angle_min, angle_max)


def _stain_plane(covariance: torch.Tensor) -> torch.Tensor:
    """(N, 3, 3) OD covariances -> (N, 3, 2) bases of their stain planes.
    eigh sorts eigenvalues ascending: the last two span the plane."""
    return torch.linalg.eigh(covariance).eigenvectors[..., 1:]


def _stain_vectors(plane: torch.Tensor, angle_min: torch.Tensor, angle_max: torch.Tensor) -> torch.Tensor:
    """Stain matrices (N, 3, 2) from the planes (N, 3, 2) and the extreme angles (N,) within them."""
    v_min = plane @ torch.stack((torch.cos(angle_min), torch.sin(angle_min)), -1).unsqueeze(-1)
    v_max = plane @ torch.stack((torch.cos(angle_max), torch.sin(angle_max)), -1).unsqueeze(-1)

    # Hematoxylin (blue, absorbs red light) first: the vector with larger red OD.
    v_min_first = (v_min[:, 0] > v_max[:, 0]).unsqueeze(-1)
    return torch.where(v_min_first, torch.cat((v_min, v_max), -1), torch.cat((v_max, v_min), -1))


def _nonnegative_lasso(od: torch.Tensor, stain_matrices: torch.Tensor, lam: float) -> torch.Tensor:
    """Exact per-pixel ``argmin_{h >= 0} 0.5 ||od - W h||^2 + lam * sum(h)``.

    Convex with two unknowns, so: if the stationary point with both stains
    active is non-negative it is the optimum; otherwise the optimum uses at
    most one stain, and of the two one-stain solutions (each a clamped
    closed form) the better has the larger ``c . h`` (the objective at a
    support's stationary point is ``-0.5 c . h``). No iterations, fully
    vectorised. (N, 3, P) OD, (N, 3, 2) W -> (N, 2, P).
    """
    gram = stain_matrices.mT @ stain_matrices
    g11, g12, g22 = (gram[:, i, j].view(-1, 1) for i, j in ((0, 0), (0, 1), (1, 1)))
    c = stain_matrices.mT @ od - lam
    c1, c2 = c[:, 0], c[:, 1]
    det = g11 * g22 - g12 * g12
    both1 = (g22 * c1 - g12 * c2) / det
    both2 = (g11 * c2 - g12 * c1) / det
    first_only = (c1 / g11).clamp(min=0)
    second_only = (c2 / g22).clamp(min=0)

    use_both = (both1 > 0) & (both2 > 0)
    use_first = c1 * first_only >= c2 * second_only
    h1 = torch.where(use_both, both1, torch.where(use_first, first_only, 0.0))
    h2 = torch.where(use_both, both2, torch.where(use_first, 0.0, second_only))
    return torch.stack((h1, h2), 1)


def _concentration_scale(concentrations: torch.Tensor, max_target: torch.Tensor) -> torch.Tensor:
    """(N, 2) factors that bring each image's 99th-percentile stain
    concentrations to ``max_target`` (N, 2). A stain absent from an image
    (percentile <= 0) keeps factor 1 rather than a division by zero."""
    max_source = _masked_percentile(concentrations, None, MAX_CONCENTRATION_PERCENTILE)
    return torch.where(max_source > 0, max_target / max_source, torch.ones_like(max_source))


# Vahadane and restain use the Beer-Lambert convention od = log(256 / (I + 1)):
# non-negative for every uint8 value (NMF needs non-negative data) and inverted
# exactly by I = 256 exp(-od) - 1, so pixels the stains explain survive a round trip.
_LOSSLESS_OD_TABLE = torch.log(256.0 / (torch.arange(256, dtype=torch.float32) + 1))


def _od_from_table(batch: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, P) OD by table lookup: 256 logs instead of
    one per pixel (about 4x faster than float conversion and log on CPU).

    Channel planes (N, 3, P) rather than pixels (N, P, 3): per-channel and
    per-stain rows are then contiguous for the elementwise work and topk.
    """
    planes = batch.permute(0, 3, 1, 2).reshape(-1).int()
    return table.to(batch.device).index_select(0, planes).view(batch.shape[0], 3, -1)


def _planes_to_images(values: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """(N, 3, P) uint8 channel planes -> (N, H, W, 3) images."""
    return values.mT.reshape(shape)


def _lossless_rgb(od: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    rgb = torch.exp(od.neg_()).mul_(256.0).sub_(1).round_().clamp_(0, 255).to(torch.uint8)
    return _planes_to_images(rgb, shape)


# --------------------------------------------------------------------------
# One image on the CPU: numpy and OpenCV
# --------------------------------------------------------------------------
# The data loader normalises one native-size image per call in a worker with
# one thread. There, torch's per-pixel passes cost more than the arithmetic
# (each large temporary is fresh memory), and a batch is no faster per image
# than single calls, so the same algorithm runs on numpy arrays instead:
# OpenCV's table lookup, range test and exp, BLAS products, and percentiles
# from a small candidate set. The 3x3 and 3x2 steps (eigh, pinv, stain
# vectors) stay the torch functions above, shared with the batched path.

#: Values sampled per row to place the candidate threshold of :func:`_order_statistic`.
_THRESHOLD_SAMPLE = 4096


def _nearest_rank(count: int, q: float) -> int:
    """0-based sorted position of the ``q``-th percentile among ``count``
    values, as :func:`_masked_percentile` and torchstain (ties to even)."""
    return round(0.01 * q * (count - 1))


def _order_statistic(values: np.ndarray, rank: int, mask: Optional[np.ndarray] = None,
                     count: Optional[int] = None, candidates: Optional[np.ndarray] = None) -> float:
    """The value at 0-based ``rank`` of the sorted ``values[mask]`` (1-D), exactly.

    A percentile near either end needs only the values beyond a threshold:
    a strided sample places the threshold a little past the rank, one
    comparison pass keeps the values beyond it (a few percent) and a
    partition of those gives the answer. When the candidates turn out too few
    to contain the rank, a full partition does. ``candidates`` is an optional
    boolean buffer shaped like ``values`` for the comparison.
    """
    count = len(values) if count is None else count
    largest = rank > (count - 1) / 2
    depth = count - 1 - rank if largest else rank  # values beyond the answer on its side
    step = max(1, len(values) // _THRESHOLD_SAMPLE)
    sample = values[::step] if mask is None else values[::step][mask[::step]]
    if len(sample) >= 64 and depth < count // 4:
        # Twice the needed fraction plus a margin: the candidates hold the rank
        # unless the sample is off by a factor of two.
        k = min(len(sample) - 1, int(len(sample) * 2 * (depth + 1) / count) + 16)
        if candidates is None:
            candidates = np.empty(len(values), bool)
        if largest:
            threshold = np.partition(sample, len(sample) - 1 - k)[len(sample) - 1 - k]
            np.greater_equal(values, threshold, out=candidates)
        else:
            threshold = np.partition(sample, k)[k]
            np.less_equal(values, threshold, out=candidates)
        if mask is not None:
            candidates &= mask
        chosen = values[candidates]
        if len(chosen) > depth:
            position = len(chosen) - 1 - depth if largest else depth
            return float(np.partition(chosen, position)[position])
    full = values if mask is None else values[mask]
    return float(np.partition(full, rank)[rank])


class _PlaneWorkspace:
    """Preallocated (H, W) planes for :func:`_macenko_transform_one`.

    Its dozen large temporaries would otherwise be fresh memory on every
    call, and the page faults on fresh memory cost more than the arithmetic
    (measured: 7.8 against 4.0 ms per 363x360 image on one thread).
    """

    def __init__(self, height: int, width: int) -> None:
        shape = (height, width)
        self.channels = [np.empty(shape, np.uint8) for _ in range(3)]
        self.od = [np.empty(shape, np.float32) for _ in range(3)]
        self.stained_u8 = np.empty(shape, np.uint8)
        self.stained = np.empty(height * width, bool)
        self.candidates = np.empty(height * width, bool)
        self.stained_od = [np.empty(height * width, np.float32) for _ in range(3)]
        self.x, self.y, self.angle = (np.empty(shape, np.float32) for _ in range(3))
        self.concentrations = [np.empty(shape, np.float32) for _ in range(2)]
        self.value = np.empty(shape, np.float32)
        self.rgb = [np.empty(shape, np.uint8) for _ in range(3)]


def _weighted_sum(planes: Sequence[np.ndarray], weights: Sequence[float], out: np.ndarray,
                  offset: float = 0.0) -> np.ndarray:
    """``sum_j weights[j] * planes[j] + offset`` of float32 planes into ``out``,
    in OpenCV's vectorised loops."""
    cv2.addWeighted(planes[0], float(weights[0]), planes[1], float(weights[1]), float(offset), out)
    for plane, weight in zip(planes[2:], weights[2:]):
        cv2.scaleAdd(plane, float(weight), out, out)
    return out


def _macenko_transform_one(image: np.ndarray, out: np.ndarray, work: _PlaneWorkspace, od_table: np.ndarray,
                           darkest_background: int, alpha: float, io: float,
                           reference_stain_matrix: np.ndarray, reference_max_concentrations: np.ndarray) -> None:
    """Macenko normalisation of one (H, W, 3) uint8 image into ``out``: the
    steps of :meth:`_StainNormalizer.transform` for :class:`MacenkoNormalizer`
    on contiguous float32 channel planes (H, W), where OpenCV's elementwise
    loops are several times faster than on interleaved pixels."""
    od = [cv2.LUT(channel, od_table, plane) for channel, plane in zip(cv2.split(image, work.channels), work.od)]
    # OD >= beta in every channel is "every channel <= darkest_background" (see _od_and_stain_matrices).
    cv2.inRange(image, (0, 0, 0), (darkest_background,) * 3, work.stained_u8)
    count = cv2.countNonZero(work.stained_u8)
    if count < 2:
        raise NoStainError("fewer than 2 stained pixels")
    stained = np.not_equal(work.stained_u8.reshape(-1), 0, out=work.stained)
    stained_od = [np.multiply(plane.reshape(-1), stained, out=buffer) for plane, buffer in zip(od, work.stained_od)]
    total = np.array([plane.sum() for plane in stained_od], np.float64)  # float32 pairwise sums: ~1e-7 relative
    gram = np.array([[np.dot(a, b) for b in stained_od] for a in stained_od], np.float64)
    covariance = (gram - np.outer(total, total) / count) / (count - 1)
    plane = _stain_plane(torch.from_numpy(covariance.astype(np.float32))[None])  # (1, 3, 2)

    basis = plane[0].numpy()
    angle = np.arctan2(_weighted_sum(od, basis[:, 1], work.y), _weighted_sum(od, basis[:, 0], work.x),
                       out=work.angle).reshape(-1)
    angle_min = _order_statistic(angle, _nearest_rank(count, alpha), stained, count, work.candidates)
    angle_max = _order_statistic(angle, _nearest_rank(count, 100 - alpha), stained, count, work.candidates)
    stain_matrix = _stain_vectors(plane, torch.tensor([angle_min]), torch.tensor([angle_max]))[0]

    to_concentrations = torch.linalg.pinv(stain_matrix).numpy()  # (2, 3)
    concentrations = [_weighted_sum(od, row, buffer) for row, buffer in zip(to_concentrations, work.concentrations)]
    rank = _nearest_rank(stained.size, MAX_CONCENTRATION_PERCENTILE)
    max_source = np.array([_order_statistic(c.reshape(-1), rank, candidates=work.candidates)
                           for c in concentrations], np.float32)
    # A stain absent from the image (percentile <= 0) keeps factor 1, as _concentration_scale.
    scale = np.where(max_source > 0, reference_max_concentrations / np.where(max_source > 0, max_source, 1), 1)
    stains = reference_stain_matrix * scale.astype(np.float32)  # (3, 2): W scale, as in transform
    for row, channel in zip(stains, work.rgb):
        # io * exp(-od) as exp(log(io) - od); then clip at 255 and truncate, as torchstain and _to_rgb.
        value = cv2.exp(_weighted_sum(concentrations, -row, work.value, math.log(io)), work.value)
        np.copyto(channel, np.minimum(value, 255, out=value), casting="unsafe")
    cv2.merge(work.rgb, out)


# --------------------------------------------------------------------------
# Normalisers
# --------------------------------------------------------------------------


class _StainNormalizer(ABC):
    """Shared fit/transform around per-method steps on (N, H, W, 3) uint8
    batches: optical density (via ``_od_table``, 256 entries, decreasing in
    the pixel value), stain matrices from the stained pixels (OD >= ``beta``
    in every channel), concentrations, and back to RGB."""

    _od_table: torch.Tensor
    beta: float

    def __init__(self) -> None:
        self.reference_stain_matrix: Optional[torch.Tensor] = None
        self.reference_max_concentrations: Optional[torch.Tensor] = None

    @abstractmethod
    def _stain_matrices(self, od: torch.Tensor, stained: torch.Tensor) -> torch.Tensor:  # (N, 3, P) -> (N, 3, 2)
        ...

    @abstractmethod
    def _concentrations(self, od: torch.Tensor, stain_matrices: torch.Tensor) -> torch.Tensor:  # (N, 2, P)
        ...

    @abstractmethod
    def _to_rgb(self, od: torch.Tensor, shape: torch.Size) -> torch.Tensor:  # (N, 3, P) -> (N, H, W, 3) uint8
        ...

    def _od_and_stain_matrices(self, batch: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Pixel OD (N, 3, P) and each image's stain matrix (N, 3, 2)."""
        od = _od_from_table(batch, self._od_table)
        # OD falls as the pixel value rises, so "OD >= beta in every channel"
        # is "brightest channel <= the last value whose OD is >= beta",
        # decided on the uint8 pixels exactly as on the OD.
        return od, self._stain_matrices(od, self._stained(batch))

    def _stained(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, P) mask of the pixels with OD >= beta in every channel."""
        darkest_background = int((self._od_table >= self.beta).sum()) - 1
        return batch.amax(-1).flatten(1) <= darkest_background

    def _estimated(self, stained: torch.Tensor) -> torch.Tensor:
        """The columns of a (N, P) pixel mask that the stain estimate looks at."""
        return stained

    def has_stain(self, images: Images) -> torch.Tensor:
        """Whether each image has a stain to estimate, (N,) bool: at least 2
        stained pixels (OD >= beta in every channel) among those the estimate
        looks at. Blank or overexposed images, and some that strong colour
        jitter washed out, have none (:class:`NoStainError` for a batch)."""
        batch, _ = _as_uint8_batch(images)
        return self._estimated(self._stained(batch)).sum(-1) >= 2

    def fit(self, target: Images) -> "_StainNormalizer":
        """Estimate the reference stain matrix and max concentrations from one image."""
        batch, _ = _as_uint8_batch(target, "target")
        if batch.shape[0] != 1:
            raise ValueError(f"fit expects one target image (H, W, 3), got a batch of {batch.shape[0]}")
        stain_matrices, max_concentrations = self.stain_statistics(batch)
        self.reference_stain_matrix = stain_matrices[0].cpu()
        self.reference_max_concentrations = max_concentrations[0].cpu()
        return self

    def transform(self, images: Images) -> Images:
        """Re-stain images with the fitted reference stains; same kind and shape out."""
        if self.reference_stain_matrix is None:
            raise ValueError(f"{type(self).__name__}.transform called before fit(target)")
        batch, restore = _as_uint8_batch(images)
        concentrations = self._concentrations(*self._od_and_stain_matrices(batch))
        max_target = self.reference_max_concentrations.to(batch.device).expand(batch.shape[0], 2)
        scale = _concentration_scale(concentrations, max_target)
        # W (scale * C) as (W scale) C: the scaling costs a (3, 2) product, not a pass over the pixels.
        od = (self.reference_stain_matrix.to(batch.device) * scale.unsqueeze(1)) @ concentrations
        return restore(self._to_rgb(od, batch.shape))

    def stain_matrices(self, images: Images) -> torch.Tensor:
        """Each image's own stain matrix, a float32 tensor (N, 3, 2) ((1, 3, 2) for one image)."""
        batch, _ = _as_uint8_batch(images)
        return self._od_and_stain_matrices(batch)[1]

    def stain_statistics(self, images: Images) -> Tuple[torch.Tensor, torch.Tensor]:
        """Each image's stain matrix (N, 3, 2) and 99th-percentile stain
        concentrations (N, 2) from one decomposition: what :meth:`fit` keeps
        of its target, and the per-image targets :func:`restain` takes."""
        batch, _ = _as_uint8_batch(images)
        od, stain_matrices = self._od_and_stain_matrices(batch)
        concentrations = self._concentrations(od, stain_matrices)
        return stain_matrices, _masked_percentile(concentrations, None, MAX_CONCENTRATION_PERCENTILE)

    def concentrations(self, images: Images) -> torch.Tensor:
        """Each pixel's stain concentrations under the image's own stain matrix,
        a float32 tensor (N, H, W, 2) ((1, H, W, 2) for one image)."""
        batch, _ = _as_uint8_batch(images)
        return self._concentrations(*self._od_and_stain_matrices(batch)).mT.reshape(*batch.shape[:3], 2)


class MacenkoNormalizer(_StainNormalizer):
    """Macenko stain normalisation, numerically the algorithm of torchstain's
    torch backend, vectorised over a batch.

    ``Io`` is the transmitted (background) light intensity, ``alpha`` the
    percentile of the extreme stain angles, ``beta`` the OD below which a
    pixel counts as background in any channel.
    """

    def __init__(self, Io: float = 240, alpha: float = 1, beta: float = 0.15) -> None:
        super().__init__()
        if Io <= 0:
            raise ValueError(f"Io must be positive, got {Io}")
        if not 0 <= alpha < 50:
            raise ValueError(f"alpha must be a percentile in [0, 50), got {alpha}")
        if beta < 0:
            raise ValueError(f"beta must be non-negative, got {beta}")
        self.Io, self.alpha, self.beta = Io, alpha, beta
        self._workspaces: dict = {}
        # torchstain's od = -log((I + 1) / Io), evaluated once per uint8 value.
        self._od_table = -torch.log((torch.arange(256, dtype=torch.float32) + 1) / Io)

    def transform(self, images: Images) -> Images:
        """Re-stain images with the fitted reference stains; same kind and shape out.

        Images on the CPU go one at a time through the numpy/OpenCV path
        (:func:`_macenko_transform_one`), on an accelerator as one batch.
        """
        if self.reference_stain_matrix is None or (isinstance(images, torch.Tensor) and images.device.type != "cpu"):
            return super().transform(images)
        batch, restore = _as_uint8_batch(images)
        darkest_background = int((self._od_table >= self.beta).sum()) - 1
        od_table = self._od_table.numpy()
        stains = self.reference_stain_matrix.numpy()
        max_concentrations = self.reference_max_concentrations.numpy()
        work = self._workspace(*batch.shape[1:3])
        out = np.empty(tuple(batch.shape), np.uint8)
        for i, image in enumerate(batch.numpy()):
            try:
                _macenko_transform_one(image, out[i], work, od_table, darkest_background, self.alpha, self.Io,
                                       stains, max_concentrations)
            except ValueError:  # the batched path's message, naming the image
                raise ValueError(f"image(s) [{i}] of the batch have fewer than 2 stained pixels (OD >= beta in "
                                 "all channels); blank or overexposed images have no stain to estimate") from None
        return restore(torch.from_numpy(out))

    def _workspace(self, height: int, width: int) -> _PlaneWorkspace:
        """The CPU path's buffers for this image size, one set per thread so
        threads sharing a normaliser never share buffers."""
        key = (threading.get_ident(), height, width)
        if key not in self._workspaces:
            self._workspaces[key] = _PlaneWorkspace(height, width)
        return self._workspaces[key]

    def __getstate__(self) -> dict:
        # Buffers are scratch memory tied to this process's threads: not worth pickling to a loader worker.
        return {**self.__dict__, "_workspaces": {}}

    def _stain_matrices(self, od: torch.Tensor, stained: torch.Tensor) -> torch.Tensor:
        return _macenko_stain_matrices(od, stained, self.alpha)

    def _concentrations(self, od: torch.Tensor, stain_matrices: torch.Tensor) -> torch.Tensor:
        # Least squares, as one tiny pseudo-inverse per image and one batched
        # matmul over all pixels instead of a solver call with P right-hand sides.
        return torch.linalg.pinv(stain_matrices) @ od

    def _to_rgb(self, od: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        # torchstain clips at 255 and truncates to integers; do the same
        # (the float -> uint8 cast truncates) so the outputs agree.
        return _planes_to_images(torch.exp(od.neg_()).mul_(self.Io).clamp_(max=255).to(torch.uint8), shape)


class VahadaneNormalizer(_StainNormalizer):
    """Vahadane stain normalisation: sparse non-negative factorisation
    ``od ~= W H`` (W >= 0 with unit columns, H >= 0 with an L1 penalty).

    Per image, on the stained pixels (OD >= ``beta`` in every channel, taken
    with a fixed stride from at most ``max_pixels`` pixels), it alternates
    ``n_iter`` times between the exact non-negative lasso for H (penalty
    ``lambda1``) and a projected block-coordinate step on W (the dictionary
    update of Mairal et al.'s SPAMS, which Vahadane's reference code uses),
    starting from the Macenko estimate. Concentrations for re-staining are the
    non-negative lasso on all pixels with the lighter ``concentration_lambda``
    (0.01, as StainTools), so little of the image is lost to shrinkage.
    """

    _od_table = _LOSSLESS_OD_TABLE

    def __init__(
        self,
        lambda1: float = 0.1,
        n_iter: int = 30,
        concentration_lambda: float = 0.01,
        beta: float = 0.15,
        max_pixels: int = 4096,
    ) -> None:
        super().__init__()
        if lambda1 < 0 or concentration_lambda < 0:
            raise ValueError(f"L1 penalties must be non-negative, got lambda1={lambda1}, "
                             f"concentration_lambda={concentration_lambda}")
        if n_iter < 1 or max_pixels < 2:
            raise ValueError(f"need n_iter >= 1 and max_pixels >= 2, got {n_iter} and {max_pixels}")
        if beta < 0:
            raise ValueError(f"beta must be non-negative, got {beta}")
        self.lambda1, self.n_iter = lambda1, n_iter
        self.concentration_lambda, self.beta, self.max_pixels = concentration_lambda, beta, max_pixels

    def _stride(self, pixels: int) -> int:
        """Every how many pixels the estimate looks at (at most ``max_pixels`` of them)."""
        return -(-pixels // self.max_pixels)

    def _estimated(self, stained: torch.Tensor) -> torch.Tensor:
        return stained[:, :: self._stride(stained.shape[-1])]

    def _stain_matrices(self, od: torch.Tensor, stained: torch.Tensor) -> torch.Tensor:
        stride = self._stride(od.shape[-1])
        od, stained = od[..., ::stride], stained[:, ::stride]
        stains = _macenko_stain_matrices(od, stained, alpha=1).clamp(min=1e-3)
        stains = stains / stains.norm(dim=1, keepdim=True)

        # Move each image's stained pixels to the front and drop the columns
        # no image needs; background left in a row is zeroed, and zero OD has
        # lasso solution 0, so it adds nothing to the dictionary statistics.
        order = torch.argsort(stained.to(torch.uint8), dim=1, descending=True, stable=True)
        order = order[:, : int(stained.sum(1).max())]
        od = od.gather(2, order.unsqueeze(1).expand(-1, 3, -1)) * stained.gather(1, order).unsqueeze(1)

        for _ in range(self.n_iter):
            concentrations = _nonnegative_lasso(od, stains, self.lambda1)
            gram = concentrations @ concentrations.mT  # (N, 2, 2)
            cross = od @ concentrations.mT  # (N, 3, 2)
            for j in range(2):
                usage = gram[:, j, j].clamp(min=1e-12).unsqueeze(-1)
                column = stains[:, :, j] + (cross[:, :, j] - (stains @ gram[:, :, j : j + 1]).squeeze(-1)) / usage
                column = column.clamp(min=0)
                norm = column.norm(dim=1, keepdim=True)
                # Project onto {w >= 0, |w| <= 1}; a column clamped to zero
                # would make the lasso singular, so it keeps its old value.
                stains[:, :, j] = torch.where(norm > 1e-6, column / norm.clamp(min=1), stains[:, :, j])
        stains = stains / stains.norm(dim=1, keepdim=True)
        # Hematoxylin first: the stain absorbing more red light.
        swap = (stains[:, 0, 0] < stains[:, 0, 1]).view(-1, 1, 1)
        return torch.where(swap, stains.flip(-1), stains)

    def _concentrations(self, od: torch.Tensor, stain_matrices: torch.Tensor) -> torch.Tensor:
        return _nonnegative_lasso(od, stain_matrices, self.concentration_lambda)

    def _to_rgb(self, od: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return _lossless_rgb(od, shape)


def restain(
    images: Images,
    stain_matrices_src: Union[np.ndarray, torch.Tensor],
    stain_matrices_tgt: Union[np.ndarray, torch.Tensor],
    max_conc_tgt: Union[np.ndarray, torch.Tensor],
    concentration_lambda: float = 0.01,
) -> Images:
    """Re-stain images from their own stains to target stains.

    Concentrations of each image under its source stain matrix (non-negative
    lasso, Vahadane's OD convention) are scaled so their 99th percentiles
    equal ``max_conc_tgt`` and recombined with the target stain matrix.
    Stain matrices are (3, 2) or per image (N, 3, 2), max concentrations (2,)
    or (N, 2), e.g. from :meth:`VahadaneNormalizer.stain_matrices` of other
    images for SADA-style augmentation. Returns images of the input's kind.
    """
    batch, restore = _as_uint8_batch(images)
    n, device = batch.shape[0], batch.device
    source = _as_matrices(stain_matrices_src, n, device, "stain_matrices_src")
    target = _as_matrices(stain_matrices_tgt, n, device, "stain_matrices_tgt")
    max_target = _as_max_concentrations(max_conc_tgt, n, device, "max_conc_tgt")
    concentrations = _nonnegative_lasso(_od_from_table(batch, _LOSSLESS_OD_TABLE), source, concentration_lambda)
    scale = _concentration_scale(concentrations, max_target)
    return restore(_lossless_rgb((target * scale.unsqueeze(1)) @ concentrations, batch.shape))


# --------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------


class StainAugmentor:
    """Random stain jitter: each image's concentrations of each stain become
    ``a * C + b`` with ``a ~ U(1 - sigma1, 1 + sigma1)`` and
    ``b ~ U(-sigma2, sigma2)``, recombined with the image's own stain matrix
    (torchstain's MacenkoAugmentor, batched; Tellez et al. 2018 in HED space).

    ``method`` picks the stain estimator ("macenko" or "vahadane"). Draws come
    from a CPU ``torch.Generator`` seeded with ``seed``, so a run is
    reproducible whatever device the images are on.
    """

    METHODS = {"macenko": MacenkoNormalizer, "vahadane": VahadaneNormalizer}

    def __init__(self, sigma1: float = 0.2, sigma2: float = 0.2, method: str = "macenko", seed: Optional[int] = None) -> None:
        if method not in self.METHODS:
            raise ValueError(f"unknown stain method {method!r}; expected one of {sorted(self.METHODS)}")
        if sigma1 < 0 or sigma2 < 0:
            raise ValueError(f"sigma1 and sigma2 must be non-negative, got {sigma1}, {sigma2}")
        self.sigma1, self.sigma2, self.method = sigma1, sigma2, method
        self.stain_model = self.METHODS[method]()
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def __call__(self, images: Images) -> Images:
        batch, restore = _as_uint8_batch(images)
        n, device = batch.shape[0], batch.device
        od, stain_matrices = self.stain_model._od_and_stain_matrices(batch)
        concentrations = self.stain_model._concentrations(od, stain_matrices)
        scale = (1 + self.sigma1 * (2 * torch.rand(n, 2, generator=self.generator) - 1)).to(device)
        shift = (self.sigma2 * (2 * torch.rand(n, 2, generator=self.generator) - 1)).to(device)
        # W (scale * C + shift) computed as (W scale) C + W shift: one pass over the pixels.
        od = (stain_matrices * scale.unsqueeze(1)) @ concentrations + stain_matrices @ shift.unsqueeze(-1)
        return restore(self.stain_model._to_rgb(od, batch.shape))
