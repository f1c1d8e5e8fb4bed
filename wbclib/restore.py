"""Restoration of noisy images: noise detection, filters, synthetic pairs, scoring.

The restoration stage of Nguyen et al. (2026, WBCBench), rebuilt on public
data:

1. **Noise detection.** Every image gets a *median-blur residual* score from
   ``R = |I - median3x3(I)|`` (per channel, at native resolution):

   * ``impulse`` – the fraction of pixels whose largest channel residual
     exceeds :data:`IMPULSE_LEVEL` grey levels. An isolated black or white
     pixel among smooth stained tissue leaves a residual of about a hundred
     grey levels; a clean pbc image has almost none (a few per 10,000), and
     blur and colour casts remove or keep them, never add them.
   * ``residual`` – the mean of ``R``. It also sees mild Gaussian noise, but
     a blurred image has *less* residual than a clean one, so a set with
     blurred images has a third, low mode.

   The threshold is data driven (:class:`NoiseDetector`): a Gaussian mixture
   on the log-scores with 1-3 components chosen by BIC; the lowest component
   is "clean" and an image is *noisy* when its posterior under it falls below
   one half. One component (no second population) flags nothing.
2. **Synthetic pairs** (:func:`make_pairs`): the benchmark's own degradation
   code (:mod:`wbclib.degrade`) applied to images the detector calls clean,
   with parameters drawn from a range (:data:`PAIR_RANGES`).
3. **Pix2Pix** (Isola et al. 2017) learns to undo them: :mod:`wbclib.pix2pix`.
   Chapter 08's protocol (images, settings, run folder) is
   :mod:`wbclib.protocols.restoration`.

Baselines are a 3x3 median filter and a bilateral filter; restoration is
scored by PSNR and SSIM (:func:`psnr`, :func:`ssim`) on held-out synthetic
pairs, and by the macro-F1 of a fixed classifier on the phase-2 degraded test
with flagged images restored (:class:`RestoredImageTable`).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import _io
from . import degrade as D
from . import metrics as M
from .augment import eval_transform
from .data import load_image
from .models import ImageTable, default_device, load_table_image

# --------------------------------------------------------------------------
# Median filter, bilateral filter, PSNR / SSIM
# --------------------------------------------------------------------------

def median3x3(image: np.ndarray) -> np.ndarray:
    """3x3 median filter of each channel, borders mirrored: OpenCV's ``medianBlur``.

    Equal to ``scipy.ndimage.median_filter(image, size=(3, 3, 1), mode="mirror")``
    (and to the numpy sorting network this replaced, kept in
    ``bench/reference_filters.py``) and 6-9 times faster than that network on
    pbc images (``bench/bench_filters.py``, one thread). ``medianBlur``
    replicates the edge pixel, so the image is mirrored by one pixel first
    and the result cropped. Takes uint8 images with 1, 3 or 4 channels (or 2-D).
    """
    padded = cv2.copyMakeBorder(image, 1, 1, 1, 1, cv2.BORDER_REFLECT_101)
    return np.ascontiguousarray(cv2.medianBlur(padded, 3)[1:-1, 1:-1].reshape(image.shape))


#: OpenCV's bilateral filter measures colour distance as the sum of the
#: channels' absolute differences (L1) where the filter it replaced used the
#: Euclidean distance; for noise-like differences L1 is about 1.5 times the
#: Euclidean (between 1 and sqrt(3)), and scaling ``sigma_color`` by 1.5 agreed
#: best with the old outputs on noisy pbc images (measured: 1.0, 1.3, 1.5, 1.73).
_L1_PER_EUCLIDEAN = 1.5


def bilateral(image: np.ndarray, sigma_color: float = 30.0, sigma_spatial: float = 1.5,
              radius: int = 2) -> np.ndarray:
    """Bilateral filter of an RGB ``uint8`` image: OpenCV's ``bilateralFilter``
    with ``d = 2 radius + 1``, mirrored borders.

    Each pixel becomes the average of its neighbours within ``radius`` (a
    disc) weighted by ``exp(-d^2 / 2 sigma_spatial^2) * exp(-c^2 / 2 s^2)``,
    ``c`` the colour distance summed over the channels (grey levels) and
    ``s = 1.5 sigma_color`` so that ``sigma_color`` keeps the meaning it had
    for Euclidean colour distances. 50-65 times faster than the numpy filter it
    replaced (square window, Euclidean distance: ``bench/reference_filters.py``;
    ``bench/bench_filters.py``, one thread); tests/test_speed_equivalence.py
    states how closely the two agree.
    """
    return cv2.bilateralFilter(image, 2 * radius + 1, _L1_PER_EUCLIDEAN * sigma_color, sigma_spatial,
                               borderType=cv2.BORDER_REFLECT_101)


def psnr(reference: np.ndarray, image: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of ``uint8`` images (infinite when identical)."""
    from skimage.metrics import peak_signal_noise_ratio

    if np.array_equal(reference, image):
        return float("inf")
    return float(peak_signal_noise_ratio(reference, image, data_range=255))


