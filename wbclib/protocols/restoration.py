"""Chapter 08's restoration protocol: which images, which settings, one run folder.

The chapter's tables are cached inside one ``restoration`` run folder whose
identity covers the profile's restoration settings, the chosen images (rows,
data root, file sizes and times) and the code (:func:`chapter_run`); the
Pix2Pix run is nested in it.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from .. import _io, runs
from ..benchmarks import PBC_LT_CLASSES, read_pbc_lt
from ..models import load_table_image
from ..pix2pix import Pix2PixConfig, Pix2PixRestorer, train_pix2pix
from ..restore import (BASELINES, EVAL_CONDITIONS, NoiseDetector, applied_kind, classify, degraded_example,
                       detection_scores, detector_rates, detector_versions, evaluate_restorers, is_degraded_by,
                       load_classifier, macro_f1_by_kind, table_scores)
from ..runs import inputs_fingerprint
from .common import cell_centred

# --------------------------------------------------------------------------
# Selecting images
# --------------------------------------------------------------------------


def round_robin(rows: pd.DataFrame, n: Optional[int], exclude: Sequence[str] = ()) -> pd.DataFrame:
    """``n`` rows spread over the classes (rank 0 of each class, then rank 1, ...),
    leaving out the paths in ``exclude``; all rows when ``n`` is None."""
    rows = rows[~rows["path"].isin(set(exclude))]
    rows = rows.sort_values(["rank", "label", "path"])
    return (rows if n is None else rows.head(int(n))).reset_index(drop=True)


# --------------------------------------------------------------------------
# The chapter's protocol (notebook 08)
# --------------------------------------------------------------------------


def cached_frame(path: Path, compute: Callable[[], pd.DataFrame]) -> pd.DataFrame:
    """Read ``path`` (CSV, inside the chapter's run folder, whose identity covers
    what it depends on) when it exists, else compute, write atomically and return."""
    path = Path(path)
    if path.is_file():
        return _io.read_csv(path)
    frame = compute()
    _io.write_csv(path, frame)
    return frame


#: The profile keys that decide the chapter's cached tables.
CHAPTER_KEYS = ("restore_detector_images", "restore_rates", "restore_pool_images", "restore_heldout_images",
                "restore_kinds", "p2p_crop", "p2p_epochs", "p2p_crops_per_image", "p2p_batch_size", "p2p_channels",
                "p2p_depth", "p2p_d_channels", "p2p_d_layers", "p2p_lr", "n_boot", "finetune_folds")


def chapter_run(results_dir: Path, cfg, root: Path, images: Dict[str, pd.DataFrame], seed: int = 0) -> runs.Run:
    """The chapter's run folder (``restoration``), named by the hash of its
    settings (:data:`CHAPTER_KEYS`), its images (rows, data root, files) and the
    code: tables cached in it are never reused for other settings or data."""
    settings = dict(seed=seed, **{k: getattr(cfg, k) for k in CHAPTER_KEYS})
    return runs.run(results_dir, "restoration", settings, inputs_fingerprint(images, root))


def chapter_images(cfg, table: pd.DataFrame) -> Dict[str, pd.DataFrame]:
    """The chapter's images, all from PBC-LT's cross-validation part (never its test):

    * ``heldout`` – ``restore_heldout_images`` pristine images for PSNR / SSIM;
    * ``detector`` – ``restore_detector_images`` others, for noise injected at known rates;
    * ``pool`` – ``restore_pool_images`` other than the held-out ones (all when
      None), every one degraded by its stress draw (:func:`benchmarks.stress`,
      the original all-degraded phase 2): the "raw" set the detector
      partitions and whose clean part trains Pix2Pix.

    Each is spread over the classes (:func:`round_robin`).
    """
    from ..benchmarks import stress

    cv = table[table["split"] == "cv"]
    heldout = round_robin(cv, cfg.restore_heldout_images)
    detector = round_robin(cv, cfg.restore_detector_images, exclude=heldout["path"])
    pool = stress(round_robin(cv, cfg.restore_pool_images, exclude=heldout["path"]))
    return dict(heldout=heldout, detector=detector, pool=pool)


def pix2pix_config(cfg, seed: int = 0) -> Pix2PixConfig:
    """The profile's Pix2Pix settings (``p2p_*`` and ``restore_kinds``)."""
    return Pix2PixConfig(kinds=list(cfg.restore_kinds), crop=cfg.p2p_crop, epochs=cfg.p2p_epochs,
                         crops_per_image=cfg.p2p_crops_per_image, batch_size=cfg.p2p_batch_size,
                         channels=cfg.p2p_channels, depth=cfg.p2p_depth, d_channels=cfg.p2p_d_channels,
                         d_layers=cfg.p2p_d_layers, lr=cfg.p2p_lr, seed=seed)


