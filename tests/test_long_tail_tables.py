"""Chapters 05 and 06's tables in :mod:`wbclib.protocols.long_tail`, on tiny synthetic result frames."""
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from wbclib import benchmarks as B
from wbclib.protocols import long_tail as lt
from wbclib.protocols.pbc_lt import RECIPE_NAMES

L0, L1 = "tf_efficientnet_lite0", "tf_efficientnet_lite1"
IB, CRT, FOCAL = RECIPE_NAMES["ib"], RECIPE_NAMES["crt"], RECIPE_NAMES["focal"]
BASE = {"ib": 0.40, "crt": 0.50, "focal": 0.38}


def score(backbone, stain, tta, rho, fold, recipe, eval_set):
    """Macro-F1 built from known parts, so every table cell can be checked by hand."""
    return (BASE[recipe] + 0.02 * fold + (0.10 if eval_set == "test" else 0) + (0.05 if rho == 10 else 0)
            + (0.07 if backbone == L1 else 0) + ((0.03 + 0.01 * fold) if stain == "macenko" else 0)
            + (0.01 if tta else 0))


def heads_frame(recipes=("ib", "crt"), folds=(1, 0)):
    """Rows as :func:`pbc_lt.pbc_lt_heads` returns them: Lite0 with Macenko and TTA variants, Lite1 plain;
    folds listed in reverse order on purpose."""
    rows = []
    for backbone, variants in ((L0, [("none", False), ("none", True), ("macenko", False), ("macenko", True)]),
                               (L1, [("none", False)])):
        for stain, tta in variants:
            for rho in (10, 100):
                for fold in folds:
                    for recipe in recipes:
                        run_dir = f"/runs/{backbone}/{stain}{'_tta' if tta else ''}/{rho}/{fold}/{recipe}"
                        for eval_set in ("val", "test", "test_degraded"):
                            f1 = score(backbone, stain, tta, rho, fold, recipe, eval_set)
                            rows.append(dict(backbone=backbone, representation="imagenet", stain=stain, rho=rho,
                                             fold=fold, recipe=recipe, tta=tta, run_dir=run_dir, eval_set=eval_set,
                                             macro_f1=f1, balanced_accuracy=f1 + 0.1, macro_precision=f1 - 0.1,
                                             macro_specificity=0.9))
    return pd.DataFrame(rows)


def write_predictions(run_dir, eval_set, labels, preds):
    run_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(dict(path=[f"img{i}.png" for i in range(len(labels))], label=labels, pred=preds)).to_csv(
        run_dir / f"predictions_{eval_set}.csv", index=False)


def cfg(**extra):
    base = dict(name="smoke", lt_backbones=[L0, L1], image_size=64, rhos=[1, 10, 100], probe_folds=[0, 1],
                probe_epochs=5, lt_stain_backbones=[L0], tta_views=8, tta_sets=["test", "test_degraded"],
                lt_tta_backbones=[L0], decoupled_backbones=[L0], finetune_folds=[0], decoupled_stain="none")
    return SimpleNamespace(**dict(base, **extra))


# --------------------------------------------------------------------------
# Chapter 05
# --------------------------------------------------------------------------

def test_method_order_and_mean_std_table():
    assert lt.method_order(["crt", "ib"]) == [CRT, IB]
    frame = pd.DataFrame(dict(g=["a", "a", "b"], macro_f1=[0.1, 0.3, 0.5], balanced_accuracy=[0.2, 0.2, 0.6]))
    table = lt.mean_std_cells(frame, ["g"])
    assert list(table.columns) == ["macro_f1", "balanced_accuracy"]
    assert table.loc["a", "macro_f1"] == "20.0 ± 14.1" and table.loc["a", "balanced_accuracy"] == "20.0 ± 0.0"
    assert table.loc["b", "macro_f1"] == "50.0 ± 0.0"  # one row: no spread


def test_lt_profile_line():
    assert lt.lt_profile_line(cfg()) == (
        "profile smoke: Lite0, Lite1 at 64 px, rho [10, 100], folds [0, 1], 5 head epochs; Macenko for ['Lite0'], "
        "TTA (8 views on ['test', 'test_degraded']) for ['Lite0']")


def test_recipe_table_spells_out_each_heads_sampler_and_loss():
    table = lt.recipe_table(7, ["focal_ilf", "crt", "ib"])
    assert list(table.index) == ["ib", "crt", "focal_ilf"]  # head_recipes' order, not the argument's
    assert list(table.columns) == ["method", "head", "sampler", "loss"]
    assert table.loc["ib"].tolist() == [IB, "linear_probe", "instance", "ce"]
    assert table.loc["crt"].tolist() == [CRT, "crt", "class_balanced", "hybrid"]
    assert table.loc["focal_ilf", "sampler"] == "inverse_log" and table.loc["focal_ilf", "loss"] == "focal_ilf"


