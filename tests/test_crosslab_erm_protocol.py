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


def finetune_frame():
    """The pbc→others fine-tuned rows of two augmentations: 0.9 with stain jitter, 0.5 without."""
    rows = results_frame()[lambda r: r.setting == "pbc→others"]
    return pd.concat([rows.assign(augmentation="dihedral_jitter", macro_f1=0.5),
                      rows.assign(augmentation="dihedral_colour_stain", macro_f1=0.9)], ignore_index=True)


def test_finetune_table_averages_seeds_per_regime_and_target():
    table = erm.finetune_table(finetune_frame())
    assert list(table.index) == [("pbc→others", r, lab) for r in ("fine-tuned", "fine-tuned + colour/stain jitter")
                                 for lab in ("bccd", "zheng1")]
    assert table.loc[("pbc→others", "fine-tuned + colour/stain jitter", "zheng1"), "macro_f1"] == 0.9
    assert table.loc[("pbc→others", "fine-tuned", "bccd"), "micro_f1"] == 0.505  # (0.3 + 0.31) / 2 + 0.2


def test_regime_bars_stack_probe_and_each_finetuned_regime_for_one_setting():
    bars = erm.regime_bars(results_frame(), finetune_frame())
    assert sorted(map(tuple, bars[["regime", "eval_set"]].to_numpy())) == [
        ("fine-tuned", "bccd"), ("fine-tuned", "zheng1"), ("fine-tuned + colour/stain jitter", "bccd"),
        ("fine-tuned + colour/stain jitter", "zheng1"), ("linear probe", "bccd"), ("linear probe", "zheng1")]
    by = bars.set_index(["regime", "eval_set"])["macro_f1"]
    assert by[("linear probe", "zheng1")] == pytest.approx(0.205)
    assert by[("fine-tuned", "bccd")] == 0.5 and by[("fine-tuned + colour/stain jitter", "bccd")] == 0.9


def write_predictions(folder, lab, labels, preds, first=0):
    folder.mkdir(exist_ok=True)
    pd.DataFrame(dict(path=[f"{lab}/{first + i}.png" for i in range(len(labels))], label=labels, pred=preds)
                 ).to_csv(folder / f"predictions_{lab}.csv", index=False)


def test_augmentation_gain_is_paired_over_the_same_images_and_seeds(tmp_path):
    classes = list(B.CROSSLAB_CLASSES)
    labels = [c for c in classes for _ in range(5)]  # 20 images, 5 per class
    rows = []
    for aug, correct in (("dihedral_jitter", 10), (erm.STRONG, 20)):
        for seed in (0, 1):
            run = tmp_path / f"{aug}-{seed}"
            # the first `correct` images right, the rest called the next class
            preds = [c if i < correct else classes[(classes.index(c) + 1) % 4] for i, c in enumerate(labels)]
            write_predictions(run, "zheng1", labels, preds)
            rows.append(dict(setting="pbc→others", augmentation=aug, seed=seed, eval_set="zheng1", run_dir=str(run)))
    gain = erm.augmentation_gain(pd.DataFrame(rows), labs=["zheng1"], n_boot=200)
    assert gain.loc["zheng1", "seeds"] == 2
    assert gain.loc["zheng1", "balanced_accuracy"] == 0.5  # 1.0 - 0.5
    assert 0 < gain.loc["zheng1", "macro_f1_low"] <= gain.loc["zheng1", "macro_f1"] <= gain.loc["zheng1", "macro_f1_high"]
    assert gain.loc["zheng1", "macro_f1_p_not_better"] == 0


def test_augmentation_gain_refuses_unmatched_runs(tmp_path):
    classes = list(B.CROSSLAB_CLASSES)
    write_predictions(tmp_path / "a", "zheng1", classes, classes)
    write_predictions(tmp_path / "b", "zheng1", classes, classes, first=1)
    runs = pd.DataFrame([dict(setting="pbc→others", augmentation=a, seed=0, eval_set="zheng1", run_dir=str(tmp_path / d))
                         for a, d in (("dihedral_jitter", "a"), (erm.STRONG, "a"))])
    assert erm.augmentation_gain(runs, labs=["zheng1"], n_boot=10).loc["zheng1", "macro_f1"] == 0
    with pytest.raises(ValueError, match="1 runs with 'dihedral_colour_stain_blur' and 0 with 'dihedral_jitter'"):
        erm.augmentation_gain(runs[runs.augmentation == erm.STRONG], labs=["zheng1"], n_boot=10)
    mixed = runs.assign(run_dir=[str(tmp_path / "a"), str(tmp_path / "b")])
    with pytest.raises(ValueError, match="different images"):
        erm.augmentation_gain(mixed, labs=["zheng1"], n_boot=10)


def test_confusions_read_each_target_labs_predictions(tmp_path):
    classes = list(B.CROSSLAB_CLASSES)
    run = tmp_path / "run"
    run.mkdir()
    pd.DataFrame(dict(label=[classes[0], classes[0], classes[1]], pred=[classes[0], classes[1], classes[1]])
                 ).to_csv(run / "predictions_zheng1.csv", index=False)
    pd.DataFrame(dict(label=[classes[2]], pred=[classes[3]])).to_csv(run / "predictions_bccd.csv", index=False)
    finetune = pd.DataFrame(dict(setting=["pbc→others"] * 3, seed=[1, 0, 0], run_dir=["elsewhere", "plain", str(run)],
                                 augmentation=[erm.STRONG, "dihedral_jitter", erm.STRONG]))
    cms = erm.confusions(finetune, seed=0)
    with pytest.raises(ValueError, match="no pbc→others run with seed 0 and augmentation 'x'"):
        erm.confusions(finetune, seed=0, augmentation="x")
    assert list(cms) == ["zheng1", "bccd"]
    assert cms["zheng1"][0, 0] == 1 and cms["zheng1"][0, 1] == 1 and cms["zheng1"][1, 1] == 1
    assert cms["zheng1"].sum() == 3 and cms["bccd"][2, 3] == 1 and cms["bccd"].shape == (len(classes),) * 2


def test_lolo_row_is_percent_per_held_out_lab_with_average():
    row = erm.lolo_row(results_frame())
    assert list(row.index) == ["micro_f1", "macro_f1"]
    assert list(row.columns) == ["bccd", "zheng1", "average"]
    assert row.loc["macro_f1", "zheng1"] == 20.5 and row.loc["micro_f1", "average"] == 40.5
