"""Chapter 08's restoration protocol: which images, which settings, one run folder.

The chapter's tables are cached inside one ``restoration`` run folder whose
identity covers the profile's restoration settings, the chosen images (rows,
data root, file sizes and times) and the code (:func:`chapter_run`); the
Pix2Pix run is nested in it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from .. import _io, runs
from ..pix2pix import Pix2PixConfig
from ..restore import classify, macro_f1_by_kind
from ..runs import inputs_fingerprint

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
