"""Chapters 05 and 06's tables, over the results of :mod:`wbclib.protocols.pbc_lt`.

Each function turns the result tables the protocols return (rows of
:func:`~wbclib.protocols.pbc_lt.pbc_lt_heads`,
:func:`~wbclib.protocols.pbc_lt.decoupled_finetune`, ...) into one table,
line or reading the chapter shows; none trains anything. Chapter 05
(long-tail methods on frozen features) first, then chapter 06 (decoupled
training and Table 1).
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, NamedTuple, Optional, Sequence

import pandas as pd

from .. import benchmarks as B
from ..metrics import METRICS, format_mean_std, summarize
from ..models import PAPER_BACKBONES
from ..verdicts import consistency
from .pbc_lt import (BACKBONE_NAMES, RECIPE_NAMES, head_recipes, lt_rhos, paper_table1, pbc_lt_ensembles,
                     per_class_scores, recipe_differences, stain_reference, summed_confusion)

#: The evaluation set the chapters read their headline numbers from.
DEGRADED = "test_degraded"


def method_order(recipes: Sequence[str]) -> List[str]:
    """The display names (:data:`pbc_lt.RECIPE_NAMES`) of ``recipes``, in their order."""
    return [RECIPE_NAMES[r] for r in recipes]


def mean_std_cells(frame: pd.DataFrame, by: Sequence[str],
                   metric_names: Sequence[str] = ("macro_f1", "balanced_accuracy")) -> pd.DataFrame:
    """``mean ± std`` strings (percent, 1 digit) over the rows (folds) of each ``by``
    group, one column per metric (:func:`metrics.summarize`, :func:`metrics.format_mean_std`)."""
    return format_mean_std(summarize(frame, by=list(by), metrics=list(metric_names)), metrics=list(metric_names))


# --------------------------------------------------------------------------
# Chapter 05: long-tail methods on frozen features
# --------------------------------------------------------------------------

#: One representative recipe per family for the head-to-tail figure.
FAMILY_REPRESENTATIVES = ("ib", "cb_sampling", "hybrid", "ldam_drw", "logit_adjusted", "crt", "tau_norm")


def lt_profile_line(cfg: SimpleNamespace) -> str:
    """Chapter 05's settings in one line: backbones, image size, rhos, folds,
    head epochs, and the backbones with Macenko and with TTA."""
    short = BACKBONE_NAMES
    return (f"profile {cfg.name}: {', '.join(short[b] for b in cfg.lt_backbones)} at {cfg.image_size} px, "
            f"rho {lt_rhos(cfg)}, folds {cfg.probe_folds}, {cfg.probe_epochs} head epochs; "
            f"Macenko for {[short[b] for b in cfg.lt_stain_backbones]}, "
            f"TTA ({cfg.tta_views} views on {cfg.tta_sets}) for {[short[b] for b in cfg.lt_tta_backbones]}")


def recipe_table(epochs: int, recipes: Sequence[str]) -> pd.DataFrame:
    """One row per head recipe of ``recipes`` (in :func:`pbc_lt.head_recipes`' order):
    its method name, registered head, sampler and loss (the head's defaults
    spelled out: cRT samples class-balanced with the hybrid loss, the others
    instance-balanced with CE)."""
    return pd.DataFrame([dict(recipe=name, method=RECIPE_NAMES[name], head=spec[0],
                              sampler=spec[1].get("sampler", "class_balanced" if spec[0] == "crt" else "instance"),
                              loss=spec[1].get("loss", "hybrid" if spec[0] == "crt" else "ce"))
                         for name, spec in head_recipes(epochs).items() if name in recipes]).set_index("recipe")


def plain_rows(heads: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``heads`` without stain normalisation or TTA, with the recipe's
    display name as ``method``."""
    return heads[(heads["stain"] == "none") & ~heads["tta"]].assign(method=heads["recipe"].map(RECIPE_NAMES))


def plain_test_rows(heads: pd.DataFrame, backbone: str) -> pd.DataFrame:
    """:func:`plain_rows` of ``backbone`` on the pristine and the degraded test."""
    plain = plain_rows(heads)
    return plain[(plain["backbone"] == backbone) & plain["eval_set"].isin(["test", DEGRADED])]


def comparison_caption(label: str, backbone: str, n_folds: int) -> str:
    """The bold caption of one comparison table (Markdown)."""
    return f"**{label}** (%, {BACKBONE_NAMES[backbone]}, mean ± std over {n_folds} folds)"


def comparison_table(heads: pd.DataFrame, backbone: str, recipes: Sequence[str], metric: str) -> pd.DataFrame:
    """``metric`` (``mean ± std`` over folds, %) of every recipe (rows, in ``recipes``'
    order) for ``backbone``, one column per (rho, test set), plain pipeline only."""
    table = mean_std_cells(plain_test_rows(heads, backbone), ["method", "rho", "eval_set"], [metric])
    return table[metric].unstack(["rho", "eval_set"]).reindex(method_order(recipes))


def backbone_table(heads: pd.DataFrame, rho: float, recipes: Sequence[str]) -> pd.DataFrame:
    """Macro-F1 (``mean ± std`` over folds, %) of every recipe (rows) on every backbone
    (columns, short names) at ``rho`` on the degraded test, plain pipeline only."""
    plain = plain_rows(heads)
    deg = plain[(plain["rho"] == rho) & (plain["eval_set"] == DEGRADED)]
    table = mean_std_cells(deg.assign(backbone=deg["backbone"].map(BACKBONE_NAMES)), ["method", "backbone"],
                           ["macro_f1"])
    return table["macro_f1"].unstack("backbone").reindex(method_order(recipes))


def representative_runs(heads: pd.DataFrame, backbone: str, rho: float,
                        recipes: Sequence[str]) -> Dict[str, List[str]]:
    """Method name -> run folders (by fold) of each :data:`FAMILY_REPRESENTATIVES`
    recipe in ``recipes``, for ``backbone`` at ``rho``, plain pipeline only."""
    plain = plain_rows(heads)
    plain = plain[(plain["backbone"] == backbone) & (plain["rho"] == rho)]
    return {RECIPE_NAMES[r]: list(plain[plain["recipe"] == r].sort_values("fold")["run_dir"].unique())
            for r in FAMILY_REPRESENTATIVES if r in recipes}


def representative_per_class(heads: pd.DataFrame, backbone: str, rho: float, recipes: Sequence[str],
                             eval_set: str = DEGRADED) -> pd.DataFrame:
    """Per-class precision, recall and F1 on ``eval_set`` of every run of
    :func:`representative_runs`: one row per (method, run, class)."""
    runs_of = representative_runs(heads, backbone, rho, recipes)
    return per_class_scores(runs_of, eval_set, list(B.PBC_LT_CLASSES)).rename(columns={"group": "method"})


def head_tail_classes(head_order: Sequence[str], n: int = 3) -> tuple:
    """The ``n`` most frequent and the ``n`` rarest training classes of ``head_order``."""
    return head_order[:n], head_order[-n:]


def head_tail_caption(head_order: Sequence[str]) -> str:
    """Which classes :func:`head_tail_f1` averages, as one line."""
    head, tail = head_tail_classes(head_order)
    return f"head classes {head}, tail classes {tail}"


def head_tail_f1(per_class: pd.DataFrame, head_order: Sequence[str]) -> pd.DataFrame:
    """Per method (rows): mean F1 (fractions, over folds, then classes) of the head
    and the tail classes of :func:`head_tail_classes`, and their change against
    instance-balanced ERM (``Δ head``, ``Δ tail``)."""
    head, tail = head_tail_classes(head_order)
    f1 = per_class.groupby(["method", "class"])["f1"].mean().unstack("class")
    groups = pd.DataFrame({"head F1": f1[head].mean(axis=1), "tail F1": f1[tail].mean(axis=1)})
    base = RECIPE_NAMES["ib"]
    groups["Δ head"] = groups["head F1"] - groups.loc[base, "head F1"]
    groups["Δ tail"] = groups["tail F1"] - groups.loc[base, "tail F1"]
    return groups


def head_tail_table(groups: pd.DataFrame, recipes: Sequence[str]) -> pd.DataFrame:
    """:func:`head_tail_f1` for display: percent, 1 digit, methods in ``recipes``' order."""
    return (100 * groups).round(1).reindex([m for m in method_order(recipes) if m in groups.index])


class StainDemo(NamedTuple):
    """The Macenko reference image, the test images shown before and after, and a line naming the reference."""
    reference: str
    examples: List[str]
    note: str


def stain_example_paths(table: pd.DataFrame, n: int = 6) -> List[str]:
    """The first test image of each class (in table order), at most ``n`` of them."""
    return table[table["split"] == "test"].groupby("label").head(1)["path"].head(n).tolist()


def stain_demo(table: pd.DataFrame, root: Path, results_dir: Path) -> StainDemo:
    """The chapter's Macenko reference (:func:`pbc_lt.stain_reference`, recorded in
    ``results_dir/pbc_lt/stain_reference.json``) with :func:`stain_example_paths`."""
    reference = stain_reference(table, root, Path(results_dir) / "pbc_lt" / "stain_reference.json")
    label = table.set_index("path")["label"][reference]
    return StainDemo(reference, stain_example_paths(table), f"reference image: {reference} (class {label})")


def variant_rows(heads: pd.DataFrame, backbones: Sequence[str]) -> pd.DataFrame:
    """The degraded-test rows of ``backbones`` with their ``variant``: the stain
    (``none``, ``macenko``), `` + TTA`` when test-time augmented."""
    variant = heads["stain"] + heads["tta"].map({True: " + TTA", False: ""})
    both = heads[heads["backbone"].isin(list(backbones))].assign(variant=variant)
    return both[both["eval_set"] == DEGRADED]


def variant_deltas(heads: pd.DataFrame, backbones: Sequence[str]) -> pd.DataFrame:
    """Each variant's macro-F1 minus the plain pipeline's (``delta``, fractions) on the
    degraded test, paired by (backbone, rho, fold, recipe), with the ``method``
    name; empty when ``backbones`` have no variant."""
    both = variant_rows(heads, backbones)
    keys = ["backbone", "rho", "fold", "recipe"]
    plain = both[both["variant"] == "none"].set_index(keys)["macro_f1"]
    deltas = []
    for name, part in both[both["variant"] != "none"].groupby("variant"):
        index = part.set_index(keys).index
        diff = (part.set_index(keys)["macro_f1"] - plain.reindex(index)).rename("delta").reset_index()
        deltas.append(diff.assign(variant=name))
    if not deltas:
        return pd.DataFrame(columns=keys + ["delta", "variant", "method"])
    deltas = pd.concat(deltas)
    deltas["method"] = deltas["recipe"].map(RECIPE_NAMES)
    return deltas


def variant_caption(heads: pd.DataFrame, backbones: Sequence[str]) -> str:
    """The bold caption of :func:`variant_delta_table` (Markdown), naming the backbones."""
    names = ", ".join(BACKBONE_NAMES[b] for b in variant_rows(heads, backbones)["backbone"].unique())
    return f"**Δ macro-F1 vs plain** (points, {names}, degraded test)"


def variant_delta_table(deltas: pd.DataFrame, recipes: Sequence[str]) -> pd.DataFrame:
    """:func:`variant_deltas` as ``mean ± std`` points over folds (and backbones),
    one row per method (``recipes``' order), one column per (rho, variant)."""
    summary = deltas.groupby(["method", "rho", "variant"])["delta"].agg(["mean", "std"])
    cells = ((100 * summary["mean"]).map("{:+.1f}".format) + " ± "
             + (100 * summary["std"].fillna(0)).map("{:.1f}".format))
    present = cells.index.get_level_values(0)
    return cells.unstack(["rho", "variant"]).reindex([m for m in method_order(recipes) if m in present])


def representation_differences(heads: pd.DataFrame, tuned: pd.DataFrame, backbone: str, folds: Sequence[int],
                               n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """:func:`pbc_lt.recipe_differences` of ``backbone``'s plain test rows on both
    representations (frozen ImageNet ``heads``, fine-tuned ``tuned``), on ``folds``."""
    both = pd.concat([plain_test_rows(heads, backbone), tuned[tuned["backbone"] == backbone]])
    return recipe_differences(both, folds=folds, n_boot=n_boot, seed=seed)


def methods_reading(heads: pd.DataFrame, groups: pd.DataFrame, deltas: pd.DataFrame, backbone: str,
                    recipes: Sequence[str], rho: float) -> str:
    """Chapter 05's reading as Markdown bullets: the best recipe at ``rho`` on the
    degraded test against ERM, the recipes more than half a point of macro-F1
    above or below it, the largest tail gain (:func:`head_tail_f1`) and the
    head-tail correlation, each variant's verdict (:func:`verdicts.consistency`
    of :func:`variant_deltas`) and the one-lab caveat."""
    main = plain_test_rows(heads, backbone)
    rho_rows = main[(main["rho"] == rho) & (main["eval_set"] == DEGRADED)]
    mf1 = rho_rows.groupby("method")["macro_f1"].mean()
    bacc = rho_rows.groupby("method")["balanced_accuracy"].mean()
    best, base, order = mf1.idxmax(), RECIPE_NAMES["ib"], method_order(recipes)
    lines = [f"* At rho = {rho} on the degraded test the best recipe for {BACKBONE_NAMES[backbone]} is **{best}** "
             f"(macro-F1 {100 * mf1[best]:.1f} % against {100 * mf1[base]:.1f} % for instance-balanced ERM; "
             f"balanced accuracy {100 * bacc[best]:.1f} % vs {100 * bacc[base]:.1f} %)."]
    better = [m for m in order if m in mf1.index and mf1[m] > mf1[base] + 0.005]
    worse = [m for m in order if m in mf1.index and mf1[m] < mf1[base] - 0.005]
    lines.append(f"* Macro-F1 above ERM by more than half a point: {', '.join(better) or 'none'}; "
                 f"below it: {', '.join(worse) or 'none'}.")
    tail_gain = groups["Δ tail"].drop(base)
    head_cost = groups["Δ head"].drop(base)
    winner = tail_gain.idxmax()
    lines.append(f"* The largest tail gain is **{winner}**: {100 * tail_gain[winner]:+.1f} points of F1 on the three "
                 f"rarest classes, for {100 * head_cost[winner]:+.1f} on the three most frequent. Across the shown "
                 f"recipes, tail and head changes correlate at r = {tail_gain.corr(head_cost):.2f}.")
    if len(deltas):
        for name, part in deltas.groupby("variant"):
            m, s = 100 * part["delta"].mean(), 100 * part["delta"].std()
            lines.append(f"* **{name}** {consistency(m, s)} on average over recipes, folds and rhos: {m:+.1f} ± "
                         f"{s:.1f} points of macro-F1 on the degraded test.")
    lines.append("* All images here come from one lab (pbc) with one staining protocol, so stain normalisation can "
                 "only undo the phase-2 colour degradations, not a change of lab; the cross-lab chapter is where it "
                 "has something to correct.")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Chapter 06: decoupled training and ensembles (Table 1)
# --------------------------------------------------------------------------

def table1_profile_line(cfg: SimpleNamespace, rho: float, eval_set: str) -> str:
    """Chapter 06's settings in one line: rho, test set, frozen and fine-tuned backbones and their folds."""
    short = BACKBONE_NAMES
    return (f"profile {cfg.name}: rho {rho}, {eval_set}; frozen backbones {[short[b] for b in cfg.lt_backbones]} "
            f"(folds {cfg.probe_folds}); fine-tuned {[short[b] for b in cfg.decoupled_backbones]} "
            f"(folds {cfg.finetune_folds})")


def table1_summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean, std and number of folds of the four metrics per Table 1 row
    (:func:`metrics.summarize`), rows in their order of appearance."""
    return summarize(rows, by=["row"]).reindex(list(dict.fromkeys(rows["row"])))


def formatted_table1(summary: pd.DataFrame) -> pd.DataFrame:
    """:func:`table1_summary` in Table 1's shape: ``mean ± std`` (%) of the four metrics and ``folds``."""
    out = format_mean_std(summary)
    out["folds"] = summary["n"].astype(int)
    return out


def decoupled_tta_rows(heads: pd.DataFrame, rho: float, eval_set: str = DEGRADED) -> pd.DataFrame:
    """The frozen-feature cRT rows evaluated with TTA (no stain) at ``rho`` on
    ``eval_set``, named ``Decoupled (<backbone>) + TTA``; empty without TTA."""
    tta = heads[(heads["rho"] == rho) & (heads["eval_set"] == eval_set) & heads["tta"] & (heads["stain"] == "none")
                & (heads["recipe"] == "crt")]
    parts = [tta[tta["backbone"] == b].assign(row=f"Decoupled ({BACKBONE_NAMES[b]}) + TTA")
             for b in dict.fromkeys(tta["backbone"])]
    return pd.concat(parts) if parts else tta.assign(row=pd.Series(dtype=str))


def frozen_table1_summary(rows: pd.DataFrame, heads: pd.DataFrame, rho: float,
                          eval_set: str = DEGRADED) -> pd.DataFrame:
    """:func:`table1_summary` of the frozen-feature Table 1 ``rows``, followed by the
    decoupled rows with TTA where the profile computed them (:func:`decoupled_tta_rows`)."""
    columns = ["row"] + list(METRICS)
    extra = decoupled_tta_rows(heads, rho, eval_set)
    return table1_summary(pd.concat([rows[columns], extra[columns]]) if len(extra) else rows)


def table1_claims(summary: pd.DataFrame, backbones: Sequence[str]) -> str:
    """Whether the paper's story holds in :func:`table1_summary` (Markdown bullets):
    cRT's change of balanced accuracy and macro-F1 per backbone, whether the
    full ensemble has the best macro-F1 (TTA rows left out), and the paper's figures."""
    bacc, mf1 = summary["balanced_accuracy_mean"], summary["macro_f1_mean"]
    lines = []
    for b in backbones:
        sup, dec = f"Supervised ({BACKBONE_NAMES[b]})", f"Decoupled ({BACKBONE_NAMES[b]})"
        if sup in summary.index and dec in summary.index:
            d_bacc = 100 * (bacc[dec] - bacc[sup])
            d_mf1 = 100 * (mf1[dec] - mf1[sup])
            lines.append(f"* {BACKBONE_NAMES[b]}: cRT changes balanced accuracy by {d_bacc:+.1f} points and macro-F1 "
                         f"by {d_mf1:+.1f} points ({'higher' if d_bacc > 0 else 'not higher'} balanced accuracy).")
    plain = summary[~summary.index.str.endswith("+ TTA")]
    best = plain["macro_f1_mean"].idxmax()
    full = "Ens. (all)" if "Ens. (all)" in plain.index else None
    if full:
        verdict = "gives" if best == full else "does not give"
        lines.append(f"* The full ensemble {verdict} the best macro-F1 ({100 * plain.macro_f1_mean[full]:.1f} %; "
                     f"best row: {best}, {100 * plain.macro_f1_mean[best]:.1f} %).")
    else:
        lines.append(f"* Best macro-F1: {best} ({100 * plain.macro_f1_mean[best]:.1f} %).")
    lines.append("* Paper: cRT adds +8.8 (R50), +4.8 (R152) and +11.9 (Swin) points of balanced accuracy; "
                 "the three-backbone ensemble has the best macro-F1 (74.2 %).")
    return "\n".join(lines)


def best_table1_row(summary: pd.DataFrame) -> str:
    """The :func:`table1_summary` row with the highest mean macro-F1, TTA rows left out."""
    plain = summary[~summary.index.str.endswith("+ TTA")]
    return plain["macro_f1_mean"].idxmax()


def row_confusion(rows: pd.DataFrame, row: str, eval_set: str = DEGRADED):
    """Confusion counts on ``eval_set`` of Table 1's ``row``, summed over its folds'
    runs (:func:`pbc_lt.summed_confusion`, classes in PBC-LT order)."""
    return summed_confusion(rows[rows["row"] == row]["run_dir"].unique(), eval_set, list(B.PBC_LT_CLASSES))


def fold_ensemble_table(ensembles: pd.DataFrame) -> Optional[pd.DataFrame]:
    """Macro-F1 and balanced accuracy (%, 1 digit) of the fold ensembles
    (:func:`pbc_lt.pbc_lt_ensembles`, kind ``folds``) on the pristine and the
    degraded test, one row per ensemble; ``None`` when there are none (one fold)."""
    folds = ensembles[ensembles["kind"] == "folds"]
    if not len(folds):
        return None
    table = folds[folds["eval_set"].isin(["test", DEGRADED])].pivot_table(
        index="ensemble", columns="eval_set", values=["macro_f1", "balanced_accuracy"])
    return (100 * table).round(1)


def single_fold_note(rows: pd.DataFrame) -> str:
    """The mean single-fold macro-F1 (%, 1 digit) of Table 1's decoupled rows, as one line."""
    single = rows[rows["row"].str.startswith("Decoupled")].groupby("row")["macro_f1"].mean()
    return f"mean single-fold macro-F1 of the decoupled rows (degraded test): {(100 * single).round(1).to_dict()}"


def ensemble_backbones(backbones: Sequence[str]) -> List[str]:
    """The fine-tuned backbones to ensemble: the paper's (Table 1's rows) when the
    profile has more than one of them, else all of ``backbones``."""
    members = [b for b in backbones if b in PAPER_BACKBONES]
    return members if len(members) > 1 else list(backbones)


def finetuned_ensembles(cfg: SimpleNamespace, results_dir: Path, tuned: pd.DataFrame, rho: float) -> pd.DataFrame:
    """The cRT backbone ensembles of the fine-tuned stage 1 (:func:`pbc_lt.pbc_lt_ensembles`
    over ``tuned``, the rows of :func:`pbc_lt.decoupled_finetune`, members
    :func:`ensemble_backbones`); an empty table with fewer than two backbones."""
    members = ensemble_backbones(cfg.decoupled_backbones)
    if len(members) < 2:
        return pd.DataFrame()
    return pbc_lt_ensembles(cfg, results_dir, source="decoupled", variant=cfg.decoupled_stain, recipe="crt",
                            backbones=members, rho=rho, members=tuned)


def paper_rows_for(summary: pd.DataFrame) -> pd.DataFrame:
    """The rows of the paper's Table 1 (:func:`pbc_lt.paper_table1`) that ``summary`` also has, in its order."""
    paper = paper_table1()
    return paper.loc[[r for r in summary.index if r in paper.index]]


def stage2_recipe_table(tuned: pd.DataFrame, rho: float, eval_set: str = DEGRADED) -> pd.DataFrame:
    """Macro-F1 and balanced accuracy (``mean ± std`` over folds, %) of every stage-2
    recipe on the fine-tuned features at ``rho`` on ``eval_set``, one row per
    (backbone, recipe), TTA rows named ``<recipe> + TTA``."""
    recipes = tuned[(tuned["eval_set"] == eval_set) & (tuned["rho"] == rho)].copy()
    recipes["backbone"] = recipes["backbone"].map(BACKBONE_NAMES)
    recipes["recipe"] = recipes["recipe"].map(RECIPE_NAMES) + recipes["tta"].map({True: " + TTA", False: ""})
    return mean_std_cells(recipes, ["backbone", "recipe"])