def ensure_erm_classifier(cfg, root: Path, splits_dir: Path, results_dir: Path, rho: int = 100, fold: int = 0,
                          seed: int = 0) -> Path:
    """The run folder of chapter 03's fine-tuned ERM model at (rho, fold): read
    back when finished, trained here (resumably, same identity) otherwise."""
    from types import SimpleNamespace

    from .pbc_lt import pbc_lt_finetune

    only = SimpleNamespace(**{**vars(cfg), "finetune_rhos": [rho], "finetune_folds": [fold]})
    runs_table = pbc_lt_finetune(only, root, splits_dir, results_dir, method="erm", seed=seed)
    return Path(runs_table["run_dir"].iloc[0])


def restoration_effect(method, config, test: pd.DataFrame, root: Path, classes: Sequence[str],
                       flags: Sequence[bool], restorers: Dict[str, Callable[[np.ndarray], np.ndarray]],
                       out_dir: Path, n_boot: int = 1000, device: Optional[torch.device] = None):
    """Predictions of a fixed classifier on ``test`` as it is (``as is``) and with
    the flagged images restored by each restorer; each condition's
    predictions are cached as ``out_dir/predictions_<name>.csv``.

    Returns ``(predictions by condition, macro-F1 table by condition and kind)``.
    """
    out_dir = Path(out_dir)
    conditions = {"as is": None, **restorers}
    preds, tables = {}, []
    for name, restorer in conditions.items():
        slug = name.replace(" ", "_").replace("/", "_")
        pred = cached_frame(out_dir / f"predictions_{slug}.csv", lambda: classify(
            method, config, test, root, classes, flags=None if restorer is None else flags, restorer=restorer,
            device=device, desc=name))
        preds[name] = pred
        tables.append(macro_f1_by_kind(pred, classes, n_boot=n_boot).assign(condition=name))
    return preds, pd.concat(tables, ignore_index=True)


# --------------------------------------------------------------------------
# The chapter's steps, one per notebook cell (notebook 08)
# --------------------------------------------------------------------------


def _rounded(scores: Dict[str, object]) -> Dict[str, object]:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in scores.items()}


def chapter_setup(cfg, root: Path, splits_dir: Path, results_dir: Path, seed: int = 0) -> SimpleNamespace:
    """PBC-LT's table and definition, the chapter's images (:func:`chapter_images`),
    its run folder ``out`` (:func:`chapter_run`) and a one-line ``summary`` of the sizes."""
    table, definition = read_pbc_lt(splits_dir, seed)
    table = cell_centred(table, cfg)
    images = chapter_images(cfg, table)
    out = chapter_run(results_dir, cfg, root, images, seed).dir
    summary = (f"profile {cfg.name}: {len(images['detector'])} images for the detector, a raw set of "
               f"{len(images['pool'])}, {len(images['heldout'])} held-out images for PSNR/SSIM; "
               f"Pix2Pix on {cfg.p2p_crop} px crops, {cfg.p2p_epochs} epochs")
    return SimpleNamespace(table=table, definition=definition, images=images, out=out, summary=summary)


