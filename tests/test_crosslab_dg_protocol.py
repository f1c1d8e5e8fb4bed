"""Chapter 07's tables, reports and verdict lines in :mod:`wbclib.protocols.crosslab_dg`,
on tiny synthetic result frames (no training)."""
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from wbclib.protocols import crosslab_dg as dg

SETTINGS = {"pbc→others": ["zheng1", "bccd"], "LOLO:pbc": ["pbc"], "LOLO:zheng1": ["zheng1"], "LOLO:bccd": ["bccd"]}


def results_frame(methods=("ERM", "SADA", "BoDA"), seeds=(0, 1), run_root="/runs"):
    """One row per (method, setting, seed, eval set) as crosslab_dg returns them; macro-F1 depends on all four."""
    rows = []
    for m, method in enumerate(methods):
        for setting, targets in SETTINGS.items():
            for seed in seeds:
                for t, eval_set in enumerate(["val"] + targets):
                    f1 = 0.3 + 0.1 * m + 0.02 * seed + 0.01 * t
                    rows.append(dict(method=method, setting=setting, seed=seed, eval_set=eval_set, macro_f1=f1,
                                     macro_f1_low=f1 - 0.05, macro_f1_high=f1 + 0.05, micro_f1=f1 + 0.2,
                                     run_dir=f"{run_root}/{method}/{setting}/{seed}"))
    return pd.DataFrame(rows)


def test_agreement_summary_reads_medians():
    agreement = pd.DataFrame(dict(iou=[0.5, 0.7, 0.9], fraction=[0.1, 0.2, 0.3], true_fraction=[0.15, 0.25, 0.35]))
    assert dg.agreement_summary(agreement) == ("zheng1, 3 images: nucleus IoU median 0.70 (mean 0.70); median nucleus "
                                               "fraction 0.200 measured vs 0.250 from the expert masks")


def test_scale_summary_quartiles_and_crop_per_stage_and_lab():
    measured = pd.DataFrame(dict(stage=["before"] * 4 + ["after"] * 4, lab=["pbc", "pbc", "bccd", "bccd"] * 2,
                                 nucleus_fraction=[0.1, 0.3, 0.2, 0.2, 0.1, 0.3, 0.25, 0.35],
                                 crop=[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 0.75]))
    summary = dg.scale_summary(measured)
    assert list(summary.columns) == ["count", "25%", "50%", "75%", "crop factor"]
    assert summary.loc[("before", "pbc"), "50%"] == 0.2 and summary.loc[("after", "bccd"), "crop factor"] == 0.75
    assert summary.loc[("after", "bccd"), "count"] == 2


def test_runs_summary_counts_runs_and_averages_validation():
    runs = results_frame()
    assert dg.runs_summary(runs) == (f"{len(runs)} scores from 24 runs; in-domain validation macro-F1 "
                                     f"{runs[runs.eval_set == 'val'].macro_f1.mean():.3f} on average")


def test_sada_reference_splits_lab_and_metric():
    reference = dg.sada_reference()
    assert reference.columns.nlevels == 2
    assert reference.loc["SADA", ("average", "F1-macro")] == 68.6


def test_interval_table_is_percent_for_one_seed_in_order():
    table = dg.interval_table(results_frame(), seed=1, order=["SADA", "ERM"])
    assert list(table.index) == ["SADA", "ERM"] and "BoDA" not in table.index
    assert ("LOLO:pbc", "pbc") in table.columns and not any(c[1] == "val" for c in table.columns)
    assert table.loc["ERM", ("LOLO:pbc", "pbc")] == "33.0 [28.0, 38.0]"  # 0.3 + 0.02 + 0.01


