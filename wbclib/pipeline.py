"""The assembled system: every stage of the two WBCBench papers in one object.

A :class:`Pipeline` takes an RGB ``uint8`` image of any size, a single-cell
crop or a whole smear field, through the papers' stages in their order:

1. **restore** – noise detection (the median-residual ``impulse`` score of
   :mod:`wbclib.restore` against a fitted threshold) and, for images called
   noisy, restoration by a 3x3 median filter or a Pix2Pix generator
   (:mod:`wbclib.pix2pix`);
2. **isolate** – leukocyte isolation: a whole field is searched for its most
   strongly stained leukocyte (:func:`segment.locate_wbc`) and cropped around
   it; a single-cell crop passes through;
3. **scale** – cell-scale normalisation: the central nucleus's share of the
   image (:func:`scale.nucleus_fraction`) is brought to the training images'
   median by a centre crop or pad (:func:`scale.centre_crop_pad`), so a lab
   that images cells larger or smaller than the training lab is met at the
   training scale;
4. **stain** – Macenko stain normalisation to a fitted reference (the stain
   matrix and maximum concentrations themselves, not a reference image path);
5. then the resize to the input size, one or more **members** (a backbone and
   its decoupled head each), **TTA** (dihedral views) and probability
   averaging over views and members (Le et al. 2026, eq. 6);
6. **rescue** – Suppress-and-Rescue (:class:`rescue.SuppressAndRescue`) with
   its morphology filter on the cell as the classifier saw it;
7. and an **abstain** flag when the largest probability is below a threshold.

Every stage can be switched off (:meth:`Pipeline.without`), one at a time,
for a cumulative ablation; a switched-off stage passes the image through and
its decision columns say so. The fitted parameters are plain numbers and
tensors, so :mod:`wbclib.bundle` saves and loads a pipeline without the data
it was fitted on. Nothing here knows about profiles or result folders: the
training protocol is :mod:`wbclib.protocols.system`.
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import torch
from torch import nn

from .augment import dihedral, eval_transform
from ._parallel import chunks, map_in_processes
from .data import DataError, load_image
from .heads import StandardizedLinear
from .rescue import SuppressAndRescue
from .restore import NoiseDetector, median3x3, noise_scores, synthetic
from .scale import centre_crop_pad, nucleus_fraction
from .stain import MacenkoNormalizer

#: The switchable stages, in the order the images meet them.
STAGES = ("restore", "isolate", "scale", "stain", "tta", "rescue")
#: Restoration back-ends: the papers' median baseline and Pix2Pix.
RESTORERS = ("median", "pix2pix")
#: Isolation modes: every image is a single-cell crop, every image is a whole
#: field, or decide per image by size (:data:`FIELD_MIN_SIDE`).
ISOLATION_MODES = ("crop", "field", "auto")
#: In ``auto`` isolation an image whose shorter side reaches this many pixels
#: is a whole field: the public single-cell crops are 120-370 px, microscope
#: fields 480 px and more (bccd: 640x480).
FIELD_MIN_SIDE = 480


# --------------------------------------------------------------------------
# Stages before the network
# --------------------------------------------------------------------------


@dataclass
class Restoration:
    """Noise detection and restoration. ``threshold`` is on the ``impulse``
    score (:func:`restore.noise_scores`); ``inf`` restores nothing."""

    threshold: float = math.inf
    score: str = "impulse"
    method: str = "median"
    #: A Pix2Pix generator (:class:`pix2pix.UNetGenerator`) for ``method="pix2pix"``.
    generator: Optional[nn.Module] = field(default=None, repr=False)
    #: The generator's constructor arguments (channels, depth, residual, full_res), for the bundle.
    generator_config: Optional[dict] = None

    def __post_init__(self):
        if self.method not in RESTORERS:
            raise ValueError(f"unknown restorer {self.method!r}; known: {RESTORERS}")
        if self.method == "pix2pix" and self.generator is None:
            raise ValueError("the pix2pix restorer needs a generator")

    @classmethod
    def fit(cls, clean_images: Sequence[np.ndarray], method: str = "median", seed: int = 0,
            noise_density: float = 0.03, **kwargs) -> "Restoration":
        """The detector threshold from images of the training lab: their scores
        and those of salt-and-pepper copies (``noise_density``, the benchmark's
        severity 2) as the two populations of :meth:`restore.NoiseDetector.fit`'s
        mixture. A clean-only set would give one population and a threshold of
        infinity; the synthetic copies say what noise looks like in this lab."""
        rng = np.random.default_rng(seed)
        clean = impulse_scores(clean_images)
        # The noisy copies draw from one generator in image order, a block at a time (bounded
        # memory); each block is scored side by side.
        noisy = []
        for start in range(0, len(clean_images), 8 * CHUNK):
            block = clean_images[start:start + 8 * CHUNK]
            noisy += impulse_scores([synthetic(im, "salt_pepper", noise_density, rng) for im in block])
        detector = NoiseDetector.fit(clean + noisy, score="impulse", seed=seed)
        return cls(threshold=float(detector.threshold), method=method, **kwargs)

    def __call__(self, image: np.ndarray) -> Tuple[np.ndarray, dict]:
        score = noise_scores(image)[self.score]
        if not score > self.threshold:
            return image, dict(noise_score=score, restored=False)
        if self.method == "median":
            return median3x3(image), dict(noise_score=score, restored=True)
        from .pix2pix import Pix2PixRestorer

        return Pix2PixRestorer(self.generator, torch.device("cpu"))(image), dict(noise_score=score, restored=True)


@dataclass
class Isolation:
    """Leukocyte isolation: ``mode`` is one of :data:`ISOLATION_MODES`;
    ``margin`` the share of the cell's box added on each side of the crop."""

    mode: str = "crop"
    margin: float = 0.25

    def __post_init__(self):
        if self.mode not in ISOLATION_MODES:
            raise ValueError(f"unknown isolation mode {self.mode!r}; known: {ISOLATION_MODES}")

    def is_field(self, image: np.ndarray) -> bool:
        if self.mode == "auto":
            return min(image.shape[:2]) >= FIELD_MIN_SIDE
        return self.mode == "field"

    def __call__(self, image: np.ndarray) -> Tuple[np.ndarray, dict]:
        if not self.is_field(image):
            return image, dict(field=False, box="")
        from .segment import locate_wbc, square_around

        x0, y0, x1, y1 = locate_wbc(image)
        # At native resolution (crop_primary_wbc's geometry without its resize): the scale stage decides the zoom.
        return square_around(image, (x0, y0, x1, y1), self.margin), dict(field=True, box=f"{x0} {y0} {x1} {y1}")


