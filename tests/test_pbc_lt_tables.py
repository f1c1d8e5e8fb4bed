"""Chapter 03's tables in :mod:`wbclib.protocols.pbc_lt`, on tiny synthetic result frames."""
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from wbclib import benchmarks as B
from wbclib.metrics import METRICS
from wbclib.protocols import pbc_lt

#: macro-F1 offset of each evaluation set from the rho's base score.
OFFSETS = {"val": 0.1, "val_degraded": 0.05, "test": 0.0, "test_degraded": -0.1, "test_stress": -0.2}
BASE = {1: 0.8, 100: 0.5}
#: The severity grid: eval set -> macro-F1 offset (fold 0 only, as the probe scores it).
GRID = {"pristine": 0.0, "blur_1": -0.1, "blur_2": -0.3, "noise_1": -0.2}


def row(rho, fold, eval_set, f1):
    return dict(rho=rho, fold=fold, eval_set=eval_set, macro_f1=f1, macro_f1_low=f1 - 0.04321,
                macro_f1_high=f1 + 0.04321, balanced_accuracy=f1 + 0.01, macro_precision=f1, macro_specificity=0.99,
                run_dir=f"/runs/{rho}/{fold}")


def results_frame(grid: bool = True):
    """Two rhos, two folds, the five evaluation sets (fold 1 scores 0.02 above
    fold 0) and, with ``grid``, fold 0's severity grid, as the probe returns them."""
    rows = []
    for rho in BASE:
        for fold in (0, 1):
            rows += [row(rho, fold, s, BASE[rho] + off + 0.02 * fold) for s, off in OFFSETS.items()]
            if grid and fold == 0:
                rows += [row(rho, fold, s, BASE[rho] + off) for s, off in GRID.items()]
    return pd.DataFrame(rows)


def test_main_set_rows_keep_only_the_three_test_sets():
    rows = pbc_lt.main_set_rows(results_frame())
    assert len(rows) == 12  # 2 rhos x 2 folds x 3 sets; no val, no grid
    assert set(rows.eval_set) == {"test", "test_degraded", "test_stress"}


def test_mean_std_table_is_percent_mean_and_std_over_folds():
    table = pbc_lt.mean_std_table(results_frame())
    assert list(table.columns) == list(METRICS)
    assert list(table.index.names) == ["rho", "eval_set"] and len(table) == 6
    assert table.loc[(1, "test"), "macro_f1"] == "81.0 ± 1.4"  # mean(0.80, 0.82), std 0.0141
    assert table.loc[(100, "test_degraded"), "balanced_accuracy"] == "42.0 ± 1.4"  # mean(0.41, 0.43)
    assert table.loc[(100, "test_stress"), "macro_specificity"] == "99.0 ± 0.0"


def test_main_set_summary_counts_folds():
    summary = pbc_lt.main_set_summary(results_frame())
    assert (summary["n"] == 2).all()
    assert summary.loc[(100, "test_stress"), "macro_f1_mean"] == pytest.approx(0.31)


def test_fold_intervals_are_one_folds_main_sets_rounded():
    table = pbc_lt.fold_intervals(results_frame(), fold=1)
    assert list(table.columns) == ["rho", "eval_set", "macro_f1", "macro_f1_low", "macro_f1_high"]
    assert len(table) == 6
    first = table.iloc[0]
    assert (first.rho, first.eval_set) == (1, "test")
    assert first.macro_f1 == 0.82 and first.macro_f1_low == 0.777 and first.macro_f1_high == 0.863  # 0.82 -+ 0.04321


def test_fold_interval_bars_keep_every_column_with_rho_as_text():
    bars = pbc_lt.fold_interval_bars(results_frame(), fold=0)
    assert list(bars.rho) == ["1"] * 3 + ["100"] * 3
    assert list(bars.columns) == list(results_frame().columns)
    assert bars.macro_f1_low.iloc[0] == pytest.approx(0.8 - 0.04321)  # not rounded


