"""Chapter 10's tables in :mod:`wbclib.protocols.rescue`, on tiny synthetic run tables and run folders."""
import json
from types import SimpleNamespace

import pandas as pd
import pytest

from wbclib import profiles, verdicts
from wbclib.protocols import rescue as protocol
from wbclib.rescue import PAPER_TABLE2

CLASSES = ["A", "B", "C"]
PHASE_ROWS = list(protocol.PHASE_NAMES.values())


def test_settings_note_names_the_profile_settings():
    cfg = SimpleNamespace(name="smoke", backbone="tiny", image_size=32, rescue_rare=2, finetune_folds=[0],
                          rescue_probe_folds=[0, 1], rescue_strengths=[0.0, 1.0])
    assert protocol.settings_note(cfg) == (
        "profile smoke: tiny at 32 px; rescuing the 2 rarest classes; fine-tuned ERM folds [0], "
        "probe folds [0, 1]; boost strengths [0.0, 1.0]")


def test_base_runs_reads_the_probe_then_erm_at_rho(monkeypatch):
    calls = []
    monkeypatch.setattr(protocol, "pbc_lt_probe", lambda cfg, *a, seed: calls.append(("probe", seed)) or "P")

    def finetune(cfg, root, splits, results, method, seed):
        calls.append(("finetune", list(cfg.finetune_rhos), method, seed))
        return "E"

    monkeypatch.setattr(protocol, "pbc_lt_finetune", finetune)
    cfg = profiles.get("smoke")
    assert protocol.base_runs(cfg, "root", "splits", "cache", "results", rho=50, seed=3) == ("P", "E")
    assert calls == [("probe", 3), ("finetune", [50], "erm", 3)]


def test_fold_training_counts_counts_train_rows_head_to_tail(monkeypatch):
    split = pd.DataFrame(dict(label=["LY", "LY", "EO", "BA", "LY"], split=["train", "train", "train", "val", "val"]))
    seen = []
    monkeypatch.setattr(protocol, "pbc_lt_sets", lambda cfg, table, d, rho, fold: seen.append((rho, fold)) or (split, {}))
    definition = SimpleNamespace(head_order=["LY", "EO", "BA"])
    assert protocol.fold_training_counts(None, None, definition, 100, 2) == {"LY": 2, "EO": 1, "BA": 0}
    assert seen == [(100, 2)]


def test_boost_table_gives_factors_at_each_strength_and_marks_the_rarest():
    table = protocol.boost_table({"A": 100, "B": 10, "C": 2}, n_rare=1)
    assert list(table.columns) == ["training images", "B_c at s=1", "B_c at s=2", "rare"]
    # w = 1 / log(1 + n) scaled to sum 3: 0.421, 0.810, 1.769; squared 0.177, 0.657, 3.128
    assert table["B_c at s=1"].tolist() == [0.42, 0.81, 1.77]
    assert table["B_c at s=2"].tolist() == [0.18, 0.66, 3.13]
    assert table["rare"].tolist() == [False, False, True] and table["training images"].tolist() == [100, 10, 2]


def test_rescue_per_model_runs_both_models_and_names_phases(monkeypatch):
    calls = []

    def rescue(cfg, root, splits, cache, results, base, regime, folds, rho, seed):
        calls.append((base, regime, folds, rho, seed))
        return pd.DataFrame(dict(regime=regime, fold=folds[0], phase=["base", "boost", "semantic", "morphology"]))

    monkeypatch.setattr(protocol, "pbc_lt_rescue", rescue)
    cfg = SimpleNamespace(finetune_folds=[0], rescue_probe_folds=[1, 2])
    rescues = protocol.rescue_per_model(cfg, "r", "s", "c", "o", "ERM", "PROBE", rho=100, seed=0)
    assert calls == [("ERM", "erm", [0], 100, 0), ("PROBE", "probe", [1, 2], 100, 0)]
    assert rescues["model"].tolist() == ["fine-tuned ERM"] * 4 + ["linear probe"] * 4
    assert rescues["row"].tolist() == PHASE_ROWS * 2 and rescues.index.tolist() == list(range(8))


def test_rare_classes_per_run_one_entry_per_model_and_fold():
    rescues = pd.DataFrame(dict(model=["m", "m", "m", "p"], fold=[0, 0, 1, 0], rare=[["A"], ["A"], ["B"], ["C"]]))
    assert protocol.rare_classes_per_run(rescues) == {"m fold 0": ["A"], "m fold 1": ["B"], "p fold 0": ["C"]}