def ssim(reference: np.ndarray, image: np.ndarray) -> float:
    """Structural similarity of ``uint8`` RGB images (skimage defaults: 7x7 window, channels averaged)."""
    from skimage.metrics import structural_similarity

    return float(structural_similarity(reference, image, data_range=255, channel_axis=-1))


# --------------------------------------------------------------------------
# Noise detection
# --------------------------------------------------------------------------

#: A pixel is an impulse when a channel differs from its 3x3 median by more than this.
IMPULSE_LEVEL = 50
#: Added to each score before the logarithm: the sensitivity floor of each score.
SCORE_FLOORS = {"impulse": 1e-3, "residual": 1e-2}
SCORES = tuple(SCORE_FLOORS)


def noise_scores(image: np.ndarray) -> Dict[str, float]:
    """Both median-residual scores of an RGB ``uint8`` image: ``impulse`` (fraction of
    pixels with a channel residual above :data:`IMPULSE_LEVEL`) and ``residual``
    (mean absolute residual in grey levels)."""
    residual = np.abs(image.astype(np.int16) - median3x3(image).astype(np.int16))
    return {"impulse": float((residual.max(-1) > IMPULSE_LEVEL).mean()), "residual": float(residual.mean())}


def noise_score(image: np.ndarray, score: str = "impulse") -> float:
    return noise_scores(image)[score]


