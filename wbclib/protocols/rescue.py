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

from .. import _io, metrics, runs, verdicts
from .. import benchmarks as B
from ..embeddings import ChainedStore, EmbeddingStore, embeddings_cached
from ..metrics import scores
from ..morphology import PAPER_FEATURES, MahalanobisFilter, MorphologyCache
from ..rescue import (BOOST_STRENGTHS, PAPER_TABLE2, PHASES, RescueGrid, SiglipEmbedder, boost_factors, class_counts,
                      fit_contrastive_head, fit_thresholds, paired_bootstrap_gain, rarest_classes, read_paper_table2)
from ..runs import inputs_fingerprint
from .common import cell_centred
from .pbc_lt import pbc_lt_finetune, pbc_lt_probe, pbc_lt_sets, probe_jobs


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


# --------------------------------------------------------------------------
# The chapter's tables, one per notebook step (notebook 10)
# --------------------------------------------------------------------------

#: Each phase of :func:`pbc_lt_rescue` (and the base predictions) as the chapter's tables name it, in order.
PHASE_NAMES = {"base": "base predictions", "boost": "+ boost only (phase 1)",
               "semantic": "+ semantic verification (phase 2)", "morphology": "+ biological filtering (phase 3)"}


def settings_note(cfg: SimpleNamespace) -> str:
    """The profile's settings the chapter depends on, as one line."""
    return (f"profile {cfg.name}: {cfg.backbone} at {cfg.image_size} px; rescuing the {cfg.rescue_rare} rarest classes; "
            f"fine-tuned ERM folds {cfg.finetune_folds}, probe folds {cfg.rescue_probe_folds}; "
            f"boost strengths {cfg.rescue_strengths}")


def base_runs(cfg: SimpleNamespace, root: Path, splits_dir: Path, cache_dir: Path, results_dir: Path,
              rho: float = 100, seed: int = 0) -> tuple:
    """The base predictions to rescue: the linear probe's runs
    (:func:`pbc_lt.pbc_lt_probe`) and the fine-tuned ERM runs at ``rho``
    (:func:`pbc_lt.pbc_lt_finetune`), read back where the baseline chapter
    finished them: ``(probe_runs, erm_runs)``."""
    probe_runs = pbc_lt_probe(cfg, root, splits_dir, cache_dir, results_dir, seed=seed)
    erm_runs = pbc_lt_finetune(cfg.replace(finetune_rhos=[rho]), root, splits_dir, results_dir, method="erm",
                               seed=seed)
    return probe_runs, erm_runs


def fold_training_counts(cfg: SimpleNamespace, table: pd.DataFrame, definition, rho: float, fold: int) -> dict:
    """Training images per class of the PBC-LT split at ``rho`` and ``fold``
    (:func:`pbc_lt.pbc_lt_sets`), classes from head to tail (``definition.head_order``)."""
    split, _ = pbc_lt_sets(cfg, table, definition, rho, fold)
    counts = class_counts(split[split["split"] == "train"]["label"], list(B.PBC_LT_CLASSES))
    return {c: counts[c] for c in definition.head_order}


def boost_table(counts: dict, n_rare: int, strengths: Sequence[float] = (1.0, 2.0)) -> pd.DataFrame:
    """Per class (``counts``' order): its ``training images``, the boost factor
    :func:`wbclib.rescue.boost_factors` would give it as a rare class at each
    strength (``B_c at s=<s>``) and whether it is one of the ``n_rare``
    rarest (``rare``), 2 digits."""
    rare = rarest_classes(counts, n_rare)
    boosts = pd.DataFrame({"training images": counts})
    for s in strengths:
        boosts[f"B_c at s={s:g}"] = [boost_factors(counts, [c], s)[c] for c in counts]
    boosts["rare"] = [c in rare for c in counts]
    return boosts.round(2)


def rescue_per_model(cfg: SimpleNamespace, root: Path, splits_dir: Path, cache_dir: Path, results_dir: Path,
                     erm_runs: pd.DataFrame, probe_runs: pd.DataFrame, rho: float = 100, seed: int = 0) -> pd.DataFrame:
    """:func:`pbc_lt_rescue` of the fine-tuned ERM runs (folds ``cfg.finetune_folds``)
    and of the linear probe's (``cfg.rescue_probe_folds``), one table with
    ``model`` (``fine-tuned ERM``, ``linear probe``) and ``row`` (the phase's
    name in :data:`PHASE_NAMES`)."""
    erm = pbc_lt_rescue(cfg, root, splits_dir, cache_dir, results_dir, erm_runs, regime="erm",
                        folds=cfg.finetune_folds, rho=rho, seed=seed)
    probe = pbc_lt_rescue(cfg, root, splits_dir, cache_dir, results_dir, probe_runs, regime="probe",
                          folds=cfg.rescue_probe_folds, rho=rho, seed=seed)
    rescues = pd.concat([erm.assign(model="fine-tuned ERM"), probe.assign(model="linear probe")], ignore_index=True)
    rescues["row"] = rescues["phase"].map(PHASE_NAMES)
    return rescues