def test_ablation_table_mean_std_per_model_in_phase_order():
    rows = []
    for model in ("fine-tuned ERM", "linear probe"):
        for fold, f1 in ((0, 0.50), (1, 0.60)):
            for k, row in enumerate(PHASE_ROWS):
                rows.append(dict(model=model, fold=fold, row=row, macro_f1=f1 + 0.01 * k, val_macro_f1=0.7,
                                 changed=fold + k))
    table = protocol.ablation_table(pd.DataFrame(rows).iloc[::-1])  # order comes from PHASE_NAMES, not the rows
    assert table.index.tolist() == PHASE_ROWS
    assert table.loc["base predictions", ("macro_f1", "fine-tuned ERM")] == "55.0 ± 7.1"  # std of 50, 60
    assert table.loc["+ boost only (phase 1)", ("macro_f1", "linear probe")] == "56.0 ± 7.1"
    assert table.loc["base predictions", ("val_macro_f1", "linear probe")] == "70.0 ± 0.0"
    assert table.loc["+ biological filtering (phase 3)", ("changed", "linear probe")] == 3.5  # (3 + 4) / 2
    assert [c[0] for c in table.columns] == ["macro_f1"] * 2 + ["val_macro_f1"] * 2 + ["changed"] * 2


def test_paper_table2_reads_the_file_or_falls_back(tmp_path):
    missing = tmp_path / "absent.md"
    assert protocol.paper_table2(missing) == (dict(PAPER_TABLE2), "wbclib.rescue.PAPER_TABLE2")
    paper = tmp_path / "paper.md"
    paper.write_text("text\n**Table 2.** caption\nMethod\tMacro-F1\nBase\t0.5\n<b>Ours</b>\t<b>0.6</b>\n\nafter\n")
    assert protocol.paper_table2(paper) == ({"Base": 0.5, "Ours": 0.6}, paper)


def test_paper_table2_frame_in_percent_two_digits():
    frame = protocol.paper_table2_frame({"x": 0.71528, "y": 0.5})
    assert list(frame.columns) == ["macro-F1 (LB)"] and frame["macro-F1 (LB)"].tolist() == [71.53, 50.0]


def test_first_folds_take_each_models_first_fold():
    cfg = SimpleNamespace(finetune_folds=[3, 4], rescue_probe_folds=[1])
    assert protocol.first_folds(cfg) == {"fine-tuned ERM": ("erm", 3), "linear probe": ("probe", 1)}


# -- tables read from run folders ------------------------------------------------------------

LABELS = ["A", "A", "B", "C"]
BASE = ["A", "B", "B", "A"]
#: ERM: boost and verification rescue the C row (right), the morphology phase also the B row (wrong).
ERM_PRED = {"boost": ["A", "B", "B", "C"], "semantic": ["A", "B", "B", "C"], "morphology": ["A", "B", "C", "C"]}


def write_run(folder, base_dir, preds, rescue, params):
    folder.mkdir(parents=True)
    pd.DataFrame(dict(path=list("wxyz"), label=LABELS, pred=BASE)).to_csv(base_dir / "predictions_test_degraded.csv",
                                                                         index=False)
    for phase, pred in preds.items():
        pd.DataFrame(dict(path=list("wxyz"), label=LABELS, pred=pred, base_pred=BASE, rescue=rescue)).to_csv(
            folder / f"predictions_test_degraded_{phase}.csv", index=False)
        (folder / f"params_{phase}.json").write_text(json.dumps(params[phase]))


def params(verify, tau, morphology, strength=1.0):
    return dict(rare_classes=["B", "C"], boosts={"B": 1.23456, "C": 2.0}, verify=verify, tau=tau,
                morphology=morphology, tau_s=0.5, tau_m={"B": 1.0, "C": 3.14159},
                info=dict(strength=strength, val_base_score=0.41234, val_score=0.5))


@pytest.fixture
def rescues(tmp_path):
    """Two models (ERM fold 0, probe fold 1) with saved base and rescued predictions and parameters."""
    base_erm, base_probe = tmp_path / "base_erm", tmp_path / "base_probe"
    base_erm.mkdir(), base_probe.mkdir()
    erm_params = {"boost": params(False, 0.9, "none"), "semantic": params(True, {"B": 0.25, "C": 0.75}, "none"),
                  "morphology": params(True, 0.3, {"B": "spikiness", "C": "none"})}
    write_run(tmp_path / "erm", base_erm, ERM_PRED, ["none", "none", "rescued", "rescued"], erm_params)
    write_run(tmp_path / "probe", base_probe, {p: BASE for p in ERM_PRED}, ["suppressed"] * 4,
              {p: params(False, 0.5, "none", strength=0.0) for p in ERM_PRED})
    rows = [dict(regime="erm", fold=0, run_dir=str(tmp_path / "erm"), base_run_dir=str(base_erm)),
            dict(regime="erm", fold=1, run_dir="elsewhere", base_run_dir="elsewhere"),
            dict(regime="probe", fold=1, run_dir=str(tmp_path / "probe"), base_run_dir=str(base_probe))]
    return pd.DataFrame(rows)


FIRST = {"fine-tuned ERM": ("erm", 0), "linear probe": ("probe", 1)}


def test_rescued_predictions_reads_base_or_phase(rescues):
    assert protocol.rescue_run(rescues, "probe", 1).base_run_dir.endswith("base_probe")
    assert protocol.rescued_predictions(rescues, "erm", 0, "base")["pred"].tolist() == BASE
    assert protocol.rescued_predictions(rescues, "erm", 0, "morphology")["pred"].tolist() == ERM_PRED["morphology"]