def detector_study(out: Path, images: pd.DataFrame, root: Path, rates: Sequence[float], seed: int = 0) -> tuple:
    """The detector's images in every noise version (:func:`restore.detector_versions`)
    and its precision / recall at each injected noise rate
    (:func:`restore.detector_rates`), both cached in the chapter's folder ``out``.
    Returns ``(versions, rates table)``."""
    versions = cached_frame(out / "detector_versions.csv", lambda: detector_versions(images, root, seed=seed))
    scores = cached_frame(out / "detector_rates.csv", lambda: detector_rates(versions, rates, seed=seed))
    return versions, scores


def rates_table(rates: pd.DataFrame) -> pd.DataFrame:
    """Precision and recall per (background, noise, rate) row and score column, rounded to 3 digits."""
    return rates.pivot_table(index=["background", "noise", "rate"], columns="score",
                             values=["precision", "recall"]).round(3)


def partition_raw_set(out: Path, pool: pd.DataFrame, root: Path, seed: int = 0) -> SimpleNamespace:
    """Fit the impulse-score detector on the raw set ``pool`` alone and call each image.

    Returns ``pool`` (with ``impulse`` and ``noisy``), the fitted ``detector``,
    ``detection`` (noisy call against the salt-and-pepper truth), ``calls`` (a
    crosstab of degradation and severity against the call) and a two-line ``report``.
    """
    scores = cached_frame(out / "pool_scores.csv", lambda: table_scores(pool, root).reset_index(drop=True))
    detector = NoiseDetector.fit(scores["impulse"], score="impulse", seed=seed)
    pool = pool.reset_index(drop=True).assign(impulse=scores["impulse"], noisy=detector.predict(scores["impulse"]))
    detection = detection_scores(is_degraded_by(pool, "salt_pepper"), pool["noisy"])
    report = (f"threshold: impulse share > {detector.threshold:.2e} ({detector.components} mixture components)\n"
              f"noisy call vs truth (salt-and-pepper) on the raw set: {_rounded(detection)}")
    return SimpleNamespace(pool=pool, detector=detector, detection=detection, calls=noisy_calls(pool),
                           report=report)


def noisy_calls(pool: pd.DataFrame) -> pd.DataFrame:
    """Images per (degradation, severity) called ``clean`` or ``noisy`` (a crosstab of the ``noisy`` column;
    rows at severity 0 under ``none``, :func:`restore.applied_kind`)."""
    return pd.crosstab([applied_kind(pool).rename("degradation"), pool["severity"]],
                       pool["noisy"].map({True: "noisy", False: "clean"}))


def pix2pix_report(summary: dict) -> str:
    """One line on a Pix2Pix run from its ``summary.json``: images, epochs x steps,
    minutes, and the sizes of both networks."""
    return (f"Pix2Pix: {summary['train_images']} clean images, {summary['epochs']} epochs x "
            f"{summary['steps_per_epoch']} steps, trained in {summary['seconds'] / 60:.1f} min; generator "
            f"{summary['generator_parameters'] / 1e6:.2f} M parameters, discriminator "
            f"{summary['discriminator_parameters'] / 1e6:.2f} M ({summary['discriminator_receptive_field']} px patches)")


def train_restorer(cfg, clean: pd.DataFrame, root: Path, out: Path, heldout: pd.DataFrame,
                   seed: int = 0) -> SimpleNamespace:
    """Pix2Pix (:func:`pix2pix_config`) trained on the images called ``clean``, in
    ``out/pix2pix`` (resumed or read back), validated on ``heldout``.

    Returns the ``generator``, ``restorers`` (the baselines and ``Pix2Pix``),
    the run's ``summary``, its per-epoch ``history`` and a one-line ``report``.
    """
    run_dir = Path(out) / "pix2pix"
    generator = train_pix2pix(pix2pix_config(cfg, seed), clean, root, run_dir, val_table=heldout)
    summary = json.loads((run_dir / "summary.json").read_text())
    history = _io.read_csv(run_dir / "history.csv")
    return SimpleNamespace(generator=generator, restorers={**BASELINES, "Pix2Pix": Pix2PixRestorer(generator)},
                           summary=summary, history=history, report=pix2pix_report(summary))


