"""Pieces every protocol shares: class indices, linear-probe runs, scoring saved predictions."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Sequence

import numpy as np
import pandas as pd

from .. import runs
from ..cellcrop import COMMON_RATIO
from ..embeddings import EmbeddingStore
from ..heads import fit_linear_head, predict_proba
from ..runs import inputs_fingerprint
from ..train import TrainConfig, predictions_frame, score_predictions


def cell_centred(table: pd.DataFrame, cfg) -> pd.DataFrame:
    """``table`` with column ``cell_crop`` = :data:`cellcrop.COMMON_RATIO` when the
    profile's ``cell_crop`` is on (the loader then crops each image around its
    leukocyte, and the column enters run identities and embedding cache keys);
    unchanged when it is off, so runs from before the switch keep their identity."""
    if not getattr(cfg, "cell_crop", False):
        return table
    return table.assign(cell_crop=COMMON_RATIO)


def labels_of(table: pd.DataFrame, classes: Sequence[str]) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    return table["label"].map(index).to_numpy()


def probe_run(results_dir: Path, protocol: str, cfg: SimpleNamespace, root: Path, split: pd.DataFrame,
               eval_sets: Dict[str, pd.DataFrame], seed: int, **tags) -> runs.Run:
    """The run folder of a linear probe: its settings, tags and inputs decide it."""
    config = dict(backbone=cfg.backbone, image_size=cfg.image_size, probe_epochs=cfg.probe_epochs, n_boot=cfg.n_boot,
                  seed=seed, **tags)
    return runs.run(results_dir, protocol, config, inputs_fingerprint(dict(split=split, **eval_sets), root),
                    keys=list(tags))


def probe_and_score(store: EmbeddingStore, split: pd.DataFrame, eval_sets: Dict[str, pd.DataFrame],
                     classes: Sequence[str], cfg: SimpleNamespace, run: runs.Run, seed: int) -> List[dict]:
    """Fit a linear probe on the split's train rows; save and score each eval set (skipped when ``run`` is done)."""
    if run.done:
        return run.metrics()
    train = split[split["split"] == "train"]
    head = fit_linear_head(store(train), labels_of(train, classes), len(classes), epochs=cfg.probe_epochs, seed=seed)
    rows = []
    for name, table in eval_sets.items():
        pred = predictions_frame(table, predict_proba(head, store(table)), classes)
        run.write_csv(f"predictions_{name}.csv", pred)
        rows.append(dict(eval_set=name, **score_predictions(pred, classes, n_boot=cfg.n_boot)))
    return run.finish(rows)


def finetune_config(cfg: SimpleNamespace, method: str, seed: int, overrides: Dict) -> TrainConfig:
    """The profile's end-to-end training settings for ``method``; ``overrides``
    (any :class:`TrainConfig` field, e.g. ``frozen_stages``) win."""
    settings = dict(method=method, backbone=cfg.backbone, pretrained=cfg.pretrained, image_size=cfg.image_size,
                    epochs=cfg.finetune_epochs, batch_size=cfg.batch_size, lr=cfg.lr, patience=cfg.patience,
                    frozen_stages=cfg.finetune_frozen_stages, seed=seed)
    return TrainConfig(**{**settings, **overrides})


def save_and_score(probs_by_set: Dict[str, np.ndarray], tables: Dict[str, pd.DataFrame], classes: Sequence[str],
                    run: runs.Run, info: dict = None) -> List[dict]:
    """Write ``predictions_<set>.csv`` for every set, then ``metrics.json`` and ``done`` (last)."""
    rows = []
    for name, probs in probs_by_set.items():
        pred = predictions_frame(tables[name], probs, classes)
        run.write_csv(f"predictions_{name}.csv", pred, float_format="%.6g")
        rows.append(dict(eval_set=name, **score_predictions(pred, classes, n_boot=0), **(info or {})))
    return run.finish(rows)


def finished_rows(run: runs.Run):
    return run.metrics() if run.done else None