def test_lolo_bars_mean_over_seeds_interval_of_one_seed():
    bars = dg.lolo_bars(results_frame(), seed=0, order=["SADA", "ERM", "BoDA"])
    assert bars["method"].tolist()[:3] == ["SADA"] * 3 and bars["method"].tolist()[-1] == "BoDA"
    erm = bars[(bars.method == "ERM") & (bars.eval_set == "pbc")].iloc[0]
    assert erm.macro_f1 == pytest.approx(0.32)  # mean of 0.31 and 0.33
    assert erm.macro_f1_low == pytest.approx(0.26) and erm.macro_f1_high == pytest.approx(0.36)  # seed 0 only
    assert set(bars.eval_set) == {"pbc", "zheng1", "bccd"}


def test_lolo_bars_figure_puts_each_seed_on_its_own_bar():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.collections import PathCollection

    from wbclib import plots

    results = results_frame()
    bars = dg.lolo_bars(results, seed=0, order=["SADA", "ERM", "BoDA"], lolo=False)
    fig = plots.lolo_bars(bars, seeds=dg.target_rows(results, lolo=False))
    dots = [c for c in fig.axes[0].collections if isinstance(c, PathCollection)]
    assert len(dots) == 1
    xy = dots[0].get_offsets()
    assert len(xy) == 3 * 2 * 2  # methods x target labs x seeds
    # both seeds of one (lab, method) share an x; the mean bar sits between them
    erm = results[(results.method == "ERM") & (results.setting == "pbc→others") & (results.eval_set == "bccd")]
    assert sorted(np.round(xy[:, 1], 6)).count(round(erm.macro_f1.iloc[0], 6)) >= 1
    assert len({round(x, 6) for x in xy[:, 0]}) == 6


def gain(method, protocol, macro, micro):
    return dict(protocol=protocol, method=method, baseline="ERM", macro_f1_gain=macro[0], macro_f1_gain_low=macro[1],
                macro_f1_gain_high=macro[2], micro_f1_gain=micro[0], micro_f1_gain_low=micro[1],
                micro_f1_gain_high=micro[2], p_not_better=0.5)


def test_gains_over_erm_one_row_per_protocol_and_method(monkeypatch):
    calls = []

    def fake(results, method, baseline, seeds, lolo, n_boot):
        calls.append((method, baseline, tuple(seeds), lolo, n_boot))
        row = gain(method, None, (0.01, 0.0, 0.02), (0.0, -0.01, 0.01))
        del row["protocol"]
        return row

    monkeypatch.setattr(dg, "paired_gain", fake)
    gains = dg.gains_over_erm(results_frame(), seeds=[0, 1], n_boot=7)
    assert list(zip(gains.protocol, gains.method)) == [(p, m) for p in ("LOLO", "pbc→others") for m in dg.GAIN_ROWS]
    assert calls[0] == ("BoDA", "ERM", (0, 1), True, 7) and calls[-1][3] is False


def test_gains_table_and_report_use_the_interval_rule():
    gains = pd.DataFrame([gain("SADA", "LOLO", (0.05, 0.01, 0.09), (0.02, -0.01, 0.05)),
                          gain("BoDA", "pbc→others", (-0.03, -0.05, -0.01), (0.0, -0.02, 0.02))])
    table = dg.gains_table(gains)
    assert "baseline" not in table.columns and table.loc[("LOLO", "SADA"), "macro_f1_gain"] == 5.0
    assert table.loc[("LOLO", "SADA"), "% replicates with gain <= 0"] == 50.0
    report = dg.gains_report(gains, "smoke", 1)
    assert "profile `smoke`, 1 seed(s)" in report
    assert "- LOLO, SADA: F1-macro better, +5.0 [+1.0, +9.0]; F1-micro not distinguishable, +2.0 [-1.0, +5.0]" in report
    assert "- pbc→others, BoDA: F1-macro worse, -3.0 [-5.0, -1.0]" in report
    assert dg.gain_verdict(gains.iloc[0], sep=", ").startswith("F1-macro better, +5.0 [+1.0, +9.0], F1-micro")