def restoration_quality(out: Path, heldout: pd.DataFrame, root: Path,
                        restorers: Dict[str, Callable[[np.ndarray], np.ndarray]], seed: int = 0) -> pd.DataFrame:
    """PSNR / SSIM of every restorer on the held-out synthetic pairs
    (:func:`restore.evaluate_restorers`), cached in the chapter's folder."""
    return cached_frame(out / "restoration_scores.csv", lambda: evaluate_restorers(heldout, root, restorers, seed=seed))


def before_after_examples(root: Path, heldout: pd.DataFrame, pool: pd.DataFrame,
                          restorers: Dict[str, Callable[[np.ndarray], np.ndarray]], n_heldout: int = 2,
                          n_flagged: int = 2, seed: int = 0) -> tuple:
    """Rows for :func:`wbclib.plots.image_grid`: the first ``n_heldout`` held-out images
    at the third salt-and-pepper condition of :data:`restore.EVAL_CONDITIONS`, then
    the first ``n_flagged`` images of the raw set called noisy (next to the pristine
    file they were made from), each restored by every restorer. Returns ``(rows, titles)``."""
    sp3 = [c for c, (kind, _, _) in enumerate(EVAL_CONDITIONS) if kind == "salt_pepper"][2]
    rows, titles = [], []
    for i, path in enumerate(heldout["path"][:n_heldout]):
        clean, noisy = degraded_example(root, path, i, sp3, seed=seed)
        rows.append({"noisy": noisy, **{k: f(noisy) for k, f in restorers.items()}, "clean": clean})
        titles.append(f"held out: {EVAL_CONDITIONS[sp3][1]}")
    for _, row in pool[pool["noisy"]].head(n_flagged).iterrows():
        noisy = load_table_image(root, row["path"], row["degradation"], row["severity"])
        rows.append({"noisy": noisy, **{k: f(noisy) for k, f in restorers.items()},
                     "clean": load_table_image(root, row["path"])})
        titles.append(f"raw set: {row['degradation']} {row['severity']}")
    return rows, titles


def flagged_share(test: pd.DataFrame, flags: Sequence[bool]) -> pd.DataFrame:
    """Share of test images flagged noisy per degradation (rows) and severity (columns), 2 digits; rows at
    severity 0 (pristine, whatever kind they were drawn) under ``none`` (:func:`restore.applied_kind`)."""
    frame = test.assign(flagged=list(flags), degradation=applied_kind(test))
    return frame.groupby(["degradation", "severity"])["flagged"].mean().unstack().round(2)


def degraded_test(cfg, root: Path, splits_dir: Path, results_dir: Path, table: pd.DataFrame, definition,
                  out: Path, detector, eval_set: str, rho: int = 100, fold: int = 0, seed: int = 0) -> SimpleNamespace:
    """The fixed classifier (chapter 03's fine-tuned ERM at ``rho``, ``fold``:
    :func:`ensure_erm_classifier`) and the degraded PBC-LT test set ``eval_set``
    (a key of :func:`pbc_lt.pbc_lt_sets`), with the ``detector``'s noisy ``flags``
    on it.

    The test's noise scores, and the predictions :func:`effect_on_classifier`
    caches, live in ``out/<eval_set>-<classifier run folder>`` (``folder``): the
    chapter's run identity does not cover the test set or the classifier, so a
    change of either reads nothing stale.

    Returns ``run_dir``, ``method``, ``train_config``, ``classes``, ``eval_set``,
    ``folder``, ``test``, ``flags``, ``detection`` (flags against the
    salt-and-pepper truth), ``flagged`` (:func:`flagged_share`) and a one-line ``report``.
    """
    from .pbc_lt import pbc_lt_sets

    run_dir = ensure_erm_classifier(cfg, root, splits_dir, results_dir, rho=rho, fold=fold, seed=seed)
    classes = list(PBC_LT_CLASSES)
    method, train_config = load_classifier(run_dir, len(classes))
    _, sets = pbc_lt_sets(cfg, table, definition, rho, fold)
    test = sets[eval_set].reset_index(drop=True)
    folder = Path(out) / f"{eval_set}-{Path(run_dir).name}"
    scores = cached_frame(folder / "test_scores.csv", lambda: table_scores(test, root).reset_index(drop=True))
    flags = detector.predict(scores["impulse"])
    detection = detection_scores(is_degraded_by(test, "salt_pepper"), flags)
    name = eval_set.replace("test_", "")
    return SimpleNamespace(run_dir=run_dir, method=method, train_config=train_config, classes=classes,
                           eval_set=eval_set, folder=folder, test=test, flags=flags, detection=detection,
                           flagged=flagged_share(test, flags),
                           report=f"noisy call vs truth on the {name} test: {_rounded(detection)}")


