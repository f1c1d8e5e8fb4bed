"""Cross-lab protocol pieces: scale normalisation, SWAD, Grad-CAM, the frozen-map
regime, tables, and the end-to-end (gpu profile) path on tiny synthetic data."""
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from conftest import write_png
from wbclib import _io, crosslab, profiles, scale
from wbclib.protocols import crosslab_dg as dg
from wbclib.gradcam import grad_cam, last_conv
from wbclib.models import ImageTable
from wbclib.swad import SWAD, update_bn

# Tiny models: one intra-op thread is faster on shared cores, and deterministic.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def disc_image(size: int, radius: float, seed: int = 0) -> np.ndarray:
    """A purple 'nucleus' disc of the given radius centred on a pale pink field."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    image = np.empty((size, size, 3), np.uint8)
    image[...] = (235, 215, 220)
    inside = np.hypot(yy - size / 2 + 0.5, xx - size / 2 + 0.5) < radius
    image[inside] = (90, 40, 140)
    return np.clip(image + rng.normal(0, 3, image.shape), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------
# Scale
# --------------------------------------------------------------------------


def test_nucleus_mask_finds_the_central_disc_and_ignores_specks():
    image = disc_image(64, 12)
    image[2:5, 2:5] = (90, 40, 140)  # a speck in the corner
    mask = scale.nucleus_mask(image)
    truth = scale.nucleus_mask(disc_image(64, 12))
    assert not mask[:8, :8].any()
    assert abs(mask.mean() - np.pi * 12 ** 2 / 64 ** 2) < 0.01
    assert (mask == truth).mean() > 0.99


def test_centre_crop_pad_scales_area_fractions():
    image = disc_image(60, 10)
    crop = scale.centre_crop_pad(image, 0.5)
    pad = scale.centre_crop_pad(image, 1.5)
    assert crop.shape == (30, 30, 3) and pad.shape == (90, 90, 3)
    assert (pad[0, 0] == np.median(np.concatenate([image[0], image[-1]]), axis=0)).all()
    f = scale.nucleus_fraction(image)
    assert scale.nucleus_fraction(crop) == pytest.approx(f * 4, rel=0.1)
    assert scale.nucleus_fraction(pad) == pytest.approx(f / 2.25, rel=0.1)


def test_scale_normaliser_equalises_a_synthetic_ratio(tmp_path):
    rows = []
    for lab, radius, size in (("small", 8, 96), ("large", 20, 80), ("mid", 9, 48)):
        for i in range(5):
            path = write_png(tmp_path / lab / f"{i}.png", disc_image(size, radius * (0.9 + 0.05 * i), seed=i))
            rows.append(dict(path=str(path.relative_to(tmp_path)), lab=lab))
    table = pd.DataFrame(rows)
    before = scale.measure(table, tmp_path)
    medians = before.groupby("lab")["nucleus_fraction"].median()
    assert medians.max() / medians.min() > 3
    factors = scale.crop_factors(before, "max")
    assert factors["large"] == pytest.approx(1.0) and factors["small"] < 1
    after = scale.measure(table, tmp_path, factors).groupby("lab")["nucleus_fraction"].median()
    assert after.max() / after.min() < 1.15
    padded = scale.measure(table, tmp_path, scale.crop_factors(before, "min")).groupby("lab")["nucleus_fraction"]
    assert padded.median().max() / padded.median().min() < 1.15


def test_image_table_crops_before_resizing(tmp_path):
    image = disc_image(80, 10)
    write_png(tmp_path / "a.png", image)
    table = pd.DataFrame(dict(path=["a.png", "a.png"], label=["x", "x"], crop=[1.0, 0.5]))
    full, cropped = (ImageTable(table, tmp_path, ["x"], 40)[i][0] for i in range(2))
    assert full.shape == cropped.shape == (3, 40, 40)
    dark = lambda x: (x[1] < 100).float().mean()  # noqa: E731 - green is low inside the disc
    assert dark(cropped) == pytest.approx(4 * dark(full), rel=0.15)


# --------------------------------------------------------------------------
# SWAD
# --------------------------------------------------------------------------


def test_swad_average_is_the_mean_of_the_collected_weights_in_the_loss_valley():
    model = nn.Linear(2, 1)
    averager = SWAD(n_converge=2, n_tolerance=2, tolerance_ratio=0.3)
    losses = [3.0, 2.0, 1.0, 1.1, 1.2, 5.0, 5.0]
    collected = []
    for segment, loss in enumerate(losses):
        for step in range(2):
            with torch.no_grad():
                model.weight.fill_(10 * segment + step)
                model.bias.fill_(-segment)
            collected.append((segment, model.weight.clone(), model.bias.clone()))
            averager.collect(model)
        averager.end_segment(loss)
    state = averager.averaged_state(model)
    # converged at segment 2 (1.0 stays lowest of (1.0, 1.1)); threshold 1.3 * 1.05;
    # 1.2 still under it, then 5.0, 5.0 close the valley
    assert averager.window == [2, 3, 4]
    chosen = [(w, b) for s, w, b in collected if s in (2, 3, 4)]
    assert torch.allclose(state["weight"], torch.stack([w for w, _ in chosen]).mean(0))
    assert torch.allclose(state["bias"], torch.stack([b for _, b in chosen]).mean(0))


def test_swad_without_a_valley_falls_back_to_the_best_segment_and_update_bn_runs():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    averager = SWAD(n_converge=3)
    for loss in (3.0, 2.0):
        averager.collect(model)
        averager.end_segment(loss)
    state = averager.averaged_state(model)
    assert not averager.converged and averager.window == [1]
    model.load_state_dict(state)
    update_bn(model, [torch.randn(8, 3) + 5 for _ in range(3)])
    assert model[1].running_mean.abs().mean() > 0.5


def test_update_bn_keeps_the_statistics_of_frozen_stages():
    # A fine-tune with its stem and first stages frozen keeps their ImageNet batch statistics; SWAD's
    # re-estimation must too (resetting them left mean 0 / variance 1 there: validation macro-F1 0.39).
    from wbclib.train import TrainConfig, build_method

    method = build_method(TrainConfig(pretrained=False, image_size=32, frozen_stages=3), 3, 1, [1, 1, 1])
    model = method.featurizer.model
    stem_bn, last_bn = model.bn1, model.bn2  # frozen stem; the head's batch norm trains
    with torch.no_grad():
        stem_bn.running_mean.fill_(0.3)  # stands for ImageNet statistics
        stem_bn.running_var.fill_(2.0)
    before_last = last_bn.running_mean.clone()
    method.eval()
    update_bn(method, [torch.rand(4, 3, 32, 32) for _ in range(2)], forward=method.predict)
    assert torch.all(stem_bn.running_mean == 0.3) and torch.all(stem_bn.running_var == 2.0)
    assert not torch.allclose(last_bn.running_mean, before_last)  # re-estimated on the batches
    assert last_bn.momentum == 0.1 and not method.training  # settings and mode restored


# --------------------------------------------------------------------------
# Grad-CAM
# --------------------------------------------------------------------------


def blob_batch(n: int, rng, size: int = 16):
    """Class 1 images hold a bright 4x4 blob at a random place; class 0 are noise."""
    x = torch.tensor(rng.normal(0, 0.3, (n, 1, size, size)), dtype=torch.float32)
    y = torch.tensor(rng.integers(0, 2, n))
    where = rng.integers(0, size - 4, (n, 2))
    for i in range(n):
        if y[i]:
            x[i, 0, where[i, 0]: where[i, 0] + 4, where[i, 1]: where[i, 1] + 4] += 2.0
    return x, y, where


def test_grad_cam_shape_and_peak_on_the_discriminative_blob():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        x, y, _ = blob_batch(32, rng)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    x, y, where = blob_batch(64, rng)
    positives = y == 1
    cams = grad_cam(model, last_conv(model), x[positives], torch.ones(int(positives.sum()), dtype=torch.long))
    assert cams.shape == (int(positives.sum()), 16, 16)
    assert float(cams.min()) >= 0 and float(cams.max()) <= 1 + 1e-6
    peaks = [divmod(int(c.argmax()), 16) for c in cams]
    hits = [w[0] - 1 <= r <= w[0] + 4 and w[1] - 1 <= c <= w[1] + 4
            for (r, c), w in zip(peaks, where[positives.numpy()])]
    assert np.mean(hits) > 0.9


# --------------------------------------------------------------------------
# The frozen-map regime and tables
# --------------------------------------------------------------------------


def test_methods_train_on_cached_maps_with_swad():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 96)
    d = rng.integers(0, 2, 96)
    centres = rng.normal(0, 1, (4, 16, 1, 1))
    x = torch.tensor(centres[y] + rng.normal(0, 0.5, (96, 16, 3, 3)), dtype=torch.float32)
    views = x[:, None].repeat(1, 3, 1, 1, 1) + 0.1 * torch.randn(96, 3, 16, 3, 3)
    for name, train_x in (("erm", x), ("boda", x), ("sada", views)):
        method, history, swad = crosslab.train_on_maps(name, {"lr": 1e-2}, train_x, y, d, x[:32], y[:32],
                                                       epochs=8, batch_size=16, seed=0, swad={"n_converge": 2},
                                                       width=8)
        accuracy = (crosslab.predict_on_maps(method, x[32:]).argmax(1) == y[32:]).mean()
        assert len(history) == 8 and swad["window"], name
        assert accuracy > 0.6, (name, accuracy)


def test_table_one_has_the_shape_of_sada_table_one():
    rows = []
    for method in ("ERM", "SADA"):
        for seed in (0, 1):
            for setting, lab in (("LOLO:pbc", "pbc"), ("LOLO:zheng1", "zheng1"), ("LOLO:bccd", "bccd")):
                rows.append(dict(method=method, setting=setting, seed=seed, eval_set=lab,
                                 macro_f1=0.5 + 0.1 * seed, micro_f1=0.6))
                rows.append(dict(method=method, setting=setting, seed=seed, eval_set="val", macro_f1=0.9, micro_f1=0.9))
    table = dg.table_one(pd.DataFrame(rows), order=["SADA", "ERM"])
    assert list(table.index) == ["SADA", "ERM"]
    assert list(table.columns.get_level_values(0).unique()) == ["pbc", "zheng1", "bccd", "average"]
    assert table.loc["ERM", ("average", "F1-macro")] == "55.0 ± 7.1"
    assert crosslab.SADA_TABLE_I.loc["SADA", "average|F1-macro"] == 68.6


def test_profiles_carry_the_cross_lab_keys():
    keys = [k for k in profiles.PROFILES["cpu"] if k.startswith(("dg_", "sada_"))]
    assert len(keys) >= 10
    for name in profiles.PROFILES:
        cfg = profiles.get(name)
        assert set(cfg.dg_rows) <= set(crosslab.ROWS) and set(cfg.dg_ablation_rows) <= set(crosslab.ROWS)
        # the fine-tuned regime runs coupled rows only, ERM (chapter 04's run) among them
        assert "ERM" in cfg.dg_finetune_rows and set(cfg.dg_finetune_rows) <= set(cfg.dg_rows)
        assert not any(crosslab.row_hparams(cfg, r)[2] for r in cfg.dg_finetune_rows)


# --------------------------------------------------------------------------
# The end-to-end (gpu profile) path, on CPU with tiny synthetic labs
# --------------------------------------------------------------------------


def synthetic_labs(root: Path, per_class: int = 4) -> pd.DataFrame:
    """Three 'labs' with the four cross-lab classes: class = nucleus size,
    lab = stain tint and cell scale."""
    rows = []
    tints = {"pbc": (0, 0, 0), "zheng1": (20, 30, -30), "bccd": (-20, 10, 20)}
    sizes = {"pbc": 48, "zheng1": 32, "bccd": 40}
    for lab, tint in tints.items():
        for c, cls in enumerate(crosslab.CLASSES):
            for i in range(per_class):
                image = disc_image(sizes[lab], sizes[lab] * (0.12 + 0.05 * c), seed=i)
                image = np.clip(image.astype(int) + tint, 0, 255).astype(np.uint8)
                path = write_png(root / lab / cls / f"{i}.png", image)
                rows.append(dict(path=str(path.relative_to(root)), lab=lab, label=cls,
                                 part="val" if i == 0 else "train", rank=i))
    return pd.DataFrame(rows)


def test_end_to_end_path_trains_on_images_on_tiny_synthetic_labs(tmp_path):
    root, splits, results, cache = (tmp_path / n for n in ("data", "splits", "results", "cache"))
    splits.mkdir()
    synthetic_labs(root).to_csv(splits / "crosslab_seed0.csv", index=False)
    cfg = SimpleNamespace(**{**profiles.PROFILES["gpu"], "name": "test", "pretrained": False, "image_size": 32,
                             "batch_size": 8, "dg_epochs": 2, "dg_seeds": [0], "n_boot": 10, "probe_epochs": 2,
                             "crosslab_val_per_class": None, "dg_scale_per_lab": 4, "num_workers": 0})
    torch.manual_seed(0)
    out = dg.crosslab_dg(cfg, root, splits, cache, results, rows=["BoDA decoupled", "SADA"],
                               settings=["pbc→others"], progress=False)
    assert set(out["eval_set"]) == {"val", "zheng1", "bccd"} and len(out) == 6
    assert out["macro_f1"].between(0, 1).all()
    sada_run = Path(out[out["method"] == "SADA"]["run_dir"].iloc[0])
    assert sada_run.parent == results / "crosslab_dg" and sada_run.name.startswith("variant-main_method-sada_")
    assert (sada_run / "train" / "swad.pt").is_file() and (sada_run / "predictions_bccd.csv").is_file()
    # re-running reads the finished runs back
    again = dg.crosslab_dg(cfg, root, splits, cache, results, rows=["SADA"], settings=["pbc→others"],
                                 progress=False)
    assert np.allclose(again["macro_f1"], out[out["method"] == "SADA"]["macro_f1"])
    examples, images, cams = dg.gradcam_examples(cfg, root, splits, cache, results, rows=["SADA"], per_lab=1)
    assert images.shape == (3, 32, 32, 3) and cams["SADA"].shape == (3, 32, 32)


@pytest.mark.parametrize("profile", ["cpu", "gpu"])  # gpu: nothing frozen
def test_fine_tuned_rows_share_chapter_04s_erm_run_and_give_dg_methods_stain_domains(tmp_path, profile):
    from wbclib.protocols import crosslab_erm

    root, splits, results, cache = (tmp_path / n for n in ("data", "splits", "results", "cache"))
    splits.mkdir()
    synthetic_labs(root).to_csv(splits / "crosslab_seed0.csv", index=False)
    cfg = SimpleNamespace(**{**profiles.PROFILES[profile], "name": "test", "pretrained": False, "image_size": 32,
                             "batch_size": 8, "crosslab_epochs": 2, "crosslab_seeds": [0], "n_boot": 10,
                             "crosslab_train_per_class": None, "crosslab_val_per_class": None,
                             "crosslab_test_per_class": None, "num_workers": 0})
    torch.manual_seed(0)
    chapter_04 = crosslab_erm.crosslab_finetune(cfg, root, splits, results, augmentations=[crosslab_erm.STRONG])
    trained = (Path(chapter_04["run_dir"].iloc[0]) / "metrics.json").stat().st_mtime_ns
    out = dg.finetuned_rows(cfg, root, splits, cache, results, rows=["ERM", "BoDA", "SADA"])
    assert set(out["eval_set"]) == {"val", "zheng1", "bccd"} and len(out) == 9
    erm_dir = out[out["method"] == "ERM"]["run_dir"].unique()
    assert list(erm_dir) == list(chapter_04["run_dir"].unique())  # the same run folder: read back, not retrained
    assert (Path(erm_dir[0]) / "metrics.json").stat().st_mtime_ns == trained
    # One source lab: BoDA's centroid table has a row per (stain cluster, class), not one domain.
    boda = _io.torch_load(Path(out[out["method"] == "BoDA"]["run_dir"].iloc[0]) / "best.pt")
    k = crosslab.stain_clusters_k(cfg)
    assert boda["centroids"].shape[0] == k > 1
    sada = json.loads((Path(out[out["method"] == "SADA"]["run_dir"].iloc[0]) / "config.json").read_text())
    assert sada["identity"]["config"]["hparams"] == {"seed": 0, "stage1_epochs": 1}  # views drawn with the run's seed
    assert sada["identity"]["config"]["augmentation"] == crosslab_erm.STRONG
    assert sada["identity"]["config"]["frozen_stages"] == cfg.crosslab_frozen_stages
    gains = dg.finetuned_gains(out, [0], 20, ["ERM", "BoDA", "SADA"])
    assert list(gains["method"]) == ["BoDA", "SADA"] and set(gains["protocol"]) == {"pbc→others, fine-tuned"}
    # the point gain is the difference of the two rows' macro-F1, averaged over the target labs
    targets = out[out["eval_set"] != "val"].groupby("method")["macro_f1"].mean()
    assert gains.set_index("method").loc["SADA", "macro_f1_gain"] == pytest.approx(targets["SADA"] - targets["ERM"])
    if profile == "cpu":  # SADA's two stages run in full: no early stop inside the first
        assert sada["identity"]["config"]["patience"] == cfg.crosslab_epochs != cfg.patience
    with pytest.raises(ValueError, match="BoDA decoupled"):
        dg.finetuned_rows(cfg, root, splits, cache, results, rows=["BoDA decoupled"])


def test_row_hyper_parameters_have_one_home(monkeypatch):
    from wbclib.sada import SADA

    cfg = profiles.get("cpu")
    assert crosslab.resolved_hparams(cfg, "SADA")["beta"] == SADA.defaults["beta"]
    # A changed method default reaches the book (the profile only overrides when it sets a value) ...
    monkeypatch.setitem(SADA.defaults, "beta", 0.5)
    assert crosslab.resolved_hparams(cfg, "SADA")["beta"] == 0.5
    # ... the profile's value beats the default, a row's own (the ablation's beta 0) beats the profile,
    # and a sweep's beats everything.
    tuned = cfg.replace(sada_beta=2.0, sada_k=4)
    assert crosslab.resolved_hparams(tuned, "SADA")["beta"] == 2.0 and crosslab.stain_clusters_k(tuned) == 4
    assert crosslab.resolved_hparams(tuned, "M2: SADA without L_LA")["beta"] == 0.0
    assert crosslab.row_hparams(tuned, "SADA", dict(beta=0.01))[1]["beta"] == 0.01
    assert crosslab.resolved_hparams(tuned, "ERM + re-stained views")["k"] == 4


def test_maps_runs_give_the_same_digits_in_one_process_and_side_by_side(tmp_path, monkeypatch):
    # crosslab_dg runs the frozen-map heads in forked workers (wbclib._parallel): one torch thread each,
    # so the predictions are the bytes one process writes (WBC_WORKERS=0), seeds and views included.
    root, splits = tmp_path / "data", tmp_path / "splits"
    splits.mkdir()
    synthetic_labs(root).to_csv(splits / "crosslab_seed0.csv", index=False)
    cfg = SimpleNamespace(**{**profiles.PROFILES["smoke"], "name": "test", "pretrained": False, "image_size": 32,
                             "batch_size": 8, "dg_epochs": 2, "n_boot": 10, "probe_epochs": 2,
                             "crosslab_val_per_class": None, "dg_scale_per_lab": 4})
    outputs = {}
    from wbclib import _parallel

    for workers, processes in (("1", 2), ("0", 1)):  # the forked run first, each with its own cache:
        # its workers get no views or maps a previous run left on disk
        monkeypatch.setenv("WBC_WORKERS", workers)
        monkeypatch.setattr(_parallel, "job_processes", lambda n=processes: n)
        out = dg.crosslab_dg(cfg, root, splits, tmp_path / f"cache{workers}", tmp_path / f"results{workers}",
                             rows=["ERM", "SADA"], settings=["pbc→others"], seeds=[0, 1], progress=False)
        outputs[workers] = out
    one, side_by_side = outputs["0"], outputs["1"]
    assert len(one) == 2 * 2 * 3 and list(one["method"]) == list(side_by_side["method"])
    assert np.array_equal(one["macro_f1"], side_by_side["macro_f1"])
    for a, b in zip(one["run_dir"], side_by_side["run_dir"]):
        for name in ("predictions_val.csv", "predictions_bccd.csv", "history.csv"):
            assert (Path(a) / name).read_bytes() == (Path(b) / name).read_bytes()
        assert (Path(b) / "done").is_file()
    seeds = one[(one["method"] == "SADA") & (one["eval_set"] == "bccd")]
    assert (Path(seeds["run_dir"].iloc[0]) / "predictions_bccd.csv").read_bytes() != \
           (Path(seeds["run_dir"].iloc[1]) / "predictions_bccd.csv").read_bytes()  # seeds differ: equality means something


def test_trunk_maps_in_forked_jobs_are_the_maps_of_one_process(monkeypatch):
    from wbclib import _parallel

    cfg = SimpleNamespace(backbone="tf_efficientnet_lite0", pretrained=False, image_size=32, cell_crop=False)
    store = crosslab.MapStore(cfg, Path("."), Path("."), batch_size=3)  # 22 images: jobs of 4 batches of 3, the last ones short
    images = np.random.default_rng(0).integers(0, 256, (22, 3, 32, 32), dtype=np.uint8)
    monkeypatch.setattr(_parallel, "job_processes", lambda: 1)
    alone = store.trunk_maps(images)
    monkeypatch.setattr(_parallel, "job_processes", lambda: 2)
    forked = store.trunk_maps(images)
    assert alone.dtype == np.float16 and alone.shape[0] == 22
    assert np.array_equal(alone, forked)
    with torch.inference_mode():  # and they are the trunk's maps of each batch of 3, in order
        batch = torch.from_numpy(images[18:21]).contiguous(memory_format=torch.channels_last)
        expected = crosslab.feature_maps(store.trunk, batch).half().numpy()
    assert np.array_equal(alone[18:21], expected)
    assert alone.flags["C_CONTIGUOUS"] and forked.flags["C_CONTIGUOUS"]  # as a cache hit returns them
