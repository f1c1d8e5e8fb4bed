"""Chapter 08's steps in :mod:`wbclib.protocols.restoration`: the tables and
reports the notebook displays, on tiny synthetic frames (no images decoded)."""
import json
from types import SimpleNamespace

import numpy as np
import pandas as pd

from wbclib.protocols import restoration as protocol


def test_rates_table_puts_scores_in_columns_and_rounds():
    rates = pd.DataFrame(dict(background=["pristine"] * 4, noise=["salt_pepper"] * 4, rate=[0.1, 0.1, 0.3, 0.3],
                              score=["impulse", "residual"] * 2, precision=[1.0, 0.5, 0.98765, 0.25],
                              recall=[0.12345, 1.0, 0.9, 0.0]))
    table = protocol.rates_table(rates)
    assert list(table.index) == [("pristine", "salt_pepper", 0.1), ("pristine", "salt_pepper", 0.3)]
    assert table.loc[("pristine", "salt_pepper", 0.3), ("precision", "impulse")] == 0.988
    assert table.loc[("pristine", "salt_pepper", 0.1), ("recall", "impulse")] == 0.123
    assert table.loc[("pristine", "salt_pepper", 0.1), ("precision", "residual")] == 0.5


def test_partition_raw_set_calls_the_high_impulse_images_noisy(tmp_path):
    # Cached scores in the chapter folder: the images are never read.
    rng = np.random.default_rng(0)
    n = 60
    kinds = np.array(["salt_pepper", "blur", "illumination"] * (n // 3))
    impulse = np.where(kinds == "salt_pepper", rng.uniform(0.02, 0.05, n), rng.uniform(1e-5, 2e-4, n))
    pd.DataFrame(dict(impulse=impulse)).to_csv(tmp_path / "pool_scores.csv", index=False)
    pool = pd.DataFrame(dict(path=[f"p/{i}.jpg" for i in range(n)], degradation=kinds,
                             severity=np.tile([1, 2, 3, 4], n // 4)), index=np.arange(n) + 100)
    raw = protocol.partition_raw_set(tmp_path, pool, root=None, seed=0)
    assert list(raw.pool.index) == list(range(n))  # reset
    assert raw.pool["noisy"].tolist() == (kinds == "salt_pepper").tolist()
    assert raw.detection["precision"] == 1.0 and raw.detection["recall"] == 1.0 and raw.detection["n"] == n
    assert raw.calls.loc[("salt_pepper", 1), "noisy"] == (kinds[::4] == "salt_pepper").sum()
    assert "clean" in raw.calls.columns and raw.calls["clean"].sum() == 2 * n // 3
    first, second = raw.report.split("\n")
    assert first.startswith("threshold: impulse share > ") and "mixture components" in first
    assert "'precision': 1.0" in second and f"'n': {n}" in second


def test_noisy_calls_counts_per_degradation_and_severity():
    pool = pd.DataFrame(dict(degradation=["blur", "blur", "salt_pepper"], severity=[1, 1, 2],
                             noisy=[False, True, True]))
    calls = protocol.noisy_calls(pool)
    assert calls.loc[("blur", 1), "clean"] == 1 and calls.loc[("blur", 1), "noisy"] == 1
    assert calls.loc[("salt_pepper", 2), "clean"] == 0 and calls.loc[("salt_pepper", 2), "noisy"] == 1


def test_pix2pix_report_reads_the_summary():
    summary = dict(train_images=12, epochs=3, steps_per_epoch=7, seconds=90, generator_parameters=1_234_567,
                   discriminator_parameters=45_000, discriminator_receptive_field=34)
    assert protocol.pix2pix_report(summary) == (
        "Pix2Pix: 12 clean images, 3 epochs x 7 steps, trained in 1.5 min; generator 1.23 M parameters, "
        "discriminator 0.04 M (34 px patches)")


def test_flagged_share_is_a_mean_per_cell():
    test = pd.DataFrame(dict(degradation=["blur", "blur", "salt_pepper", "salt_pepper"], severity=[1, 1, 1, 2]))
    share = protocol.flagged_share(test, np.array([True, False, True, True]))
    assert share.loc["blur", 1] == 0.5 and share.loc["salt_pepper", 2] == 1.0
    assert np.isnan(share.loc["blur", 2])


def effect_frame():
    return pd.DataFrame(dict(kind=["all", "all", "salt_pepper", "salt_pepper"],
                             condition=["as is", "Pix2Pix", "as is", "Pix2Pix"],
                             macro_f1=[0.5, 0.61234, 0.3, 0.45], macro_f1_low=[0.4, 0.5, 0.2, 0.35],
                             macro_f1_high=[0.6, 0.7, 0.4, 0.55]))


def test_interval_table_formats_and_orders_conditions():
    table = protocol.interval_table(effect_frame(), ["as is", "Pix2Pix"])
    assert list(table.columns) == ["as is", "Pix2Pix"]
    assert table.loc["all", "Pix2Pix"] == "0.612 [0.500, 0.700]"
    assert table.loc["salt_pepper", "as is"] == "0.300 [0.200, 0.400]"
    assert list(protocol.interval_table(effect_frame(), ["Pix2Pix", "as is"]).columns) == ["Pix2Pix", "as is"]


def test_agreement_report_compares_with_the_saved_predictions(tmp_path):
    pd.DataFrame(dict(pred=["a", "b", "c", "d"])).to_csv(tmp_path / "predictions_test_stress.csv", index=False)
    (tmp_path / "metrics.json").write_text(json.dumps(dict(test=dict(macro_f1=0.9), test_stress=dict(macro_f1=0.6))))
    report = protocol.agreement_report(tmp_path, pd.DataFrame(dict(pred=["a", "b", "c", "x"])), "test_stress")
    assert report == ("'as is' reproduces chapter 03's predictions on 75.0 % of images; "
                      "macro-F1 on the pristine test 0.900, stress 0.600")


def test_salt_pepper_report_reads_both_tables():
    effect = pd.concat([effect_frame(), pd.DataFrame(dict(kind=["salt_pepper"], condition=["median 3x3"],
                                                          macro_f1=[0.5], macro_f1_low=[0.4], macro_f1_high=[0.6]))])
    quality = pd.DataFrame(dict(kind=["salt_pepper", "salt_pepper", "salt_pepper", "blur"],
                                method=["median 3x3", "median 3x3", "Pix2Pix", "Pix2Pix"],
                                psnr=[30.0, 32.0, 28.04, 99.0], ssim=[0.9, 0.8, 0.7, 0.0]))
    first, second = protocol.salt_pepper_report(effect, quality).split("\n")
    assert first == ("salt-and-pepper test images: macro-F1 0.300 as is, 0.450 after Pix2Pix, "
                     "0.500 after the median filter")
    assert second == "held-out salt-and-pepper pairs, mean PSNR (dB) / SSIM: Pix2Pix 28.0 / 0.700, median 3x3 31.0 / 0.850"


def test_degraded_test_caches_per_test_set_and_classifier(tmp_path, monkeypatch):
    """The chapter's run identity covers neither the test set nor the classifier:
    their cached scores live in a folder named by both, so a change of either
    never reads a stale file."""
    from wbclib.protocols import pbc_lt

    test = pd.DataFrame(dict(path=["a.jpg", "b.jpg", "c.jpg"], degradation=["salt_pepper", "blur", "salt_pepper"],
                             severity=[1, 2, 3]))
    scored = []

    def fake_scores(table, root):
        scored.append(len(table))
        return pd.DataFrame(dict(impulse=[0.5, 0.0, 0.4]))

    runs = {"A": tmp_path / "runs" / "rho-100_fold-0_aaaa", "B": tmp_path / "runs" / "rho-100_fold-0_bbbb"}
    current = {"run": runs["A"]}
    monkeypatch.setattr(protocol, "ensure_erm_classifier", lambda *a, **k: current["run"])
    monkeypatch.setattr(protocol, "load_classifier", lambda run_dir, n: ("method", "config"))
    monkeypatch.setattr(pbc_lt, "pbc_lt_sets", lambda *a: (None, {"test_stress": test, "test_degraded": test}))
    monkeypatch.setattr(protocol, "table_scores", fake_scores)
    detector = SimpleNamespace(predict=lambda s: np.asarray(s) > 0.1)
    out = tmp_path / "chapter"

    def run(eval_set):
        return protocol.degraded_test(None, None, None, None, None, None, out, detector, eval_set=eval_set)

    first = run("test_stress")
    assert first.folder == out / "test_stress-rho-100_fold-0_aaaa" and (first.folder / "test_scores.csv").is_file()
    assert first.flags.tolist() == [True, False, True] and first.detection["recall"] == 1.0
    assert first.report.startswith("noisy call vs truth on the stress test: {'precision': 1.0")
    assert run("test_stress").folder == first.folder and scored == [3]  # read back
    assert run("test_degraded").folder != first.folder and scored == [3, 3]  # another test set: scored again
    current["run"] = runs["B"]
    assert run("test_stress").folder.name == "test_stress-rho-100_fold-0_bbbb" and scored == [3, 3, 3]


def test_rows_at_severity_0_count_as_pristine_not_as_their_drawn_kind(tmp_path, monkeypatch):
    """Phase-2 mixes keep each image's drawn kind at severity 0 (the pristine
    image): the salt-and-pepper truth, the flagged shares and the noisy calls
    must not count those rows as degraded."""
    from wbclib.protocols import pbc_lt

    test = pd.DataFrame(dict(path=["a.jpg", "b.jpg", "c.jpg", "d.jpg"],
                             degradation=["salt_pepper", "salt_pepper", "blur", "blur"], severity=[2, 0, 0, 1]))
    monkeypatch.setattr(protocol, "ensure_erm_classifier", lambda *a, **k: tmp_path / "runs" / "run_a")
    monkeypatch.setattr(protocol, "load_classifier", lambda run_dir, n: ("method", "config"))
    monkeypatch.setattr(pbc_lt, "pbc_lt_sets", lambda *a: (None, {"test_degraded": test}))
    monkeypatch.setattr(protocol, "table_scores", lambda t, r: pd.DataFrame(dict(impulse=[0.5, 0.0, 0.0, 0.0])))
    detector = SimpleNamespace(predict=lambda s: np.asarray(s) > 0.1)
    got = protocol.degraded_test(None, None, None, None, None, None, tmp_path / "ch", detector,
                                 eval_set="test_degraded")
    # one salt-and-pepper image, flagged; the pristine "salt_pepper" row is a true negative
    assert got.detection["precision"] == 1.0 and got.detection["recall"] == 1.0
    assert got.detection["n"] == 4
    share = got.flagged
    assert set(share.index) == {"salt_pepper", "blur", "none"}
    assert share.loc["salt_pepper", 2] == 1.0 and share.loc["none", 0] == 0.0 and share.loc["blur", 1] == 0.0
    assert np.isnan(share.loc["salt_pepper", 0]) and np.isnan(share.loc["blur", 0])
    calls = protocol.noisy_calls(test.assign(noisy=[True, False, False, True]))
    assert calls.loc[("none", 0), "clean"] == 2 and ("salt_pepper", 0) not in calls.index