def interval_table(effect: pd.DataFrame, conditions: Sequence[str]) -> pd.DataFrame:
    """``macro-F1 [low, high]`` per kind (rows) and condition (columns, in the order given)."""
    cells = effect.assign(interval=[f"{a:.3f} [{lo:.3f}, {hi:.3f}]" for a, lo, hi in
                                    zip(effect["macro_f1"], effect["macro_f1_low"], effect["macro_f1_high"])])
    return cells.pivot(index="kind", columns="condition", values="interval")[list(conditions)]


def agreement_report(run_dir: Path, as_is: pd.DataFrame, eval_set: str) -> str:
    """How often the ``as is`` predictions equal the ones the classifier's own run
    saved on ``eval_set``, and that run's macro-F1 on the pristine test and on ``eval_set``."""
    saved = _io.read_csv(Path(run_dir) / f"predictions_{eval_set}.csv")
    agree = (saved["pred"].to_numpy() == as_is["pred"].to_numpy()).mean()
    reference = json.loads((Path(run_dir) / "metrics.json").read_text())
    return (f"'as is' reproduces chapter 03's predictions on {100 * agree:.1f} % of images; "
            f"macro-F1 on the pristine test {reference['test']['macro_f1']:.3f}, "
            f"{eval_set.replace('test_', '')} {reference[eval_set]['macro_f1']:.3f}")


def effect_on_classifier(test: SimpleNamespace, restorers: Dict[str, Callable[[np.ndarray], np.ndarray]],
                         root: Path, n_boot: int = 1000) -> SimpleNamespace:
    """:func:`restoration_effect` for the fixed classifier of :func:`degraded_test`
    (``test``) with ``restorers`` applied to its flagged images, cached in
    ``test.folder/classify``.

    Returns ``preds`` (by condition), ``effect`` (macro-F1 by condition and kind),
    ``intervals`` (:func:`interval_table`) and ``report`` (:func:`agreement_report`).
    """
    preds, effect = restoration_effect(test.method, test.train_config, test.test, root, test.classes, test.flags,
                                       restorers, Path(test.folder) / "classify", n_boot=n_boot)
    return SimpleNamespace(preds=preds, effect=effect, intervals=interval_table(effect, list(preds)),
                           report=agreement_report(test.run_dir, preds["as is"], test.eval_set))


def salt_pepper_report(effect: pd.DataFrame, quality: pd.DataFrame) -> str:
    """Two lines: macro-F1 on the salt-and-pepper test images in each condition
    (``as is``, ``Pix2Pix``, ``median 3x3``), and the mean PSNR / SSIM of each
    method on the held-out salt-and-pepper pairs."""
    sp = effect[effect["kind"] == "salt_pepper"].set_index("condition")["macro_f1"]
    mean_q = quality[quality["kind"] == "salt_pepper"].groupby("method")[["psnr", "ssim"]].mean()
    return (f"salt-and-pepper test images: macro-F1 {sp['as is']:.3f} as is, {sp['Pix2Pix']:.3f} after Pix2Pix, "
            f"{sp['median 3x3']:.3f} after the median filter\n"
            "held-out salt-and-pepper pairs, mean PSNR (dB) / SSIM: "
            + ", ".join(f"{m} {r.psnr:.1f} / {r.ssim:.3f}" for m, r in mean_q.iterrows()))
