"""The book's experiment protocols, each resumable and writing tidy result tables.

Every protocol stores per-image predictions (with class probabilities) for
every evaluation set, so ensembles, rescue and plots read saved predictions
and never retrain. Finished pieces are skipped on re-runs.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from . import benchmarks as B
from .degrade import KINDS, SEVERITIES
from .heads import fit_linear_head, predict_proba
from .models import create_backbone, extract_embeddings
from .train import TrainConfig, predictions_frame, score_predictions, train_run

_KEY = ["path", "degradation", "severity"]


class EmbeddingStore:
    """Embeddings of every row any experiment needs, extracted once (cached on
    disk) and looked up by (path, degradation, severity)."""

    def __init__(self, tables: Sequence[pd.DataFrame], backbone_name: str, image_size: int, root: Path,
                 cache_dir: Path, desc: str = "embeddings"):
        needed = pd.concat([self._keyed(t) for t in tables])[_KEY + ["label"]]
        needed = needed.drop_duplicates(_KEY).sort_values(_KEY).reset_index(drop=True)
        backbone = create_backbone(backbone_name, pretrained=True)
        self.features = extract_embeddings(backbone, needed, root, image_size, cache_dir=cache_dir, desc=desc)
        self.index = {k: i for i, k in enumerate(map(tuple, needed[_KEY].astype(str).to_numpy()))}

    @staticmethod
    def _keyed(table: pd.DataFrame) -> pd.DataFrame:
        out = table.copy()
        if "degradation" not in out:
            out["degradation"] = "none"
        if "severity" not in out:
            out["severity"] = 0
        return out

    def __call__(self, table: pd.DataFrame) -> np.ndarray:
        keys = map(tuple, self._keyed(table)[_KEY].astype(str).to_numpy())
        return self.features[[self.index[k] for k in keys]]


def _labels(table: pd.DataFrame, classes: Sequence[str]) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    return table["label"].map(index).to_numpy()


def _probe_and_score(store: EmbeddingStore, split: pd.DataFrame, eval_sets: Dict[str, pd.DataFrame],
                     classes: Sequence[str], cfg: SimpleNamespace, out_dir: Path, seed: int) -> List[dict]:
    """Fit a linear probe on the split's train rows; save and score each eval set."""
    metrics_path = out_dir / "metrics.json"
    if metrics_path.is_file():
        return json.loads(metrics_path.read_text())
    train = split[split["split"] == "train"]
    head = fit_linear_head(store(train), _labels(train, classes), len(classes), epochs=cfg.probe_epochs, seed=seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, table in eval_sets.items():
        pred = predictions_frame(table, predict_proba(head, store(table)), classes)
        pred.to_csv(out_dir / f"predictions_{name}.csv", index=False)
        rows.append(dict(eval_set=name, **score_predictions(pred, classes, n_boot=cfg.n_boot)))
    metrics_path.write_text(json.dumps(rows, indent=2))
    return rows


# --------------------------------------------------------------------------
# PBC-LT
# --------------------------------------------------------------------------


def pbc_lt_sets(cfg: SimpleNamespace, table: pd.DataFrame, definition, rho: float, fold: int) -> tuple:
    split = B.pbc_lt_split(table, definition, rho, fold, n_max=cfg.n_max, val_per_class=cfg.val_per_class,
                           test_per_class=cfg.test_per_class)
    val, test = split[split["split"] == "val"], split[split["split"] == "test"]
    eval_sets = {"val": val, "val_degraded": B.phase2(val), "test": test, "test_degraded": B.phase2(test)}
    return split, eval_sets


def severity_grid_rows(cfg: SimpleNamespace, table: pd.DataFrame, definition) -> Dict[str, pd.DataFrame]:
    """A per-class-capped slice of the test set under every kind and severity."""
    _, sets = pbc_lt_sets(cfg, table, definition, 1, 0)
    test = B._cap(sets["test"], cfg.severity_grid_per_class)
    grid = {"pristine": test}
    for kind in KINDS:
        for level in SEVERITIES:
            grid[f"{kind}_{level}"] = B.at_severity(test, kind, level)
    return grid


def pbc_lt_probe(cfg: SimpleNamespace, root: Path, splits_dir: Path, cache_dir: Path, results_dir: Path,
                 seed: int = 0) -> pd.DataFrame:
    """Frozen-feature linear probe on PBC-LT for every rho and probe fold.

    Returns one row per (rho, fold, eval set) with the four metrics and the
    macro-F1 bootstrap interval; also a severity grid (fold 0) with
    ``eval_set`` named ``<kind>_<severity>``.
    """
    table, definition = B.read_pbc_lt(splits_dir, seed)
    classes = list(B.PBC_LT_CLASSES)
    jobs = [(rho, fold, *pbc_lt_sets(cfg, table, definition, rho, fold)) for fold in cfg.probe_folds for rho in cfg.rhos]
    grid = severity_grid_rows(cfg, table, definition)
    store = EmbeddingStore([s for _, _, s, _ in jobs] + [t for _, _, _, e in jobs for t in e.values()] + list(grid.values()),
                           cfg.backbone, cfg.image_size, root, cache_dir, desc="PBC-LT embeddings")
    rows = []
    for rho, fold, split, eval_sets in tqdm(jobs, desc="linear probes"):
        sets = dict(eval_sets, **grid) if fold == cfg.probe_folds[0] else eval_sets
        out = results_dir / "pbc_lt" / "probe" / f"rho{rho}_fold{fold}"
        for r in _probe_and_score(store, split, sets, classes, cfg, out, seed):
            rows.append(dict(rho=rho, fold=fold, **r))
    return pd.DataFrame(rows)


def pbc_lt_finetune(cfg: SimpleNamespace, root: Path, splits_dir: Path, results_dir: Path, method: str = "erm",
                    seed: int = 0, **train_overrides) -> pd.DataFrame:
    """End-to-end fine-tuning on PBC-LT for every fine-tune rho and fold."""
    table, definition = B.read_pbc_lt(splits_dir, seed)
    classes = list(B.PBC_LT_CLASSES)
    rows = []
    for fold in cfg.finetune_folds:
        for rho in cfg.finetune_rhos:
            split, eval_sets = pbc_lt_sets(cfg, table, definition, rho, fold)
            config = TrainConfig(method=method, backbone=cfg.backbone, pretrained=cfg.pretrained,
                                 image_size=cfg.image_size, epochs=cfg.finetune_epochs, batch_size=cfg.batch_size,
                                 lr=cfg.lr, patience=cfg.patience, seed=seed, **train_overrides)
            run_dir = results_dir / "pbc_lt" / method / f"rho{rho}_fold{fold}"
            result = train_run(config, split, root, run_dir, classes, eval_sets=eval_sets, n_boot=cfg.n_boot)
            for name in eval_sets:
                rows.append(dict(rho=rho, fold=fold, eval_set=name, **result[name]))
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------
# Cross-lab
# --------------------------------------------------------------------------

#: (name, source labs, target labs): train on pbc, and leave-one-lab-out.
CROSSLAB_SETTINGS = [
    ("pbc→others", ["pbc"], ["zheng1", "bccd"]),
    ("LOLO:pbc", ["zheng1", "bccd"], ["pbc"]),
    ("LOLO:zheng1", ["pbc", "bccd"], ["zheng1"]),
    ("LOLO:bccd", ["pbc", "zheng1"], ["bccd"]),
]


def crosslab_sets(cfg: SimpleNamespace, table: pd.DataFrame, sources, targets) -> tuple:
    split = B.crosslab_split(table, targets, sources, train_per_class=cfg.crosslab_train_per_class,
                             val_per_class=cfg.crosslab_val_per_class)
    split = split.assign(domain=split["lab"])
    eval_sets = {"val": split[split["split"] == "val"]}
    test = split[split["split"] == "test"]
    for lab in targets:
        eval_sets[lab] = B._cap_lab(test[test["lab"] == lab], cfg.crosslab_test_per_class)
    return split, eval_sets


def crosslab_probe(cfg: SimpleNamespace, root: Path, splits_dir: Path, cache_dir: Path, results_dir: Path,
                   seed: int = 0) -> pd.DataFrame:
    """Linear probe for every cross-lab setting and seed; one row per (setting, seed, eval set)."""
    table = B.read_crosslab(splits_dir, seed)
    classes = list(B.CROSSLAB_CLASSES)
    jobs = [(name, *crosslab_sets(cfg, table, src, tgt)) for name, src, tgt in CROSSLAB_SETTINGS]
    store = EmbeddingStore([s[s["split"] == "train"] for _, s, _ in jobs] + [t for _, _, e in jobs for t in e.values()],
                           cfg.backbone, cfg.image_size, root, cache_dir, desc="cross-lab embeddings")
    rows = []
    for name, split, eval_sets in jobs:
        for s in cfg.crosslab_seeds:
            out = results_dir / "crosslab" / "probe" / f"{_slug(name)}_seed{s}"
            for r in _probe_and_score(store, split, eval_sets, classes, cfg, out, s):
                rows.append(dict(setting=name, seed=s, **r))
    return pd.DataFrame(rows)


def crosslab_finetune(cfg: SimpleNamespace, root: Path, splits_dir: Path, results_dir: Path, method: str = "erm",
                      settings: Sequence[str] = ("pbc→others",), seed: int = 0, **train_overrides) -> pd.DataFrame:
    """End-to-end training for the named cross-lab settings and every seed of the profile."""
    table = B.read_crosslab(splits_dir, seed)
    classes = list(B.CROSSLAB_CLASSES)
    rows = []
    for name, src, tgt in CROSSLAB_SETTINGS:
        if name not in settings:
            continue
        split, eval_sets = crosslab_sets(cfg, table, src, tgt)
        for s in cfg.crosslab_seeds:
            config = TrainConfig(method=method, backbone=cfg.backbone, pretrained=cfg.pretrained,
                                 image_size=cfg.image_size, epochs=cfg.finetune_epochs, batch_size=cfg.batch_size,
                                 lr=cfg.lr, patience=cfg.patience, seed=s, **train_overrides)
            run_dir = results_dir / "crosslab" / method / f"{_slug(name)}_seed{s}"
            result = train_run(config, split, root, run_dir, classes, eval_sets=eval_sets, n_boot=cfg.n_boot)
            for set_name in eval_sets:
                rows.append(dict(setting=name, seed=s, eval_set=set_name, **result[set_name]))
    return pd.DataFrame(rows)


def _slug(name: str) -> str:
    return name.replace("→", "_to_").replace(":", "_")