def rare_classes_per_run(rescues: pd.DataFrame) -> dict:
    """``{"<model> fold <fold>": rare classes}`` for each run of ``rescues`` (a :func:`rescue_per_model` table)."""
    first = rescues.drop_duplicates(["model", "fold"])[["model", "fold", "rare"]]
    return {f"{m} fold {f}": r for m, f, r in first.itertuples(index=False)}


def ablation_table(rescues: pd.DataFrame) -> pd.DataFrame:
    """The ablation in the shape of the paper's Table 2: one row per phase
    (:data:`PHASE_NAMES` order), per model the test and validation macro-F1
    (percent, ``mean ± std`` over folds, 1 digit) and the mean number of test
    predictions the phase ``changed`` (1 digit)."""
    summary = metrics.summarize(rescues, by=["model", "row"], metrics=["macro_f1", "val_macro_f1", "changed"])
    shown = metrics.format_mean_std(summary, metrics=["macro_f1", "val_macro_f1"])
    shown["changed"] = summary["changed_mean"].round(1)
    return shown.reset_index().pivot(index="row", columns="model").reindex(list(PHASE_NAMES.values()))


def paper_table2(paper_file: Path) -> tuple:
    """The paper's Table 2 (method -> macro-F1) read from ``paper_file``
    (:func:`wbclib.rescue.read_paper_table2`) when it exists, else the copy
    :data:`wbclib.rescue.PAPER_TABLE2`: ``(table, where it was read from)``."""
    if Path(paper_file).is_file():
        return read_paper_table2(paper_file), paper_file
    return dict(PAPER_TABLE2), "wbclib.rescue.PAPER_TABLE2"


def paper_table2_frame(paper: dict) -> pd.DataFrame:
    """The paper's Table 2 as one column ``macro-F1 (LB)`` in percent, 2 digits."""
    return pd.Series(paper, name="macro-F1 (LB)").mul(100).round(2).to_frame()


def first_folds(cfg: SimpleNamespace) -> dict:
    """``{model: (regime, fold)}``: the first fold of each model, the one the
    chapter's per-class, outcome, parameter and gain tables read."""
    return {"fine-tuned ERM": ("erm", cfg.finetune_folds[0]), "linear probe": ("probe", cfg.rescue_probe_folds[0])}


def rescue_run(rescues: pd.DataFrame, regime: str, fold: int) -> pd.Series:
    """The first row of ``rescues`` (a :func:`rescue_per_model` table) for ``regime`` and ``fold``."""
    return rescues[(rescues.regime == regime) & (rescues.fold == fold)].iloc[0]


def rescued_predictions(rescues: pd.DataFrame, regime: str, fold: int, phase: str,
                        test_set: str = "test_degraded") -> pd.DataFrame:
    """The saved test predictions of a rescue run after ``phase``; phase
    ``base``: the base run's own ``predictions_<test_set>.csv``."""
    run = rescue_run(rescues, regime, fold)
    if phase == "base":
        return _io.read_csv(Path(run.base_run_dir) / f"predictions_{test_set}.csv")
    return _io.read_csv(Path(run.run_dir) / f"predictions_{test_set}_{phase}.csv")


def per_class_scores(rescues: pd.DataFrame, first: dict, classes: Sequence[str]) -> pd.DataFrame:
    """Per-class scores (:func:`metrics.per_class`) of the test predictions
    of each model's run in ``first`` (:func:`first_folds`) after every phase:
    one row per (model, phase, class), phases named as in :data:`PHASE_NAMES`."""
    index = {c: i for i, c in enumerate(classes)}
    per_class = []
    for model, (regime, fold) in first.items():
        for phase, name in PHASE_NAMES.items():
            pred = rescued_predictions(rescues, regime, fold, phase)
            pc = metrics.per_class(pred["label"].map(index), pred["pred"].map(index), classes).reset_index()
            per_class.append(pc.assign(model=model, phase=name))
    return pd.concat(per_class, ignore_index=True)


def model_rows(per_class: pd.DataFrame, model: str) -> pd.DataFrame:
    """The rows of a :func:`per_class_scores` table for one ``model``."""
    return per_class[per_class["model"] == model]


def per_class_change_table(per_class: pd.DataFrame) -> pd.DataFrame:
    """Per (model, class): F1 after every phase and its change (``Δ <phase>``)
    from the base predictions, in percent, 1 digit."""
    order = list(PHASE_NAMES.values())
    f1 = per_class.pivot_table(index=["model", "class"], columns="phase", values="f1").reindex(columns=order)
    change = f1.sub(f1[order[0]], axis=0).drop(columns=order[0]).add_prefix("Δ ")
    return (100 * pd.concat([f1, change], axis=1)).round(1)


