"""Chapter 07's protocol: SADA's Table I on the public labs, and its statistics.

Trains and evaluates every row of :data:`wbclib.crosslab.ROWS` on every
cross-lab setting and seed in ``crosslab_dg`` run folders (named by variant,
method, setting and seed, keyed by the full configuration, the rows read and
the code), then builds the chapter's tables, paired-bootstrap gains and
Grad-CAM examples. The machinery it runs on (cached trunk maps, re-stained
views, the map-head trainer, scale factors) is :mod:`wbclib.crosslab`.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .. import _io, heads, runs
from .. import benchmarks as B
from .. import metrics as M
from ..crosslab import (CLASSES, ROWS, SADA_TABLE_I, VERSION, VIEW_METHODS, MapHead, MapStore, dg_sets,
                        features_on_maps, labels_of, one_thread, predict_on_maps, resolved_hparams, row_hparams,
                        scale_factors, settings_named, stain_clusters_k, store_for, train_on_maps)
from ..benchmarks import CROSSLAB_SETTINGS, setting_key
from ..gradcam import grad_cam, last_conv
from ..method_base import METHODS
from ..methods import create_method
from ..models import ImageTable
from ..runs import inputs_fingerprint
from ..scale import mask_agreement
from .._parallel import image_loader, map_in_processes
from ..train import TrainConfig, build_method, predictions_frame, score_predictions, train_run
from ..verdicts import interval, views_carry_gain
from . import crosslab_erm
from .common import cell_centred

def _score_sets(run_dir: Path, eval_sets: Dict[str, pd.DataFrame], probs: Dict[str, np.ndarray], n_boot: int) -> dict:
    results = {}
    for name, rows in eval_sets.items():
        pred = predictions_frame(rows, probs[name], CLASSES)
        _io.write_csv(run_dir / f"predictions_{name}.csv", pred)
        results[name] = score_predictions(pred, CLASSES, n_boot=n_boot if name != "val" else 0)
    return results


#: The configuration keys that name a cross-lab DG run folder (and that :func:`runs.find` queries).
DG_KEYS = ("variant", "method", "setting", "seed")


class _MapsRunner:
    """Everything one cross-lab setting needs in the frozen-trunk regime."""

    def __init__(self, cfg, store: MapStore, split: pd.DataFrame, eval_sets: Dict[str, pd.DataFrame],
                 single_source: bool):
        self.cfg, self.store = cfg, store
        self.train = split[split["split"] == "train"].reset_index(drop=True)
        self.eval_sets = eval_sets
        everything = pd.concat([self.train] + list(eval_sets.values()))
        all_maps = torch.from_numpy(store.maps(everything))
        self.train_idx = store.index(self.train, everything)
        self.train_x = all_maps[self.train_idx]
        self.train_y = labels_of(self.train)
        self.eval_x = {n: all_maps[store.index(r, everything)] for n, r in eval_sets.items()}
        self.eval_y = {n: labels_of(r) for n, r in eval_sets.items()}
        if single_source:  # stain-colour clusters as domains
            clusters = store.stain_clusters(self.train, stain_clusters_k(cfg))
            self.train_d = clusters[store.index(self.train, self.train)]
        else:
            labs = sorted(self.train["lab"].unique())
            self.train_d = self.train["lab"].map({l: i for i, l in enumerate(labs)}).to_numpy()
        self._views: Dict[Tuple[int, int], torch.Tensor] = {}

    def views(self, k: int, seed: int) -> torch.Tensor:
        """Trunk maps of the training rows' re-stained views, clusters and donors
        drawn with ``seed`` (the run's: seeds differ in their views too)."""
        if (k, seed) not in self._views:
            maps = torch.from_numpy(self.store.view_maps(self.train, k, seed))
            self._views[(k, seed)] = maps[self.store.index(self.train, self.train)]
        return self._views[(k, seed)]

    def prepare(self, method_name: str, hparams: dict, seed: int) -> None:
        """Compute what :meth:`run` of this method will read (its re-stained views)."""
        if method_name in VIEW_METHODS:
            self.views(*self._view_key(method_name, hparams, seed))

    @staticmethod
    def _view_key(method_name: str, hparams: dict, seed: int) -> Tuple[int, int]:
        k = METHODS.get(method_name).resolve_hparams(hparams)["k"]  # the row's, else the method's default
        return int(k), int(hparams.get("seed", seed))

    def run(self, method_name: str, hparams: dict, options: dict, seed: int, run_dir: Path, n_boot: int,
            save_weights: bool = False) -> dict:
        cfg = self.cfg
        x, y, d = self.train_x, self.train_y, self.train_d
        if method_name in VIEW_METHODS:
            views = self.views(*self._view_key(method_name, hparams, seed))
            x = torch.cat([x[:, None], views], 1)
        method, history, swad = train_on_maps(
            method_name, hparams, x, y, d, self.eval_x["val"], self.eval_y["val"], cfg.dg_epochs, cfg.batch_size,
            seed, swad={} if cfg.dg_swad else None, width=cfg.dg_head_width)
        _io.write_csv(run_dir / "history.csv", pd.DataFrame(history))
        if options.get("decoupled"):
            head = heads.fit_linear_head(features_on_maps(method, self.train_x), self.train_y, len(CLASSES),
                                         sampler="class_balanced", epochs=cfg.probe_epochs, seed=seed)
            probs = {n: heads.predict_proba(head, features_on_maps(method, m)) for n, m in self.eval_x.items()}
        else:
            probs = {n: predict_on_maps(method, m) for n, m in self.eval_x.items()}
        if save_weights:
            _io.torch_save(method.state_dict(), run_dir / "weights.pt")
        results = _score_sets(run_dir, self.eval_sets, probs, n_boot)
        if swad is not None:
            results["swad"] = swad
        return results


def image_hparams(method_name: str, hparams: dict, epochs: int, n_train: int, batch_size: int, seed: int) -> dict:
    """``hparams`` of a run that trains on images for ``epochs``, with what
    follows from the schedule filled in: SADA's first stage is half the epochs,
    BoDA warms up over a fifth of the steps, and methods with re-stained views
    draw them with the run's ``seed`` (set values win)."""
    hparams = dict(hparams)
    if method_name == "sada":
        hparams.setdefault("stage1_epochs", epochs // 2)
    if method_name in VIEW_METHODS:
        hparams.setdefault("seed", seed)
    if method_name == "boda":
        hparams.setdefault("warmup_steps", int(0.2 * epochs * max(1, n_train // batch_size)))
    return hparams


def with_stain_domains(cfg, store: MapStore, split: pd.DataFrame) -> pd.DataFrame:
    """``split`` with its training rows' ``domain`` set to SADA's stain-colour
    cluster (``stain0`` ...): the domains of a one-lab training set."""
    train = split[split["split"] == "train"]
    clusters = store.stain_clusters(train, stain_clusters_k(cfg))[store.index(train, train)]
    split = split.copy()
    split.loc[train.index, "domain"] = [f"stain{c}" for c in clusters]
    return split


def end_to_end_config(cfg, method_name: str, hparams: dict, seed: int) -> TrainConfig:
    """The settings of one ``end_to_end`` run: the DG schedule (``dg_epochs``,
    no early stop) with ``cfg.crosslab_frozen_stages`` frozen."""
    return TrainConfig(method=method_name, backbone=cfg.backbone, pretrained=cfg.pretrained,
                       image_size=cfg.image_size, epochs=cfg.dg_epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                       patience=cfg.dg_epochs, seed=seed, hparams=hparams, frozen_stages=cfg.crosslab_frozen_stages,
                       num_workers=getattr(cfg, "num_workers", None))


def _end_to_end(cfg, store: MapStore, root: Path, split: pd.DataFrame, eval_sets, single_source: bool,
                method_name: str, hparams: dict, options: dict, seed: int, run_dir: Path, n_boot: int) -> dict:
    """One run of the ``gpu`` regime: :func:`train.train_run` on images."""
    split = split.copy()
    train = split[split["split"] == "train"]
    if single_source:
        split = with_stain_domains(cfg, store, split)
    hparams = image_hparams(method_name, hparams, cfg.dg_epochs, len(train), cfg.batch_size, seed)
    config = end_to_end_config(cfg, method_name, hparams, seed)
    stage1 = run_dir
    results = train_run(config, split, root, stage1 / "train", CLASSES, eval_sets=eval_sets, n_boot=n_boot,
                        swad={} if cfg.dg_swad else None)
    if not options.get("decoupled"):
        for name in eval_sets:
            _io.write_csv(run_dir / f"predictions_{name}.csv", _io.read_csv(stage1 / "train" / f"predictions_{name}.csv"))
        return results
    # BoDA decoupled: class-balanced linear head on the trained, frozen featurizer.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    counts = np.bincount(labels_of(train), minlength=len(CLASSES))
    num_domains = split.loc[train.index, "domain"].nunique()
    method = build_method(config, len(CLASSES), num_domains, counts.tolist()).to(device)
    weights = stage1 / "train" / ("swad.pt" if cfg.dg_swad else "best.pt")
    method.load_state_dict(_io.torch_load(weights, map_location=device))

    @torch.no_grad()
    def featurize(rows):
        loader = image_loader(ImageTable(rows, root, CLASSES, cfg.image_size), cfg.batch_size, device,
                              getattr(cfg, "num_workers", None))
        method.eval()
        return torch.cat([method.featurize(x.to(device)).float().cpu() for x, _, _ in loader]).numpy()

    head = heads.fit_linear_head(featurize(train), labels_of(train), len(CLASSES), sampler="class_balanced",
                                 epochs=cfg.probe_epochs, seed=seed)
    probs = {n: heads.predict_proba(head, featurize(rows)) for n, rows in eval_sets.items()}
    return _score_sets(run_dir, eval_sets, probs, n_boot)


@one_thread
def crosslab_dg(cfg: SimpleNamespace, root: Path, splits_dir: Path, cache_dir: Path, results_dir: Path,
                rows: Optional[Sequence[str]] = None, settings: Optional[Sequence[str]] = None,
                seeds: Optional[Sequence[int]] = None, overrides: Optional[Dict[str, dict]] = None,
                variant: str = "main", split_seed: int = 0, scale: bool = True,
                weights_for: Optional[Tuple[str, int]] = None, progress: bool = True) -> pd.DataFrame:
    """Train and evaluate table rows (:data:`ROWS`, default ``cfg.dg_rows``) on
    cross-lab settings (default all four) for ``seeds`` (default
    ``cfg.dg_seeds``). ``overrides`` maps a row to extra hyper-parameters
    (the k/beta sweep); ``variant`` is a key of the run folders
    (:data:`DG_KEYS`, :func:`runs.run`). Finished runs of the same identity
    (configuration, inputs, code) are read back. Returns one row per (row,
    setting, seed, eval set) with ``macro_f1``, ``micro_f1``, the bootstrap
    interval and the ``run_dir`` holding its predictions.
    In the maps regime the trained head of each row for the (setting, seed)
    ``weights_for`` is kept as ``weights.pt`` (for Grad-CAM)."""
    table = cell_centred(B.read_crosslab(splits_dir, split_seed), cfg)
    rows = list(rows or cfg.dg_rows)
    seeds = list(cfg.dg_seeds if seeds is None else seeds)
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        raise KeyError(f"unknown rows {unknown}; known: {list(ROWS)}")
    crops = scale_factors(cfg, table, root, cache_dir)[0] if scale else {}
    store = store_for(cfg, root, cache_dir, table, crops)
    out = []
    jobs = [(s, r, seed) for s in settings_named(settings) for r in rows for seed in seeds]
    bar = tqdm(total=len(jobs), desc=f"cross-lab {variant}", disable=None if progress else True)
    for name, sources, targets in settings_named(settings):
        split, eval_sets = dg_sets(cfg, table, sources, targets, crops)
        inputs = inputs_fingerprint(dict(split=split, **eval_sets), root)
        single = len(sources) == 1
        planned = []
        for row in rows:
            method_name, hparams, options = row_hparams(cfg, row, (overrides or {}).get(row))
            for seed in seeds:
                config = dict(variant=variant, row=row, setting=setting_key(name), seed=seed, version=VERSION,
                              regime=cfg.dg_regime, method=method_name, hparams=hparams, options=options,
                              epochs=cfg.dg_epochs, batch_size=cfg.batch_size, swad=cfg.dg_swad, crops=crops,
                              width=cfg.dg_head_width, image_size=cfg.image_size, backbone=cfg.backbone,
                              pretrained=cfg.pretrained, train_per_class=cfg.dg_train_per_class,
                              test_per_class=cfg.dg_test_per_class, probe_epochs=cfg.probe_epochs, n_boot=cfg.n_boot,
                              lr=cfg.lr if cfg.dg_regime == "end_to_end" else None,
                              frozen_stages=cfg.crosslab_frozen_stages if cfg.dg_regime == "end_to_end" else None)
                run = runs.run(results_dir, "crosslab_dg", config, inputs, keys=DG_KEYS)
                keep = cfg.dg_regime == "maps" and weights_for == (name, seed)
                results = run.metrics()
                if results is not None and keep and not (run.dir / "weights.pt").is_file():
                    results = None
                planned.append(SimpleNamespace(row=row, seed=seed, run=run, keep=keep, method=method_name,
                                               hparams=hparams, options=options, results=results))
        todo = [p for p in planned if p.results is None]
        bar.update(len(planned) - len(todo))
        if todo and cfg.dg_regime == "maps":
            runner = _MapsRunner(cfg, store, split, eval_sets, single)
            for p in todo:
                runner.prepare(p.method, p.hparams, p.seed)  # re-stained views: computed once, before the fork
            # Small heads on cached maps: one torch thread each, runs side by side (wbclib._parallel).
            done = map_in_processes(runner.run, [(p.method, p.hparams, p.options, p.seed, p.run.dir, cfg.n_boot,
                                                  p.keep) for p in todo])
            for p, results in zip(todo, done, strict=True):
                p.results = p.run.finish(results)
                bar.update(1)
        elif todo and cfg.dg_regime == "end_to_end":
            for p in todo:
                p.results = p.run.finish(_end_to_end(cfg, store, root, split, eval_sets, single, p.method,
                                                     p.hparams, p.options, p.seed, p.run.dir, cfg.n_boot))
                bar.update(1)
        elif todo:
            raise ValueError(f"dg_regime must be 'maps' or 'end_to_end', not {cfg.dg_regime!r}")
        for p in planned:
            for set_name in eval_sets:
                r = p.results[set_name]
                out.append(dict(variant=variant, method=p.row, setting=name, seed=p.seed, eval_set=set_name,
                                run_dir=str(p.run.dir),
                                macro_f1=r["macro_f1"], micro_f1=r["accuracy"],
                                macro_f1_low=r.get("macro_f1_low"), macro_f1_high=r.get("macro_f1_high"),
                                **{f"{k}": v for k, v in (overrides or {}).get(p.row, {}).items()}))
    bar.close()
    return pd.DataFrame(out)


#: The setting of the fine-tuned comparison: chapter 04's.
FINETUNED_SETTING = "pbc→others"


def finetuned_rows(cfg: SimpleNamespace, root: Path, splits_dir: Path, cache_dir: Path, results_dir: Path,
                   rows: Optional[Sequence[str]] = None, augmentation: str = crosslab_erm.STRONG,
                   split_seed: int = 0) -> pd.DataFrame:
    """Table rows (default ``cfg.dg_finetune_rows``) trained on pbc like
    chapter 04's strong regime (:func:`crosslab_erm.finetune_run`: the same
    split, cell crops, ``crosslab_epochs``, ``crosslab_frozen_stages`` and
    ``augmentation``, every seed of ``crosslab_seeds``), so the ERM row is
    chapter 04's run and only the training objective changes. One source lab:
    the methods that read domains see SADA's stain-colour clusters of the
    training images (ERM keeps its lab). No SWAD, for any row; a two-stage
    method (SADA) trains every epoch (no early stop inside its first stage).
    Returns :func:`crosslab_dg`'s columns (``variant`` "fine-tuned") plus
    ``augmentation``."""
    table = cell_centred(B.read_crosslab(splits_dir, split_seed), cfg)
    (name, sources, targets), = settings_named([FINETUNED_SETTING])
    split, eval_sets = crosslab_erm.crosslab_sets(cfg, table, sources, targets)
    train = split[split["split"] == "train"]
    clustered = None
    out = []
    for row in rows if rows is not None else cfg.dg_finetune_rows:
        method_name, hparams, options = row_hparams(cfg, row)
        if options:
            raise ValueError(f"row {row!r} has options {options}, which the fine-tuned regime does not run")
        if method_name != "erm" and clustered is None:
            clustered = with_stain_domains(cfg, MapStore(cfg, root, cache_dir), split)
        row_split = split if method_name == "erm" else clustered
        for seed in cfg.crosslab_seeds:
            run_hparams = image_hparams(method_name, hparams, cfg.crosslab_epochs, len(train), cfg.batch_size, seed)
            two_stage = {"patience": cfg.crosslab_epochs} if "stage1_epochs" in run_hparams else {}
            for r in crosslab_erm.finetune_run(cfg, root, results_dir, name, row_split, eval_sets, method_name, seed,
                                               augmentation, run_hparams, **two_stage):
                out.append(dict(variant="fine-tuned", method=row, setting=name, seed=seed, eval_set=r["eval_set"],
                                run_dir=r["run_dir"], macro_f1=r["macro_f1"], micro_f1=r["accuracy"],
                                macro_f1_low=r.get("macro_f1_low"), macro_f1_high=r.get("macro_f1_high"),
                                augmentation=augmentation))
    return pd.DataFrame(out)


# --------------------------------------------------------------------------
# Tables and statistics
# --------------------------------------------------------------------------


def target_rows(results: pd.DataFrame, lolo: bool = True) -> pd.DataFrame:
    """Target-lab rows of the leave-one-lab-out settings (``lolo``) or of pbc→others."""
    is_lolo = results["setting"].str.startswith("LOLO")
    return results[(is_lolo if lolo else ~is_lolo) & (results["eval_set"] != "val")]


def table_one(results: pd.DataFrame, lolo: bool = True, order: Optional[Sequence[str]] = None,
              digits: int = 1) -> pd.DataFrame:
    """SADA's Table I shape: rows methods; columns (target lab, F1-micro / F1-macro)
    and their average over target labs, as ``mean ± std`` over seeds in percent
    (the average is taken per seed, then summarised)."""
    t = target_rows(results, lolo)
    per_seed = t.pivot_table(index=["method", "seed"], columns="eval_set", values=["micro_f1", "macro_f1"])
    labs = [l for l in B.LABS if l in t["eval_set"].unique()]
    cols = {}
    for lab in labs + ["average"]:
        for metric, name in (("micro_f1", "F1-micro"), ("macro_f1", "F1-macro")):
            values = per_seed[metric][labs].mean(axis=1) if lab == "average" else per_seed[metric][lab]
            g = (100 * values).groupby(level="method")
            mean, std = g.mean(), g.std(ddof=1).fillna(0.0)
            cols[(lab, name)] = [f"{a:.{digits}f} ± {b:.{digits}f}" for a, b in zip(mean, std)]
            index = mean.index
    out = pd.DataFrame(cols, index=index)
    out.columns = pd.MultiIndex.from_tuples(out.columns)
    if order:
        out = out.loc[[m for m in order if m in out.index]]
    return out


def average_over_targets(results: pd.DataFrame, lolo: bool = True) -> pd.DataFrame:
    """Per method: mean and std over seeds of the target-lab average macro/micro-F1."""
    t = target_rows(results, lolo)
    per_seed = t.groupby(["method", "seed"])[["macro_f1", "micro_f1"]].mean()
    g = per_seed.groupby(level="method")
    return g.mean().add_suffix("_mean").join(g.std(ddof=1).fillna(0.0).add_suffix("_std"))


def load_predictions(results: pd.DataFrame, row: str, setting: str, seed: int, eval_set: str) -> pd.DataFrame:
    """The saved predictions of one run of ``results`` (the table :func:`crosslab_dg` returned)."""
    hits = results[(results["method"] == row) & (results["setting"] == setting) & (results["seed"] == seed)]
    run_dirs = hits["run_dir"].unique()
    if len(run_dirs) != 1:
        raise LookupError(f"{len(run_dirs)} runs of {row!r} on {setting!r} with seed {seed} in the results table")
    return _io.read_csv(Path(run_dirs[0]) / f"predictions_{eval_set}.csv")


def paired_gain(results: pd.DataFrame, method: str, baseline: str = "ERM", seeds: Sequence[int] = (0,),
                lolo: bool = True, n_boot: int = 1000, seed: int = 0) -> dict:
    """Gain of ``method`` over ``baseline`` in target-averaged macro-F1 (and
    micro-F1), with a paired percentile bootstrap over test images: each
    replicate resamples every target lab's images once, scores both methods
    (every seed) on the same sample, and averages over seeds and targets.
    ``results`` is the table :func:`crosslab_dg` returned (one variant)."""
    settings = [(n, t) for n, _, t in CROSSLAB_SETTINGS if n.startswith("LOLO") == lolo]
    index = {c: i for i, c in enumerate(CLASSES)}
    blocks = []  # (y, {method: [pred per seed]})
    for name, targets in settings:
        for lab in targets:
            preds = {m: [load_predictions(results, m, name, s, lab) for s in seeds]
                     for m in (method, baseline)}
            y = preds[baseline][0]["label"].map(index).to_numpy()
            blocks.append((y, {m: [p["pred"].map(index).to_numpy() for p in ps] for m, ps in preds.items()}))

    def averaged(sample):
        out = {}
        for m in (method, baseline):
            macro, micro = [], []
            for (y, preds), idx in zip(blocks, sample):
                for p in preds[m]:
                    s = M.scores(y[idx], p[idx], len(CLASSES))
                    macro.append(s["macro_f1"])
                    micro.append(s["accuracy"])
            out[m] = (np.mean(macro), np.mean(micro))
        return out[method][0] - out[baseline][0], out[method][1] - out[baseline][1]

    point = averaged([np.arange(len(y)) for y, _ in blocks])
    rng = np.random.default_rng(seed)
    boot = np.array([averaged([rng.integers(0, len(y), len(y)) for y, _ in blocks]) for _ in range(n_boot)])
    low, high = np.quantile(boot, [0.025, 0.975], axis=0)
    return dict(method=method, baseline=baseline, macro_f1_gain=point[0], macro_f1_gain_low=low[0],
                macro_f1_gain_high=high[0], micro_f1_gain=point[1], micro_f1_gain_low=low[1],
                micro_f1_gain_high=high[1], p_not_better=float((boot[:, 0] <= 0).mean()))


# --------------------------------------------------------------------------
# Grad-CAM
# --------------------------------------------------------------------------


@one_thread
def gradcam_examples(cfg: SimpleNamespace, root: Path, splits_dir: Path, cache_dir: Path, results_dir: Path,
                     rows: Sequence[str], setting: str = "pbc→others", per_lab: int = 2, seed: int = 0,
                     variant: str = "main", split_seed: int = 0
                     ) -> Tuple[pd.DataFrame, np.ndarray, Dict[str, np.ndarray]]:
    """Grad-CAM of each row's model (trained on ``setting``, seed ``seed``) on
    ``per_lab`` images of every lab (source labs: validation images; targets:
    test images), one per class in turn. Returns ``(examples, images
    (n, S, S, 3), {row: maps (n, S, S)})``; the class explained is the true one."""
    table = cell_centred(B.read_crosslab(splits_dir, split_seed), cfg)
    crops = scale_factors(cfg, table, root, cache_dir)[0]
    name, sources, targets = settings_named([setting])[0]
    _, eval_sets = dg_sets(cfg, table, sources, targets, crops)
    picks = []
    for lab in B.LABS:
        pool = eval_sets["val"] if lab in sources else eval_sets[lab]
        pool = pool[pool["lab"] == lab].sort_values(["rank", "path"])
        chosen = [pool[pool["label"] == c].head(1) for c in CLASSES]
        picks.append(pd.concat(chosen).head(per_lab))
    examples = pd.concat(picks).reset_index(drop=True)
    store = store_for(cfg, root, cache_dir, table, crops)
    images = store.images(examples)[store.index(examples, examples)]
    x = torch.from_numpy(images)
    y = torch.tensor(labels_of(examples))
    cams = {}
    trained = crosslab_dg(cfg, root, splits_dir, cache_dir, results_dir, rows=rows, settings=[setting], seeds=[seed],
                          variant=variant, split_seed=split_seed, weights_for=(setting, seed), progress=False)
    for row in rows:
        method_name, hparams, _ = row_hparams(cfg, row)
        run_dir = Path(trained[trained["method"] == row]["run_dir"].iloc[0])
        if cfg.dg_regime == "maps":
            maps = torch.from_numpy(store.trunk_maps(images)).float()
            hp = dict(hparams)
            if method_name == "boda":
                hp["domain_class_counts"] = None
            method = create_method(method_name, MapHead(maps.shape[1], cfg.dg_head_width), cfg.dg_head_width,
                                   len(CLASSES), num_domains=_num_domains(run_dir), hparams=hp)
            state = _io.torch_load(run_dir / "weights.pt")
            method.load_state_dict({k: v for k, v in state.items() if k != "declared_counts"}, strict=False)
            method.eval()
            cams[row] = grad_cam(method.predict, last_conv(method.featurizer), maps, y,
                                 size=tuple(x.shape[-2:])).numpy()
        else:
            config = _io.read_json(run_dir / "train" / "config.json")["identity"]["config"]
            tc = TrainConfig(**{k: v for k, v in config.items() if k in TrainConfig.__dataclass_fields__})
            method = build_method(tc, len(CLASSES), _num_domains(run_dir), [1] * len(CLASSES))
            weights = run_dir / "train" / ("swad.pt" if cfg.dg_swad else "best.pt")
            method.load_state_dict(_io.torch_load(weights))
            method.eval()
            cams[row] = grad_cam(method.predict, last_conv(method.featurizer), x, y).numpy()
    return examples, images.transpose(0, 2, 3, 1), cams


def _num_domains(run_dir: Path) -> int:
    """Domains a saved run was trained with (read from its weights: DANN's
    discriminator output, BoDA's centroid table), 1 when nothing records it."""
    for name in ("weights.pt", "train/swad.pt", "train/best.pt"):
        path = run_dir / name
        if path.is_file():
            state = _io.torch_load(path)
            if "centroids" in state:
                return int(state["centroids"].shape[0])
            last = [k for k in state if k.startswith("discriminator.") and k.endswith(".weight")]
            if last:
                return int(state[sorted(last, key=lambda k: int(k.split(".")[1]))[-1]].shape[0])
            return 1
    return 1


# --------------------------------------------------------------------------
# The chapter's steps, one per notebook cell (notebook 07)
# --------------------------------------------------------------------------

#: The rows chapter 07 compares with ERM in a paired bootstrap.
GAIN_ROWS = ("BoDA", "BoDA decoupled", "SADA")

#: The rows whose Grad-CAM maps chapter 07 shows (those the profile trains).
GRADCAM_ROWS = ("ERM", "CORAL", "Mixup", "SelfReg", "BoDA", "SADA")


def profile_summary(cfg: SimpleNamespace) -> str:
    """One line: the profile's regime, image size, seeds and per-class image counts."""
    return (f"profile {cfg.name}: regime {cfg.dg_regime}, {cfg.image_size} px, seeds {cfg.dg_seeds}, "
            f"{cfg.dg_train_per_class or 'all'} training images per lab and class, "
            f"{cfg.dg_test_per_class or 'all'} test images per target lab and class")


def nucleus_agreement(cfg: SimpleNamespace, table: pd.DataFrame, root: Path) -> pd.DataFrame:
    """:func:`wbclib.scale.mask_agreement` of the nucleus rule against zheng1's
    expert masks, on the first ``dg_scale_per_lab`` zheng1 images by path (all when unset)."""
    zheng = table[table["lab"] == "zheng1"].sort_values("path")
    if cfg.dg_scale_per_lab:
        zheng = zheng.head(cfg.dg_scale_per_lab)
    paths = [Path(root) / p for p in zheng["path"]]
    return mask_agreement(paths, [p.parent.parent / "masks" / p.name for p in paths])


def agreement_summary(agreement: pd.DataFrame) -> str:
    """Median (and mean) nucleus IoU, and the median nucleus fraction measured and from the expert masks."""
    return (f"zheng1, {len(agreement)} images: nucleus IoU median {agreement.iou.median():.2f} "
            f"(mean {agreement.iou.mean():.2f}); median nucleus fraction {agreement.fraction.median():.3f} "
            f"measured vs {agreement.true_fraction.median():.3f} from the expert masks")


def scale_summary(measured: pd.DataFrame) -> pd.DataFrame:
    """Count and quartiles of the nucleus fraction per (stage, lab), with the lab's crop factor, 3 digits."""
    summary = measured.groupby(["stage", "lab"])["nucleus_fraction"].describe()[["count", "25%", "50%", "75%"]]
    summary["crop factor"] = measured.groupby(["stage", "lab"])["crop"].first()
    return summary.round(3)


def stain_cluster_views(cfg: SimpleNamespace, root: Path, cache_dir: Path, table: pd.DataFrame,
                        crops: Dict[str, float], setting: str = "LOLO:zheng1", n: int = 4) -> SimpleNamespace:
    """The training images of ``setting`` clustered by stain matrix (SADA's
    pseudo-domains) and ``n`` of them re-stained with the other clusters' colours.

    Returns ``k``, ``labs`` (a crosstab of lab against stain cluster), ``raw``
    (n, S, S, 3) and ``views`` (n, k - 1, S, S, 3)."""
    _, sources, targets = settings_named([setting])[0]
    split, _ = dg_sets(cfg, table, sources, targets, crops)
    train = split[split["split"] == "train"]
    store = store_for(cfg, root, cache_dir, table, crops)
    k = stain_clusters_k(cfg)
    clusters = store.stain_clusters(train, k)[store.index(train, train)]
    labs = pd.crosstab(train["lab"].to_numpy(), clusters, rownames=["lab"], colnames=["stain cluster"])
    raw, views = store.view_images(train, k, n=n)
    return SimpleNamespace(k=k, labs=labs, raw=raw, views=views)


def runs_summary(results: pd.DataFrame) -> str:
    """How many scores and runs ``results`` holds, and the mean in-domain validation macro-F1."""
    return (f"{len(results)} scores from {results.groupby(['method', 'setting', 'seed']).ngroups} runs; "
            f"in-domain validation macro-F1 {results[results.eval_set == 'val'].macro_f1.mean():.3f} on average")


def sada_reference() -> pd.DataFrame:
    """SADA's reported Table I (:data:`wbclib.crosslab.SADA_TABLE_I`) with (lab, metric) column levels."""
    reference = SADA_TABLE_I.copy()
    reference.columns = pd.MultiIndex.from_tuples([tuple(c.split("|")) for c in reference.columns])
    return reference


def interval_table(results: pd.DataFrame, seed: int, order: Sequence[str]) -> pd.DataFrame:
    """``macro-F1 [low, high]`` in percent of the runs with ``seed`` per method
    (rows, in ``order``) and (setting, target lab) (columns)."""
    first = results[(results["seed"] == seed) & (results["eval_set"] != "val")].copy()
    first["interval"] = [f"{100 * a:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"
                         for a, lo, hi in zip(first.macro_f1, first.macro_f1_low, first.macro_f1_high)]
    return first.pivot_table(index="method", columns=["setting", "eval_set"], values="interval",
                             aggfunc="first").loc[list(order)]


def lolo_bars(results: pd.DataFrame, seed: int, order: Sequence[str], lolo: bool = True) -> pd.DataFrame:
    """Per (method, held-out lab) of leave-one-lab-out (or, with ``lolo``
    False, per target lab of pbc→others): macro-F1 averaged over seeds, with
    the bootstrap interval of the run with ``seed``; methods in ``order``."""
    order = list(order)
    bars = target_rows(results, lolo=lolo).groupby(["method", "eval_set"], as_index=False)[["macro_f1"]].mean()
    first = target_rows(results[results["seed"] == seed], lolo=lolo)
    bars = bars.merge(first[["method", "eval_set", "macro_f1_low", "macro_f1_high"]], on=["method", "eval_set"])
    bars = bars.sort_values(["method", "eval_set"], key=lambda c: c.map(order.index) if c.name == "method" else c)
    return bars.reset_index(drop=True)


def gains_over_erm(results: pd.DataFrame, seeds: Sequence[int], n_boot: int,
                   methods: Sequence[str] = GAIN_ROWS) -> pd.DataFrame:
    """:func:`paired_gain` of each of ``methods`` over ERM, leave-one-lab-out
    and trained on pbc, one row per (``protocol``, method)."""
    gains = []
    for lolo, label in ((True, "LOLO"), (False, "pbc→others")):
        for method in methods:
            gains.append(dict(protocol=label, **paired_gain(results, method, "ERM", seeds=seeds, lolo=lolo,
                                                            n_boot=n_boot)))
    return pd.DataFrame(gains)


def finetuned_gains(results: pd.DataFrame, seeds: Sequence[int], n_boot: int,
                    methods: Sequence[str]) -> pd.DataFrame:
    """:func:`paired_gain` over ERM of each of ``methods`` but ERM in the
    fine-tuned regime (:func:`finetuned_rows`: pbc→others), in
    :func:`gains_over_erm`'s shape (``protocol`` "pbc→others, fine-tuned")."""
    if not results.empty and set(results["setting"]) != {FINETUNED_SETTING}:
        raise ValueError(f"fine-tuned gains are over {FINETUNED_SETTING!r} runs; got {sorted(set(results['setting']))}")
    return pd.DataFrame([dict(protocol=f"{FINETUNED_SETTING}, fine-tuned",
                              **paired_gain(results, m, "ERM", seeds=seeds, lolo=False, n_boot=n_boot))
                         for m in methods if m != "ERM"])


def gains_table(gains: pd.DataFrame) -> pd.DataFrame:
    """:func:`gains_over_erm` in points (1 digit), indexed by (protocol, method)."""
    return ((gains.set_index(["protocol", "method"]).drop(columns="baseline") * 100).round(1)
            .rename(columns={"p_not_better": "% replicates with gain <= 0"}))


def gain_verdict(gain, sep: str = "; ") -> str:
    """``F1-macro <verdict><sep>F1-micro <verdict>`` of one row of :func:`gains_over_erm`
    (:func:`wbclib.verdicts.interval`: better / worse only when the whole interval excludes zero)."""
    return (f"F1-macro {interval(gain.macro_f1_gain, gain.macro_f1_gain_low, gain.macro_f1_gain_high)}{sep}"
            f"F1-micro {interval(gain.micro_f1_gain, gain.micro_f1_gain_low, gain.micro_f1_gain_high)}")


def gains_report(gains: pd.DataFrame, profile: str, n_seeds: int) -> str:
    """Markdown: one verdict line per row of :func:`gains_over_erm`, and the paper's reported gains."""
    lines = [f"- {r.protocol}, {r.method}: {gain_verdict(r)}" for r in gains.itertuples()]
    return ("Compared with ERM on the average over the target labs (gain in points with its 95 % paired-bootstrap "
            f"interval; profile `{profile}`, {n_seeds} seed(s)):\n\n" + "\n".join(lines) +
            "\n\nSADA's paper reports +5.4 points average F1-macro (68.6 vs 63.2) and +4.8 F1-micro over ERM, "
            "and BoDA +1.5 F1-macro.")


def lolo_settings(results: pd.DataFrame) -> list:
    """The leave-one-lab-out settings present in ``results``, in order of appearance."""
    return [n for n in results["setting"].unique() if n.startswith("LOLO")]


def ablation_table(results: pd.DataFrame, ablation: pd.DataFrame, seed: int, rows: Sequence[str]) -> pd.DataFrame:
    """SADA's Table III shape: F1-micro and F1-macro (percent, 1 digit) averaged
    over the leave-one-lab-out target labs, for ERM (``M1: ERM``), the ablation
    ``rows`` (the first two before SADA, the rest after) and SADA, runs with ``seed``."""
    settings = lolo_settings(results)
    base = results[results["method"].isin(["ERM", "SADA"]) & (results["seed"] == seed)
                   & results["setting"].isin(settings)]
    both = pd.concat([base.replace({"method": {"ERM": "M1: ERM"}}), ablation])
    avg = (100 * target_rows(both).groupby("method")[["micro_f1", "macro_f1"]].mean()).round(1)
    rows = list(rows)
    avg = avg.loc[[m for m in ["M1: ERM", *rows[:2], "SADA", *rows[2:]] if m in avg.index]]
    avg.columns = ["F1-micro", "F1-macro"]
    return avg


def ablation(cfg: SimpleNamespace, root: Path, splits_dir: Path, cache_dir: Path, results_dir: Path,
             results: pd.DataFrame, split_seed: int = 0) -> pd.DataFrame:
    """The profile's ablation rows (``dg_ablation_rows``) on the leave-one-lab-out
    settings with the first seed (:func:`crosslab_dg`), tabled against ERM and
    SADA of ``results`` (:func:`ablation_table`)."""
    seed = cfg.dg_seeds[0]
    runs_ = crosslab_dg(cfg, root, splits_dir, cache_dir, results_dir, rows=cfg.dg_ablation_rows,
                        settings=lolo_settings(results), seeds=[seed], split_seed=split_seed)
    return ablation_table(results, runs_, seed, cfg.dg_ablation_rows)


def boda_term_report(results: pd.DataFrame, seeds: Sequence[int], pairs: int = 2 * len(CLASSES)) -> str:
    """BoDA's loss term at the last epoch, averaged over its leave-one-lab-out
    runs with ``seeds`` (from each run's ``history.csv``), next to its value for
    uniform logits, ``log(pairs - 1)`` (``pairs``: domain-class pairs, two source
    labs by default)."""
    terms = []
    for setting in lolo_settings(results):
        for seed in seeds:
            run_dir = results[(results.method == "BoDA") & (results.setting == setting)
                              & (results.seed == seed)].run_dir.iloc[0]
            history = _io.read_csv(Path(run_dir) / "history.csv")
            if "boda" in history:
                terms.append(history["boda"].iloc[-1])
    if not terms:
        return "BoDA's term did not start within these few updates (warm-up)"
    return (f"BoDA term, last epoch: {np.mean(terms):.3f} "
            f"(uniform logits: log({pairs - 1}) = {np.log(pairs - 1):.3f})")


def sada_sweep(cfg: SimpleNamespace, root: Path, splits_dir: Path, cache_dir: Path, results_dir: Path,
               split_seed: int = 0) -> pd.DataFrame:
    """SADA with every (k, beta) of ``sada_sweep_k`` x ``sada_sweep_beta`` on
    ``sada_sweep_settings`` (first seed); the main run's (k, beta) is read from
    the ``main`` variant. Target-lab rows with ``k`` and ``beta`` columns."""
    defaults = resolved_hparams(cfg, "SADA")
    sweep = []
    for k in cfg.sada_sweep_k:
        for beta in cfg.sada_sweep_beta:
            default = (k, beta) == (defaults["k"], defaults["beta"])
            part = crosslab_dg(cfg, root, splits_dir, cache_dir, results_dir, rows=["SADA"],
                               settings=cfg.sada_sweep_settings, seeds=cfg.dg_seeds[:1], split_seed=split_seed,
                               overrides=None if default else {"SADA": {"k": k, "beta": beta}},
                               variant="main" if default else f"sweep_k{k}_beta{beta}", progress=False)
            sweep.append(target_rows(part).assign(k=k, beta=beta))
    return pd.concat(sweep)


def gradcam_rows(cfg: SimpleNamespace) -> list:
    """:data:`GRADCAM_ROWS` that the profile trains (``dg_rows``)."""
    return [r for r in GRADCAM_ROWS if r in cfg.dg_rows]


def gradcam_captions(examples: pd.DataFrame) -> list:
    """``lab`` and ``label`` of each Grad-CAM example, on two lines."""
    return [f"{lab}\n{label}" for lab, label in zip(examples["lab"], examples["label"])]


def scale_comparison(cfg: SimpleNamespace, root: Path, splits_dir: Path, cache_dir: Path, results_dir: Path,
                     results: pd.DataFrame, split_seed: int = 0) -> pd.DataFrame:
    """ERM's target-lab rows (first seed) with scale normalisation (from
    ``results``) and without it (the ``noscale`` variant, trained here), with a
    ``scale`` column. Scale normalisation is the per-image cell-centred crop
    when ``cfg.cell_crop`` is on (then the per-lab crop factors are all 1, see
    :func:`crosslab.scale_factors`), else the per-lab crop; the ``noscale``
    variant switches both off, so it resizes whole images."""
    seed = cfg.dg_seeds[0]
    cell = bool(getattr(cfg, "cell_crop", False))
    plain = SimpleNamespace(**{**vars(cfg), "cell_crop": False}) if cell else cfg
    noscale = crosslab_dg(plain, root, splits_dir, cache_dir, results_dir, rows=["ERM"], seeds=[seed],
                          variant="noscale", scale=False, split_seed=split_seed, progress=False)
    with_scale = results[(results.method == "ERM") & (results.seed == seed)]
    compare = pd.concat([with_scale.assign(scale="cell-centred" if cell else "cropped per lab"),
                         noscale.assign(scale="resized only")])
    return compare[compare.eval_set != "val"]


def scale_table(compare: pd.DataFrame) -> pd.DataFrame:
    """Macro-F1 (percent, 1 digit) per (setting, target lab) with and without scale normalisation."""
    return (100 * compare.pivot_table(index=["setting", "eval_set"], columns="scale", values="macro_f1")).round(1)


def finetuned_regime(cfg: SimpleNamespace) -> str:
    """How the fine-tuned comparison trains the backbone, in words."""
    frozen = cfg.crosslab_frozen_stages
    return (f"stem and first {frozen} stages frozen, the rest fine-tuned" if frozen else "fine-tuned end to end")


def chapter_summary(results: pd.DataFrame, ablation: pd.DataFrame, compare: pd.DataFrame,
                    gains: pd.DataFrame, finetuned: Optional[pd.DataFrame] = None,
                    finetuned_gain: Optional[pd.DataFrame] = None, regime: str = "fine-tuned") -> str:
    """The chapter's closing bullet points (Markdown), every number from the
    tables above (``finetuned`` and ``finetuned_gain``: :func:`finetuned_rows`
    and :func:`finetuned_gains`, when run; ``regime``: :func:`finetuned_regime`)."""
    average = average_over_targets(results, lolo=True)
    abl = ablation["F1-macro"]
    scale_gain = (compare[compare.scale != "resized only"].macro_f1.mean()
                  - compare[compare.scale == "resized only"].macro_f1.mean())
    sada_gain = gains[(gains.protocol == "LOLO") & (gains.method == "SADA")].iloc[0]
    points = [
        f"scale normalisation changes ERM's macro-F1 on the target labs by {100 * scale_gain:+.1f} points on average;",
        f"leave-one-lab-out, the best average F1-macro is {average.macro_f1_mean.idxmax()} "
        f"({100 * average.macro_f1_mean.max():.1f}); ERM {100 * average.macro_f1_mean['ERM']:.1f}, "
        f"SADA {100 * average.macro_f1_mean['SADA']:.1f}, BoDA {100 * average.macro_f1_mean['BoDA']:.1f};",
        f"SADA against ERM (LOLO average): {gain_verdict(sada_gain, sep=', ')} "
        "(the paper: +5.4 and +4.8);",
    ]
    if "ERM + re-stained views" in abl.index and "SADA" in abl.index:
        views, sada, erm = abl["ERM + re-stained views"], abl["SADA"], abl["M1: ERM"]
        points.append(f"in the ablation (first seed), ERM trained on the same re-stained copies reaches "
                      f"{views:.1f} F1-macro against SADA's {sada:.1f} and ERM's {erm:.1f}: most of what SADA "
                      "adds here comes with its re-stained views rather than its losses."
                      if views_carry_gain(views, sada) else
                      f"in the ablation (first seed), ERM on the re-stained copies reaches "
                      f"{views:.1f} F1-macro, SADA {sada:.1f}, ERM {erm:.1f}.")
    if finetuned is not None and finetuned_gain is not None:
        tuned = average_over_targets(finetuned, lolo=False).macro_f1_mean
        scores = ", ".join(f"{m} {100 * tuned[m]:.1f}" for m in finetuned["method"].unique())
        verdicts = "; ".join(f"{r.method}: {gain_verdict(r, sep=', ')}" for r in finetuned_gain.itertuples())
        points.append(f"trained like chapter 04's ERM ({regime}; on pbc, F1-macro averaged over zheng1 and "
                      f"bccd): {scores}; against ERM, {verdicts}.")
    return "\n".join(f"- {p}" for p in points)