def test_plain_test_rows_drop_variants_other_backbones_and_val():
    rows = lt.plain_test_rows(heads_frame(), L0)
    assert set(rows.backbone) == {L0} and set(rows.stain) == {"none"} and not rows.tta.any()
    assert set(rows.eval_set) == {"test", "test_degraded"} and len(rows) == 2 * 2 * 2 * 2
    assert set(rows.method) == {IB, CRT}


def test_comparison_table_is_plain_mean_std_per_rho_and_test_set():
    table = lt.comparison_table(heads_frame(), L0, ["crt", "ib"], "macro_f1")
    assert list(table.index) == [CRT, IB]
    assert sorted(table.columns) == [(10, "test"), (10, "test_degraded"), (100, "test"), (100, "test_degraded")]
    assert table.loc[CRT, (100, "test_degraded")] == "51.0 ± 1.4"  # 0.50, 0.52: no Macenko or TTA rows mixed in
    assert table.loc[IB, (10, "test")] == "56.0 ± 1.4"  # 0.55, 0.57
    bacc = lt.comparison_table(heads_frame(), L0, ["ib", "crt"], "balanced_accuracy")
    assert bacc.loc[IB, (10, "test")] == "66.0 ± 1.4"
    assert lt.comparison_caption("macro-F1", L0, 2) == "**macro-F1** (%, Lite0, mean ± std over 2 folds)"


def test_backbone_table_is_degraded_test_at_rho():
    table = lt.backbone_table(heads_frame(), 100, ["ib", "crt"])
    assert list(table.index) == [IB, CRT] and list(table.columns) == ["Lite0", "Lite1"]
    assert table.loc[CRT, "Lite1"] == "58.0 ± 1.4" and table.loc[IB, "Lite0"] == "41.0 ± 1.4"


def test_representative_runs_keep_family_order_and_sort_folds():
    runs_of = lt.representative_runs(heads_frame(("ib", "crt", "focal")), L0, 100, ["focal", "crt", "ib"])
    assert list(runs_of) == [IB, CRT]  # focal is not a family representative
    assert runs_of[CRT] == [f"/runs/{L0}/none/100/0/crt", f"/runs/{L0}/none/100/1/crt"]


def test_representative_per_class_reads_each_runs_predictions(tmp_path):
    classes = list(B.PBC_LT_CLASSES)
    heads = heads_frame()
    heads["run_dir"] = heads.run_dir.map(lambda d: str(tmp_path / d.strip("/")))
    for d in heads.run_dir.unique():
        write_predictions(tmp_path / d, "test_degraded", [classes[0], classes[0], classes[1]],
                          [classes[0], classes[1], classes[1]] if "crt" in d else [classes[0]] * 3)
    per_class = lt.representative_per_class(heads, L0, 100, ["ib", "crt"])
    assert "method" in per_class.columns and "group" not in per_class.columns
    assert len(per_class) == 2 * 2 * len(classes)  # 2 methods x 2 folds x classes
    f1 = per_class.groupby(["method", "class"]).f1.mean()
    assert f1[(IB, classes[0])] == pytest.approx(0.8) and f1[(IB, classes[1])] == 0
    assert f1[(CRT, classes[0])] == pytest.approx(2 / 3) and f1[(CRT, classes[1])] == pytest.approx(2 / 3)


def per_class_frame():
    order = list("abcdefg")
    rows = []
    for method, head, tail in ((IB, 0.9, 0.1), (CRT, 0.8, 0.4), (FOCAL, 0.85, 0.2)):
        for run, shift in ((0, 0.0), (1, 0.02)):
            for k, c in enumerate(order):
                rows.append(dict(method=method, run=run, **{"class": c},
                                 f1=(head if k < 3 else tail if k >= 4 else 0.5) + shift))
    return pd.DataFrame(rows), order


def test_head_tail_f1_and_its_table():
    per_class, order = per_class_frame()
    groups = lt.head_tail_f1(per_class, order)
    assert groups.loc[CRT, "head F1"] == pytest.approx(0.81) and groups.loc[CRT, "tail F1"] == pytest.approx(0.41)
    assert groups.loc[CRT, "Δ tail"] == pytest.approx(0.3) and groups.loc[CRT, "Δ head"] == pytest.approx(-0.1)
    assert groups.loc[IB, "Δ head"] == 0
    table = lt.head_tail_table(groups, ["crt", "ib", "lws", "focal"])
    assert list(table.index) == [CRT, IB, FOCAL]  # absent methods left out
    assert list(table.columns) == ["head F1", "tail F1", "Δ head", "Δ tail"]
    assert table.loc[FOCAL].tolist() == [86.0, 21.0, -5.0, 10.0]
    assert lt.head_tail_caption(order) == "head classes ['a', 'b', 'c'], tail classes ['e', 'f', 'g']"