@dataclass
class ScaleNormalization:
    """Per-image cell-scale normalisation to ``target_fraction`` (the training
    images' median nucleus fraction). The side factor ``sqrt(f / target)`` is
    clipped to [``min_factor``, ``max_factor``] so one bad nucleus mask cannot
    zoom an image to nothing; an image with no measurable nucleus is kept.
    ``crop_factors`` (per training lab, :func:`scale.crop_factors`) are only
    recorded: they describe the training data, the per-image rule is applied.

    With ``cell_ratio`` > 0 (the profile's ``cell_crop``, ratio
    :data:`cellcrop.COMMON_RATIO`) the stage instead crops the square around
    the located leukocyte in which the cell fills that share of the side
    (:func:`cellcrop.locate_cell`, :func:`cellcrop.centre_on_cell`), as the
    book's chapters do; the nucleus-fraction rule is then not applied (no
    double crop). The cell is located on the image this stage receives
    (degraded, restored), as the chapters' loader locates it on each row's
    degraded image. An image whose cell is not found is kept whole
    (``cell_found`` False in the decisions): the stage is given no lab. The
    chapters' loader (:class:`models.ImageTable`), which reads the lab from
    the image's path, cuts such an image around its centre at the lab's
    fixed cell share instead (:func:`cellcrop.fallback_box`); for a square
    image of no known lab the two agree."""

    target_fraction: float = 0.0
    min_factor: float = 0.5
    max_factor: float = 2.5
    crop_factors: Dict[str, float] = field(default_factory=dict)
    cell_ratio: float = 0.0

    @classmethod
    def fit(cls, images: Sequence[np.ndarray], **kwargs) -> "ScaleNormalization":
        if kwargs.get("cell_ratio", 0.0) > 0:
            return cls(target_fraction=0.0, **kwargs)
        fractions = np.array([nucleus_fraction(im) for im in images])
        fractions = fractions[fractions > 0]
        if not len(fractions):
            raise ValueError("no training image has a measurable nucleus; cannot fit the scale stage")
        return cls(target_fraction=float(np.median(fractions)), **kwargs)

    def factor(self, image: np.ndarray) -> float:
        fraction = nucleus_fraction(image)
        if fraction <= 0 or self.target_fraction <= 0:
            return 1.0
        return float(np.clip(math.sqrt(fraction / self.target_fraction), self.min_factor, self.max_factor))

    def __call__(self, image: np.ndarray) -> Tuple[np.ndarray, dict]:
        if self.cell_ratio > 0:
            from .cellcrop import centre_on_cell, locate_cell

            box = locate_cell(image)
            if not box.found:
                return image, dict(scale_factor=1.0, cell_found=False)
            crop = centre_on_cell(image, box.cx, box.cy, box.side, self.cell_ratio)
            return crop, dict(scale_factor=float(crop.shape[0] / min(image.shape[:2])), cell_found=True)
        f = self.factor(image)
        return centre_crop_pad(image, f), dict(scale_factor=f)


