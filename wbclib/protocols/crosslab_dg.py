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
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .. import _io, heads, runs
from .. import benchmarks as B
from .. import metrics as M
from ..crosslab import (CLASSES, ROWS, VERSION, VIEW_METHODS, MapHead, MapStore, dg_sets, features_on_maps,
                        labels_of, one_thread, predict_on_maps, row_hparams, scale_factors, settings_named,
                        stain_clusters_k, store_for, train_on_maps)
from ..benchmarks import CROSSLAB_SETTINGS, setting_key
from ..gradcam import grad_cam, last_conv
from ..method_base import METHODS
from ..methods import create_method
from ..models import ImageTable, default_workers
from ..runs import inputs_fingerprint
from ..train import TrainConfig, build_method, predictions_frame, score_predictions, train_run
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

    def run(self, method_name: str, hparams: dict, options: dict, seed: int, run_dir: Path, n_boot: int,
            save_weights: bool = False) -> dict:
        cfg = self.cfg
        x, y, d = self.train_x, self.train_y, self.train_d
        if method_name in VIEW_METHODS:
            k = METHODS.get(method_name).resolve_hparams(hparams)["k"]  # the row's, else the method's default
            views = self.views(int(k), int(hparams.get("seed", seed)))
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


def _end_to_end(cfg, store: MapStore, root: Path, split: pd.DataFrame, eval_sets, single_source: bool,
                method_name: str, hparams: dict, options: dict, seed: int, run_dir: Path, n_boot: int) -> dict:
    """One run of the ``gpu`` regime: :func:`train.train_run` on images."""
    split = split.copy()
    train = split[split["split"] == "train"]
    if single_source:
        clusters = store.stain_clusters(train, stain_clusters_k(cfg))
        split.loc[train.index, "domain"] = [f"stain{c}" for c in clusters[store.index(train, train)]]
    hparams = dict(hparams)
    if method_name == "sada":
        hparams.setdefault("stage1_epochs", cfg.dg_epochs // 2)
    if method_name in VIEW_METHODS:
        hparams.setdefault("seed", seed)
    if method_name == "boda":
        hparams.setdefault("warmup_steps", int(0.2 * cfg.dg_epochs * max(1, len(train) // cfg.batch_size)))
    config = TrainConfig(method=method_name, backbone=cfg.backbone, pretrained=cfg.pretrained,
                         image_size=cfg.image_size, epochs=cfg.dg_epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                         patience=cfg.dg_epochs, seed=seed, hparams=hparams,
                         num_workers=getattr(cfg, "num_workers", None))
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
        loader = DataLoader(ImageTable(rows, root, CLASSES, cfg.image_size), batch_size=cfg.batch_size,
                            num_workers=default_workers() if getattr(cfg, "num_workers", None) is None
                            else cfg.num_workers)
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
        runner = None
        for row in rows:
            method_name, hparams, options = row_hparams(cfg, row, (overrides or {}).get(row))
            for seed in seeds:
                config = dict(variant=variant, row=row, setting=setting_key(name), seed=seed, version=VERSION,
                              regime=cfg.dg_regime, method=method_name, hparams=hparams, options=options,
                              epochs=cfg.dg_epochs, batch_size=cfg.batch_size, swad=cfg.dg_swad, crops=crops,
                              width=cfg.dg_head_width, image_size=cfg.image_size, backbone=cfg.backbone,
                              pretrained=cfg.pretrained, train_per_class=cfg.dg_train_per_class,
                              test_per_class=cfg.dg_test_per_class, probe_epochs=cfg.probe_epochs, n_boot=cfg.n_boot,
                              lr=cfg.lr if cfg.dg_regime == "end_to_end" else None)
                run = runs.run(results_dir, "crosslab_dg", config, inputs, keys=DG_KEYS)
                run_dir = run.dir
                keep = cfg.dg_regime == "maps" and weights_for == (name, seed)
                results = run.metrics()
                if results is not None and keep and not (run_dir / "weights.pt").is_file():
                    results = None
                if results is None:
                    if cfg.dg_regime == "maps":
                        runner = runner or _MapsRunner(cfg, store, split, eval_sets, single)
                        results = runner.run(method_name, hparams, options, seed, run_dir, cfg.n_boot, keep)
                    elif cfg.dg_regime == "end_to_end":
                        results = _end_to_end(cfg, store, root, split, eval_sets, single, method_name, hparams,
                                              options, seed, run_dir, cfg.n_boot)
                    else:
                        raise ValueError(f"dg_regime must be 'maps' or 'end_to_end', not {cfg.dg_regime!r}")
                    run.finish(results)
                for set_name in eval_sets:
                    r = results[set_name]
                    out.append(dict(variant=variant, method=row, setting=name, seed=seed, eval_set=set_name,
                                    run_dir=str(run_dir),
                                    macro_f1=r["macro_f1"], micro_f1=r["accuracy"],
                                    macro_f1_low=r.get("macro_f1_low"), macro_f1_high=r.get("macro_f1_high"),
                                    **{f"{k}": v for k, v in (overrides or {}).get(row, {}).items()}))
                bar.update(1)
    bar.close()
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
