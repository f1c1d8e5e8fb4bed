"""Find the primary white blood cell: nucleus and whole-cell masks, a box for it
in a whole smear field, crops centred on it, and the scores that check all of
this against expert masks (zheng1) and expert boxes (bccd).

The classical back-end works in optical density (OD) measured against the
slide's own background colour, so the same rules hold for a yellow-background
rapid stain (zheng1), May-Grünwald-Giemsa on a CellaVision (pbc) and the
blurry BCCD photographs:

* nuclear chromatin absorbs red and green light strongly; haemoglobin absorbs
  blue (the Soret band), so ``od_red + od_green - 0.5 * od_blue`` is high on
  nuclei and low on red cells. An Otsu threshold of that score gives the
  nucleus; the component that is both large and central is the primary one.
* the cell is every stained pixel (total OD above a fraction of its own Otsu
  threshold) that a distance-transform watershed attaches to the nucleus; the
  watershed cuts touching objects at their necks.
* a red cell pressed flat against the leukocyte has no neck, so colour decides:
  blobs in the cell whose OD hue is nearer that of the stained matter outside
  the cell (red cells) than that of the ring just outside the nucleus
  (cytoplasm), and beyond 95% of that ring's own hues, are removed and the
  cell is grown again.

The parameters in :class:`ClassicalParams` were tuned on zheng1 images 1-100
and the first 100 bccd fields (by name); ``evaluate_zheng1`` and
``evaluate_bccd_localisation`` measure them on all images.
"""
from __future__ import annotations

import math
import time
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage as ndi
from skimage.color import hed_from_rgb
from skimage.filters import threshold_multiotsu, threshold_otsu
from skimage.morphology import disk, h_maxima
from skimage.segmentation import watershed
from skimage.transform import resize

from . import _io, data

PathLike = Union[str, Path]
#: (x0, y0, x1, y1) in pixels, end-exclusive.
Box = Tuple[int, int, int, int]

BACKENDS = ("classical", "cellpose")

CELLPOSE_TRAINING_HINT = (
    "train one first with wbclib.segment.train_cellpose(images, cell_masks, out_dir, epochs=...) "
    "(cellpose 3.1, from scratch, on background-relative optical density), or cross-validated on zheng1's "
    "expert masks with wbclib.protocols.segmentation.cellpose_kfold(results_dir, root, n_folds=5, epochs=...); full-length "
    "training wants a GPU. Then pass the saved model file as model_path=..."
)
#: The cellpose major version this back-end is written for (3.x: CPnet, ``train.train_seg``).
CELLPOSE_MAJOR = 3


class SegmentationError(RuntimeError):
    """A segmentation back-end cannot run; the message says what to do."""


@dataclass(frozen=True)
class SegmentationResult:
    """Boolean (H, W) masks of the primary WBC and its box.

    ``cell`` contains ``nucleus``. When no nucleus is found both masks are
    empty and ``bbox`` is the whole image, so crops fall back to the image.
    """

    nucleus: np.ndarray
    cell: np.ndarray
    bbox: Box

    @property
    def found(self) -> bool:
        return bool(self.nucleus.any())


@dataclass(frozen=True)
class ClassicalParams:
    """Knobs of the classical segmenter; the defaults are the tuned values."""

    #: Gaussian smoothing of the OD image (px); removes JPEG and granule noise.
    smoothing_sigma: float = 1.0
    #: Background colour = median of the pixels brighter than this percentile.
    background_percentile: float = 85.0
    #: Weights of (red, green, blue) OD in the nucleus score.
    stain_weights: Tuple[float, float, float] = (1.0, 1.0, -0.5)
    #: Stained-matter threshold as a fraction of the Otsu threshold of total OD
    #: over non-nuclear pixels; below 1 so that pale cytoplasm is kept.
    foreground_fraction: float = 0.6
    #: Radius (px) of the openings that remove specks and thin bridges.
    open_radius: int = 2
    #: Minimum height (px) of a distance-transform peak that seeds its own
    #: watershed region, i.e. how deep a neck must be to split two objects.
    split_height: float = 2.0
    #: A watershed region joins the cell when the nucleus covers this fraction
    #: of it, or it covers ``min_nucleus_overlap`` of the nucleus.
    min_region_overlap: float = 0.1
    min_nucleus_overlap: float = 0.2
    #: Nuclear fragments smaller than this fraction of the primary one are
    #: granules, not lobes.
    min_lobe_fraction: float = 0.1
    #: No leukocyte in zheng1's expert masks has a nucleus above 0.74 of the
    #: cell; above this the threshold split cell from background (dark
    #: eosinophils) and is redone inside the cell.
    max_nucleus_fraction: float = 0.7
    #: Cytoplasm colour is sampled this far (fraction of the nucleus radius,
    #: at least 3 px) outside the nucleus.
    cytoplasm_ring: float = 0.3
    #: Colour exclusion needs this many reference pixels on each side and this
    #: much hue difference (OD chromaticity) between them.
    min_reference_pixels: int = 50
    min_colour_separation: float = 0.05
    #: A pixel is foreign when its hue is nearer the foreign than the cytoplasm
    #: reference and beyond this quantile of the cytoplasm reference's own
    #: hues; a blob must cover ``foreign_min_fraction`` of the cell to go.
    cytoplasm_quantile: float = 0.95
    foreign_min_fraction: float = 0.03