@dataclass
class NoiseDetector:
    """A clean / noisy threshold fitted on the scores of one image set.

    Fit with :meth:`fit`; ``threshold`` is in score units (``inf``: nothing is
    noisy). ``components`` is the number of mixture components BIC chose.
    """

    score: str = "impulse"
    threshold: float = math.inf
    components: int = 1
    method: str = "gmm"

    @classmethod
    def fit(cls, scores: Sequence[float], score: str = "impulse", method: str = "gmm", max_components: int = 3,
            min_var: float = 0.1, seed: int = 0) -> "NoiseDetector":
        """Threshold the log-scores ``z = log(s + floor)``.

        ``gmm``: Gaussian mixtures with 1..``max_components`` components (at
        most one per 8 images), the one with the lowest BIC kept; the lowest
        component is the clean population and the threshold is the smallest
        ``z`` above its mean where its posterior drops below 1/2. ``min_var``
        (added to every component's variance, in squared log units) keeps a
        near-constant clean cluster from putting the threshold at its very
        edge. ``otsu``: Otsu's threshold of ``z`` (always splits, even a
        clean-only set).
        """
        from sklearn.mixture import GaussianMixture

        z = _log_scores(scores, score)
        if method == "otsu":
            from .scale import otsu_threshold

            return cls(score=score, threshold=_from_log(otsu_threshold(z), score), components=2, method=method)
        if method != "gmm":
            raise ValueError(f"unknown threshold method {method!r}; known: gmm, otsu")
        x = z.reshape(-1, 1)
        best, best_bic = None, math.inf
        for k in range(1, max(1, min(max_components, len(z) // 8)) + 1):
            gmm = GaussianMixture(k, reg_covar=min_var, n_init=3, random_state=seed).fit(x)
            bic = gmm.bic(x)
            if bic < best_bic:
                best, best_bic = gmm, bic
        if best.n_components == 1:
            return cls(score=score, threshold=math.inf, components=1, method=method)
        clean = int(np.argmin(best.means_.ravel()))
        lo, hi = float(best.means_.ravel()[clean]), float(z.max()) + 1.0
        grid = np.linspace(lo, hi, 4001)
        post = best.predict_proba(grid.reshape(-1, 1))[:, clean]
        below = np.flatnonzero(post < 0.5)
        threshold = _from_log(grid[below[0]], score) if len(below) else math.inf
        return cls(score=score, threshold=threshold, components=best.n_components, method=method)

    def predict(self, scores: Sequence[float]) -> np.ndarray:
        """True where an image is called noisy."""
        return np.asarray(scores, dtype=float) > self.threshold

    def is_noisy(self, image: np.ndarray) -> bool:
        return bool(noise_score(image, self.score) > self.threshold)


def _log_scores(scores, score: str) -> np.ndarray:
    return np.log(np.asarray(scores, dtype=float) + SCORE_FLOORS[score])


def _from_log(z: float, score: str) -> float:
    return float(np.exp(z) - SCORE_FLOORS[score])


def detection_scores(truth: Sequence[bool], called: Sequence[bool]) -> Dict[str, float]:
    """Precision, recall and F1 of the "noisy" call; counts of each outcome."""
    truth, called = np.asarray(truth, bool), np.asarray(called, bool)
    tp, fp, fn = int((truth & called).sum()), int((~truth & called).sum()), int((truth & ~called).sum())
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
    return dict(precision=precision, recall=recall, f1=f1, tp=tp, fp=fp, fn=fn, n=len(truth))


# --------------------------------------------------------------------------
# Synthetic pairs (the benchmark's degradation code)
# --------------------------------------------------------------------------

#: Uniform parameter ranges of the synthetic degradations: salt-and-pepper
#: density and Gaussian-blur sigma (a fraction of the shorter side) span the
#: phase-2 severities 1-4 of :data:`degrade.SEVERITY_PARAMS`; Gaussian-noise
#: sigma is in grey levels.
PAIR_RANGES: Dict[str, Tuple[float, float]] = {
    "salt_pepper": (D.SEVERITY_PARAMS["salt_pepper"][1], D.SEVERITY_PARAMS["salt_pepper"][4]),
    "gaussian_noise": (5.0, 25.0),
    "gaussian_blur": (D.SEVERITY_PARAMS["gaussian_blur"][1], D.SEVERITY_PARAMS["gaussian_blur"][4]),
}


def synthetic(image: np.ndarray, kind: str, param: float, rng: np.random.Generator) -> np.ndarray:
    """One synthetic degradation with an explicit parameter (see :data:`PAIR_RANGES`)."""
    if kind == "salt_pepper":
        return D.salt_and_pepper(image, param, rng)
    if kind == "gaussian_noise":
        return D.gaussian_noise(image, param, rng)
    if kind == "gaussian_blur":
        return D.gaussian_blur(image, param * min(image.shape[:2]))
    raise ValueError(f"unknown synthetic degradation {kind!r}; known: {', '.join(PAIR_RANGES)}")


def make_pairs(images: Sequence[np.ndarray], kinds: Sequence[str], rng: np.random.Generator,
               ranges: Optional[Dict[str, Tuple[float, float]]] = None) -> Tuple[List[np.ndarray], pd.DataFrame]:
    """Degrade each clean image by one of ``kinds`` (drawn uniformly) with a parameter
    drawn uniformly from its range.

    Returns the degraded images (same order, the inputs are untouched) and a
    table with each image's ``kind`` and ``param``.
    """
    ranges = {**PAIR_RANGES, **(ranges or {})}
    unknown = sorted(set(kinds) - set(ranges))
    if unknown or not len(kinds):
        raise ValueError(f"kinds must be among {sorted(ranges)}; got {list(kinds)}")
    noisy, meta = [], []
    for image in images:
        kind = kinds[int(rng.integers(len(kinds)))]
        param = float(rng.uniform(*ranges[kind]))
        noisy.append(synthetic(image, kind, param, rng))
        meta.append(dict(kind=kind, param=param))
    return noisy, pd.DataFrame(meta, columns=["kind", "param"])


def random_crop(images: Sequence[np.ndarray], size: int, rng: np.random.Generator) -> List[np.ndarray]:
    """The same random ``size`` x ``size`` window of each image (reflect-padded if smaller)."""
    h, w = images[0].shape[:2]
    if h < size or w < size:
        pad = ((0, max(0, size - h)), (0, max(0, size - w)), (0, 0))
        images = [np.pad(im, pad, mode="reflect") for im in images]
        h, w = images[0].shape[:2]
    y, x = int(rng.integers(h - size + 1)), int(rng.integers(w - size + 1))
    return [im[y:y + size, x:x + size] for im in images]


def table_scores(table: pd.DataFrame, root: Path, degrade_seed: int = 0, desc: str = "noise scores") -> pd.DataFrame:
    """Both noise scores of every row's image as the loader sees it (degraded where the row says so)."""
    kinds = table["degradation"] if "degradation" in table else [None] * len(table)
    levels = table["severity"] if "severity" in table else [0] * len(table)
    rows = [noise_scores(load_table_image(root, p, k, l, degrade_seed))
            for p, k, l in tqdm(list(zip(table["path"], kinds, levels)), desc=desc, leave=False)]
    return pd.DataFrame(rows, index=table.index, columns=list(SCORES))




#: The classical restorers, by name.
BASELINES: Dict[str, Callable[[np.ndarray], np.ndarray]] = {"median 3x3": median3x3, "bilateral": bilateral}


# --------------------------------------------------------------------------
# Scoring restorations on held-out synthetic pairs
# --------------------------------------------------------------------------

#: (kind, label, parameter) of the held-out evaluation: salt-and-pepper at the
#: four phase-2 densities, Gaussian noise, and the phase-2 blur at severity 2.
EVAL_CONDITIONS: List[Tuple[str, str, float]] = (
    [("salt_pepper", f"density {d:g}", d) for d in D.SEVERITY_PARAMS["salt_pepper"].values()]
    + [("gaussian_noise", "sigma 10", 10.0), ("gaussian_noise", "sigma 20", 20.0)]
    + [("gaussian_blur", f"sigma {D.SEVERITY_PARAMS['gaussian_blur'][2]:g} x side", D.SEVERITY_PARAMS["gaussian_blur"][2])]
)


def evaluate_restorers(table: pd.DataFrame, root: Path, restorers: Dict[str, Callable[[np.ndarray], np.ndarray]],
                       conditions: Sequence[Tuple[str, str, float]] = EVAL_CONDITIONS, seed: int = 0) -> pd.DataFrame:
    """PSNR and SSIM against the clean image of the degraded input ("noisy
    input") and of each restorer's output, for every image and condition:
    a long table (``path``, ``kind``, ``condition``, ``method``, ``psnr``,
    ``ssim``). The degradation of image ``i`` under condition ``c`` is seeded
    by ``(seed, i, c)`` (:func:`degraded_example` rebuilds it)."""
    rows = []
    for i, path in enumerate(tqdm(list(table["path"]), desc="restoration scores", leave=False)):
        clean = load_image(Path(root) / path)
        for c, (kind, label, param) in enumerate(conditions):
            noisy = synthetic(clean, kind, param, np.random.default_rng([seed, i, c]))
            outputs = {"noisy input": noisy, **{name: fn(noisy) for name, fn in restorers.items()}}
            for name, out in outputs.items():
                rows.append(dict(path=path, kind=kind, condition=label, method=name, psnr=psnr(clean, out),
                                 ssim=ssim(clean, out)))
    return pd.DataFrame(rows)


def degraded_example(root: Path, path: str, i: int, c: int, conditions=EVAL_CONDITIONS, seed: int = 0):
    """``(clean, degraded)`` of image ``i`` under condition ``c`` as :func:`evaluate_restorers` made them."""
    clean = load_image(Path(root) / path)
    kind, _, param = conditions[c]
    return clean, synthetic(clean, kind, param, np.random.default_rng([seed, i, c]))


def restoration_table(scores: pd.DataFrame, by: Sequence[str] = ("kind", "condition")) -> pd.DataFrame:
    """Mean PSNR (dB) and SSIM per condition (rows) and method (columns)."""
    order = list(dict.fromkeys(scores["method"]))
    g = scores.groupby(list(by) + ["method"], sort=False)[["psnr", "ssim"]].mean().unstack("method")
    return g.reindex(columns=pd.MultiIndex.from_product([["psnr", "ssim"], order]))


# --------------------------------------------------------------------------
# Detector precision / recall with known noise rates
# --------------------------------------------------------------------------

#: Noise kinds of the detector experiment and their parameter ranges.
DETECTOR_NOISE = ("salt_pepper", "gaussian_noise")


def detector_versions(table: pd.DataFrame, root: Path, seed: int = 0) -> pd.DataFrame:
    """Scores of every image in four versions, to assemble sets at any noise rate.

    ``background`` ``pristine`` is the image itself; ``mixed`` is the image
    left alone, blurred or given an illumination shift (a third each, at a
    random phase-2 severity; the non-noise degradations of the benchmark).
    ``version`` ``clean`` is the background, and ``salt_pepper`` /
    ``gaussian_noise`` add that noise to it with a parameter drawn from
    :data:`PAIR_RANGES`. One row per (image, background, version).
    """
    rows = []
    for i, path in enumerate(tqdm(list(table["path"]), desc="detector scores", leave=False)):
        rng = np.random.default_rng([seed, i])
        image = load_image(Path(root) / path)
        other = ["none", "gaussian_blur", "illumination"][int(rng.integers(3))]
        level = int(rng.integers(1, 5))
        backgrounds = {"pristine": image,
                       "mixed": image if other == "none" else D.degrade(image, other, level, rng)}
        for bg, base in backgrounds.items():
            rows.append(dict(image=i, path=path, background=bg, other=other if bg == "mixed" else "none",
                             version="clean", param=0.0, **noise_scores(base)))
            for kind in DETECTOR_NOISE:
                param = float(rng.uniform(*PAIR_RANGES[kind]))
                rows.append(dict(image=i, path=path, background=bg, other=other if bg == "mixed" else "none",
                                 version=kind, param=param, **noise_scores(synthetic(base, kind, param, rng))))
    return pd.DataFrame(rows)


def noise_rate_set(versions: pd.DataFrame, background: str, kind: str, rate: float, seed: int = 0) -> pd.DataFrame:
    """One image set: every image once, a ``rate`` share of them (chosen at random) noisy
    with ``kind``. Adds ``noisy`` (the truth)."""
    part = versions[versions["background"] == background]
    images = np.sort(part["image"].unique())
    rng = np.random.default_rng([seed, int(round(1000 * rate))])
    noisy = set(rng.choice(images, int(round(rate * len(images))), replace=False).tolist())
    pick = np.array([(v == kind) == (i in noisy) for i, v in zip(part["image"], part["version"])])
    pick &= part["version"].isin(["clean", kind]).to_numpy()
    out = part[pick].copy()
    out["noisy"] = out["version"] == kind
    return out.sort_values("image").reset_index(drop=True)


def detector_rates(versions: pd.DataFrame, rates: Sequence[float] = (0.1, 0.3, 0.5), seed: int = 0,
                   scores: Sequence[str] = SCORES) -> pd.DataFrame:
    """Precision / recall of the fitted detector on sets with known noise rates:
    one row per (background, noise kind, rate, score)."""
    rows = []
    for background in sorted(versions["background"].unique(), reverse=True):
        for kind in DETECTOR_NOISE:
            for rate in rates:
                s = noise_rate_set(versions, background, kind, rate, seed)
                for score in scores:
                    det = NoiseDetector.fit(s[score], score=score, seed=seed)
                    rows.append(dict(background=background, noise=kind, rate=rate, score=score,
                                     threshold=det.threshold, components=det.components,
                                     **detection_scores(s["noisy"], det.predict(s[score]))))
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------
# A fixed classifier on restored images
# --------------------------------------------------------------------------


class RestoredImageTable(ImageTable):
    """:class:`models.ImageTable` with restoration: rows with ``flags[i]`` true are
    passed through ``restorer`` (``uint8`` -> ``uint8``) after the
    degradation and before stain normalisation, cropping and resizing.
    Without flags it returns exactly what ``ImageTable`` does.

    Run it with ``num_workers=0`` when the restorer is a network.
    """

    def __init__(self, table: pd.DataFrame, root: Path, classes: Sequence[str], image_size: int,
                 degrade_seed: int = 0, transform=None, flags: Optional[Sequence[bool]] = None,
                 restorer: Optional[Callable[[np.ndarray], np.ndarray]] = None):
        super().__init__(table, root, classes, image_size, degrade_seed=degrade_seed, transform=transform)
        self.flags = np.zeros(len(table), bool) if flags is None else np.asarray(flags, bool)
        if len(self.flags) != len(table):
            raise ValueError(f"{len(self.flags)} flags for {len(table)} rows")
        if self.flags.any() and restorer is None:
            raise ValueError("flagged rows need a restorer")
        self.restorer = restorer

    def native_image(self, i: int) -> np.ndarray:
        image = super().native_image(i)
        return self.restorer(image) if self.flags[i] else image


def load_classifier(run_dir: Path, num_classes: int, device: Optional[torch.device] = None):
    """The fine-tuned model of a :func:`train.train_run` folder (``best.pt``) and its config."""
    from .train import TrainConfig, build_method

    run_dir = Path(run_dir)
    saved = _io.read_json(run_dir / "config.json")["identity"]["config"]
    names = {f.name for f in fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in saved.items() if k in names})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        method = build_method(config, num_classes=num_classes, num_domains=1, class_counts=[1] * num_classes)
    device = device or default_device()
    method.load_state_dict(_io.torch_load(run_dir / "best.pt"))
    return method.to(device).eval(), config


def classify(method, config, table: pd.DataFrame, root: Path, classes: Sequence[str],
             flags: Optional[Sequence[bool]] = None, restorer=None, device: Optional[torch.device] = None,
             desc: str = "classify") -> pd.DataFrame:
    """Per-image predictions (:func:`train.predictions_frame`) of a fixed classifier,
    with the flagged rows restored; ``flagged`` records which."""
    from .train import predict_proba, predictions_frame

    dataset = RestoredImageTable(table, root, classes, config.image_size, config.degrade_seed,
                                 transform=eval_transform(config.augmentation, config.image_size),
                                 flags=flags, restorer=restorer)
    workers = 0 if restorer is not None else None
    probs = predict_proba(method, dataset, device=device, num_workers=workers, desc=desc)
    pred = predictions_frame(table, probs, classes)
    pred["flagged"] = dataset.flags
    return pred


def applied_kind(frame: pd.DataFrame) -> pd.Series:
    """Each row's degradation as applied: its ``degradation`` kind where its
    ``severity`` is above 0, else ``"none"``. Phase-2 rows keep their drawn
    kind at severity 0 (the pristine image), so ``degradation`` alone does
    not say whether an image is degraded."""
    kind = (frame["degradation"].fillna("none").astype(str) if "degradation" in frame
            else pd.Series("none", index=frame.index))
    if "severity" in frame:
        kind = kind.where(pd.to_numeric(frame["severity"]).fillna(0).to_numpy() > 0, "none")
    return kind


def is_degraded_by(frame: pd.DataFrame, kind: str) -> pd.Series:
    """Whether each row's image carries ``kind`` (``degradation == kind`` and ``severity`` > 0)."""
    return applied_kind(frame).eq(kind)


def macro_f1_by_kind(pred: pd.DataFrame, classes: Sequence[str], n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Macro-F1 with its bootstrap interval on all rows and on each degradation
    kind's rows (:func:`applied_kind`: rows at severity 0 are ``"none"``)."""
    index = {c: i for i, c in enumerate(classes)}
    parts = [("all", pred)] + [(k, g) for k, g in pred.groupby(applied_kind(pred), sort=True)]
    rows = []
    for kind, g in parts:
        s = M.evaluate(g["label"].map(index).to_numpy(), g["pred"].map(index).to_numpy(), len(classes),
                       n_boot=n_boot, seed=seed)
        rows.append(dict(kind=kind, n=len(g), flagged=int(g["flagged"].sum()) if "flagged" in g else 0,
                         macro_f1=s["macro_f1"], macro_f1_low=s.get("macro_f1_low", np.nan),
                         macro_f1_high=s.get("macro_f1_high", np.nan), accuracy=s["accuracy"]))
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------


def score_histograms(versions: pd.DataFrame, rate: float = 0.3, seed: int = 0):
    """Histograms of both log-scores (rows) for pristine and mixed backgrounds
    (columns), clean vs each noise; dashed lines: the thresholds fitted on the
    sets with ``rate`` of each noise. Returns the Figure."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    backgrounds = sorted(versions["background"].unique(), reverse=True)
    fig, axes = plt.subplots(len(SCORES), len(backgrounds), figsize=(5 * len(backgrounds), 3.2 * len(SCORES)),
                             squeeze=False)
    palette = dict(zip(["clean", *DETECTOR_NOISE], sns.color_palette(n_colors=3)))
    for r, score in enumerate(SCORES):
        for c, background in enumerate(backgrounds):
            ax = axes[r, c]
            part = versions[versions["background"] == background].assign(
                log_score=lambda d: np.log10(d[score] + SCORE_FLOORS[score]))
            sns.histplot(data=part, x="log_score", hue="version", hue_order=list(palette), palette=palette,
                         bins=40, element="step", ax=ax)
            for kind in DETECTOR_NOISE:
                s = noise_rate_set(versions, background, kind, rate, seed)
                det = NoiseDetector.fit(s[score], score=score, seed=seed)
                if math.isfinite(det.threshold):
                    ax.axvline(np.log10(det.threshold + SCORE_FLOORS[score]), color=palette[kind], ls="--", lw=1.2)
            ax.set_xlabel(f"log10({score} + {SCORE_FLOORS[score]:g})")
            ax.set_title(f"{score} score, {background} background", fontsize=10)
    fig.tight_layout()
    return fig
