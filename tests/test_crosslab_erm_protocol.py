"""Chapter 04's tables in :mod:`wbclib.protocols.crosslab_erm`, on tiny synthetic result frames."""
import pandas as pd
import pytest

from wbclib import benchmarks as B
from wbclib.protocols import crosslab_erm as erm


def results_frame():
    """Two settings, two seeds, a val row and target rows, as the protocol returns them (``accuracy``)."""
    rows = []
    for setting, targets in (("pbc→others", ["zheng1", "bccd"]), ("LOLO:zheng1", ["zheng1"]), ("LOLO:bccd", ["bccd"])):
        for seed in (0, 1):
            for k, eval_set in enumerate(["val"] + targets):
                f1 = 0.1 * (k + 1) + 0.01 * seed
                rows.append(dict(setting=setting, seed=seed, eval_set=eval_set, macro_f1=f1, macro_f1_low=f1 - 0.05,
                                 macro_f1_high=f1 + 0.05, accuracy=f1 + 0.2, run_dir=f"/runs/{setting}/{seed}"))
    return pd.DataFrame(rows)


def test_images_per_lab_counts_class_by_lab(monkeypatch):
    table = pd.DataFrame(dict(path=list("abcde"), label=["LY", "LY", "MO", "LY", "MO"],
                              lab=["pbc", "pbc", "pbc", "bccd", "zheng1"]))
    monkeypatch.setattr(erm.B, "read_crosslab", lambda splits_dir, seed: table)
    counts = erm.images_per_lab("unused", 0)
    assert counts.loc["LY", "pbc"] == 2 and counts.loc["MO", "bccd"] == 0 and counts.loc["MO", "zheng1"] == 1


def test_target_means_average_seeds_without_val():
    means = erm.target_means(results_frame())
    assert "val" not in means.index.get_level_values("eval_set")
    assert list(means.columns) == ["macro_f1", "macro_f1_low", "macro_f1_high", "micro_f1"]
    assert means.loc[("pbc→others", "bccd"), "macro_f1"] == 0.305  # (0.3 + 0.31) / 2
    assert means.loc[("LOLO:zheng1", "zheng1"), "micro_f1"] == 0.405


def test_validation_note_lists_each_setting():
    assert erm.validation_note(results_frame()) == (
        "in-domain validation macro-F1: {'LOLO:bccd': 0.105, 'LOLO:zheng1': 0.105, 'pbc→others': 0.105}")


def test_score_table_keeps_the_shown_columns():
    table = erm.score_table(results_frame())
    assert list(table.columns) == ["setting", "eval_set", "macro_f1", "macro_f1_low", "macro_f1_high", "micro_f1"]
    assert len(table) == len(results_frame()) and table["micro_f1"].iloc[0] == 0.3


def test_regime_bars_stack_probe_and_finetune_for_one_setting():
    probe = results_frame()
    finetune = results_frame()[lambda r: r.setting == "pbc→others"].assign(macro_f1=0.9)
    bars = erm.regime_bars(probe, finetune)
    assert sorted(map(tuple, bars[["regime", "eval_set"]].to_numpy())) == [
        ("fine-tuned", "bccd"), ("fine-tuned", "zheng1"), ("linear probe", "bccd"), ("linear probe", "zheng1")]
    assert bars.set_index(["regime", "eval_set"]).loc[("linear probe", "zheng1"), "macro_f1"] == pytest.approx(0.205)
    assert (bars[bars.regime == "fine-tuned"].macro_f1 == 0.9).all()


def test_confusions_read_each_target_labs_predictions(tmp_path):
    classes = list(B.CROSSLAB_CLASSES)
    run = tmp_path / "run"
    run.mkdir()
    pd.DataFrame(dict(label=[classes[0], classes[0], classes[1]], pred=[classes[0], classes[1], classes[1]])
                 ).to_csv(run / "predictions_zheng1.csv", index=False)
    pd.DataFrame(dict(label=[classes[2]], pred=[classes[3]])).to_csv(run / "predictions_bccd.csv", index=False)
    finetune = pd.DataFrame(dict(setting=["pbc→others", "pbc→others"], seed=[1, 0], run_dir=["elsewhere", str(run)]))
    cms = erm.confusions(finetune, seed=0)
    assert list(cms) == ["zheng1", "bccd"]
    assert cms["zheng1"][0, 0] == 1 and cms["zheng1"][0, 1] == 1 and cms["zheng1"][1, 1] == 1
    assert cms["zheng1"].sum() == 3 and cms["bccd"][2, 3] == 1 and cms["bccd"].shape == (len(classes),) * 2


def test_lolo_row_is_percent_per_held_out_lab_with_average():
    row = erm.lolo_row(results_frame())
    assert list(row.index) == ["micro_f1", "macro_f1"]
    assert list(row.columns) == ["bccd", "zheng1", "average"]
    assert row.loc["macro_f1", "zheng1"] == 20.5 and row.loc["micro_f1", "average"] == 40.5
