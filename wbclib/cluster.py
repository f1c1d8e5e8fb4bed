"""The one k-means of the library: scikit-learn's, on one thread.

Two callers cluster small problems: :func:`wbclib.morphology.kmeans_masks`
splits a cell's pixels (about 10^4 optical densities, 3-D) into nucleus and
cytoplasm once per image, and :func:`wbclib.sada.pseudo_domains` groups a
batch's stain matrices (tens of 6-D points) into stain-colour clusters once
per training step. Each used its own hand-written Lloyd's algorithm (numpy
and torch); on one thread scikit-learn's Lloyd (Cython) measured 2.3x faster
than the numpy one on the pixel problem and 2.4x slower than the torch one
on the stain matrices (``bench/bench_filters.py`` prints both ratios), so it
wins where the library spends its k-means time: per image rather than per
training step.

scikit-learn parallelises over chunks of 256 points with OpenMP; for problems
this small the threads cost more than they save, and on a shared two-core
machine they made one call 10x slower, so calls run on one thread.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import numpy as np


@functools.lru_cache(maxsize=1)
def _thread_controller():
    from threadpoolctl import ThreadpoolController

    # Built once: it inspects the loaded native libraries, which costs milliseconds.
    return ThreadpoolController()


def kmeans(points: np.ndarray, k: int, seed: int = 0, n_init: int = 1, max_iter: int = 300,
           max_fit: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means with k-means++ seeding: labels (N,) int64 and centres (k, D) float.

    ``n_init`` restarts keep the lowest within-cluster sum of squares. With
    ``max_fit`` the centres are fitted on at most that many rows drawn at
    random (seeded) and every row is then labelled by its nearest centre.
    With no more points than clusters each point is its own cluster.
    Deterministic for a given ``seed``.
    """
    from sklearn.cluster import KMeans

    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2:
        raise ValueError(f"points must be (N, D), got shape {points.shape}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    n = len(points)
    if n <= k:
        return np.arange(n, dtype=np.int64), points.copy()
    rng = np.random.default_rng(seed)
    fit_on = points if max_fit is None or n <= max_fit else points[rng.choice(n, max_fit, replace=False)]
    model = KMeans(n_clusters=k, n_init=n_init, max_iter=max_iter, random_state=seed)
    with _thread_controller().limit(limits=1, user_api="openmp"):
        if fit_on is points:
            labels = model.fit_predict(points)
        else:
            labels = model.fit(fit_on).predict(points)
    return labels.astype(np.int64), model.cluster_centers_