# --------------------------------------------------------------------------
# Stain maps
# --------------------------------------------------------------------------


def _check_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {image.shape}")
    return image


def background_rgb(image: np.ndarray, percentile: float = 85.0) -> np.ndarray:
    """The slide background colour: median RGB of the brightest pixels."""
    pixels = _check_rgb(image).reshape(-1, 3).astype(float)
    brightness = pixels.sum(1)
    return np.median(pixels[brightness >= np.percentile(brightness, percentile)], axis=0)


def optical_density(image: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Per-channel OD, log10(background / pixel), clipped at 0: (H, W, 3) float.

    Measuring against the slide's own background instead of pure white makes
    a yellow-background stain and a white one comparable.
    """
    ratio = (_check_rgb(image).astype(float) + 1.0) / (np.asarray(background, float) + 1.0)
    return -np.log10(np.clip(ratio, 1e-3, 1.0))


def hematoxylin_od(image: np.ndarray, percentile: float = 85.0) -> np.ndarray:
    """Hematoxylin (nuclear dye) OD by Ruifrok-Johnston colour deconvolution
    (``skimage.color.hed_from_rgb``) of the background-relative OD, >= 0."""
    od = optical_density(image, background_rgb(image, percentile))
    return np.maximum(od @ hed_from_rgb[:, 0], 0.0)


def nucleus_stain(od: np.ndarray, weights: Tuple[float, float, float] = ClassicalParams.stain_weights) -> np.ndarray:
    """Nucleus score from an OD image: high on chromatin, low on red cells."""
    return od @ np.asarray(weights, float)


# --------------------------------------------------------------------------
# Mask helpers
# --------------------------------------------------------------------------


def _open(mask: np.ndarray, radius: int) -> np.ndarray:
    return ndi.binary_opening(mask, disk(radius)) if radius > 0 else mask


def _areas(labels: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(labels.ravel(), minlength=n + 1)[1:]


def largest_central_component(mask: np.ndarray) -> np.ndarray:
    """The component with the best area x centrality: the primary object of a
    crop is big and near the middle; debris at the edge is neither."""
    labels, n = ndi.label(mask)
    if n == 0:
        return mask.copy()
    h, w = mask.shape
    centres = np.array(ndi.center_of_mass(mask, labels, range(1, n + 1))).reshape(-1, 2)
    offset = np.hypot(centres[:, 0] - h / 2, centres[:, 1] - w / 2) / math.hypot(h / 2, w / 2)
    return labels == 1 + int(np.argmax(_areas(labels, n) * (1 - offset) ** 2))


def _components_touching(mask: np.ndarray, seed: np.ndarray) -> np.ndarray:
    labels, _ = ndi.label(mask)
    ids = np.unique(labels[seed & mask])
    return np.isin(labels, ids[ids > 0])


def mask_bbox(mask: np.ndarray) -> Box:
    """End-exclusive box of a mask's pixels; the whole image when it is empty."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return (0, 0, mask.shape[1], mask.shape[0])
    return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


# --------------------------------------------------------------------------
# Classical segmentation
# --------------------------------------------------------------------------


def _grow_cell(stained: np.ndarray, core: np.ndarray, p: ClassicalParams) -> np.ndarray:
    """The stained region attached to the nucleus ``core``, with touching
    objects cut off at their necks by a distance-transform watershed."""
    dist = ndi.distance_transform_edt(stained)
    seeds, _ = ndi.label(h_maxima(ndi.gaussian_filter(dist, 1.0), p.split_height))
    regions = watershed(-dist, seeds, mask=stained)
    cell = core.copy()
    core_area = core.sum()
    for region_id in np.unique(regions[core]):
        if region_id == 0:
            continue
        region = regions == region_id
        overlap = (region & core).sum()
        if overlap >= p.min_region_overlap * region.sum() or overlap >= p.min_nucleus_overlap * core_area:
            cell |= region
    cell = ndi.binary_fill_holes(cell)
    return _components_touching(_open(cell, p.open_radius), core) | core


def _foreign_in_cell(cell, stained, nuclear, core, od, p: ClassicalParams) -> np.ndarray:
    """Blobs inside ``cell`` coloured like the stained matter outside it (red
    cells) rather than like the cytoplasm next to the nucleus."""
    chroma = od / np.maximum(od.sum(-1), 1e-6)[..., None]
    ring_px = max(3.0, p.cytoplasm_ring * math.sqrt(core.sum() / math.pi))
    from_nucleus = ndi.distance_transform_edt(~(nuclear & cell))
    cytoplasm = cell & ~nuclear & (from_nucleus > 1) & (from_nucleus <= ring_px)
    outside = stained & ~ndi.binary_dilation(cell, iterations=3) & ~nuclear
    empty = np.zeros_like(cell)
    if cytoplasm.sum() < p.min_reference_pixels or outside.sum() < p.min_reference_pixels:
        return empty
    cyto_hue = np.median(chroma[cytoplasm], axis=0)
    foreign_hue = np.median(chroma[outside], axis=0)
    separation = np.linalg.norm(foreign_hue - cyto_hue)
    if separation < p.min_colour_separation:
        return empty  # e.g. eosinophil granules look like red cells: colour cannot decide
    # position along the cytoplasm -> foreign hue axis: 0 at cytoplasm, 1 at foreign
    t = ((chroma - cyto_hue) @ (foreign_hue - cyto_hue)) / separation**2
    # foreign = nearer the foreign hue, and beyond all but the most extreme
    # cytoplasm pixels (granular cytoplasm has a wide spread of hues)
    cut = max(0.5, float(np.quantile(t[cytoplasm], p.cytoplasm_quantile)))
    foreign = (t > cut) & cell & ~nuclear & (from_nucleus > ring_px)
    foreign = _open(foreign, p.open_radius)
    labels, n = ndi.label(foreign)
    big = 1 + np.flatnonzero(_areas(labels, n) >= p.foreign_min_fraction * cell.sum())
    return np.isin(labels, big)


def _segment_classical(image: np.ndarray, p: ClassicalParams) -> Tuple[np.ndarray, np.ndarray]:
    od = optical_density(image, background_rgb(image, p.background_percentile))
    od = ndi.gaussian_filter(od, (p.smoothing_sigma, p.smoothing_sigma, 0))
    score = nucleus_stain(od, p.stain_weights)
    total = od.sum(-1)
    empty = np.zeros(score.shape, bool)
    if np.ptp(score) <= 0:
        return empty, empty
    t_nucleus = threshold_otsu(score)
    nuclear = ndi.binary_fill_holes(_open(score > t_nucleus, p.open_radius))
    if not nuclear.any():
        return empty, empty
    core = largest_central_component(nuclear)

    background_like = total[score <= t_nucleus]
    t_stained = p.foreground_fraction * threshold_otsu(background_like) if np.ptp(background_like) > 0 else 0.0
    stained = ndi.binary_fill_holes((total > t_stained) | nuclear)
    stained = _open(stained, p.open_radius) | core

    cell = _grow_cell(stained, core, p)
    foreign = _foreign_in_cell(cell, stained, nuclear, core, od, p)
    if foreign.any():
        # remove the red cells (and a 1 px seam) and grow again, so their
        # leftover rims are cut off by the watershed rather than kept
        cut = ndi.binary_dilation(foreign, iterations=1) & ~nuclear
        cell = _grow_cell(_open(stained & ~cut, p.open_radius) | core, core, p)

    if (nuclear & cell).sum() > p.max_nucleus_fraction * cell.sum():
        inside = ndi.binary_fill_holes(_open((score > threshold_otsu(score[cell])) & cell, p.open_radius))
        if inside.any():
            nuclear, core = inside, largest_central_component(inside)

    labels, n = ndi.label(nuclear & cell)
    lobes = 1 + np.flatnonzero(_areas(labels, n) >= p.min_lobe_fraction * core.sum())
    nucleus = np.isin(labels, lobes) | core
    return nucleus, cell | nucleus


def require_cellpose() -> None:
    """Check that the cellpose back-end can run here (cellpose 3.1 importable);
    a :class:`SegmentationError` says what to install otherwise."""
    _import_cellpose()


def _import_cellpose():
    """cellpose's ``models`` and ``train`` modules, or a :class:`SegmentationError` saying what to install."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script_method, used by cellpose 3
            import cellpose
            from cellpose import models, train
    except ImportError:
        raise SegmentationError(
            "the cellpose back-end needs cellpose 3.1 (pip install 'wbclib[segment]', i.e. "
            f"pip install 'cellpose>=3.1,<4'); {CELLPOSE_TRAINING_HINT}") from None
    version = getattr(cellpose, "version", None) or _package_version("cellpose")
    if version and not str(version).startswith(f"{CELLPOSE_MAJOR}."):
        raise SegmentationError(f"cellpose {version} is installed; this back-end is written for cellpose "
                                f"{CELLPOSE_MAJOR}.x (pip install 'cellpose>=3.1,<4')")
    return models, train


def _package_version(name: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


#: Input of the cellpose back-end: background-relative optical density (one
#: channel per RGB channel, :func:`optical_density`) divided by this, so a dark
#: nucleus is near 1 in every lab's colours; a fixed scale, not per-image
#: percentiles, so the same OD means the same input everywhere.
CELLPOSE_OD_SCALE = 1.5
#: Images are resized by this factor before the network (and masks back):
#: zheng1's cells (median diameter 75 px at 120 px per image) then measure
#: ~37 px, near cellpose's own working diameter (30 px), and the network
#: costs a quarter of full resolution.
CELLPOSE_SCALE = 0.5
#: Side (px) of the square training patches (after scaling); a resized zheng1
#: image (60 px) fits whole, with room for rotations.
CELLPOSE_PATCH = 64


def cellpose_input(image: np.ndarray, params: Optional[ClassicalParams] = None, scale: float = 1.0) -> np.ndarray:
    """The network input of the cellpose back-end: (H', W', 3) float32 optical
    density against the slide's own background, over :data:`CELLPOSE_OD_SCALE`,
    resized by ``scale``.

    Working in OD removes the background colour (yellow zheng1, white pbc)
    that raw RGB would make the network learn per lab.
    """
    p = params or ClassicalParams()
    od = optical_density(image, background_rgb(image, p.background_percentile)) / CELLPOSE_OD_SCALE
    if scale != 1.0:
        h, w = od.shape[:2]
        od = resize(od, (max(8, round(h * scale)), max(8, round(w * scale))), order=1, anti_aliasing=scale < 1,
                    preserve_range=True)
    return od.astype(np.float32)


def _resize_labels(labels: np.ndarray, shape: Tuple[int, int]) -> np.ndarray:
    if labels.shape == tuple(shape):
        return labels
    return resize(labels, shape, order=0, preserve_range=True, anti_aliasing=False).astype(labels.dtype)


_CELLPOSE_MODELS: Dict[tuple, tuple] = {}


def _load_cellpose(model_path: PathLike):
    """(model, settings) for a saved model, cached per file and modification time.

    Models from :func:`train_cellpose` have a ``<model>.json`` beside them
    (``nchan`` 3, OD input); any other file is taken for a stock cellpose 3
    model (2 channels, grayscale input).
    """
    path = Path(model_path)
    key = (str(path.resolve()), path.stat().st_mtime_ns)
    if key not in _CELLPOSE_MODELS:
        models, _ = _import_cellpose()
        sidecar = path.with_name(path.name + ".json")
        settings = _io.read_json(sidecar) if sidecar.is_file() else {"nchan": 2, "input": "rgb"}
        import torch

        model = models.CellposeModel(pretrained_model=str(path), nchan=int(settings["nchan"]),
                                     device=torch.device("cpu") if not torch.cuda.is_available() else None)
        _CELLPOSE_MODELS.clear()  # one model at a time: k-fold evaluation swaps them
        _CELLPOSE_MODELS[key] = (model, settings)
    return _CELLPOSE_MODELS[key]


def cellpose_instances(image: np.ndarray, model_path: PathLike, params: Optional[ClassicalParams] = None) -> np.ndarray:
    """The instance label image (H, W) a cellpose model predicts for ``image``."""
    model, settings = _load_cellpose(model_path)
    # single-cell images: one object may cover most of the frame, so no upper size limit
    common = dict(max_size_fraction=1.0, min_size=int(settings.get("min_size", 15)))
    if settings.get("input") == "od":
        x = cellpose_input(image, params, float(settings.get("scale", 1.0)))
        out = model.eval(x, channel_axis=-1, channels=None, normalize=False, rescale=1.0,
                         bsize=int(settings.get("bsize", 224)), **common)
    else:
        out = model.eval(image, channels=[0, 0], **common)
    return _resize_labels(np.asarray(out[0]).astype(np.int32), image.shape[:2])


def _segment_cellpose(image: np.ndarray, model_path: Optional[PathLike], p: ClassicalParams) -> Tuple[np.ndarray, np.ndarray]:
    _import_cellpose()
    if model_path is None:
        raise SegmentationError(f"backend 'cellpose' needs model_path=<trained cellpose model>; {CELLPOSE_TRAINING_HINT}")
    if not Path(model_path).is_file():
        raise SegmentationError(f"{model_path}: no such cellpose model file; {CELLPOSE_TRAINING_HINT}")
    instances = cellpose_instances(image, model_path, p)
    cell = largest_central_component(instances > 0)
    # cellpose gives the cell outline; the nucleus inside it is found by stain
    od = optical_density(image, background_rgb(image, p.background_percentile))
    score = nucleus_stain(ndi.gaussian_filter(od, (p.smoothing_sigma, p.smoothing_sigma, 0)), p.stain_weights)
    nucleus = np.zeros_like(cell)
    if cell.any() and np.ptp(score[cell]) > 0:
        nucleus = _open((score > threshold_otsu(score[cell])) & cell, p.open_radius)
    return nucleus, cell


def segment_cell(image: np.ndarray, backend: str = "classical", model_path: Optional[PathLike] = None,
                 params: Optional[ClassicalParams] = None) -> SegmentationResult:
    """Segment the primary WBC of a single-cell image (a pbc or zheng1 image,
    or a crop around :func:`locate_wbc`'s box in a whole field).

    ``backend="cellpose"`` runs a cellpose model trained for blood smears
    (``model_path``); it raises :class:`SegmentationError` saying how to train
    one when cellpose or the model is missing.
    """
    image = _check_rgb(image)
    p = params or ClassicalParams()
    if backend == "classical":
        nucleus, cell = _segment_classical(image, p)
    elif backend == "cellpose":
        nucleus, cell = _segment_cellpose(image, model_path, p)
    else:
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    return SegmentationResult(nucleus=nucleus, cell=cell, bbox=mask_bbox(cell))


# --------------------------------------------------------------------------
# Whole fields and crops
# --------------------------------------------------------------------------

#: Field-scale settings of :func:`locate_wbc`, as fractions of the field's
#: diagonal so they do not depend on resolution.
FIELD_SMOOTHING = 0.0025
FIELD_OPEN = 0.005
FIELD_CLOSE = 0.015
#: The crop handed to :func:`segment_cell` extends this many nucleus sizes
#: beyond the nucleus on each side; leukocytes are at most ~2x their nucleus.
FIELD_CROP_MARGIN = 0.5


def locate_wbc(field_image: np.ndarray, params: Optional[ClassicalParams] = None) -> Box:
    """Box (x0, y0, x1, y1) of the most strongly stained leukocyte in a whole
    smear field.

    The nucleus is the top class of a three-class Otsu split (background, red
    cells, nuclei) of the nucleus score; lobes are merged by a closing and the
    blob with the most stain wins (platelets are small, red cells pale on this
    score). The cell is then grown by :func:`segment_cell` in a crop around it.
    """
    field_image = _check_rgb(field_image)
    p = params or ClassicalParams()
    h, w = field_image.shape[:2]
    diag = math.hypot(h, w)
    od = optical_density(field_image, background_rgb(field_image, p.background_percentile))
    sigma = max(1.0, FIELD_SMOOTHING * diag)
    score = nucleus_stain(ndi.gaussian_filter(od, (sigma, sigma, 0)), p.stain_weights)
    if np.ptp(score) <= 0:
        return (0, 0, w, h)
    nuclear = score > threshold_multiotsu(score, classes=3)[1]
    nuclear = _open(nuclear, max(1, round(FIELD_OPEN * diag)))
    nuclear = ndi.binary_closing(nuclear, disk(max(1, round(FIELD_CLOSE * diag))))
    labels, n = ndi.label(nuclear)
    if n == 0:
        return (0, 0, w, h)
    stain_mass = ndi.sum(score, labels, range(1, n + 1))
    x0, y0, x1, y1 = mask_bbox(labels == 1 + int(np.argmax(stain_mass)))
    half = max(x1 - x0, y1 - y0) * (0.5 + FIELD_CROP_MARGIN)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    X0, Y0 = int(max(0, cx - half)), int(max(0, cy - half))
    X1, Y1 = int(min(w, cx + half)), int(min(h, cy + half))
    result = segment_cell(field_image[Y0:Y1, X0:X1], params=p)
    if not result.found:
        return (x0, y0, x1, y1)
    bx0, by0, bx1, by1 = result.bbox
    return (X0 + bx0, Y0 + by0, X0 + bx1, Y0 + by1)


def square_around(image: np.ndarray, box: Box, margin: float = 0.1) -> np.ndarray:
    """The square around ``box`` at native resolution: its side is the box's
    longer side plus ``margin`` of it on each side, centred on the box; parts
    beyond the image are filled with the background colour."""
    x0, y0, x1, y1 = box
    side = max(1, int(round(max(x1 - x0, y1 - y0) * (1 + 2 * margin))))
    left = int(round((x0 + x1) / 2 - side / 2))
    top = int(round((y0 + y1) / 2 - side / 2))
    canvas = np.empty((side, side, 3), np.uint8)
    canvas[:] = np.round(background_rgb(image)).astype(np.uint8)
    h, w = image.shape[:2]
    sx0, sy0, sx1, sy1 = max(0, left), max(0, top), min(w, left + side), min(h, top + side)
    if sx1 > sx0 and sy1 > sy0:
        canvas[sy0 - top:sy1 - top, sx0 - left:sx1 - left] = image[sy0:sy1, sx0:sx1]
    return canvas


def crop_primary_wbc(image: np.ndarray, size: int = 224, margin: float = 0.1,
                     bbox: Optional[Box] = None) -> np.ndarray:
    """A ``size`` x ``size`` RGB crop centred on the primary WBC.

    The square's side is the box's longer side plus ``margin`` of it on each
    side; parts beyond the image are filled with the background colour. The
    box defaults to :func:`segment_cell`'s; for whole fields pass
    ``bbox=locate_wbc(field)``.
    """
    image = _check_rgb(image)
    canvas = square_around(image, segment_cell(image).bbox if bbox is None else bbox, margin)
    return np.asarray(Image.fromarray(canvas).resize((size, size), Image.BILINEAR))


# --------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------


def dice(pred: np.ndarray, true: np.ndarray) -> float:
    """Dice overlap of two boolean masks; 1.0 when both are empty."""
    pred, true = np.asarray(pred, bool), np.asarray(true, bool)
    if pred.shape != true.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {true.shape}")
    total = pred.sum() + true.sum()
    return 1.0 if total == 0 else float(2.0 * (pred & true).sum() / total)


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes; 0 for empty union."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


# --------------------------------------------------------------------------
# Ground truth and evaluation
# --------------------------------------------------------------------------


def _zheng1_table(root: Path) -> pd.DataFrame:
    """``image_id``, ``label`` of zheng1, from the label table checked by :func:`data.zheng1_labels`."""
    return data.zheng1_labels(root)[["image_id", "label"]]


def zheng1_image_ids(root: Path, limit: Optional[int] = None) -> List[int]:
    """zheng1's image ids in label-table order (the first ``limit``)."""
    table = _zheng1_table(Path(root))
    return (table if limit is None else table.head(limit))["image_id"].astype(int).tolist()


def zheng1_regions(mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(nucleus, cell) from a zheng1 expert mask (nucleus 255, cytoplasm 128,
    background 0); cell = nucleus + cytoplasm. Cut at 64 and 192 so that
    resampled or antialiased masks decode the same way."""
    mask = np.asarray(mask)
    return mask >= 192, mask >= 64


def load_zheng1_masks(root: Optional[PathLike] = None, limit: Optional[int] = None) -> Dict[int, Tuple[np.ndarray, np.ndarray]]:
    """Expert masks of zheng1 as ``{image_id: (nucleus, cell)}`` boolean arrays,
    in label-table order (the first ``limit`` images).

    Missing, corrupt or truncated masks are all reported together in one
    :class:`data.DataError` naming each file.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1 image, got {limit}")
    root = data.data_root(root)
    ids = _zheng1_table(root)["image_id"].tolist()[:limit]
    masks, problems = {}, []
    for image_id in ids:
        path = root / "zheng1" / "masks" / f"{image_id:03d}.png"
        if not path.is_file():
            problems.append(f"{path}: expert mask missing")
            continue
        try:
            masks[image_id] = zheng1_regions(np.asarray(data.read_image(path, "expert mask").convert("L")))
        except data.DataError as exc:
            problems.append(str(exc))
    data.report_problems(f"the zheng1 expert masks under {root}", problems)
    return masks


def evaluate_zheng1(root: Optional[PathLike] = None, backend: str = "classical", limit: Optional[int] = None,
                    model_path: Optional[PathLike] = None, params: Optional[ClassicalParams] = None) -> pd.DataFrame:
    """Per-image Dice of the predicted nucleus and cell against zheng1's expert
    masks: columns ``image_id, label, nucleus_dice, cell_dice``.

    ``summarize_dice(table)`` gives the per-class means for printing.
    """
    root = data.data_root(root)
    table = _zheng1_table(root).head(limit) if limit is not None else _zheng1_table(root)
    masks = load_zheng1_masks(root, limit)
    rows = []
    for image_id, label in zip(table["image_id"], table["label"]):
        image = data.load_image(root / "zheng1" / "images" / f"{image_id:03d}.png")
        true_nucleus, true_cell = masks[image_id]
        if true_cell.shape != image.shape[:2]:
            raise data.DataError(f"zheng1 {image_id:03d}: mask {true_cell.shape} and image {image.shape[:2]} differ in size")
        result = segment_cell(image, backend=backend, model_path=model_path, params=params)
        rows.append((image_id, label, dice(result.nucleus, true_nucleus), dice(result.cell, true_cell)))
    return pd.DataFrame(rows, columns=["image_id", "label", "nucleus_dice", "cell_dice"])


def summarize_dice(table: pd.DataFrame) -> pd.DataFrame:
    """Mean Dice per class plus an ``all`` row, with image counts."""
    cols = ["nucleus_dice", "cell_dice"]
    by_class = table.groupby("label")[cols].mean()
    by_class["n"] = table.groupby("label").size()
    overall = pd.DataFrame([[*table[cols].mean(), len(table)]], columns=cols + ["n"], index=["all"])
    out = pd.concat([by_class, overall])
    out["n"] = out["n"].astype(int)
    return out.round(3)


def read_voc_boxes(xml_path: PathLike, name: str = "WBC") -> list:
    """Boxes (x0, y0, x1, y1) of the objects called ``name`` in a Pascal VOC file."""
    try:
        tree = ET.parse(xml_path)
    except (ET.ParseError, OSError) as exc:
        raise data.DataError(f"{xml_path}: unreadable VOC annotation ({exc})") from None
    boxes = []
    for obj in tree.getroot().iter("object"):
        if (obj.findtext("name") or "").strip() != name:
            continue
        bb = obj.find("bndbox")
        boxes.append(tuple(int(float(bb.findtext(k))) for k in ("xmin", "ymin", "xmax", "ymax")))
    return boxes


def evaluate_bccd_localisation(root: Optional[PathLike] = None, limit: Optional[int] = None) -> pd.DataFrame:
    """Per-field IoU of :func:`locate_wbc`'s box against the annotated WBC box
    (the best-matching one when a field has several).

    Columns ``field, n_wbc, iou, x0, y0, x1, y1`` (the predicted box). Fields
    without a WBC annotation (6 in BCCD) have ``n_wbc = 0`` and a NaN IoU,
    which pandas' ``mean`` skips.
    """
    root = data.data_root(root)
    fields = sorted((root / "bccd" / "fields").glob("*.jpg"))[:limit]
    if not fields:
        raise data.DataError(f"{root / 'bccd' / 'fields'}: no field images")
    rows = []
    for path in fields:
        truth = read_voc_boxes(root / "bccd" / "annotations" / f"{path.stem}.xml")
        box = locate_wbc(data.load_image(path))
        iou = max(box_iou(box, t) for t in truth) if truth else float("nan")
        rows.append((path.stem, len(truth), iou, *box))
    return pd.DataFrame(rows, columns=["field", "n_wbc", "iou", "x0", "y0", "x1", "y1"])


# --------------------------------------------------------------------------
# Training the cellpose back-end
# --------------------------------------------------------------------------


def train_cellpose(images, masks, out_dir: PathLike, epochs: int = 100, batch_size: int = 8,
                   learning_rate: float = 0.005, weight_decay: float = 1e-5, scale: float = CELLPOSE_SCALE,
                   patch: int = CELLPOSE_PATCH, seed: int = 0, device=None, model_name: str = "wbc_cellpose") -> Path:
    """Train a cellpose 3.1 network from scratch (``pretrained_model=False``:
    no cyto3 download) on single-cell images and their cell masks; returns
    the model file (``out_dir/models/<model_name>``) for ``model_path=``.

    ``images`` are RGB arrays; ``masks`` boolean cell masks (or label images,
    0 = background) of the same size. The input is :func:`cellpose_input`
    (3 OD channels, fixed intensity scale: ``normalize=False``) resized by
    ``scale`` (the same factor at prediction, masks resized back); no
    per-image diameter rescaling (``rescale=False``, scale jitter 0.75-1.25),
    rotations and flips in ``patch`` x ``patch`` crops, and ``min_train_masks=1`` because each image
    holds one cell. cellpose's own schedule: AdamW, linear warm-up over 10
    epochs. ``<model>.json`` beside the model records the input convention
    (read back by :func:`segment_cell`), the settings, the per-epoch training
    loss and the wall time.
    """
    models, train = _import_cellpose()
    import torch

    images, masks = list(images), list(masks)
    if len(images) != len(masks) or not images:
        raise ValueError(f"need as many masks as images, at least one; got {len(images)} images, {len(masks)} masks")
    labels = []
    for image, mask in zip(images, masks):
        mask = np.asarray(mask)
        if mask.shape != np.asarray(image).shape[:2]:
            raise ValueError(f"mask {mask.shape} and image {np.asarray(image).shape[:2]} differ in size")
        labels.append((mask > 0).astype(np.uint16) if mask.dtype == bool else mask.astype(np.uint16))
    if not any(l.any() for l in labels):
        raise ValueError("every mask is empty: nothing to train on")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    np.random.seed(seed)
    torch.manual_seed(seed)
    model = models.CellposeModel(pretrained_model=False, nchan=3, device=device)
    data = [cellpose_input(np.asarray(im), scale=scale).transpose(2, 0, 1) for im in images]  # (3, H, W)
    labels = [_resize_labels(l, d.shape[1:]) for l, d in zip(labels, data)]
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse invariant checks")
        path, train_losses, _ = train.train_seg(
            model.net, train_data=data, train_labels=labels, batch_size=batch_size, learning_rate=learning_rate,
            n_epochs=epochs, weight_decay=weight_decay, normalize=False, rescale=False, scale_range=0.5, bsize=patch,
            min_train_masks=1, save_path=str(out_dir), model_name=model_name, save_every=max(epochs, 1))
    seconds = time.perf_counter() - start
    path = Path(path)
    settings = dict(nchan=3, input="od", od_scale=CELLPOSE_OD_SCALE, scale=scale, bsize=patch, min_size=15, epochs=epochs,
                    batch_size=batch_size, learning_rate=learning_rate, weight_decay=weight_decay, seed=seed,
                    n_train=len(images), device=str(device), seconds=round(seconds, 2),
                    train_loss=[round(float(v), 5) for v in np.asarray(train_losses)])
    _io.write_json(path.with_name(path.name + ".json"), settings)
    return path


def zheng1_folds(table: pd.DataFrame, n_folds: int, seed: int = 0) -> np.ndarray:
    """Fold (0..n_folds-1) of each row: a seeded order within each class dealt
    round-robin, so every fold gets each class in proportion."""
    if n_folds < 2:
        raise ValueError(f"need at least 2 folds, got {n_folds}")
    rng = np.random.default_rng(seed)
    folds = np.empty(len(table), dtype=int)
    offset = 0
    for _, idx in table.reset_index(drop=True).groupby("label").groups.items():
        order = rng.permutation(np.asarray(idx))
        folds[order] = (offset + np.arange(len(order))) % n_folds
        offset += len(order)
    return folds


def cellpose_kfold(root: Optional[PathLike], out_dir: PathLike, n_folds: int = 5, epochs: int = 100,
                   limit: Optional[int] = None, seed: int = 0, device=None, threads: Optional[int] = None,
                   **train_kwargs) -> pd.DataFrame:
    """Cross-validated Dice of the cellpose back-end on zheng1's expert masks:
    a model is trained from scratch on the other folds and scores only its own
    fold, so no image is scored by a model that saw it.

    The first ``limit`` images (label-table order) take part, split by
    :func:`zheng1_folds`. Resumable: each fold writes ``fold<k>/models/...``
    and then ``fold<k>/scores.csv`` (its presence marks the fold done). The
    folder must belong to these settings and data:
    :func:`wbclib.protocols.segmentation.cellpose_kfold` chooses and guards it. ``threads``
    caps torch's CPU threads meanwhile (1 is several times faster than 2 on
    cores other jobs are using). Returns ``image_id, label, fold,
    nucleus_dice, cell_dice, train_seconds``.
    """
    import torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _cellpose_kfold(root, out_dir, n_folds, epochs, limit, seed, device, train_kwargs)
    finally:
        torch.set_num_threads(previous)


def _cellpose_kfold(root, out_dir, n_folds, epochs, limit, seed, device, train_kwargs) -> pd.DataFrame:
    from . import _io

    root = data.data_root(root)
    out_dir = Path(out_dir)
    table = _zheng1_table(root).head(limit) if limit is not None else _zheng1_table(root)
    table = table.reset_index(drop=True).assign(fold=zheng1_folds(table, n_folds, seed))
    masks = load_zheng1_masks(root, limit)
    images = {i: data.load_image(root / "zheng1" / "images" / f"{i:03d}.png") for i in table["image_id"]}
    parts = []
    for k in range(n_folds):
        fold_dir = out_dir / f"fold{k}"
        scores_path = fold_dir / "scores.csv"
        if scores_path.is_file():
            parts.append(_io.read_csv(scores_path))
            continue
        train_ids = table.loc[table["fold"] != k, "image_id"].tolist()
        model_path = train_cellpose([images[i] for i in train_ids], [masks[i][1] for i in train_ids], fold_dir,
                                    epochs=epochs, seed=seed + k, device=device, **train_kwargs)
        seconds = _io.read_json(model_path.with_name(model_path.name + ".json"))["seconds"]
        rows = []
        for image_id, label in table.loc[table["fold"] == k, ["image_id", "label"]].itertuples(index=False):
            result = segment_cell(images[image_id], backend="cellpose", model_path=model_path)
            true_nucleus, true_cell = masks[image_id]
            rows.append((image_id, label, k, dice(result.nucleus, true_nucleus), dice(result.cell, true_cell), seconds))
        part = pd.DataFrame(rows, columns=["image_id", "label", "fold", "nucleus_dice", "cell_dice", "train_seconds"])
        _io.write_csv(scores_path, part)
        parts.append(part)
    return pd.concat(parts, ignore_index=True).sort_values("image_id").reset_index(drop=True)