def rescue_outcomes(rescues: pd.DataFrame, first: dict) -> pd.DataFrame:
    """Per model (its run in ``first``), the full rescue on the test rows:
    rows per ``rescue`` outcome, changed predictions that are right
    (``rescued_right``) and wrong (``rescued_wrong``) and the classes they
    went to (``rescued_classes``); 0 where an outcome never happened."""
    outcomes = []
    for model, (regime, fold) in first.items():
        pred = rescued_predictions(rescues, regime, fold, "morphology")
        changed = pred[pred["pred"] != pred["base_pred"]]
        row = pred["rescue"].value_counts().to_dict()
        row.update(model=model, rescued_right=int((changed["pred"] == changed["label"]).sum()),
                   rescued_wrong=int((changed["pred"] != changed["label"]).sum()),
                   rescued_classes=", ".join(sorted(changed["pred"].unique())) or "none")
        outcomes.append(row)
    return pd.DataFrame(outcomes).set_index("model").fillna(0)


def per_class_value(value, c: str):
    """A rescue parameter of class ``c``: ``value[c]`` when it is per class (a dict), else ``value``."""
    return value[c] if isinstance(value, dict) else value


def chosen_parameters(rescues: pd.DataFrame, first: dict) -> pd.DataFrame:
    """The parameters each phase chose (``params_<phase>.json``) for each
    model's run in ``first``: one row per (model, phase, rare class) with the
    strength, the class's boost, whether verification is on and its ``tau``
    (None when off), the morphology rule and its thresholds, and the
    validation macro-F1 before and after; 3 digits."""
    chosen = []
    for model, (regime, fold) in first.items():
        for phase in PHASES:
            p = _io.read_json(Path(rescue_run(rescues, regime, fold).run_dir) / f"params_{phase}.json")
            for c in p["rare_classes"]:
                chosen.append(dict(model=model, phase=phase, rare_class=c, strength=p["info"]["strength"],
                                   boost=p["boosts"][c], verify=p["verify"],
                                   tau=per_class_value(p["tau"], c) if p["verify"] else None,
                                   rule=per_class_value(p["morphology"], c),
                                   tau_s=per_class_value(p["tau_s"], c), tau_m=per_class_value(p["tau_m"], c),
                                   val_base=p["info"]["val_base_score"], val_after=p["info"]["val_score"]))
    return pd.DataFrame(chosen).round(3)


def paper_gains(paper: dict) -> dict:
    """The paper's gains in macro-F1 points (Table 2): ``semantic``, from
    "Swin-T (5-Fold + TTA)" to its verification row, and ``morphology``,
    from there to biological filtering."""
    verified = paper["+ MedSigLIP Semantic Verification (Phase 2)"]
    return {"semantic": 100 * (verified - paper["Swin-T (5-Fold + TTA)"]),
            "morphology": 100 * (paper["+ Biological Filtering (Phase 3)"] - verified)}


def gain_verdicts(rescues: pd.DataFrame, first: dict, classes: Sequence[str], paper: dict, n_boot: int = 1000,
                  seed: int = 0) -> pd.DataFrame:
    """Per model (its run in ``first``) and step (base -> semantic, semantic ->
    morphology): the macro-F1 ``gain`` in points with its 95 % paired-bootstrap
    interval (``low``, ``high``; :func:`wbclib.rescue.paired_bootstrap_gain`),
    the paper's gain for that step (:func:`paper_gains`) and the
    :func:`verdicts.reproduction` verdict."""
    paper_gain = paper_gains(paper)
    judged = []
    for model, (regime, fold) in first.items():
        before = rescued_predictions(rescues, regime, fold, "base")
        for phase, previous in (("semantic", "base"), ("morphology", "semantic")):
            a = rescued_predictions(rescues, regime, fold, previous)
            b = rescued_predictions(rescues, regime, fold, phase)
            g = paired_bootstrap_gain(before["label"], a["pred"], b["pred"], classes, n_boot=n_boot, seed=seed)
            gain, low, high = 100 * g["gain"], 100 * g["low"], 100 * g["high"]
            judged.append(dict(model=model, phase=PHASE_NAMES[phase], gain=gain, low=low, high=high,
                               paper_gain=paper_gain[phase],
                               verdict=verdicts.reproduction(gain, low, paper_gain[phase])))
    return pd.DataFrame(judged)


def gain_summary(judged: pd.DataFrame) -> str:
    """A :func:`gain_verdicts` table as markdown bullets, one per (model, step)."""
    lines = [f"* **{r.model}, {r.phase}**: {r.gain:+.2f} points (95 % CI {r.low:+.2f} to {r.high:+.2f}) against the "
             f"paper's {r.paper_gain:+.2f}: {r.verdict}." for r in judged.itertuples()]
    return "\n".join(lines)
