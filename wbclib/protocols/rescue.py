"""Chapter 10's protocol: Suppress-and-Rescue on a PBC-LT run's saved predictions.

The algorithm (boosts, semantic verification, morphology filter, threshold
search) is :mod:`wbclib.rescue`; this module chooses the rows, the verifier's
embeddings and the run folders (``pbc_lt/rescue``), and reads the profile.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Optional, Sequence

import pandas as pd

from .. import _io, runs
from .. import benchmarks as B
from ..embeddings import ChainedStore, EmbeddingStore, embeddings_cached
from ..metrics import scores
from ..morphology import PAPER_FEATURES, MahalanobisFilter, MorphologyCache
from ..rescue import (BOOST_STRENGTHS, PHASES, RescueGrid, SiglipEmbedder, class_counts, fit_contrastive_head,
                      fit_thresholds, rarest_classes)
from ..runs import inputs_fingerprint
from .common import cell_centred
from .pbc_lt import pbc_lt_sets, probe_jobs


def verification_store(cfg: SimpleNamespace, tables: Sequence[pd.DataFrame], root: Path, cache_dir: Path):
    """Embeddings for the verifier: a SigLIP tower when ``cfg.rescue_siglip_path``
    names local weights, else the profile's frozen backbone (reusing the
    linear-probe chapter's cache entry where it holds the rows)."""
    if getattr(cfg, "rescue_siglip_path", None):
        return SiglipEmbedder.from_pretrained(cfg.rescue_siglip_path, name="medsiglip").store(tables, root, cache_dir)
    table, definition = B.read_pbc_lt(Path(cfg._splits), cfg._seed)
    table = cell_centred(table, cfg)
    superset = probe_jobs(cfg, table, definition)[2]
    stores = []
    if embeddings_cached(superset, cfg.backbone, cfg.image_size, cache_dir, root):
        probe = EmbeddingStore(superset, cfg.backbone, cfg.image_size, root, cache_dir)
        stores.append(probe)
        missing = [t[probe.positions(t) < 0] for t in tables]
        tables = [t for t in missing if len(t)]
    if tables:
        stores.append(EmbeddingStore(tables, cfg.backbone, cfg.image_size, root, cache_dir,
                                     desc="verification embeddings"))
    return ChainedStore(*stores)


