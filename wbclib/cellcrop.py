"""Cell-centred inputs: find each image's leukocyte, then crop a square around
it whose side makes the cell fill one common share of the input.

The labs frame their cells differently (pbc: a 360 px field with the cell in
about a third of it among red cells; zheng1: tight 120 px crops; bccd: crops of
every size), and resizing the whole image to the network's input size keeps
those differences. Here every image is cropped around its own cell:

* :func:`locate_cell` finds the cell cheaply with OpenCV on a copy shrunk to
  :data:`WORK_SIDE` px: optical density against the slide's own background, the
  nucleus score of :mod:`segment` (``od_red + od_green - 0.5 od_blue``)
  thresholded by Otsu, lobes merged by a closing, the component with the most
  stain weighted by centrality kept as the nucleus. Stained pixels are those
  whose total OD exceeds 0.6 of the Otsu threshold of the non-nuclear pixels;
  the largest disc of stained pixels centred in or next to the nucleus (the
  maximum of their distance transform) seeds the cell, which is the stained
  blob around it once necks thinner than its radius are opened away, within
  1.5 radii: a red cell touching the leukocyte through a neck does not
  inflate it. The box is that blob's bounding square (nucleus included).
  Where no nucleus is found, :func:`fallback_box` gives the image centre and
  a fixed share of the shorter side for the image's lab
  (:data:`LAB_CELL_SHARE`, the lab read from the path): a function of the
  image alone, never of the other images loaded with it.
* :func:`crop_square` / :func:`centre_on_cell` cut a square around the cell
  whose side is ``cell side / ratio``, padding by reflection where the square
  leaves the image, so the cell covers the same share of every input; the
  loader (:class:`models.ImageTable`, column ``cell_crop``) then resizes it.

:data:`COMMON_RATIO` is the one cell-to-crop side ratio used for every lab:
the median of the three labs' median native ratios (zheng1's, whose cells
are also the ones checked against expert masks). pbc fields are cropped in,
zheng1 is nearly unchanged and bccd's tight crops are padded out a little. The
largest lab median (bccd, 0.82) was not taken: the located side is within
0.73-1.04 of the classical segmenter's on 90 % of pbc images, and at 0.82 a box a quarter
too small would cut the cell off. :func:`ratio_table` re-measures it
(chapter 01 reports the per-lab ratios before and after).

Degradations are applied to the whole native image *before* the crop (as an
acquisition would: the crop is a processing step after it), and the box is
located on the image as the model gets it, the degraded one, never on its
pristine twin (which no deployed system has): the loader
(:class:`models.ImageTable`) locates each row's box on the row's degraded
image and caches the boxes per (path, degradation, severity, degrade seed)
(a pristine row keeps its path-only key); the system's scale stage
(:class:`pipeline.ScaleNormalization`) locates on the image it receives.
Degradations are seeded per image and localisation is deterministic, so the
boxes are too.

This module is pure (arrays and tables in, arrays and tables out); the cached
per-image box table lives with the loader (``wbclib._cellboxes``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from .data import load_image

#: Images are localised on a copy whose longer side is this many pixels.
WORK_SIDE = 128
#: Bump when the localisation rule changes (part of the box cache key).
LOCATE_VERSION = 2
#: Nucleus components smaller than this share of the image are specks.
MIN_NUCLEUS = 0.004
#: The nucleus score's weights on the OD of (red, green, blue).
STAIN_WEIGHTS = (1.0, 1.0, -0.5)
#: Stained (cell or red cell) pixels: total OD above this share of the Otsu
#: threshold of the non-nuclear pixels (as :class:`segment.ClassicalParams`' ``foreground_fraction``).
STAINED_FRACTION = 0.6
#: The cell extends at most this many inscribed-disc radii from the disc's centre.
CELL_REACH = 1.5
#: Cell side / crop side for every lab: :func:`common_ratio` of a
#: :func:`ratio_table` of 300 images per lab (``sample(300, random_state=0)``
#: of each lab's manifest): lab medians pbc 0.425, zheng1 0.650, bccd 0.820.
COMMON_RATIO = 0.65


@dataclass(frozen=True)
class CellBox:
    """A located cell: centre ``(cx, cy)`` and ``side`` (cell diameter) in
    native pixels; ``found`` is False for the image-centre fallback."""

    cx: float
    cy: float
    side: float
    found: bool


def _odd(n: float) -> int:
    n = max(1, int(round(n)))
    return n if n % 2 else n + 1


def locate_cell(image: np.ndarray) -> CellBox:
    """Centre and diameter of the primary leukocyte of ``image`` (RGB uint8).

    A failed localisation returns the image centre, a side of half the shorter
    image side and ``found=False`` (callers then use :func:`fallback_box`)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {image.shape}")
    h, w = image.shape[:2]
    fallback = CellBox(w / 2, h / 2, min(h, w) / 2, False)
    s = WORK_SIDE / max(h, w)
    small = cv2.resize(image, (max(8, round(w * s)), max(8, round(h * s))), interpolation=cv2.INTER_AREA) \
        if s < 1 else image
    s = small.shape[1] / w
    sh, sw = small.shape[:2]
    pixels = small.reshape(-1, 3).astype(np.float32)
    brightness = pixels.sum(1)
    background = np.median(pixels[brightness >= np.percentile(brightness, 85)], axis=0)
    od = -np.log10(np.clip((small.astype(np.float32) + 1) / (background + 1), 1e-3, 1.0))
    od = cv2.GaussianBlur(od, (3, 3), 0)
    score = od @ np.asarray(STAIN_WEIGHTS, np.float32)
    if float(score.max() - score.min()) < 1e-4:
        return fallback
    scaled = cv2.normalize(score, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    t, nuclear = cv2.threshold(scaled, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    side = min(sh, sw)
    close = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (_odd(0.06 * side),) * 2)
    nuclear = cv2.morphologyEx(cv2.morphologyEx(nuclear, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8)),
                               cv2.MORPH_CLOSE, close)
    n, labels, stats, centroids = cv2.connectedComponentsWithStats(nuclear, connectivity=8)
    if n <= 1:
        return fallback
    areas = stats[1:, cv2.CC_STAT_AREA].astype(float)
    mass = np.bincount(labels.ravel(), weights=scaled.ravel().astype(float), minlength=n)[1:]
    offset = np.hypot(centroids[1:, 0] - sw / 2, centroids[1:, 1] - sh / 2) / np.hypot(sw / 2, sh / 2)
    merit = np.where(areas >= MIN_NUCLEUS * sh * sw, mass * (1 - offset) ** 2, -1)
    if merit.max() <= 0:
        return fallback
    nucleus = (labels == 1 + int(np.argmax(merit))).astype(np.uint8)
    total = od.sum(-1)
    rest = total[scaled <= t]  # background, red cells, cytoplasm: everything but chromatin
    span = float(rest.max() - rest.min()) if rest.size else 0.0
    level = 0.0
    if span > 1e-6:
        t_rest, _ = cv2.threshold(((rest - rest.min()) / span * 255).astype(np.uint8).reshape(1, -1), 0, 255,
                                  cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        level = STAINED_FRACTION * (rest.min() + t_rest / 255 * span)
    stained = ((total > level) | nucleus.astype(bool)).astype(np.uint8)
    # the image border is background too: a cell cut by it is measured by what is visible
    stained = cv2.copyMakeBorder(stained, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    distance = cv2.distanceTransform(stained, cv2.DIST_L2, 5)[1:-1, 1:-1]
    near = cv2.dilate(nucleus, close) > 0
    inside = np.where(near, distance, -1)
    y, x = np.unravel_index(int(np.argmax(inside)), inside.shape)
    radius = float(inside[y, x])
    # the cell's extent: the stained blob around that disc once necks thinner than
    # its radius are opened away, within 1.5 radii of its centre, nucleus included
    cut = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (_odd(radius),) * 2)
    body = cv2.morphologyEx(stained[1:-1, 1:-1], cv2.MORPH_OPEN, cut)
    _, blobs = cv2.connectedComponents(body, connectivity=8)
    reach = np.zeros_like(body)
    cv2.circle(reach, (int(x), int(y)), int(round(CELL_REACH * radius)), 1, -1)
    cell = (((blobs == blobs[y, x]) & (blobs[y, x] > 0)) | nucleus.astype(bool)) & reach.astype(bool)
    ys, xs = np.nonzero(cell | nucleus.astype(bool))
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    cell_side = max(x1 - x0, y1 - y0, 2 * radius)
    return CellBox((x0 + x1) / 2 / s, (y0 + y1) / 2 / s, float(cell_side) / s, True)


#: A lab's median located cell side / shorter image side (the :func:`ratio_table`
#: that set :data:`COMMON_RATIO`): the size of the fallback box of an image of
#: that lab whose cell is not found (:func:`fallback_box`).
LAB_CELL_SHARE = {"pbc": 0.425, "zheng1": 0.650, "bccd": 0.820}


def lab_of(path: str) -> str:
    """The lab of a benchmark image: the first component of its path relative
    to the data root (``"pbc/neutrophil/x.jpg"`` -> ``"pbc"``)."""
    parts = Path(str(path)).parts
    return parts[0] if parts else ""


def fallback_box(width: int, height: int, lab: str = "") -> CellBox:
    """The box of an image whose cell is not found: the image centre, with a
    side of ``lab``'s :data:`LAB_CELL_SHARE` of the shorter image side; for an
    unknown lab :data:`COMMON_RATIO` of it, so :func:`centre_on_cell` at the
    common ratio keeps the centred square of the shorter side (the whole image
    when it is square). A fixed function of the image, whatever else is loaded
    with it (``found`` False). The system's scale stage
    (:class:`pipeline.ScaleNormalization`), which is given no lab, keeps such
    an image whole instead (for a square image the same as the unknown-lab
    rule here)."""
    share = LAB_CELL_SHARE.get(lab, COMMON_RATIO)
    return CellBox(width / 2, height / 2, share * min(width, height), False)


def crop_square(image: np.ndarray, cx: float, cy: float, side: float) -> np.ndarray:
    """The ``side`` x ``side`` square centred on ``(cx, cy)`` (native pixels),
    padded by reflection (``BORDER_REFLECT_101``) where it leaves the image."""
    side = max(1, int(round(side)))
    h, w = image.shape[:2]
    x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
    x1, y1 = x0 + side, y0 + side
    pad = max(0, -x0, -y0, x1 - w, y1 - h)
    if pad:
        # reflection of a reflection for squares more than twice the image: repeat until it fits
        padded = image
        while pad > 0:
            step = min(pad, min(padded.shape[:2]) - 1)
            padded = cv2.copyMakeBorder(padded, step, step, step, step, cv2.BORDER_REFLECT_101)
            x0, y0, x1, y1, pad = x0 + step, y0 + step, x1 + step, y1 + step, pad - step
        image = padded
    return np.ascontiguousarray(image[y0:y1, x0:x1])


def centre_on_cell(image: np.ndarray, cx: float, cy: float, cell_side: float, ratio: float = COMMON_RATIO) -> np.ndarray:
    """The square around the cell in which it fills ``ratio`` of the side."""
    if not 0 < ratio <= 1:
        raise ValueError(f"cell-to-crop ratio must be in (0, 1], got {ratio}")
    return crop_square(image, cx, cy, cell_side / ratio)


def ratio_table(table: pd.DataFrame, root: Path, ratio: float = COMMON_RATIO) -> pd.DataFrame:
    """Per image (``path``, ``lab``): the box (``cx``, ``cy``, ``side``;
    :func:`fallback_box` where the cell is not found), the native
    cell-to-image ratio ``before`` (cell side / shorter image side), the ratio
    ``after`` :func:`centre_on_cell` (re-located on the crop) and whether the
    cell was ``found``. Located here, on the pristine images, uncached."""
    rows = []
    for rel, lab in zip(table["path"], table["lab"]):
        image = load_image(Path(root) / rel)
        h, w = image.shape[:2]
        b = locate_cell(image)
        if not b.found:
            b = fallback_box(w, h, lab_of(rel))
        crop = centre_on_cell(image, b.cx, b.cy, b.side, ratio)
        after = locate_cell(crop)
        rows.append(dict(path=rel, lab=lab, found=bool(b.found), cx=round(b.cx, 2), cy=round(b.cy, 2),
                         side=round(b.side, 2), before=float(b.side / min(w, h)),
                         after=float(after.side / min(crop.shape[:2])) if after.found else np.nan))
    return pd.DataFrame(rows)


def lab_sample(manifest: pd.DataFrame, per_lab: int, seed: int = 0) -> pd.DataFrame:
    """Up to ``per_lab`` random rows of each lab (how :data:`COMMON_RATIO` was measured)."""
    return pd.concat([rows.sample(min(per_lab, len(rows)), random_state=seed)
                      for _, rows in manifest.groupby("lab")], ignore_index=True)


def summarize_ratios(ratios: pd.DataFrame) -> pd.DataFrame:
    """Per lab: images, share located, median cell-to-input ratio before and after the crop."""
    return ratios.groupby("lab").agg(images=("path", "size"), located=("found", "mean"),
                                     before=("before", "median"), after=("after", "median")).round(3).reset_index()


def common_ratio(ratios: pd.DataFrame) -> float:
    """The common ratio from a :func:`ratio_table`: the median over labs of
    each lab's median native ratio among located cells."""
    return float(ratios[ratios["found"]].groupby("lab")["before"].median().median())