def test_stain_demo_names_the_reference_and_one_test_image_per_class(monkeypatch, tmp_path):
    table = pd.DataFrame(dict(path=[f"p{i}" for i in range(10)], split=["cv"] * 2 + ["test"] * 8,
                              label=["X", "Y", "Y", "Y", "Z", "X", "W", "V", "U", "T"]))
    assert lt.stain_example_paths(table) == ["p2", "p4", "p5", "p6", "p7", "p8"]  # first per class, at most 6
    calls = []
    monkeypatch.setattr(lt, "stain_reference", lambda t, root, record: calls.append(record) or "p1")
    demo = lt.stain_demo(table, tmp_path, tmp_path / "results")
    assert calls == [tmp_path / "results" / "pbc_lt" / "stain_reference.json"]
    assert demo.reference == "p1" and demo.note == "reference image: p1 (class Y)"
    assert demo.examples == ["p2", "p4", "p5", "p6", "p7", "p8"]


def test_variant_deltas_pair_each_variant_with_the_plain_run():
    deltas = lt.variant_deltas(heads_frame(), [L0, L0])
    assert sorted(deltas.variant.unique()) == ["macenko", "macenko + TTA", "none + TTA"]
    assert len(deltas) == 3 * 2 * 2 * 2  # variants x rhos x folds x recipes, degraded test only
    d = deltas.set_index(["variant", "rho", "fold", "recipe"]).delta
    assert d[("none + TTA", 10, 0, "ib")] == pytest.approx(0.01)
    assert d[("macenko", 100, 1, "crt")] == pytest.approx(0.04)
    assert d[("macenko + TTA", 100, 1, "crt")] == pytest.approx(0.05)
    assert set(deltas.method) == {IB, CRT}
    assert len(lt.variant_deltas(heads_frame(), [L1])) == 0  # Lite1 has no variant
    assert lt.variant_caption(heads_frame(), [L1, L0]) == "**Δ macro-F1 vs plain** (points, Lite0, Lite1, degraded test)"


def test_variant_delta_table_is_mean_std_points():
    table = lt.variant_delta_table(lt.variant_deltas(heads_frame(), [L0]), ["crt", "lws", "ib"])
    assert list(table.index) == [CRT, IB]
    assert table.loc[IB, (100, "macenko")] == "+3.5 ± 0.7"  # 0.03, 0.04 over folds
    assert table.loc[CRT, (10, "none + TTA")] == "+1.0 ± 0.0"


def test_representation_differences_pass_both_representations_of_one_backbone(monkeypatch):
    seen = {}
    monkeypatch.setattr(lt, "recipe_differences", lambda frame, **kw: seen.update(frame=frame, **kw) or "diffs")
    tuned = heads_frame().assign(representation="finetuned")
    tuned = tuned[(tuned.stain == "none") & ~tuned.tta]
    assert lt.representation_differences(heads_frame(), tuned, L0, [0], n_boot=7, seed=3) == "diffs"
    frame = seen["frame"]
    assert seen["folds"] == [0] and seen["n_boot"] == 7 and seen["seed"] == 3
    imagenet = frame[frame.representation == "imagenet"]
    assert set(imagenet.eval_set) == {"test", "test_degraded"} and set(imagenet.stain) == {"none"}
    assert set(frame.backbone) == {L0} and len(frame[frame.representation == "finetuned"]) == 2 * 2 * 2 * 3