def test_severity_curves_repeat_pristine_at_severity_zero_per_kind():
    probe = pd.concat([results_frame(), pd.DataFrame([row(1, 1, "blur_1", 0.0)])])  # another fold's grid row: left out
    curves = pbc_lt.severity_curves(probe, fold=0)
    assert len(curves) == 10  # per rho: 3 degraded + pristine once per kind (blur, noise)
    assert np.issubdtype(curves.severity.dtype, np.integer)
    one = curves[curves.rho == 1]
    assert list(zip(one.kind, one.severity)) == [("blur", 1), ("blur", 2), ("noise", 1), ("blur", 0), ("noise", 0)]
    assert list(one.macro_f1) == pytest.approx([0.7, 0.5, 0.6, 0.8, 0.8])
    assert (curves.fold == 0).all()


def test_fold_scores_list_every_fold_on_the_main_sets():
    table = pbc_lt.fold_scores(results_frame())
    assert list(table.columns) == ["rho", "fold", "eval_set", "macro_f1", "macro_f1_low", "macro_f1_high"]
    assert len(table) == 12
    assert table.set_index(["rho", "fold", "eval_set"]).loc[(100, 1, "test_stress"), "macro_f1_low"] == 0.277


def test_run_dir_of_picks_the_rho_and_fold():
    assert str(pbc_lt.run_dir_of(results_frame(), 100, 1)) == "/runs/100/1"


def write_predictions(run_dir, labels, preds):
    run_dir.mkdir(parents=True)
    pd.DataFrame(dict(label=labels, pred=preds)).to_csv(run_dir / "predictions_test_degraded.csv", index=False)


def test_head_to_tail_reads_both_regimes_predictions(tmp_path, monkeypatch):
    write_predictions(tmp_path / "probe", ["SNE", "SNE", "LY"], ["SNE", "LY", "LY"])
    write_predictions(tmp_path / "ft", ["SNE", "SNE", "LY"], ["SNE", "SNE", "LY"])
    order = list(reversed(B.PBC_LT_CLASSES))
    monkeypatch.setattr(pbc_lt.B, "read_pbc_lt", lambda splits_dir, seed: (None, SimpleNamespace(head_order=order)))
    probe = pd.DataFrame(dict(rho=[100, 1, 100], fold=[1, 0, 0], run_dir=["elsewhere", "elsewhere", str(tmp_path / "probe")]))
    finetune = pd.DataFrame(dict(rho=[100, 100], fold=[0, 0], run_dir=[str(tmp_path / "ft"), "elsewhere"]))
    tail = pbc_lt.head_to_tail(probe, finetune, "unused", rho=100, fold=0, seed=0)
    assert tail.rho == 100 and tail.head_order == order and tail.classes == list(B.PBC_LT_CLASSES)
    pc = tail.per_class
    assert list(pc.columns) == ["class", "precision", "recall", "f1", "specificity", "support", "regime"]
    assert list(pc.regime) == ["probe"] * 9 + ["fine-tuned"] * 9
    f1 = pc.set_index(["regime", "class"]).f1
    assert f1[("probe", "SNE")] == pytest.approx(2 / 3) and f1[("probe", "LY")] == pytest.approx(2 / 3)
    assert f1[("fine-tuned", "SNE")] == 1 and f1[("fine-tuned", "LY")] == 1
    ly = B.PBC_LT_CLASSES.index("LY")
    assert tail.confusion.shape == (9, 9) and tail.confusion.sum() == 3  # the fine-tuned model's
    assert tail.confusion[0, 0] == 2 and tail.confusion[ly, ly] == 1


def test_headline_table_is_percent_macro_f1_per_regime_and_rho():
    probe = results_frame()
    finetune = results_frame(grid=False).assign(macro_f1=lambda r: r.macro_f1 + 0.1234)
    table = pbc_lt.headline_table(probe, finetune)
    assert list(table.index) == [("fine-tuned", 1), ("fine-tuned", 100), ("linear probe", 1), ("linear probe", 100)]
    assert list(table.columns) == ["test", "test_degraded", "test_stress"]
    assert table.loc[("linear probe", 1), "test"] == 81.0
    assert table.loc[("fine-tuned", 1), "test"] == 93.3  # 0.81 + 0.1234
    assert table.loc[("linear probe", 100), "test_stress"] == 31.0
