"""Chapter 04's protocol: ERM trained on some labs, tested on the others.

Settings (:data:`benchmarks.CROSSLAB_SETTINGS`): train on pbc and test on
zheng1 and bccd, and leave-one-lab-out. A linear probe on frozen embeddings
for every setting and seed, and end-to-end fine-tuning for the named settings.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import pandas as pd

from .. import benchmarks as B
from ..benchmarks import CROSSLAB_SETTINGS, setting_key
from ..embeddings import EmbeddingStore
from ..train import train_in
from .common import cell_centred, finetune_config, probe_and_score, probe_run


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
    table = cell_centred(B.read_crosslab(splits_dir, seed), cfg)
    classes = list(B.CROSSLAB_CLASSES)
    jobs = [(name, *crosslab_sets(cfg, table, src, tgt)) for name, src, tgt in CROSSLAB_SETTINGS]
    store = EmbeddingStore([s[s["split"] == "train"] for _, s, _ in jobs] + [t for _, _, e in jobs for t in e.values()],
                           cfg.backbone, cfg.image_size, root, cache_dir, desc="cross-lab embeddings")
    rows = []
    for name, split, eval_sets in jobs:
        for s in cfg.crosslab_seeds:
            run = probe_run(results_dir, "crosslab/probe", cfg, root, split, eval_sets, s, setting=setting_key(name))
            for r in probe_and_score(store, split, eval_sets, classes, cfg, run, s):
                rows.append(dict(setting=name, seed=s, run_dir=str(run.dir), **r))
    return pd.DataFrame(rows)


def crosslab_finetune(cfg: SimpleNamespace, root: Path, splits_dir: Path, results_dir: Path, method: str = "erm",
                      settings: Sequence[str] = ("pbc→others",), seed: int = 0, **train_overrides) -> pd.DataFrame:
    """End-to-end training for the named cross-lab settings and every seed of the profile."""
    table = cell_centred(B.read_crosslab(splits_dir, seed), cfg)
    classes = list(B.CROSSLAB_CLASSES)
    rows = []
    for name, src, tgt in CROSSLAB_SETTINGS:
        if name not in settings:
            continue
        split, eval_sets = crosslab_sets(cfg, table, src, tgt)
        for s in cfg.crosslab_seeds:
            config = finetune_config(cfg, method, s, train_overrides)
            run, result = train_in(results_dir, "crosslab/finetune", dict(setting=setting_key(name), seed=s), config, split,
                                   root, classes, eval_sets=eval_sets, n_boot=cfg.n_boot)
            for set_name in eval_sets:
                rows.append(dict(setting=name, seed=s, eval_set=set_name, run_dir=str(run.dir), **result[set_name]))
    return pd.DataFrame(rows)