def test_methods_reading_names_the_best_recipe_and_the_variant_verdicts():
    heads = heads_frame(("ib", "crt", "focal"))
    per_class, order = per_class_frame()
    groups = lt.head_tail_f1(per_class, order)
    deltas = lt.variant_deltas(heads, [L0])
    text = lt.methods_reading(heads, groups, deltas, L0, ["ib", "focal", "crt"], 100)
    lines = text.split("\n")
    assert lines[0] == ("* At rho = 100 on the degraded test the best recipe for Lite0 is **cRT (CB sampling + hybrid)** "
                        "(macro-F1 51.0 % against 41.0 % for instance-balanced ERM; balanced accuracy 61.0 % vs 51.0 %).")
    assert lines[1] == "* Macro-F1 above ERM by more than half a point: cRT (CB sampling + hybrid); below it: focal."
    assert lines[2].startswith(f"* The largest tail gain is **{CRT}**: +30.0 points of F1 on the three rarest classes, "
                               "for -10.0 on the three most frequent.")
    assert lines[2].endswith("correlate at r = -1.00.")
    assert "* **macenko** helps on average over recipes, folds and rhos: +3.5 ± 0.5 points" in text
    assert "* **none + TTA** helps on average" in text  # +1.0 ± 0.0
    assert lines[-1].startswith("* All images here come from one lab (pbc)")
    no_variants = lt.methods_reading(heads, groups, deltas.iloc[:0], L0, ["ib", "focal", "crt"], 100)
    assert "helps" not in no_variants and len(no_variants.split("\n")) == 4


# --------------------------------------------------------------------------
# Chapter 06
# --------------------------------------------------------------------------

def table1_rows_frame():
    rows = []
    for row, values in (("Supervised (Lite0)", (0.40, 0.44)), ("Decoupled (Lite0)", (0.50, 0.52)),
                        ("Ens. (all)", (0.60,))):
        for fold, v in enumerate(values):
            rows.append(dict(row=row, fold=fold, macro_f1=v, balanced_accuracy=v + 0.1, macro_precision=v - 0.1,
                             macro_specificity=0.9, run_dir=f"/runs/{row}/{fold}"))
    return pd.DataFrame(rows)


def test_table1_profile_line():
    assert lt.table1_profile_line(cfg(), 100, "test_degraded") == (
        "profile smoke: rho 100, test_degraded; frozen backbones ['Lite0', 'Lite1'] (folds [0, 1]); "
        "fine-tuned ['Lite0'] (folds [0])")


def test_table1_summary_keeps_row_order_and_formats_with_folds():
    summary = lt.table1_summary(table1_rows_frame())
    assert list(summary.index) == ["Supervised (Lite0)", "Decoupled (Lite0)", "Ens. (all)"]
    assert summary.loc["Supervised (Lite0)", "macro_f1_mean"] == pytest.approx(0.42)
    shown = lt.formatted_table1(summary)
    assert list(shown.columns) == ["macro_f1", "balanced_accuracy", "macro_precision", "macro_specificity", "folds"]
    assert shown.loc["Supervised (Lite0)", "macro_f1"] == "42.0 ± 2.8"
    assert shown.loc["Ens. (all)", "balanced_accuracy"] == "70.0 ± 0.0" and shown.folds.tolist() == [2, 2, 1]


def test_frozen_table1_summary_appends_the_tta_rows():
    heads = heads_frame()
    rows = table1_rows_frame()
    tta = lt.decoupled_tta_rows(heads, 100)
    assert set(tta.row) == {"Decoupled (Lite0) + TTA"} and set(tta.recipe) == {"crt"} and set(tta.stain) == {"none"}
    summary = lt.frozen_table1_summary(rows, heads, 100)
    assert list(summary.index) == list(dict.fromkeys(rows.row)) + ["Decoupled (Lite0) + TTA"]
    assert summary.loc["Decoupled (Lite0) + TTA", "macro_f1_mean"] == pytest.approx(0.52)  # 0.51, 0.53
    # the same numbers as summarising the TTA rows on their own and appending them
    apart = pd.concat([lt.table1_summary(rows), lt.table1_summary(tta)])
    pd.testing.assert_frame_equal(summary, apart)
    no_tta = heads[~heads.tta]
    assert len(lt.decoupled_tta_rows(no_tta, 100)) == 0
    pd.testing.assert_frame_equal(lt.frozen_table1_summary(rows, no_tta, 100), lt.table1_summary(rows))


def claims_summary():
    summary = lt.table1_summary(table1_rows_frame())
    tta = pd.DataFrame(dict(macro_f1_mean=[0.9], balanced_accuracy_mean=[0.9]), index=["Decoupled (Lite0) + TTA"])
    return pd.concat([summary, tta])