def test_per_class_scores_and_their_change_from_base(rescues):
    per_class = protocol.per_class_scores(rescues, FIRST, CLASSES)
    assert len(per_class) == 2 * 4 * 3 and {"model", "phase", "class", "f1"} <= set(per_class.columns)
    erm = protocol.model_rows(per_class, "fine-tuned ERM")
    assert erm["model"].unique().tolist() == ["fine-tuned ERM"] and len(erm) == 12
    table = protocol.per_class_change_table(per_class)
    assert list(table.columns) == PHASE_ROWS + [f"Δ {r}" for r in PHASE_ROWS[1:]]
    # base: A p=1/2 r=1/2, B p=1/2 r=1, C never predicted; boost: A 2/3, B 2/3, C 1; morphology: B 0, C 2/3
    assert table.loc[("fine-tuned ERM", "A")].tolist() == [50.0, 66.7, 66.7, 66.7, 16.7, 16.7, 16.7]
    assert table.loc[("fine-tuned ERM", "B")].tolist() == [66.7, 66.7, 66.7, 0.0, 0.0, 0.0, -66.7]
    assert table.loc[("fine-tuned ERM", "C")].tolist() == [0.0, 100.0, 100.0, 66.7, 100.0, 100.0, 66.7]
    assert table.loc[("linear probe", "C"), "Δ + biological filtering (phase 3)"] == 0.0


def test_rescue_outcomes_count_right_and_wrong_changes(rescues):
    outcomes = protocol.rescue_outcomes(rescues, FIRST)
    assert outcomes.index.tolist() == ["fine-tuned ERM", "linear probe"]
    erm, probe = outcomes.loc["fine-tuned ERM"], outcomes.loc["linear probe"]
    assert (erm["none"], erm["rescued"], erm["suppressed"]) == (2, 2, 0)  # 0: filled where it never happened
    assert (probe["none"], probe["suppressed"]) == (0, 4)
    assert (erm["rescued_right"], erm["rescued_wrong"], erm["rescued_classes"]) == (1, 1, "C")
    assert (probe["rescued_right"], probe["rescued_wrong"], probe["rescued_classes"]) == (0, 0, "none")


def test_chosen_parameters_one_row_per_phase_and_rare_class(rescues):
    chosen = protocol.chosen_parameters(rescues, FIRST)
    assert len(chosen) == 2 * 3 * 2
    assert list(chosen.columns) == ["model", "phase", "rare_class", "strength", "boost", "verify", "tau", "rule",
                                    "tau_s", "tau_m", "val_base", "val_after"]
    erm = chosen[chosen.model == "fine-tuned ERM"].set_index(["phase", "rare_class"])
    assert pd.isna(erm.loc[("boost", "B"), "tau"])  # no verification: no tau
    assert erm.loc[("semantic", "C"), "tau"] == 0.75 and erm.loc[("morphology", "B"), "tau"] == 0.3
    assert erm.loc[("morphology", "B"), "rule"] == "spikiness" and erm.loc[("morphology", "C"), "rule"] == "none"
    assert erm.loc[("boost", "B"), "boost"] == 1.235 and erm.loc[("boost", "C"), "tau_m"] == 3.142
    assert erm.loc[("boost", "B"), "tau_s"] == 0.5 and erm.loc[("boost", "B"), "val_base"] == 0.412
    assert chosen[chosen.model == "linear probe"]["strength"].tolist() == [0.0] * 6


def test_paper_gains_are_consecutive_rows_in_points():
    gains = protocol.paper_gains(PAPER_TABLE2)
    assert gains["semantic"] == pytest.approx(4.943) and gains["morphology"] == pytest.approx(5.611)


def test_gain_verdicts_measure_each_step_against_the_paper(rescues):
    judged = protocol.gain_verdicts(rescues, FIRST, CLASSES, PAPER_TABLE2, n_boot=50, seed=0)
    assert list(judged.columns) == ["model", "phase", "gain", "low", "high", "paper_gain", "verdict"]
    assert judged["phase"].tolist() == ["+ semantic verification (phase 2)", "+ biological filtering (phase 3)"] * 2
    # ERM macro-F1: base (1/2 + 2/3 + 0) / 3, semantic (2/3 + 2/3 + 1) / 3, morphology (2/3 + 0 + 2/3) / 3
    assert judged["gain"].tolist() == pytest.approx([100 * 7 / 18, -100 / 3, 0.0, 0.0])
    assert judged["paper_gain"].tolist() == pytest.approx([4.943, 5.611, 4.943, 5.611])
    assert judged["verdict"].tolist()[1:] == ["not reproduced"] * 3
    first = judged.iloc[0]
    assert first["verdict"] == verdicts.reproduction(first["gain"], first["low"], first["paper_gain"])
    assert first["low"] <= first["gain"] <= first["high"]


def test_gain_summary_one_bullet_per_row():
    judged = pd.DataFrame(dict(model=["m"], phase=["+ x"], gain=[1.234], low=[-0.5], high=[3.0], paper_gain=[4.9],
                               verdict=["same direction, smaller or not significant"]))
    assert protocol.gain_summary(judged) == (
        "* **m, + x**: +1.23 points (95 % CI -0.50 to +3.00) against the paper's +4.90: "
        "same direction, smaller or not significant.")
