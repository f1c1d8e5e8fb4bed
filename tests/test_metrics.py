import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import (balanced_accuracy_score, confusion_matrix, f1_score, multilabel_confusion_matrix,
                             precision_score)

from wbclib import metrics


@pytest.mark.parametrize("trial", range(20))
def test_scores_agree_with_scikit_learn(trial):
    rng = np.random.default_rng(trial)
    c = int(rng.integers(2, 9))
    n = int(rng.integers(5, 200))
    y = rng.integers(0, c, n)
    p = np.where(rng.random(n) < 0.5, y, rng.integers(0, c, n))
    s = metrics.scores(y, p, c)
    assert s["macro_f1"] == pytest.approx(f1_score(y, p, average="macro", zero_division=0))
    assert s["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p))
    assert s["macro_precision"] == pytest.approx(precision_score(y, p, average="macro", zero_division=0))
    mcm = multilabel_confusion_matrix(y, p)
    spec = [tn / (tn + fp) if tn + fp else 0.0 for (tn, fp), _ in mcm]
    assert s["macro_specificity"] == pytest.approx(np.mean(spec))
    labels = np.arange(c)
    np.testing.assert_array_equal(metrics.confusion(y, p, c), confusion_matrix(y, p, labels=labels))


def test_per_class_table():
    y = [0, 0, 1, 1, 2]
    p = [0, 1, 1, 1, 0]
    t = metrics.per_class(y, p, ["a", "b", "c"])
    assert t.loc["a", "precision"] == 0.5 and t.loc["b", "recall"] == 1.0 and t.loc["c", "f1"] == 0.0
    assert t.support.tolist() == [2, 2, 1]


def test_bootstrap_interval_brackets_the_estimate_and_narrows_with_n():
    rng = np.random.default_rng(0)
    def ci(n):
        y = rng.integers(0, 3, n)
        p = np.where(rng.random(n) < 0.7, y, rng.integers(0, 3, n))
        point = metrics.scores(y, p, 3)["macro_f1"]
        lo, hi = metrics.bootstrap_ci(y, p, 3, n_boot=300)
        assert lo <= point <= hi
        return hi - lo
    assert ci(2000) < ci(100)


def test_summarize_mean_and_std_over_folds():
    t = pd.DataFrame({"rho": [1, 1, 10, 10], "macro_f1": [0.5, 0.7, 0.2, 0.2],
                      "balanced_accuracy": 0.0, "macro_precision": 0.0, "macro_specificity": 0.0})
    s = metrics.summarize(t, by=["rho"])
    assert s.loc[1, "macro_f1_mean"] == pytest.approx(0.6)
    assert s.loc[1, "macro_f1_std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert s.loc[10, "n"] == 2
    assert metrics.format_mean_std(s).loc[1, "macro_f1"] == "60.0 ± 14.1"


def test_paired_difference_by_hand():
    # Four images, two classes. base says "0" everywhere: class 0 F1 = 2*2/(2+4) = 2/3, class 1 F1 = 0,
    # macro-F1 1/3, balanced accuracy (1 + 0) / 2 = 1/2. pred is right everywhere: 1 and 1.
    y = [0, 0, 1, 1]
    base, pred = [0, 0, 0, 0], [0, 0, 1, 1]
    d = metrics.paired_difference(y, pred, base, 2, n_boot=0)
    assert d["macro_f1"] == pytest.approx(2 / 3) and d["balanced_accuracy"] == pytest.approx(1 / 2)
    assert np.isnan(d["macro_f1_low"])
    # The interval is the percentiles of the per-draw differences (same images for both), drawn as a loop would.
    rng = np.random.default_rng(0)
    y, pred, base = rng.integers(0, 4, 60), rng.integers(0, 4, 60), rng.integers(0, 4, 60)
    pred[:40] = y[:40]
    d = metrics.paired_difference(y, pred, base, 4, n_boot=300, seed=5)
    draws = np.random.default_rng(5).integers(0, 60, (300, 60))
    for m in ("macro_f1", "balanced_accuracy"):
        loop = [metrics.scores(y[i], pred[i], 4)[m] - metrics.scores(y[i], base[i], 4)[m] for i in draws]
        assert [d[f"{m}_low"], d[f"{m}_high"]] == pytest.approx(np.quantile(loop, [0.025, 0.975]))
        assert d[f"{m}_p_not_better"] == pytest.approx(np.mean(np.array(loop) <= 0))
        assert d[m] == pytest.approx(metrics.scores(y, pred, 4)[m] - metrics.scores(y, base, 4)[m])
        assert d[f"{m}_low"] < d[m] < d[f"{m}_high"]
    # Several runs on the same images (folds): each score is the mean over runs.
    runs_a, runs_b = np.stack([pred, y]), np.stack([base, base])
    d2 = metrics.paired_difference(y, runs_a, runs_b, 4, n_boot=0)
    mean_a = np.mean([metrics.scores(y, p, 4)["macro_f1"] for p in runs_a])
    assert d2["macro_f1"] == pytest.approx(mean_a - metrics.scores(y, base, 4)["macro_f1"])
    # A method compared with itself differs by exactly zero on every draw.
    same = metrics.paired_difference(y, pred, pred, 4, n_boot=50)
    assert same["macro_f1_low"] == same["macro_f1_high"] == 0.0
    with pytest.raises(ValueError):
        metrics.paired_difference(y, pred[:10], base, 4)


@pytest.mark.parametrize("metric", [*metrics.METRICS, "accuracy"])
def test_bootstrap_counts_resamples_in_blocks_with_the_digits_of_one_at_a_time(metric, monkeypatch):
    """The batched bootstrap (one bincount per block of resamples) gives exactly
    the interval of scoring each resample on its own, including resamples
    that miss a class entirely."""
    rng = np.random.default_rng(7)
    y = rng.integers(0, 6, 40)
    p = np.where(rng.random(40) < 0.6, y, rng.integers(0, 6, 40))
    y[:3] = 5  # a rare class that many resamples miss
    draws = np.random.default_rng(11)
    values = [metrics.scores(y[idx], p[idx], 6)[metric] for idx in (draws.integers(0, 40, 40) for _ in range(200))]
    expected = (float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975)))
    monkeypatch.setattr(metrics, "_BOOT_INDICES", 40 * 7)  # blocks of 7 resamples, the last one short
    assert metrics.bootstrap_ci(y, p, 6, metric=metric, n_boot=200, seed=11) == expected