@dataclass
class StainNormalization:
    """Macenko normalisation to a fitted reference: ``stain_matrix`` (3, 2) and
    ``max_concentrations`` (2,), as :meth:`stain.MacenkoNormalizer.fit` keeps
    them. An image whose stain cannot be estimated (blank, overexposed) is
    kept as it is and flagged."""

    stain_matrix: np.ndarray
    max_concentrations: np.ndarray
    #: Where the reference came from (a description, never read back).
    reference: str = ""

    def __post_init__(self):
        self.stain_matrix = np.asarray(self.stain_matrix, dtype=np.float32).reshape(3, 2)
        self.max_concentrations = np.asarray(self.max_concentrations, dtype=np.float32).reshape(2)
        self._normalizer = MacenkoNormalizer()
        self._normalizer.reference_stain_matrix = torch.from_numpy(self.stain_matrix.copy())
        self._normalizer.reference_max_concentrations = torch.from_numpy(self.max_concentrations.copy())

    @classmethod
    def fit(cls, images: Sequence[np.ndarray], names: Optional[Sequence[str]] = None,
            max_candidates: int = 48) -> "StainNormalization":
        """The reference is the *medoid* training image: the one whose own stain
        matrix is nearest the element-wise median of theirs, so neither a pale
        nor an over-stained slide becomes everyone's target. At most
        ``max_candidates`` images, evenly spaced through ``images``, are
        decomposed (a 360 px image takes about a quarter of a second on one core;
        the median of 48 matrices is already stable)."""
        normalizer = MacenkoNormalizer()
        matrices, kept = [], []
        candidates = np.unique(np.linspace(0, len(images) - 1, min(len(images), max_candidates)).round().astype(int))
        for i in candidates.tolist():
            im = images[i]
            try:
                matrices.append(normalizer.stain_matrices(im)[0].numpy())
                kept.append(i)
            except (ValueError, RuntimeError):
                continue
        if not kept:
            raise ValueError("no training image has an estimable stain; cannot fit the stain stage")
        stack = np.stack(matrices)
        best = kept[int(np.argmin(np.abs(stack - np.median(stack, 0)).sum((1, 2))))]
        normalizer.fit(images[best])
        return cls(normalizer.reference_stain_matrix.numpy(), normalizer.reference_max_concentrations.numpy(),
                   reference=str(names[best]) if names is not None else f"image {best}")

    def __call__(self, image: np.ndarray) -> Tuple[np.ndarray, dict]:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return self._normalizer.transform(image), dict(stain_normalized=True)
        except (ValueError, RuntimeError):
            return image, dict(stain_normalized=False)


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Resize to ``size`` x ``size`` exactly as :class:`models.ImageTable` does
    (bilinear, antialiased, rounded to uint8), so that a network fine-tuned on
    image tables sees the same pixels here."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    x = nn.functional.interpolate(x[None].float(), size=(size, size), mode="bilinear", antialias=True,
                                  align_corners=False)[0]
    return x.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


# --------------------------------------------------------------------------
# Network members and rescue
# --------------------------------------------------------------------------


