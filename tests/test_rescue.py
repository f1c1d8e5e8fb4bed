"""Suppress-and-Rescue: the supervised contrastive verifier, Algorithm 1's
decisions, and parameters chosen on validation data only."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from wbclib import rescue
from wbclib.protocols import rescue as rescue_protocol
from wbclib.data import PROJECT_ROOT
from wbclib.morphology import MahalanobisFilter
from wbclib.rescue import RescueGrid, SuppressAndRescue, fit_thresholds, supcon_loss

CLASSES = ["A", "B", "R", "Q"]  # R and Q are the rare classes


def frame(probs, labels=None, classes=CLASSES):
    """A predictions table like ``predictions_<set>.csv``."""
    probs = np.asarray(probs, float)
    out = pd.DataFrame({"path": [f"img{i}.png" for i in range(len(probs))]})
    out["label"] = labels if labels is not None else [classes[i] for i in probs.argmax(1)]
    out["pred"] = [classes[i] for i in probs.argmax(1)]
    for j, c in enumerate(classes):
        out[f"prob_{c}"] = probs[:, j]
    return out


# -- supervised contrastive loss and the projection head ---------------------------


def test_supcon_loss_matches_a_hand_computation():
    z = F.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]), dim=1)
    labels = torch.tensor([0, 0, 1])
    t = 0.5
    # anchor 0: its positive is row 1 (cos 0.8), the other row 2 (cos 0)
    l0 = -(0.8 / t - math.log(math.exp(0.8 / t) + math.exp(0.0 / t)))
    # anchor 1: positive row 0 (cos 0.8), other row 2 (cos 0.6)
    l1 = -(0.8 / t - math.log(math.exp(0.8 / t) + math.exp(0.6 / t)))
    # anchor 2 has no positive and is left out
    assert supcon_loss(z, labels, t).item() == pytest.approx((l0 + l1) / 2, abs=1e-6)
    assert (l0 + l1) / 2 == pytest.approx(0.3485, abs=1e-4)


def test_supcon_loss_with_several_positives_and_none():
    z = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.9, -0.2], [0.0, 1.0]]), dim=1)
    labels = torch.tensor([0, 0, 0, 1])
    sim = (z @ z.T).numpy() / 0.1
    expected = []
    for i in range(3):
        others = [a for a in range(4) if a != i]
        log_den = np.log(np.exp(sim[i, others]).sum())
        expected.append(-np.mean([sim[i, p] - log_den for p in range(3) if p != i]))
    assert supcon_loss(z, labels, 0.1).item() == pytest.approx(np.mean(expected), rel=1e-5)
    # no anchor with a positive: zero, and still differentiable
    lone = z.clone().requires_grad_(True)
    loss = supcon_loss(lone, torch.tensor([0, 1, 2, 3]), 0.1)
    loss.backward()
    assert loss.item() == 0.0 and lone.grad is not None


def test_projection_head_separates_two_synthetic_clusters():
    rng = np.random.default_rng(0)
    # two clusters that differ only along 2 of 20 dimensions, buried in noise
    direction = np.zeros(20)
    direction[:2] = 1.5

    def sample(n):
        y = rng.integers(0, 2, n)
        return rng.normal(0, 1, (n, 20)) + np.where(y[:, None] == 1, direction, -direction), y

    x_train, y_train = sample(200)
    x_test, y_test = sample(200)
    verifier = rescue.fit_contrastive_head(x_train, y_train, num_classes=2, hidden=32, out_dim=8, epochs=40,
                                           batch_size=64, seed=0)
    proba = verifier.predict_proba(x_test)
    assert proba.shape == (200, 2) and np.allclose(proba.sum(1), 1.0)
    assert (proba.argmax(1) == y_test).mean() > 0.9
    z = verifier.project(x_test)
    assert np.allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
    # mean cosine similarity of pairs of the same and of different clusters: close to
    # each other in the raw (standardised) features, far apart after projection
    same = y_test[:, None] == y_test[None, :]
    cos = z @ z.T
    raw = (x_test - x_train.mean(0)) / x_train.std(0)
    raw /= np.linalg.norm(raw, axis=1, keepdims=True)
    assert (raw @ raw.T)[same].mean() - (raw @ raw.T)[~same].mean() < 0.2
    assert cos[same].mean() - cos[~same].mean() > 0.3


def test_verifier_gives_an_absent_class_no_probability():
    x = np.random.default_rng(1).normal(size=(20, 4))
    verifier = rescue.fit_contrastive_head(x, np.array([0, 1] * 10), num_classes=3, hidden=8, out_dim=4, epochs=2)
    assert np.allclose(verifier.predict_proba(x)[:, 2], 0.0)


# -- Algorithm 1 ------------------------------------------------------------------------


def boost_everything():
    return SuppressAndRescue(rare_classes=["R", "Q"], boosts={"R": 3.0, "Q": 3.0}, tau=0.5, morphology="spikiness",
                             tau_s=0.1)


def test_rescue_never_changes_a_prediction_when_no_rare_class_surfaces():
    # rare probabilities too small to win even after a 3x boost
    probs = [[0.7, 0.2, 0.05, 0.05], [0.1, 0.8, 0.06, 0.04], [0.5, 0.3, 0.15, 0.05], [0.4, 0.4, 0.1, 0.1]]
    f = frame(probs, labels=["R", "Q", "R", "Q"])
    passing_verify = np.tile([0.0, 0.0, 1.0, 1.0], (4, 1))
    passing_morph = pd.DataFrame({"spikiness": [0.9] * 4})
    out = boost_everything().apply(f, passing_verify, passing_morph)
    assert (out["pred"] == f["pred"]).all()
    assert (out["rescue"] == "no_candidate").all()
    # a row whose base prediction already is a rare class is no candidate either and keeps it,
    # even when verification and morphology would reject it
    g = frame([[0.1, 0.1, 0.7, 0.1]])
    out = boost_everything().apply(g, np.zeros((1, 4)), pd.DataFrame({"spikiness": [0.0]}))
    assert out["pred"].tolist() == ["R"] and out["rescue"].tolist() == ["no_candidate"]
    # neither the verifier nor morphology is consulted when nothing surfaces
    def must_not_measure(rows):
        raise AssertionError("morphology measured although nothing surfaced")

    out = boost_everything().apply(f, None, must_not_measure)
    assert (out["pred"] == f["pred"]).all()


def test_boosted_rare_candidates_are_rescued_only_when_every_check_passes():
    # every row: base A (0.5), R at 0.3 -> 0.9 after the 3x boost
    probs = np.tile([0.5, 0.1, 0.3, 0.1], (4, 1))
    f = frame(probs, labels=["R"] * 4)
    verify = np.tile([0.1, 0.1, 0.8, 0.0], (4, 1))
    verify[1, 2] = 0.2  # row 1 fails semantic verification (tau 0.5)
    morph = pd.DataFrame({"spikiness": [0.3, 0.3, 0.05, np.nan]})  # row 2 too smooth, row 3 unmeasurable
    out = boost_everything().apply(f, verify, morph)
    assert out["candidate"].tolist() == ["R"] * 4
    assert out["rescue"].tolist() == ["rescued", "semantic_reject", "morphology_reject", "morphology_reject"]
    assert out["pred"].tolist() == ["R", "A", "A", "A"]
    assert out["base_pred"].tolist() == ["A"] * 4
    # the probabilities themselves are untouched
    assert np.allclose(out[[f"prob_{c}" for c in CLASSES]].to_numpy(), probs)


def test_mahalanobis_rule_and_lazy_morphology():
    rng = np.random.default_rng(0)
    features = ["nucleus_fraction", "staining_intensity", "nucleus_offset"]
    train = rng.normal([0.4, 0.6, 0.3], 0.02, (30, 3))
    maha = MahalanobisFilter(shrinkage=0.1).fit(train, ["Q"] * 30)
    sr = SuppressAndRescue(rare_classes=["Q"], boosts={"Q": 4.0}, verify=False, morphology={"Q": "mahalanobis"},
                           tau_m={"Q": 3.0}, mahalanobis=maha)
    f = frame(np.tile([0.6, 0.2, 0.0, 0.2], (3, 1)), labels=["Q"] * 3)
    measured = []

    def measure(rows):
        measured.append(rows["path"].tolist())
        values = {"img0.png": [0.4, 0.6, 0.3], "img1.png": [0.9, 0.1, 0.0], "img2.png": [0.41, 0.61, 0.31]}
        return pd.DataFrame([values[p] for p in rows["path"]], columns=features)

    out = sr.apply(f, None, measure)
    assert out["pred"].tolist() == ["Q", "A", "Q"]
    assert measured == [["img0.png", "img1.png", "img2.png"]]
    with pytest.raises(ValueError, match="MahalanobisFilter"):
        SuppressAndRescue(rare_classes=["Q"], boosts={"Q": 4.0}, verify=False, morphology="mahalanobis").apply(
            f, None, measure)
    with pytest.raises(ValueError, match="unknown morphology rule"):
        SuppressAndRescue(rare_classes=["Q"], boosts={"Q": 1.0}, morphology="magic")


def test_boosts_follow_inverse_log_frequency():
    counts = {"A": 200, "B": 50, "R": 4, "Q": 2}
    b = rescue.boost_factors(counts, ["R", "Q"], strength=1.0)
    w = 1 / np.log1p([200, 50, 4, 2])
    w = w / w.mean()
    assert b["R"] == pytest.approx(w[2]) and b["Q"] == pytest.approx(w[3])
    assert b["Q"] > b["R"] > 1
    assert rescue.boost_factors(counts, ["R"], strength=0.0) == {"R": 1.0}
    assert rescue.rarest_classes(counts, 2) == ["Q", "R"]


# -- parameters from validation data only -----------------------------------------


def synthetic_split(n_rare=20, n_common=80, rare_is_right=True, seed=0):
    """Rows whose base prediction is A; true R rows hide R at 0.3, and so do
    decoys of class A. The verifier is confident on true R rows only."""
    rng = np.random.default_rng(seed)
    rows, labels, verify = [], [], []
    for i in range(n_rare):
        rows.append([0.5, 0.15, 0.3, 0.05])
        labels.append("R" if rare_is_right else "A")
        verify.append([0.1, 0.0, 0.9, 0.0] if rare_is_right else [0.9, 0.0, 0.1, 0.0])
    for i in range(n_common):
        p = rng.dirichlet([8, 4, 0.5, 0.5])
        p = p[[0, 1, 2, 3]]
        rows.append(p)
        labels.append(["A", "B"][int(p[1] > p[0])])
        verify.append([0.5, 0.5, 0.0, 0.0])
    # decoys: true A rows with exactly the same probabilities, which only the verifier tells apart
    for i in range(10):
        rows.append([0.5, 0.15, 0.3, 0.05])
        labels.append("A")
        verify.append([0.7, 0.1, 0.2, 0.0])
    f = frame(rows, labels)
    return f, np.asarray(verify, float)


COUNTS = {"A": 300, "B": 150, "R": 3, "Q": 2}


def test_fit_thresholds_rescues_what_validation_supports():
    val, verify = synthetic_split()
    base = rescue_protocol.score_rows(val, CLASSES)["macro_f1"]
    boost = fit_thresholds(val, COUNTS, ["R", "Q"], phase="boost")
    semantic = fit_thresholds(val, COUNTS, ["R", "Q"], verify, phase="semantic", start=boost)
    assert semantic.info["val_score"] > base + 0.1
    # the decoys (verifier 0.2) are rejected, true R rows (0.9) pass
    assert 0.2 < semantic.tau["R"] <= 0.9
    out = semantic.apply(val, verify)
    assert (out.loc[out["label"] == "R", "pred"] == "R").all()
    assert not (out.loc[out["label"] == "A", "pred"] == "R").any()
    # the morphology phase starts from the semantic solution and cannot score lower on validation
    morph = pd.DataFrame({"spikiness": np.linspace(0, 1, len(val))})
    full = fit_thresholds(val, COUNTS, ["R", "Q"], verify, morph, phase="morphology", start=semantic)
    assert full.info["val_score"] >= semantic.info["val_score"] - 1e-12
    assert semantic.info["val_score"] >= boost.info["val_score"] - 1e-12


def test_nothing_is_rescued_when_validation_says_it_hurts():
    # on validation every surfacing R is wrong; on a test set it would be right
    val, verify_val = synthetic_split(rare_is_right=False, seed=1)
    test, verify_test = synthetic_split(rare_is_right=True, seed=2)
    params = fit_thresholds(val, COUNTS, ["R", "Q"], verify_val, phase="semantic")
    assert params.info["val_rescued"] == 0
    out = params.apply(test, verify_test)
    assert (out["pred"] == test["pred"]).all()  # chosen on validation, so test's better option is not taken


def test_thresholds_depend_on_validation_rows_only():
    val, verify_val = synthetic_split(seed=3)
    a = fit_thresholds(val, COUNTS, ["R", "Q"], verify_val, phase="semantic")
    b = fit_thresholds(val.copy(), COUNTS, ["R", "Q"], verify_val.copy(), phase="semantic")
    assert a.to_dict() == b.to_dict()
    # the function takes no test data at all: its inputs are the validation table, training counts and grid
    import inspect

    assert not any("test" in name for name in inspect.signature(fit_thresholds).parameters)
    # applying the parameters to two different test sets leaves them unchanged
    before = a.to_dict()
    for seed in (4, 5):
        test, verify_test = synthetic_split(seed=seed, rare_is_right=bool(seed % 2))
        a.apply(test, verify_test)
    assert a.to_dict() == before
    # a table without prob_ columns or with unknown labels is refused
    with pytest.raises(ValueError, match="prob_"):
        fit_thresholds(val[["path", "label", "pred"]], COUNTS, ["R"])


def test_nothing_surfaces_gives_the_identity():
    probs = np.tile([0.8, 0.19, 0.005, 0.005], (10, 1))
    val = frame(probs, labels=["A"] * 5 + ["B"] * 5)
    params = fit_thresholds(val, COUNTS, ["R", "Q"], np.zeros((10, 4)), pd.DataFrame({"spikiness": [0.5] * 10}),
                            grid=RescueGrid(strengths=(0.0, 1.0)))
    assert params.info["val_rescued"] == 0
    assert (params.apply(val, np.zeros((10, 4)), pd.DataFrame({"spikiness": [0.5] * 10}))["pred"] == val["pred"]).all()


def graded_rare_split():
    """True R rows whose A:R probability ratio is 3, 8 or 15 (each needs a larger
    boost to surface: strength > 3.0, 5.7, 7.5 with COUNTS) and true A decoys at
    ratio 40 (surface from strength 10.2): the best strength is 7.5-10.2."""
    rows, labels = [], []
    for ratio in (3, 8, 15):
        for _ in range(5):
            p_r = 1 / (ratio + 1.05)
            rows.append([ratio * p_r, 0.05 * p_r, p_r, 0.0])
            labels.append("R")
    for _ in range(15):
        p_r = 1 / 41.05
        rows.append([40 * p_r, 0.05 * p_r, p_r, 0.0])
        labels.append("A")
    rows += [[0.2, 0.8, 0.0, 0.0]] * 10 + [[0.9, 0.1, 0.0, 0.0]] * 10
    labels += ["B"] * 10 + ["A"] * 10
    return frame(rows, labels)


def test_boost_grid_extends_until_the_chosen_strength_is_interior():
    # The profiles' grid (max 4) was chosen at its top in 3 of 4 runs: the edge
    # said nothing about whether a stronger boost would help. The search now
    # extends the grid (x2) while the top strength wins.
    assert max(rescue.BOOST_STRENGTHS) > 4 and RescueGrid().strengths == rescue.BOOST_STRENGTHS
    val = graded_rare_split()
    narrow = RescueGrid(strengths=(0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0))
    params = fit_thresholds(val, COUNTS, ["R", "Q"], phase="boost", grid=narrow)
    assert params.info["strength"] == 8.0 and not params.info["strength_at_edge"]
    assert params.info["strengths"][-2:] == [8.0, 16.0]  # 16 lets the decoys through
    out = params.apply(val)
    assert (out.loc[out["label"] == "R", "pred"] == "R").all() and not (out["pred"][out["label"] == "A"] == "R").any()
    assert fit_thresholds(val, COUNTS, ["R", "Q"], phase="boost").info["strength"] == 8.0


def test_boost_strength_at_the_grid_edge_warns():
    val = graded_rare_split()
    capped = RescueGrid(strengths=(0.0, 1.0, 2.0, 4.0), max_strength=4.0)
    with pytest.warns(UserWarning, match="edge"):
        params = fit_thresholds(val, COUNTS, ["R", "Q"], phase="boost", grid=capped)
    assert params.info["strength"] == 4.0 and params.info["strength_at_edge"]


def test_paired_bootstrap_gain():
    labels = ["A", "B", "R", "R"] * 10
    before = ["A", "B", "A", "A"] * 10
    after = ["A", "B", "R", "A"] * 10
    g = rescue.paired_bootstrap_gain(labels, before, after, ["A", "B", "R"], n_boot=200)
    assert g["gain"] > 0 and g["low"] <= g["gain"] <= g["high"]
    # The book's one paired bootstrap: the same draws as scoring each replicate on its own.
    from wbclib.metrics import scores

    rng = np.random.default_rng(0)
    y, a, b = (np.array([{"A": 0, "B": 1, "R": 2}[c] for c in names]) for names in (labels, before, after))
    boots = []
    for _ in range(200):
        idx = rng.integers(0, len(y), len(y))
        boots.append(scores(y[idx], b[idx], 3)["macro_f1"] - scores(y[idx], a[idx], 3)["macro_f1"])
    assert g["gain"] == pytest.approx(scores(y, b, 3)["macro_f1"] - scores(y, a, 3)["macro_f1"])
    assert [g["low"], g["high"]] == pytest.approx(list(np.quantile(boots, [0.025, 0.975])))


def test_paper_table2_is_read_from_the_paper():
    path = PROJECT_ROOT.parent / "shared" / "papers" / "hybrid-rescue-wbcbench2026.md"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    rows = rescue.read_paper_table2(path)
    assert rows["Baseline (Single Fold Swin-T)"] == pytest.approx(0.63857)
    assert rows["+ Biological Filtering (Phase 3)"] == pytest.approx(0.77139)
    assert list(rows.values()) == pytest.approx(list(rescue.PAPER_TABLE2.values()))


# -- SigLIP embeddings ------------------------------------------------------------------


def test_siglip_embedder_with_a_tiny_random_config(synthetic_root, tmp_path):
    pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")
    from wbclib.data import image_folder

    config = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    embedder = rescue.SiglipEmbedder.from_config(seed=0, **config)
    assert embedder.image_size == 32 and embedder.num_features == 16
    table = image_folder(synthetic_root, "pbc", hashes=False)[["path", "label"]]
    store = embedder.store([table], synthetic_root, tmp_path / "cache")
    x = store(table)
    assert x.shape == (len(table), 16) and np.isfinite(x).all()
    assert len(list((tmp_path / "cache").rglob("embeddings_siglip_random_32_*.npy"))) == 1
    # the same weights saved and read back from a local folder give the same embeddings
    embedder.model.save_pretrained(tmp_path / "weights")
    loaded = rescue.SiglipEmbedder.from_pretrained(tmp_path / "weights")
    y = loaded.store([table], synthetic_root, None)(table)
    assert np.allclose(x, y, atol=1e-4)
    assert loaded.tag != embedder.tag
    # and the contrastive head trains on them
    labels = table["label"].map({"lymphocyte": 0, "neutrophil": 1}).to_numpy()
    verifier = rescue.fit_contrastive_head(x, labels, 2, hidden=8, out_dim=4, epochs=3)
    assert verifier.predict_proba(x).shape == (len(table), 2)
    with pytest.raises(FileNotFoundError, match="SigLIP"):
        rescue.SiglipEmbedder.from_pretrained(tmp_path / "missing")


# -- the protocol: the verifier embeds rows as the base run saw them -------------


def test_rescue_embeds_val_and_test_rows_cell_centred_like_its_prototypes(tmp_path, monkeypatch):
    """With ``cell_crop`` on, every row the verifier embeds (training views,
    and the val/test rows read back from ``predictions_<set>.csv``, which lack
    the loader columns) carries the crop: none is embedded uncropped."""
    import json
    from types import SimpleNamespace

    from wbclib import benchmarks as B
    from wbclib import embeddings, profiles
    from wbclib.cellcrop import COMMON_RATIO
    from wbclib.protocols.common import cell_centred
    from wbclib.protocols.pbc_lt import pbc_lt_sets
    from wbclib.train import predictions_frame

    rows = [dict(path=f"pbc/{c}/{c}_{i}.png", fine_label=c) for c in B.PBC_LT_CLASSES for i in range(15)]
    table, definition = B.make_pbc_lt(pd.DataFrame(rows), seed=0)
    splits = tmp_path / "splits"
    splits.mkdir()
    table.to_csv(splits / "pbc_lt_seed0.csv", index=False)
    (splits / "pbc_lt_seed0.json").write_text(json.dumps(definition.__dict__))
    cfg = SimpleNamespace(**dict(profiles.PROFILES["smoke"], n_max=None, val_per_class=None, test_per_class=None,
                                 probe_folds=[0], rhos=[100], finetune_folds=[0], rescue_head_epochs=1,
                                 rescue_strengths=[0.0, 1.0], rescue_siglip_path=None))
    assert cfg.cell_crop

    # the base run: saved predictions as train.predictions_frame writes them
    classes = list(B.PBC_LT_CLASSES)
    _, sets = pbc_lt_sets(cfg, cell_centred(table, cfg), definition, 100, 0)
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    rng = np.random.default_rng(0)
    for name in ("val_degraded", "test_degraded"):
        probs = rng.dirichlet(np.ones(len(classes)), size=len(sets[name]))
        predictions_frame(sets[name], probs, classes).to_csv(base_dir / f"predictions_{name}.csv", index=False)
    assert "cell_crop" not in pd.read_csv(base_dir / "predictions_val_degraded.csv")

    extracted = []

    def fake_extract(backbone, needed, *args, **kwargs):
        extracted.append(needed.copy())
        return np.random.default_rng(len(needed)).normal(size=(len(needed), 8)).astype(np.float32)

    class FakeMorphology:
        VERSION = "fake"

        @classmethod
        def in_cache(cls, root, cache_dir):
            def measure(t):
                r = np.random.default_rng(len(t)).normal(size=(len(t), len(PAPER_FEATURES)))
                return pd.DataFrame({f"km_{f}": r[:, j] for j, f in enumerate(PAPER_FEATURES)}
                                    | {f: r[:, j] for j, f in enumerate(PAPER_FEATURES)})
            return measure

    from wbclib.morphology import PAPER_FEATURES
    monkeypatch.setattr(embeddings, "extract_embeddings", fake_extract)
    monkeypatch.setattr(embeddings, "create_backbone", lambda *a, **k: None)
    monkeypatch.setattr(rescue_protocol, "MorphologyCache", FakeMorphology)

    base = pd.DataFrame([dict(rho=100, fold=0, run_dir=str(base_dir))])
    out = rescue_protocol.pbc_lt_rescue(cfg, tmp_path / "data", splits, tmp_path / "cache", tmp_path / "results",
                                        base, rho=100, folds=[0])
    assert set(out["phase"]) >= {"base"} and len(out) > 1
    needed = pd.concat(extracted)
    assert len(needed) and (needed["cell_crop"].astype(float) == COMMON_RATIO).all()
    # the val/test rows were among them, with their draws
    test_paths = set(sets["test_degraded"]["path"])
    assert test_paths <= set(needed["path"])


def test_with_loader_columns_joins_on_path_and_checks_the_draw():
    pred = pd.DataFrame(dict(path=["b", "a"], label=["X", "Y"], degradation=["blur", "none"], severity=[2, 0],
                             pred=["X", "X"]))
    rows = pd.DataFrame(dict(path=["a", "b"], label=["Y", "X"], degradation=["none", "blur"], severity=[0, 2],
                             cell_crop=[0.65, 0.65], stain=["macenko", "macenko"], split="test"))
    out = rescue_protocol.with_loader_columns(pred, rows)
    assert out["path"].tolist() == ["b", "a"] and out["cell_crop"].tolist() == [0.65, 0.65]
    assert out["stain"].tolist() == ["macenko"] * 2 and out["pred"].tolist() == ["X", "X"]
    with pytest.raises(ValueError, match="severity"):
        rescue_protocol.with_loader_columns(pred.assign(severity=[1, 0]), rows)
    with pytest.raises(LookupError):
        rescue_protocol.with_loader_columns(pred.assign(path=["b", "c"]), rows)