def with_loader_columns(pred: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    """A saved predictions table (``predictions_<set>.csv``, which keeps only
    path, lab, label, degradation and severity) with every other loader column
    (:data:`runs.ROW_COLUMNS`: ``cell_crop``, ``view``, ``stain``, ``crop`` ...)
    of the evaluation set's ``rows`` it was predicted on, joined on ``path``,
    in ``pred``'s order. Without them an embedding store would embed the rows
    with its defaults (uncropped, no stain normalisation), not as the base run
    saw them. Raises when a row is missing or its label or draw disagrees."""
    extra = [c for c in runs.ROW_COLUMNS if c in rows and c not in pred and c != "path"]
    shared = [c for c in ("label", "lab", "degradation", "severity") if c in rows and c in pred]
    source = rows[["path"] + shared + extra].rename(columns={c: f"{c}__set" for c in shared})
    if source["path"].duplicated().any():
        raise ValueError("the evaluation set lists a path twice; its rows cannot be joined on path")
    out = pred.merge(source, on="path", how="left", validate="many_to_one", indicator=True)
    if (out["_merge"] != "both").any():
        missing = out.loc[out["_merge"] != "both", "path"].iloc[0]
        raise LookupError(f"{int((out['_merge'] != 'both').sum())} predicted rows are not in the evaluation set "
                          f"(e.g. {missing})")
    for c in shared:
        if not out[c].astype(str).equals(out[f"{c}__set"].astype(str)):
            raise ValueError(f"the predictions' {c!r} column disagrees with the evaluation set's")
    return out.drop(columns=["_merge"] + [f"{c}__set" for c in shared]).reset_index(drop=True)


def score_rows(frame: pd.DataFrame, classes: Sequence[str]) -> dict:
    index = {c: i for i, c in enumerate(classes)}
    return scores(frame["label"].map(index).to_numpy(), frame["pred"].map(index).to_numpy(), len(classes))


def pbc_lt_rescue(cfg: SimpleNamespace, root: Path, splits_dir: Path, cache_dir: Path, results_dir: Path,
                  base: pd.DataFrame, regime: str = "erm", folds: Optional[Sequence[int]] = None, rho: float = 100,
                  seed: int = 0, val_set: str = "val_degraded", test_set: str = "test_degraded") -> pd.DataFrame:
    """Suppress-and-Rescue on top of a PBC-LT run's saved predictions.

    ``base`` is the table a PBC-LT protocol returned (``protocols.pbc_lt.pbc_lt_finetune``
    or ``pbc_lt_probe``: ``rho``, ``fold``, ``run_dir``); ``regime`` names it
    (``erm``, ``probe``). For each fold, with the base run's training rows:

    * the rare classes are the ``cfg.rescue_rare`` rarest in training, and
      their boosts come from the training counts;
    * the verifier (:func:`fit_contrastive_head`) is trained on the training
      rows' embeddings, as trained (with their phase-2 training draw when the
      profile's ``phase2_train`` is on) and all degraded (:func:`benchmarks.stress`);
    * the Mahalanobis filter is fitted on the same rows' K-means morphology
      (:data:`wbclib.morphology.PAPER_FEATURES`), for the rare classes;
    * every phase's parameters are chosen by :func:`fit_thresholds` on
      ``predictions_<val_set>.csv`` and then applied, unchanged, to
      ``predictions_<test_set>.csv``.

    Each fold is a ``pbc_lt/rescue`` run folder (:func:`runs.run`, named by
    regime, rho and fold, keyed by the base run and every setting):
    ``params_<phase>.json``, ``predictions_<test_set>_<phase>.csv``,
    ``metrics.json`` and ``done`` (a finished fold is read back). Returns one
    row per (fold, phase) with the test and validation scores, the rescue's
    ``run_dir`` and the ``base_run_dir``; phase ``base`` is the run's own predictions.
    """

    table, definition = B.read_pbc_lt(splits_dir, seed)
    table = cell_centred(table, cfg)
    classes = list(B.PBC_LT_CLASSES)
    folds = list(folds if folds is not None else cfg.finetune_folds)
    cfg = SimpleNamespace(**vars(cfg), _splits=str(splits_dir), _seed=seed)

    morph = MorphologyCache.in_cache(root, cache_dir)
    rows = []
    strengths = tuple(getattr(cfg, "rescue_strengths", None) or BOOST_STRENGTHS)
    for fold in folds:
        hits = base[(base["rho"] == rho) & (base["fold"] == fold)]["run_dir"].unique()
        if len(hits) != 1:
            raise LookupError(f"{len(hits)} base runs for rho={rho} fold={fold} in the {regime!r} table")
        run_dir = Path(hits[0])
        split, eval_sets = pbc_lt_sets(cfg, table, definition, rho, fold)
        train = split[split["split"] == "train"]
        views = pd.concat([train, B.stress(train)], ignore_index=True)
        config = dict(regime=regime, rho=rho, fold=fold, base=run_dir.name, val_set=val_set, test_set=test_set,
                      rare=cfg.rescue_rare, head_epochs=cfg.rescue_head_epochs, strengths=list(strengths),
                      siglip=getattr(cfg, "rescue_siglip_path", None), backbone=cfg.backbone,
                      image_size=cfg.image_size, morphology=MorphologyCache.VERSION, seed=seed)
        out = runs.run(results_dir, "pbc_lt/rescue", config, inputs_fingerprint(dict(views=views), root),
                       keys=("regime", "rho", "fold"))
        if out.done:
            rows += [dict(r, run_dir=str(out.dir), base_run_dir=str(run_dir)) for r in out.metrics()]
            continue
        counts = class_counts(train["label"], classes)
        rare = rarest_classes({c: counts[c] for c in definition.head_order}, cfg.rescue_rare)
        # the saved predictions lack the loader columns (cell_crop, stain ...): join them back from the sets
        val = with_loader_columns(_io.read_csv(run_dir / f"predictions_{val_set}.csv"), eval_sets[val_set])
        test = with_loader_columns(_io.read_csv(run_dir / f"predictions_{test_set}.csv"), eval_sets[test_set])
        store = verification_store(cfg, [views, val, test], root, cache_dir)
        index = {c: i for i, c in enumerate(classes)}
        verifier = fit_contrastive_head(store(views), views["label"].map(index).to_numpy(), len(classes),
                                        epochs=cfg.rescue_head_epochs, seed=seed)
        verify_val, verify_test = verifier.predict_proba(store(val)), verifier.predict_proba(store(test))
        rare_views = views[views["label"].isin(rare)]
        maha = MahalanobisFilter().fit(morph(rare_views)[[f"km_{f}" for f in PAPER_FEATURES]].to_numpy(float),
                                       rare_views["label"].to_numpy())
        kmeans_morph = lambda t: morph(t).rename(columns={f"km_{f}": f for f in PAPER_FEATURES} | {  # noqa: E731
            f: f"mask_{f}" for f in PAPER_FEATURES})
        base_val, base_test = score_rows(val, classes), score_rows(test, classes)
        fold_rows = [dict(regime=regime, fold=fold, phase="base", rare=rare, **base_test,
                          val_macro_f1=base_val["macro_f1"], changed=0)]
        previous, grid = None, RescueGrid(strengths=strengths)
        for phase in PHASES:
            params = fit_thresholds(val, counts, rare, verify_val, kmeans_morph, phase=phase, grid=grid,
                                    mahalanobis=maha, start=previous)
            rescued = params.apply(test, verify_test, kmeans_morph)
            keep = [c for c in ("path", "label", "degradation", "severity", "pred", "base_pred", "candidate", "rescue")
                    if c in rescued]
            out.write_csv(f"predictions_{test_set}_{phase}.csv", rescued[keep])
            out.write_json(f"params_{phase}.json", params.to_dict())
            fold_rows.append(dict(regime=regime, fold=fold, phase=phase, rare=rare, **score_rows(rescued, classes),
                                  val_macro_f1=params.info["val_score"],
                                  changed=int((rescued["pred"] != rescued["base_pred"]).sum())))
            previous = params
        out.finish(fold_rows)
        rows += [dict(r, run_dir=str(out.dir), base_run_dir=str(run_dir)) for r in fold_rows]
    return pd.DataFrame(rows)