def test_ablation_table_orders_variants_around_sada():
    runs = results_frame(methods=("ERM", "SADA"), seeds=(0, 1))
    ablation = results_frame(methods=("M2", "M3", "ERM + views"), seeds=(0,))
    ablation = ablation[ablation.setting.str.startswith("LOLO")]
    avg = dg.ablation_table(runs, ablation, seed=0, rows=["M2", "M3", "ERM + views"])
    assert list(avg.index) == ["M1: ERM", "M2", "M3", "SADA", "ERM + views"]
    assert list(avg.columns) == ["F1-micro", "F1-macro"]
    assert avg.loc["M1: ERM", "F1-macro"] == 31.0  # seed 0, LOLO targets only: 0.3 + 0.01
    assert avg.loc["SADA", "F1-micro"] == 61.0


def test_boda_term_report_averages_last_epochs(tmp_path):
    runs = results_frame(run_root=str(tmp_path), seeds=(0,))
    for setting in ("LOLO:pbc", "LOLO:zheng1", "LOLO:bccd"):
        d = tmp_path / "BoDA" / setting / "0"
        d.mkdir(parents=True)
        pd.DataFrame(dict(boda=[5.0, {"LOLO:pbc": 2.0, "LOLO:zheng1": 2.2, "LOLO:bccd": 2.4}[setting]])
                     ).to_csv(d / "history.csv", index=False)
    assert dg.boda_term_report(runs, seeds=[0]) == f"BoDA term, last epoch: 2.200 (uniform logits: log(7) = {np.log(7):.3f})"
    for setting in ("LOLO:pbc", "LOLO:zheng1", "LOLO:bccd"):
        pd.DataFrame(dict(ce=[1.0])).to_csv(tmp_path / "BoDA" / setting / "0" / "history.csv", index=False)
    assert "did not start" in dg.boda_term_report(runs, seeds=[0])


def test_gradcam_rows_and_captions():
    assert dg.gradcam_rows(SimpleNamespace(dg_rows=["SADA", "DANN", "ERM"])) == ["ERM", "SADA"]
    assert dg.gradcam_captions(pd.DataFrame(dict(lab=["pbc"], label=["LY"]))) == ["pbc\nLY"]


def test_scale_table_is_percent_per_setting_and_lab():
    compare = pd.DataFrame(dict(setting=["a", "a"], eval_set=["x", "x"], scale=["cropped per lab", "resized only"],
                                macro_f1=[0.5, 0.4]))
    table = dg.scale_table(compare)
    assert table.loc[("a", "x"), "cropped per lab"] == 50.0 and table.loc[("a", "x"), "resized only"] == 40.0


def test_chapter_summary_reads_every_table_and_the_views_verdict():
    runs = results_frame()
    compare = pd.DataFrame(dict(scale=["cropped per lab", "resized only"], macro_f1=[0.5, 0.45]))
    gains = pd.DataFrame([gain("SADA", "LOLO", (0.05, 0.01, 0.09), (0.02, -0.01, 0.05))])
    ablation = pd.DataFrame({"F1-macro": [40.0, 50.0, 49.5]}, index=["M1: ERM", "SADA", "ERM + re-stained views"])
    lines = dg.chapter_summary(runs, ablation, compare, gains).split("\n")
    assert lines[0] == "- scale normalisation changes ERM's macro-F1 on the target labs by +5.0 points on average;"
    assert lines[1].startswith("- leave-one-lab-out, the best average F1-macro is BoDA (52.0); ERM 32.0, SADA 42.0")
    assert lines[2] == ("- SADA against ERM (LOLO average): F1-macro better, +5.0 [+1.0, +9.0], F1-micro not "
                        "distinguishable, +2.0 [-1.0, +5.0] (the paper: +5.4 and +4.8);")
    assert "most of what SADA adds here comes with its re-stained views" in lines[3]
    ablation.loc["ERM + re-stained views"] = 45.0
    last = dg.chapter_summary(runs, ablation, compare, gains).split("\n")[3]
    assert last == "- in the ablation (first seed), ERM on the re-stained copies reaches 45.0 F1-macro, SADA 50.0, ERM 40.0."