def test_table1_claims_and_best_row_leave_tta_out():
    assert lt.best_table1_row(claims_summary()) == "Ens. (all)"
    text = lt.table1_claims(claims_summary(), [L0, L1])
    assert text.split("\n") == [
        "* Lite0: cRT changes balanced accuracy by +9.0 points and macro-F1 by +9.0 points "
        "(higher balanced accuracy).",
        "* The full ensemble gives the best macro-F1 (60.0 %; best row: Ens. (all), 60.0 %).",
        "* Paper: cRT adds +8.8 (R50), +4.8 (R152) and +11.9 (Swin) points of balanced accuracy; "
        "the three-backbone ensemble has the best macro-F1 (74.2 %)."]
    worse = claims_summary().drop(index="Ens. (all)")
    worse.loc["Decoupled (Lite0)", "balanced_accuracy_mean"] = 0.3
    lines = lt.table1_claims(worse, [L0]).split("\n")
    assert lines[0].endswith("by -22.0 points and macro-F1 by +9.0 points (not higher balanced accuracy).")
    assert lines[1] == "* Best macro-F1: Decoupled (Lite0) (51.0 %)."


def test_row_confusion_sums_the_rows_folds(tmp_path):
    classes = list(B.PBC_LT_CLASSES)
    rows = table1_rows_frame()
    rows["run_dir"] = [str(tmp_path / f"r{i}") for i in range(len(rows))]
    for d in rows.run_dir:
        write_predictions(tmp_path / d, "test_degraded", [classes[0], classes[1]], [classes[0], classes[0]])
    cm = lt.row_confusion(rows, "Decoupled (Lite0)")
    assert cm.shape == (len(classes), len(classes)) and cm[0, 0] == 2 and cm[1, 0] == 2 and cm.sum() == 4


def test_fold_ensemble_table_and_single_fold_note():
    assert lt.fold_ensemble_table(pd.DataFrame(dict(kind=["backbones"], eval_set=["test"]))) is None
    ens = pd.DataFrame(dict(kind=["folds"] * 3 + ["backbones"], ensemble=["Lite0"] * 3 + ["all"],
                            eval_set=["test", "test_degraded", "test_stress", "test"],
                            macro_f1=[0.51234, 0.4, 0.1, 0.9], balanced_accuracy=[0.6, 0.55, 0.1, 0.9]))
    table = lt.fold_ensemble_table(ens)
    assert list(table.index) == ["Lite0"]
    assert table.loc["Lite0", ("macro_f1", "test")] == 51.2 and table.loc["Lite0", ("balanced_accuracy", "test_degraded")] == 55.0
    assert "test_stress" not in table.columns.get_level_values(1)
    assert lt.single_fold_note(table1_rows_frame()) == (
        "mean single-fold macro-F1 of the decoupled rows (degraded test): {'Decoupled (Lite0)': 51.0}")


def test_ensemble_backbones_prefer_the_papers():
    assert lt.ensemble_backbones(["resnet50", "swin_t", L0]) == ["resnet50", "swin_t"]
    assert lt.ensemble_backbones(["resnet50", L0]) == ["resnet50", L0]
    assert lt.ensemble_backbones([L0]) == [L0]


def test_finetuned_ensembles_need_two_backbones(monkeypatch):
    calls = []
    monkeypatch.setattr(lt, "pbc_lt_ensembles", lambda *a, **kw: calls.append(kw) or pd.DataFrame(dict(x=[1])))
    assert lt.finetuned_ensembles(cfg(), "results", pd.DataFrame(), 100).empty and not calls
    out = lt.finetuned_ensembles(cfg(decoupled_backbones=["resnet50", "resnet152", L0], decoupled_stain="macenko"),
                                 "results", "tuned", 100)
    assert len(out) == 1
    assert calls == [dict(source="decoupled", variant="macenko", recipe="crt", backbones=["resnet50", "resnet152"],
                          rho=100, members="tuned")]


def test_paper_rows_for_keep_the_summarys_order():
    summary = pd.DataFrame(index=["Ens. (all)", "Supervised (Lite0)", "Supervised (R50)"])
    rows = lt.paper_rows_for(summary)
    assert list(rows.index) == ["Ens. (all)", "Supervised (R50)"]
    assert rows.loc["Supervised (R50)", "macro_f1"] == "65.8 ± 0.6"
    assert len(lt.paper_rows_for(pd.DataFrame(index=["Supervised (Lite0)"]))) == 0


def test_stage2_recipe_table_names_tta_rows():
    tuned = heads_frame()
    tuned = tuned[tuned.stain == "none"]
    table = lt.stage2_recipe_table(tuned, 100)
    assert list(table.columns) == ["macro_f1", "balanced_accuracy"]
    assert table.loc[("Lite0", f"{CRT} + TTA"), "macro_f1"] == "52.0 ± 1.4"
    assert table.loc[("Lite1", IB), "balanced_accuracy"] == "58.0 ± 1.4"
    assert len(table) == 2 * 2 + 2  # Lite0 plain and TTA, Lite1 plain; two recipes each
    assert np.isin(["Lite0", "Lite1"], table.index.get_level_values(0)).all()
