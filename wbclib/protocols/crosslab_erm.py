"""Chapter 04's protocol: ERM trained on some labs, tested on the others.

Settings (:data:`benchmarks.CROSSLAB_SETTINGS`): train on pbc and test on
zheng1 and bccd, and leave-one-lab-out. A linear probe on frozen embeddings
for every setting and seed, and end-to-end fine-tuning for the named settings.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import List, Optional, Sequence

import pandas as pd

from .. import _io
from .. import benchmarks as B
from ..benchmarks import CROSSLAB_SETTINGS, setting_key
from ..embeddings import EmbeddingStore
from ..metrics import confusion, paired_difference
from ..train import TrainConfig, train_in
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


def crosslab_finetune_config(cfg: SimpleNamespace, method: str, seed: int, augmentation: str,
                             overrides: Optional[dict] = None) -> TrainConfig:
    """A cross-lab fine-tune's settings: the profile's training settings for
    ``cfg.crosslab_epochs`` epochs with ``cfg.crosslab_frozen_stages`` frozen
    (not the long-tail chapters' keys) and ``augmentation``; ``overrides`` win."""
    return finetune_config(cfg, method, seed, {"epochs": cfg.crosslab_epochs,
                                               "frozen_stages": cfg.crosslab_frozen_stages, **(overrides or {}),
                                               "augmentation": augmentation})


def finetune_run(cfg: SimpleNamespace, root: Path, results_dir: Path, setting: str, split: pd.DataFrame,
                 eval_sets: dict, method: str, seed: int, augmentation: str, hparams: Optional[dict] = None,
                 **train_overrides) -> List[dict]:
    """One cross-lab fine-tune (:func:`crosslab_finetune_config`) of ``method``
    with ``hparams`` on ``split`` in its ``crosslab/finetune`` run folder (read
    back when done). One row per eval set: setting, method, augmentation, seed,
    eval set, run folder and the scores."""
    overrides = {**train_overrides, **({"hparams": dict(hparams)} if hparams else {})}
    config = crosslab_finetune_config(cfg, method, seed, augmentation, overrides)
    run, result = train_in(results_dir, "crosslab/finetune",
                           dict(setting=setting_key(setting), method=method, augmentation=augmentation, seed=seed),
                           config, split, root, list(B.CROSSLAB_CLASSES), eval_sets=eval_sets, n_boot=cfg.n_boot)
    return [dict(setting=setting, method=method, augmentation=augmentation, seed=seed, eval_set=name,
                 run_dir=str(run.dir), **result[name]) for name in eval_sets]


def crosslab_finetune(cfg: SimpleNamespace, root: Path, splits_dir: Path, results_dir: Path, method: str = "erm",
                      settings: Sequence[str] = ("pbc→others",), seed: int = 0,
                      augmentations: Optional[Sequence[str]] = None, **train_overrides) -> pd.DataFrame:
    """End-to-end training for the named cross-lab settings, every seed of the
    profile and every training augmentation of ``augmentations`` (default: the
    profile's ``crosslab_augmentations``; column ``augmentation``)."""
    table = cell_centred(B.read_crosslab(splits_dir, seed), cfg)
    rows = []
    for name, src, tgt in CROSSLAB_SETTINGS:
        if name not in settings:
            continue
        split, eval_sets = crosslab_sets(cfg, table, src, tgt)
        for augmentation in augmentations or cfg.crosslab_augmentations:
            for s in cfg.crosslab_seeds:
                rows += finetune_run(cfg, root, results_dir, name, split, eval_sets, method, s, augmentation,
                                     **train_overrides)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------
# The chapter's tables, one per notebook step (notebook 04)
# --------------------------------------------------------------------------

#: The score columns the chapter shows (``micro_f1`` is the accuracy).
SCORES = ["macro_f1", "macro_f1_low", "macro_f1_high", "micro_f1"]


def images_per_lab(splits_dir: Path, seed: int = 0) -> pd.DataFrame:
    """Images of the cross-lab benchmark per class (rows) and lab (columns)."""
    cross = B.read_crosslab(splits_dir, seed)
    return cross.pivot_table(index="label", columns="lab", values="path", aggfunc="size", fill_value=0)


def with_micro_f1(results: pd.DataFrame) -> pd.DataFrame:
    """``results`` with ``accuracy`` renamed ``micro_f1`` (F1-micro, as the DG papers name it)."""
    return results.rename(columns={"accuracy": "micro_f1"})


def target_scores(results: pd.DataFrame) -> pd.DataFrame:
    """The rows scored on a target lab (every eval set but ``val``), accuracy as ``micro_f1``."""
    results = with_micro_f1(results)
    return results[results["eval_set"] != "val"]


def target_means(results: pd.DataFrame) -> pd.DataFrame:
    """Mean over seeds of macro-F1 (with its interval) and micro-F1 per (setting, target lab), 3 digits."""
    return target_scores(results).groupby(["setting", "eval_set"])[SCORES].mean().round(3)


def validation_note(results: pd.DataFrame) -> str:
    """Mean in-domain validation macro-F1 per setting, as one line."""
    val = results[results["eval_set"] == "val"]
    return f"in-domain validation macro-F1: {val.groupby('setting').macro_f1.mean().round(3).to_dict()}"


#: How the chapter names each fine-tuning augmentation preset.
AUGMENTATION_NAMES = {"dihedral_jitter": "fine-tuned", "dihedral_colour_stain": "fine-tuned + colour/stain jitter",
                      "dihedral_colour_stain_blur": "fine-tuned + colour/stain jitter + blur"}
#: The chapter's strong augmentation, compared with the default ``dihedral_jitter``.
STRONG = "dihedral_colour_stain_blur"


def regime_name(augmentation: str) -> str:
    return AUGMENTATION_NAMES.get(augmentation, f"fine-tuned ({augmentation})")


def finetune_table(finetune: pd.DataFrame) -> pd.DataFrame:
    """Target-lab macro-F1 (with its interval) and micro-F1 of each fine-tuned
    regime, mean over seeds, one row per (setting, regime, target lab), 3 digits."""
    targets = target_scores(finetune).assign(regime=lambda t: t["augmentation"].map(regime_name))
    return targets.groupby(["setting", "regime", "eval_set"])[SCORES].mean().round(3)


def regime_bars(probe: pd.DataFrame, finetune: pd.DataFrame, setting: str = "pbc→others") -> pd.DataFrame:
    """Target-lab macro-F1 (mean over seeds, with its interval) of ``setting`` for
    the linear probe and each fine-tuned regime, one row per (regime, eval set)."""
    tuned = target_scores(finetune)
    both = pd.concat([target_scores(probe).assign(regime="linear probe"),
                      tuned.assign(regime=tuned["augmentation"].map(regime_name))])
    return both[both["setting"] == setting].groupby(["regime", "eval_set"], as_index=False, sort=False)[
        ["macro_f1", "macro_f1_low", "macro_f1_high"]].mean()


def _predictions(finetune: pd.DataFrame, setting: str, augmentation: str, lab: str) -> list:
    """The saved predictions on ``lab`` of every seed's run, in seed order."""
    runs_ = finetune[(finetune["setting"] == setting) & (finetune["augmentation"] == augmentation)
                     & (finetune["eval_set"] == lab)].sort_values("seed")
    return [_io.read_csv(Path(d) / f"predictions_{lab}.csv") for d in runs_["run_dir"]]


def augmentation_gain(finetune: pd.DataFrame, augmentation: str = STRONG,
                      base: str = "dihedral_jitter", setting: str = "pbc→others",
                      labs: Sequence[str] = ("zheng1", "bccd"), n_boot: int = 1000) -> pd.DataFrame:
    """Macro-F1 and balanced-accuracy gain of fine-tuning with ``augmentation``
    over ``base`` on each target lab: the paired bootstrap
    (:func:`wbclib.metrics.paired_difference`) over the same test images, each
    score the mean over the seeds (the runs of one seed share their split).
    One row per lab: ``macro_f1`` (the gain), its interval, ``p_not_better``."""
    classes = list(B.CROSSLAB_CLASSES)
    index = {c: i for i, c in enumerate(classes)}
    rows = []
    for lab in labs:
        new, old = _predictions(finetune, setting, augmentation, lab), _predictions(finetune, setting, base, lab)
        if not new or len(new) != len(old):
            raise ValueError(f"{setting}: {len(new)} runs with {augmentation!r} and {len(old)} with {base!r} on {lab}")
        labels = new[0]["label"].map(index).to_numpy()
        if any(not p["path"].equals(new[0]["path"]) for p in new + old):
            raise ValueError(f"{setting}: the runs on {lab} scored different images")
        gain = paired_difference(labels, [p["pred"].map(index) for p in new], [p["pred"].map(index) for p in old],
                                 len(classes), n_boot=n_boot)
        rows.append(dict(eval_set=lab, seeds=len(new), **gain))
    return pd.DataFrame(rows).set_index("eval_set").round(3)


def confusions(finetune: pd.DataFrame, seed: int, setting: str = "pbc→others",
               labs: Sequence[str] = ("zheng1", "bccd"), augmentation: str = STRONG) -> dict:
    """Confusion counts (:func:`wbclib.metrics.confusion`, classes in
    :data:`benchmarks.CROSSLAB_CLASSES` order) of the fine-tuned ``setting`` run
    with ``seed`` and ``augmentation`` on each target lab, from its saved
    predictions: ``{lab: matrix}``."""
    classes = list(B.CROSSLAB_CLASSES)
    index = {c: i for i, c in enumerate(classes)}
    found = finetune[(finetune["setting"] == setting) & (finetune["seed"] == seed)
                     & (finetune["augmentation"] == augmentation)]
    if found.empty:
        raise ValueError(f"no {setting} run with seed {seed} and augmentation {augmentation!r} "
                         f"(augmentations run: {sorted(finetune['augmentation'].unique())})")
    run = Path(found["run_dir"].iloc[0])
    out = {}
    for lab in labs:
        pred = _io.read_csv(run / f"predictions_{lab}.csv")
        out[lab] = confusion(pred["label"].map(index), pred["pred"].map(index), len(classes))
    return out


def lolo_row(results: pd.DataFrame) -> pd.DataFrame:
    """The leave-one-lab-out row in the shape of SADA's Table I: F1-micro and
    F1-macro (rows, percent, 1 digit) per held-out lab and their ``average`` (columns)."""
    targets = target_scores(results)
    row = targets[targets["setting"].str.startswith("LOLO")].groupby("eval_set")[["micro_f1", "macro_f1"]].mean()
    row.loc["average"] = row.mean()
    return (100 * row.T).round(1)
