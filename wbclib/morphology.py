"""Hand-crafted leukocyte morphology and the hybrid-rescue paper's biological
filters (Nguyen et al., WBCBench 2026, section 2.4).

* :func:`morphology_features` measures a cell from its nucleus and cell masks:
  areas, nucleus-to-cytoplasm ratio, contour spikiness, nuclear staining,
  nucleus eccentricity and lobe count.
* :func:`kmeans_masks` is the paper's K-means (K = 2) pixel clustering of the
  isolated cell, so the same features can come from it or from
  :mod:`wbclib.segment`'s masks.
* :class:`MahalanobisFilter` is the paper's class-conditional Mahalanobis
  check: a candidate keeps a rare-class prediction only if its feature vector
  lies within a threshold chosen on validation data.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from scipy.spatial import ConvexHull, QhullError
from skimage.measure import find_contours
from skimage.morphology import h_maxima

from . import _io, cluster, data
from ._parallel import chunks, map_in_processes
from .segment import (SegmentationResult, background_rgb, hematoxylin_od, mask_bbox, nucleus_stain, optical_density,
                      segment_cell)

FEATURES = ("nucleus_area", "cell_area", "nc_ratio", "nucleus_fraction", "spikiness",
            "staining_intensity", "nucleus_offset", "lobe_count")

#: The paper's vector V for the plasma-cell check: N:C ratio, staining
#: intensity, centroid offset. The N:C ratio enters as nucleus / cell, which is
#: bounded, because nucleus / cytoplasm explodes for cells with almost no
#: visible cytoplasm (small lymphocytes) and one such outlier would dominate a
#: covariance matrix.
PAPER_FEATURES = ("nucleus_fraction", "staining_intensity", "nucleus_offset")

#: A distance-transform peak is a separate lobe when it rises this fraction of
#: the nucleus' thickest half-width above the saddle joining it to an equal or
#: higher peak. On zheng1's expert masks 0.2 gives mean lobe counts neutrophil
#: 2.45, eosinophil 2.0, lymphocyte 1.0, monocyte 1.06; 0.15 counts more
#: neutrophil lobes (2.61) but also more bumps of ragged segmented outlines.
LOBE_PEAK_HEIGHT = 0.2
#: kmeans_masks fits its two clusters on at most this many of a cell's pixels
#: (drawn at random, seeded), then labels every pixel by its nearest centre.
KMEANS_MAX_FIT = 20000
#: Nuclear fragments below this fraction of the nucleus area are ignored.
MIN_FRAGMENT_FRACTION = 0.05


def _contour(mask: np.ndarray) -> Optional[np.ndarray]:
    """The outer contour (N, 2) of the largest component of ``mask``."""
    if not mask.any():
        return None
    labels, n = ndi.label(mask)
    largest = labels == 1 + int(np.argmax(np.bincount(labels.ravel(), minlength=n + 1)[1:]))
    # pad so that cells touching the border still give closed contours
    contours = find_contours(np.pad(largest, 1).astype(float), 0.5)
    return max(contours, key=len) if contours else None


def _polygon_area(points: np.ndarray) -> float:
    y, x = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def spikiness(cell_mask: np.ndarray) -> float:
    """Solidity deficit of the cell contour: ``1 - area / convex hull area``.

    It is 0 for every convex outline, round or elongated, and grows with the
    number and depth of the indentations between protrusions, which is what a
    spiky or villous membrane (the hybrid-rescue paper's prolymphocyte cue)
    adds to an otherwise smooth, convex leukocyte. Unlike the spread of radial
    distances it does not mistake an oval cell for a spiky one, and unlike
    curvature sign changes it does not count pixel staircase noise. Measured
    on the subpixel contour; NaN for an empty mask.
    """
    contour = _contour(np.asarray(cell_mask, bool))
    if contour is None or len(contour) < 4:
        return float("nan")
    try:
        hull_area = ConvexHull(contour).volume  # in 2-D, "volume" is the area
    except QhullError:
        return float("nan")  # degenerate (collinear) outline
    return float(1.0 - _polygon_area(contour) / hull_area) if hull_area > 0 else float("nan")


def lobe_count(nucleus_mask: np.ndarray, peak_height: float = LOBE_PEAK_HEIGHT) -> int:
    """Number of nuclear lobes: distance-transform peaks of each nuclear
    fragment whose dynamic (rise above the highest saddle joining them to an
    equal or higher peak) is at least ``peak_height`` of the fragment's
    largest half-width.

    Lobes joined by a thin chromatin bridge have a deep saddle between their
    peaks; a round, oval or kidney-shaped nucleus has one peak, or twin peaks
    across a shallow waist, which count once.
    """
    labels, n = ndi.label(np.asarray(nucleus_mask, bool))
    if n == 0:
        return 0
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    count = 0
    for fragment in 1 + np.flatnonzero(areas >= MIN_FRAGMENT_FRACTION * areas.sum()):
        dist = ndi.distance_transform_edt(np.pad(labels == fragment, 1))
        h = max(1.0, peak_height * dist.max())
        # h_maxima keeps every peak of dynamic >= h but also both of two
        # equal-height twins however shallow the saddle between them, so
        # peaks are accepted highest first and a peak that reaches an
        # accepted one without dropping h below its own height is the same lobe
        peaks, n_peaks = ndi.label(h_maxima(dist, h))
        heights = np.asarray(ndi.maximum(dist, peaks, range(1, n_peaks + 1)))
        accepted = []
        for i in np.argsort(-heights, kind="stable"):
            level_set, _ = ndi.label(dist > heights[i] - h)
            reach = level_set[peaks == i + 1][0]
            if all(level_set[peaks == j + 1][0] != reach for j in accepted):
                accepted.append(i)
        count += len(accepted)
    return count


def morphology_features(image: np.ndarray, nucleus_mask: np.ndarray, cell_mask: np.ndarray) -> Dict[str, float]:
    """Morphology of one cell, areas in pixels:

    * ``nc_ratio``: nucleus area / cytoplasm area (cell minus nucleus);
      infinite when no cytoplasm is visible. ``nucleus_fraction``: nucleus
      area / cell area, the bounded form.
    * ``spikiness``: see :func:`spikiness`.
    * ``staining_intensity``: mean hematoxylin OD in the nucleus
      (:func:`wbclib.segment.hematoxylin_od`).
    * ``nucleus_offset``: distance between the nucleus and cell centroids over
      the cell's equivalent radius: 0 for a centred nucleus, 0.5 for a
      nucleus of half the cell's radius touching its rim (plasma-cell-like).
    * ``lobe_count``: see :func:`lobe_count`.

    Undefined features (empty masks) are NaN.
    """
    nucleus = np.asarray(nucleus_mask, bool)
    cell = np.asarray(cell_mask, bool) | nucleus
    nucleus_area, cell_area = int(nucleus.sum()), int(cell.sum())
    cytoplasm_area = cell_area - nucleus_area
    nan = float("nan")
    if nucleus_area:
        nc_ratio = nucleus_area / cytoplasm_area if cytoplasm_area else float("inf")
        offset = np.hypot(*(np.array(ndi.center_of_mass(nucleus)) - np.array(ndi.center_of_mass(cell))))
        staining = float(hematoxylin_od(image)[nucleus].mean())
    else:
        nc_ratio = offset = staining = nan
    return {
        "nucleus_area": float(nucleus_area),
        "cell_area": float(cell_area),
        "nc_ratio": float(nc_ratio),
        "nucleus_fraction": nucleus_area / cell_area if cell_area else nan,
        "spikiness": spikiness(cell),
        "staining_intensity": staining,
        "nucleus_offset": float(offset / math.sqrt(cell_area / math.pi)) if nucleus_area else nan,
        "lobe_count": float(lobe_count(nucleus)),
    }


def kmeans_masks(image: np.ndarray, k: int = 2, seed: int = 0, cell_mask: Optional[np.ndarray] = None) -> SegmentationResult:
    """The paper's nucleus extraction: K-means (K = 2) clustering of the
    pixels of the isolated cell, the cluster with the highest nucleus score
    being the nucleus.

    The paper isolates the cell with CellPose first; ``cell_mask`` takes that
    mask, and defaults to :func:`wbclib.segment.segment_cell`'s cell. Pixels
    are clustered on background-relative optical density. Unlike the
    segmenter's Otsu threshold on a purpose-built nucleus score, nothing stops
    dark granules or a pale nucleus from landing in the wrong cluster: that is
    the difference the two feature sources expose.
    """
    if k < 2:
        raise ValueError(f"k must be at least 2, got {k}")
    cell = segment_cell(image).cell if cell_mask is None else np.asarray(cell_mask, bool)
    nucleus = np.zeros_like(cell)
    if cell.sum() >= k:
        od = optical_density(image, background_rgb(image))[cell]
        clusters = cluster.kmeans(od, k, seed=seed, max_fit=KMEANS_MAX_FIT)[0]
        scores = nucleus_stain(od)
        means = [scores[clusters == c].mean() if (clusters == c).any() else -np.inf for c in range(k)]
        nucleus[cell] = clusters == int(np.argmax(means))
    return SegmentationResult(nucleus=nucleus, cell=cell, bbox=mask_bbox(cell))


ImageLike = Union[np.ndarray, str, Path]


def features_table(images: Iterable[ImageLike], labels: Sequence, source: str = "masks",
                   masks: Optional[Sequence] = None, backend: str = "classical") -> pd.DataFrame:
    """One row of :data:`FEATURES` per image, with its ``label``.

    ``images`` are RGB arrays or image paths; ``masks`` optional (nucleus,
    cell) pairs, e.g. zheng1's expert masks. ``source="masks"`` measures those
    masks, or without them :func:`wbclib.segment.segment_cell`'s
    (``backend``); ``source="kmeans"`` measures :func:`kmeans_masks`' nucleus
    inside the given cell masks, or inside the segmenter's cells.
    """
    if source not in ("masks", "kmeans"):
        raise ValueError(f"unknown source {source!r}; use 'masks' or 'kmeans'")
    labels = list(labels)
    rows = []
    for i, item in enumerate(images):
        image = item if isinstance(item, np.ndarray) else data.load_image(item)
        if masks is not None:
            nucleus, cell = masks[i]
        else:
            result = segment_cell(image, backend=backend)
            nucleus, cell = result.nucleus, result.cell
        if source == "kmeans":
            nucleus = kmeans_masks(image, cell_mask=cell).nucleus
        rows.append(morphology_features(image, nucleus, cell))
    if len(rows) != len(labels):
        raise ValueError(f"{len(rows)} images but {len(labels)} labels")
    table = pd.DataFrame(rows, columns=list(FEATURES))
    table.insert(0, "label", labels)
    return table


class MahalanobisFilter:
    """Class-conditional Mahalanobis distance with shrunk covariances.

    ``shrinkage="ledoit-wolf"`` picks the shrinkage per class (Ledoit & Wolf
    2004); a number in [0, 1] blends each class covariance with a scaled
    identity by that much. Features are standardised with the training set's
    overall mean and spread first: shrinking towards the identity only makes
    sense when the features share a scale (areas are ~1e4, ratios ~0.5).
    Rows with a NaN are left out of fitting and get a NaN distance.
    """

    def __init__(self, shrinkage: Union[str, float] = "ledoit-wolf"):
        if shrinkage != "ledoit-wolf" and not (isinstance(shrinkage, (int, float)) and 0 <= shrinkage <= 1):
            raise ValueError(f"shrinkage must be 'ledoit-wolf' or a number in [0, 1], got {shrinkage!r}")
        self.shrinkage = shrinkage
        self.means_: Dict[object, np.ndarray] = {}
        self.precisions_: Dict[object, np.ndarray] = {}
        self.thresholds_: Dict[object, float] = {}

    @staticmethod
    def _matrix(features) -> np.ndarray:
        x = np.asarray(features, dtype=float)
        return x[:, None] if x.ndim == 1 else x

    def fit(self, features, labels) -> "MahalanobisFilter":
        """Estimate each class's mean and covariance; classes with fewer than
        two complete rows are skipped (see ``classes_``)."""
        from sklearn.covariance import LedoitWolf

        x = self._matrix(features)
        y = np.asarray(labels)
        if len(x) != len(y):
            raise ValueError(f"{len(x)} feature rows but {len(y)} labels")
        keep = np.isfinite(x).all(1)
        x, y = x[keep], y[keep]
        self.center_ = x.mean(0)
        self.scale_ = np.where(x.std(0) > 0, x.std(0), 1.0)
        z = (x - self.center_) / self.scale_
        self.means_, self.precisions_, self.thresholds_ = {}, {}, {}
        for cls in np.unique(y):
            zc = z[y == cls]
            if len(zc) < 2:
                continue
            if self.shrinkage == "ledoit-wolf":
                cov = LedoitWolf().fit(zc).covariance_
            else:
                sample = np.cov(zc, rowvar=False).reshape(z.shape[1], z.shape[1])
                target = np.trace(sample) / len(sample) * np.eye(len(sample))
                cov = (1 - self.shrinkage) * sample + self.shrinkage * target
            self.means_[cls] = zc.mean(0)
            self.precisions_[cls] = np.linalg.pinv(cov)
        return self

    @property
    def classes_(self) -> list:
        return list(self.means_)

    def distance(self, features, cls) -> np.ndarray:
        """Mahalanobis distance of each row to class ``cls``."""
        if cls not in self.means_:
            raise KeyError(f"class {cls!r} was not fitted (fewer than two training rows?); fitted: {self.classes_}")
        z = (self._matrix(features) - self.center_) / self.scale_ - self.means_[cls]
        return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", z, self.precisions_[cls], z), 0.0))

    def choose_threshold(self, val_features, val_labels, cls, target_recall: float = 0.95) -> float:
        """Smallest distance that accepts ``target_recall`` of the validation
        rows of class ``cls``; stored in ``thresholds_`` for :meth:`accepts`."""
        d = self.distance(val_features, cls)[np.asarray(val_labels) == cls]
        d = d[np.isfinite(d)]
        if d.size == 0:
            raise ValueError(f"no complete validation rows of class {cls!r}")
        threshold = float(np.quantile(d, target_recall, method="higher"))
        self.thresholds_[cls] = threshold
        return threshold

    def accepts(self, features, cls) -> np.ndarray:
        """The paper's rule: keep class ``cls`` where the distance is within
        the chosen threshold."""
        if cls not in self.thresholds_:
            raise KeyError(f"no threshold for class {cls!r}; call choose_threshold first")
        return self.distance(features, cls) <= self.thresholds_[cls]


def class_separation(table: pd.DataFrame, feature: str = "spikiness", label: str = "label",
                     pairs: Optional[Sequence[tuple]] = None) -> pd.DataFrame:
    """How well one feature separates classes: each class against the rest
    (default) or each ``(a, b)`` pair.

    Columns: ``n_a``, ``n_b``, ``mean_a``, ``mean_b``, ``auc`` = P(a's value >
    b's) + P(tie) / 2 (the Mann-Whitney U statistic over n_a n_b: 0.5 is no
    separation, 1 or 0 perfect), its two-sided ``p_value``, and Hedges' ``g``
    (standardised mean difference with the small-sample correction). Rows
    with a NaN feature are left out.
    """
    from scipy.stats import mannwhitneyu

    values = table[[label, feature]].dropna()
    if pairs is None:
        groups = [(str(c), values[feature][values[label] == c], values[feature][values[label] != c], f"{c} vs rest")
                  for c in sorted(values[label].unique())]
    else:
        groups = [(str(a), values[feature][values[label] == a], values[feature][values[label] == b], f"{a} vs {b}")
                  for a, b in pairs]
    rows = []
    for _, xa, xb, name in groups:
        xa, xb = np.asarray(xa, float), np.asarray(xb, float)
        na, nb = len(xa), len(xb)
        if na == 0 or nb == 0:
            rows.append((name, na, nb, np.nan, np.nan, np.nan, np.nan, np.nan))
            continue
        u, p = mannwhitneyu(xa, xb, alternative="two-sided")
        pooled = math.sqrt(((na - 1) * xa.var(ddof=1 if na > 1 else 0) + (nb - 1) * xb.var(ddof=1 if nb > 1 else 0))
                           / max(na + nb - 2, 1))
        d = (xa.mean() - xb.mean()) / pooled if pooled > 0 else np.nan
        g = d * (1 - 3 / (4 * (na + nb) - 9)) if na + nb > 2 else np.nan
        rows.append((name, na, nb, xa.mean(), xb.mean(), u / (na * nb), p, g))
    return pd.DataFrame(rows, columns=["comparison", "n_a", "n_b", "mean_a", "mean_b", "auc", "p_value", "hedges_g"]
                        ).set_index("comparison")


#: Longer side (px) images are shrunk to before :func:`cell_morphology`: a pbc
#: leukocyte (~140 px across at 360 px) then measures ~75 px, like zheng1's
#: cells, which the segmenter was tuned on; it is also ~5x faster.
MORPHOLOGY_MAX_SIDE = 192


def cell_morphology(image: np.ndarray, max_side: Optional[int] = MORPHOLOGY_MAX_SIDE,
                    backend: str = "classical", model_path=None) -> Dict[str, float]:
    """Both feature sets of one image's primary cell: :data:`FEATURES` of the
    segmenter's nucleus and cell masks, and the same with the nucleus from
    :func:`kmeans_masks` (K = 2) inside that cell, prefixed ``km_``.

    Images whose longer side exceeds ``max_side`` are resized first (bilinear)
    so every lab's cells are measured at a similar size; areas are in pixels
    of the resized image, the other features do not depend on size.
    """
    from PIL import Image

    image = np.asarray(image)
    h, w = image.shape[:2]
    if max_side is not None and max(h, w) > max_side:
        f = max_side / max(h, w)
        image = np.asarray(Image.fromarray(image).resize((max(1, round(w * f)), max(1, round(h * f))), Image.BILINEAR))
    result = segment_cell(image, backend=backend, model_path=model_path)
    out = morphology_features(image, result.nucleus, result.cell)
    km = kmeans_masks(image, cell_mask=result.cell)
    out.update({f"km_{k}": v for k, v in morphology_features(image, km.nucleus, result.cell).items()})
    return out


def _degraded_image(root: Path, row) -> np.ndarray:
    from .degrade import degrade, image_rng

    image = data.load_image(Path(root) / row.path)
    kind, level = getattr(row, "degradation", None), int(getattr(row, "severity", 0) or 0)
    if isinstance(kind, str) and kind not in ("", "none") and level > 0:
        image = degrade(image, kind, level, image_rng(row.path, 0))
    return image


#: Rows per job when :class:`MorphologyCache` measures side by side.
_MEASURE_CHUNK = 32


class MorphologyCache:
    """:func:`wbclib.morphology.cell_morphology` of table rows (path,
    degradation, severity: the image as the classifier saw it at native
    resolution), measured once and kept in a CSV file (``None``: memory only).
    Call it with a table to get its rows' features in order.

    A row's key holds its file's size and modification time, so an edited or
    replaced image is measured again; :meth:`in_cache` names the file by the
    data root and the code that measures, and the file is rewritten
    atomically whenever rows are added."""

    VERSION = "v2"
    #: The modules whose code decides the measurements.
    MODULES = ("morphology.py", "segment.py", "degrade.py", "data.py", "cluster.py")

    def __init__(self, root: Union[str, Path], path: Optional[Union[str, Path]] = None):
        self.root = Path(root)
        self.path = Path(path) if path is not None else None
        self.max_side = MORPHOLOGY_MAX_SIDE
        self.rows: Dict[str, dict] = {}
        if self.path is not None and self.path.is_file():
            for rec in _io.read_csv(self.path).to_dict("records"):
                self.rows[rec.pop("key")] = rec

    @classmethod
    def in_cache(cls, root: Union[str, Path], cache_dir: Union[str, Path]) -> "MorphologyCache":
        """The cache file of ``root``'s measurements under ``cache_dir``."""
        from . import cache

        entry = cache.entry(cache_dir, "morphology", dict(version=cls.VERSION, max_side=MORPHOLOGY_MAX_SIDE),
                            dict(root=str(Path(root).resolve())), modules=cls.MODULES, suffix=".csv")
        return cls(root, entry.path)

    def key(self, row) -> str:
        kind = getattr(row, "degradation", "none")
        kind = kind if isinstance(kind, str) else "none"
        try:
            st = (self.root / row.path).stat()
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        return f"{row.path}|{stamp}|{kind}|{int(getattr(row, 'severity', 0) or 0)}"

    def __call__(self, table: pd.DataFrame) -> pd.DataFrame:
        keys, missing = [], {}
        for row in table.itertuples(index=False):
            k = self.key(row)
            keys.append(k)
            if k not in self.rows and k not in missing:
                missing[k] = row
        # Each row's measurement is a function of its image alone: chunks run side by side.
        new, rows = list(missing), list(missing.values())
        jobs = [(piece,) for piece in chunks(rows, _MEASURE_CHUNK)]
        for k, measured in zip(new, (m for part in map_in_processes(self._measure, jobs, desc="morphology")
                                     for m in part)):
            self.rows[k] = measured
        if new and self.path is not None:
            _io.write_csv(self.path, pd.DataFrame([dict(key=k, **v) for k, v in self.rows.items()]))
        return pd.DataFrame([self.rows[k] for k in keys]).reset_index(drop=True)

    def _measure(self, rows: Sequence) -> List[dict]:
        return [cell_morphology(_degraded_image(self.root, row), max_side=self.max_side) for row in rows]