@dataclass
class Member:
    """One backbone with its decoupled head. ``model`` is a plain headless timm
    model (``timm.create_model(backbone, num_classes=0)``), ``head`` maps its
    pooled features to logits; ``augmentation`` names the training preset whose
    deterministic evaluation part (:func:`augment.eval_transform`) is applied."""

    backbone: str
    model: nn.Module
    head: StandardizedLinear
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    augmentation: str = "none"

    @torch.no_grad()
    def features(self, batch: torch.Tensor) -> torch.Tensor:
        """Pooled features of a uint8 batch (N, 3, S, S), in fp32 (no autocast:
        a saved pipeline must give the same numbers on every machine)."""
        transform = eval_transform(self.augmentation, batch.shape[-1])
        if transform is not None:
            batch = transform(batch)
        device = next(self.model.parameters()).device
        x = batch.to(device).float() / 255.0
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
        self.model.eval()
        return self.model((x - mean) / std).float()

    @torch.no_grad()
    def proba(self, batch: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities (N, C) on the CPU."""
        self.head.eval()
        features = self.features(batch)
        return torch.softmax(self.head.to(features.device)(features), dim=1).cpu()

    def to(self, device: Union[str, torch.device]) -> "Member":
        """Move the backbone and head to ``device`` (in place); inputs follow the backbone."""
        self.model.to(device)
        if self.head is not None:
            self.head.to(device)
        return self


@dataclass
class RescueStage:
    """Suppress-and-Rescue as the pipeline runs it. ``rule`` is the fitted
    :class:`rescue.SuppressAndRescue`. The bundle carries no semantic verifier
    yet, so phase 2 sees a probability of 1 for every candidate: only a class
    that the fit closed entirely (``tau`` above 1) is rejected there; the
    morphology filter (phase 3) measures the cell as the network saw it."""

    rule: SuppressAndRescue

    def apply(self, frame: pd.DataFrame, images: Sequence[np.ndarray]) -> pd.DataFrame:
        classes = [c[len("prob_"):] for c in frame.columns if c.startswith("prob_")]
        ones = np.ones((len(frame), len(classes)))
        return self.rule.apply(frame, verify_probs=ones,
                               morph_features=lambda rows: morphology_rows([images[i] for i in rows.index]))


#: Images per job of the per-image measurements that run side by side (:func:`_parallel.map_in_processes`).
CHUNK = 64


def _chunks(items: Sequence, size: int = CHUNK) -> List[tuple]:
    return [(piece,) for piece in chunks(items, size)]


def morphology_rows(images: Sequence[np.ndarray], desc: Optional[str] = None) -> pd.DataFrame:
    """Morphology features (:func:`morphology.cell_morphology`) of each image;
    a cell the segmenter cannot find gives a row of NaN (which fails a filter).
    Images are measured in chunks side by side (each measurement is a
    function of its image alone, so the rows do not depend on the workers)."""
    parts = map_in_processes(_morphology_chunk, _chunks(list(images)), desc=desc)
    return pd.DataFrame([row for part in parts for row in part])


def _morphology_chunk(images: Sequence[np.ndarray]) -> List[dict]:
    from .morphology import FEATURES, cell_morphology

    rows = []
    for image in images:
        try:
            rows.append(cell_morphology(image))
        except Exception:  # noqa: BLE001 - any segmentation failure means "no measurement", never a crash
            rows.append({f: math.nan for f in FEATURES})
    return rows


def _impulse_scores(images: Sequence[np.ndarray]) -> List[float]:
    return [noise_scores(im)["impulse"] for im in images]


def impulse_scores(images: Sequence[np.ndarray]) -> List[float]:
    """:func:`restore.noise_scores`' impulse score of each image, in chunks side by side."""
    return [s for part in map_in_processes(_impulse_scores, _chunks(list(images))) for s in part]


# --------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------

ImageSource = Union[str, Path, np.ndarray]


@dataclass
class Pipeline:
    """The assembled classifier (see the module docstring).

    ``enabled`` switches stages (:data:`STAGES`) on and off; ``tta_views`` is
    how many dihedral views TTA averages when it is on (1: none);
    ``abstain_threshold`` is the largest probability below which a prediction
    is flagged ``abstain``; ``abstain_by_views`` holds one threshold per number
    of TTA views it was chosen for (averaging views lowers the largest
    probability, so a threshold chosen with 8 views would flag too few single-view
    predictions and vice versa), used when it has the number in use.
    """

    classes: List[str]
    image_size: int
    members: List[Member]
    restoration: Optional[Restoration] = None
    isolation: Isolation = field(default_factory=Isolation)
    scale: Optional[ScaleNormalization] = None
    stain: Optional[StainNormalization] = None
    rescue: Optional[RescueStage] = None
    tta_views: int = 8
    abstain_threshold: float = 0.0
    abstain_by_views: Dict[int, float] = field(default_factory=dict)
    enabled: Dict[str, bool] = field(default_factory=lambda: {s: True for s in STAGES})

    def __post_init__(self):
        unknown = set(self.enabled) - set(STAGES)
        if unknown:
            raise ValueError(f"unknown stages {sorted(unknown)}; known: {STAGES}")
        self.enabled = {s: bool(self.enabled.get(s, True)) for s in STAGES}
        if not 1 <= self.tta_views <= 8:
            raise ValueError(f"tta_views must be 1..8 dihedral views, got {self.tta_views}")
        if not self.members:
            raise ValueError("a pipeline needs at least one member (backbone and head)")

    def is_on(self, stage: str) -> bool:
        """Whether ``stage`` runs: switched on and fitted."""
        fitted = {"restore": self.restoration, "scale": self.scale, "stain": self.stain, "rescue": self.rescue}
        return self.enabled[stage] and (stage not in fitted or fitted[stage] is not None)

    def without(self, *stages: str) -> "Pipeline":
        """A copy with ``stages`` switched off (the models are shared, not copied)."""
        unknown = set(stages) - set(STAGES)
        if unknown:
            raise ValueError(f"unknown stages {sorted(unknown)}; known: {STAGES}")
        out = copy.copy(self)
        out.enabled = {s: self.enabled[s] and s not in stages for s in STAGES}
        return out

    def with_isolation(self, mode: str) -> "Pipeline":
        """A copy that treats images as ``mode`` (:data:`ISOLATION_MODES`)."""
        out = copy.copy(self)
        out.isolation = Isolation(mode=mode, margin=self.isolation.margin)
        return out

    # ---- images -> network input ----------------------------------------

    def preprocess(self, image: np.ndarray) -> Tuple[np.ndarray, dict]:
        """The (S, S, 3) uint8 image the network sees, and each stage's decision."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}")
        decisions: dict = dict(width=image.shape[1], height=image.shape[0])
        if self.is_on("restore"):
            image, d = self.restoration(image)
            decisions.update(d)
        else:
            decisions.update(noise_score=math.nan, restored=False)
        if self.is_on("isolate"):
            image, d = self.isolation(image)
            decisions.update(d)
        else:
            decisions.update(field=False, box="")
        if self.is_on("scale"):
            image, d = self.scale(image)
            decisions.update(d)
        else:
            decisions.update(scale_factor=1.0)
        if self.is_on("stain"):
            image, d = self.stain(image)
            decisions.update(d)
        else:
            decisions.update(stain_normalized=False)
        return resize_square(image, self.image_size), decisions

    # ---- network ----------------------------------------------------------

    def views(self, tta: Optional[bool] = None) -> int:
        on = self.is_on("tta") if tta is None else (tta and self.enabled["tta"])
        return self.tta_views if on else 1

    @torch.no_grad()
    def proba(self, inputs: np.ndarray, tta: Optional[bool] = None, batch_size: int = 64) -> np.ndarray:
        """Class probabilities (N, C) of preprocessed images (N, S, S, 3),
        averaged over the TTA views and the members."""
        k = self.views(tta)
        out = []
        for start in range(0, len(inputs), max(1, batch_size // k)):
            x = torch.from_numpy(np.ascontiguousarray(inputs[start:start + max(1, batch_size // k)]))
            x = x.permute(0, 3, 1, 2)
            # Every view of the chunk in one forward pass (view-major), then averaged per image.
            views = torch.cat([dihedral(x, view) for view in range(k)]).contiguous()
            total = torch.zeros(len(x), len(self.classes), dtype=torch.float64)
            for member in self.members:
                total += member.proba(views).double().view(k, len(x), -1).sum(0)
            out.append(total / (k * len(self.members)))
        return torch.cat(out).numpy().astype(np.float64) if out else np.zeros((0, len(self.classes)))

    @torch.no_grad()
    def features(self, inputs: np.ndarray, member: int = 0, view: int = 0, batch_size: int = 64) -> np.ndarray:
        """One member's pooled features (N, D) of preprocessed images, for one dihedral view."""
        chunks = []
        for start in range(0, len(inputs), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(inputs[start:start + batch_size])).permute(0, 3, 1, 2)
            chunks.append(self.members[member].features(dihedral(x, view).contiguous()).cpu())
        return torch.cat(chunks).numpy()

    def to(self, device: Union[str, torch.device]) -> "Pipeline":
        """Run the members on ``device`` (in place); preprocessing stays on the CPU
        and probabilities come back to it. Everything is fp32 on any device."""
        for member in self.members:
            member.to(device)
        return self

    # ---- end to end -------------------------------------------------------

    def abstain_threshold_for(self, views: int) -> float:
        """The abstain threshold chosen for ``views`` TTA views, else the default one."""
        return float(self.abstain_by_views.get(views, self.abstain_threshold))

    def decide(self, probs: np.ndarray, inputs: Sequence[np.ndarray], views: int = 1) -> pd.DataFrame:
        """Predicted class, rescue and abstain decisions for probabilities (N, C)
        averaged over ``views`` TTA views."""
        frame = pd.DataFrame(probs, columns=[f"prob_{c}" for c in self.classes])
        frame.insert(0, "pred", [self.classes[i] for i in probs.argmax(1)] if len(probs) else [])
        if self.is_on("rescue") and len(frame):
            rescued = self.rescue.apply(frame, inputs)
            frame["pred"] = rescued["pred"].to_numpy()
            frame["base_pred"] = rescued["base_pred"].to_numpy()
            frame["rescue"] = rescued["rescue"].to_numpy()
        else:
            frame["base_pred"] = frame["pred"]
            frame["rescue"] = "off"
        frame["rescued"] = frame["rescue"] == "rescued"
        frame["max_prob"] = probs.max(1) if len(probs) else []
        frame["abstain"] = frame["max_prob"] < self.abstain_threshold_for(views)
        return frame

    def predict_images(self, images: Sequence[np.ndarray], tta: Optional[bool] = None) -> pd.DataFrame:
        """Predictions for in-memory images (every one must be valid)."""
        prepared = [self.preprocess(im) for im in images]
        inputs = np.stack([p for p, _ in prepared]) if prepared else np.zeros((0, self.image_size,
                                                                               self.image_size, 3), np.uint8)
        frame = self.decide(self.proba(inputs, tta), list(inputs), self.views(tta))
        decisions = pd.DataFrame([d for _, d in prepared])
        return pd.concat([frame, decisions], axis=1)

    def predict_files(self, paths: Sequence[ImageSource], tta: Optional[bool] = None, batch_size: int = 32,
                      progress: bool = True, on_error: Optional[Callable[[str, str], None]] = None) -> pd.DataFrame:
        """Predictions for image files, one row per path in order: ``path``,
        ``pred``, every ``prob_<class>``, ``max_prob``, ``abstain``, the stage
        decisions and ``error``. A file that cannot be read or processed gets
        its message in ``error`` (and ``on_error(path, message)`` is called)
        and empty predictions; the others go on."""
        from tqdm.auto import tqdm

        rows: List[Optional[pd.DataFrame]] = []
        batch: List[Tuple[int, np.ndarray, dict]] = []
        errors: Dict[int, str] = {}

        def flush():
            if not batch:
                return
            inputs = np.stack([x for _, x, _ in batch])
            frame = self.decide(self.proba(inputs, tta), list(inputs), self.views(tta))
            frame = pd.concat([frame, pd.DataFrame([d for _, _, d in batch])], axis=1)
            frame.insert(0, "_row", [i for i, _, _ in batch])
            rows.append(frame)
            batch.clear()

        for i, path in enumerate(tqdm(list(paths), desc="predict", unit="image", disable=not progress)):
            try:
                image = load_image(path)
                x, decisions = self.preprocess(image)
            except (DataError, OSError, ValueError, RuntimeError) as exc:
                message = str(exc) if str(path) in str(exc) else f"{path}: {exc}"
                errors[i] = message
                if on_error is not None:
                    on_error(str(path), message)
                continue
            batch.append((i, x, decisions))
            if len(batch) >= batch_size:
                flush()
        flush()
        columns = ["pred", *[f"prob_{c}" for c in self.classes], "max_prob", "abstain", "base_pred", "rescue",
                   "rescued"]
        done = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=["_row", *columns])
        out = pd.DataFrame({"_row": range(len(paths)), "path": [str(p) for p in paths]})
        out = out.merge(done, on="_row", how="left").drop(columns="_row")
        out["error"] = [errors.get(i, "") for i in range(len(paths))]
        return out
