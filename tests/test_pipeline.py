"""The assembled system: pipeline stages, the bundle round trip, predict on a
folder with junk files, whole fields vs crops, and evaluate against
scikit-learn; plus the command line end to end (train smoke -> predict ->
evaluate)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from wbclib import apply, bundle
from wbclib.protocols import system
from wbclib.data import load_image
from wbclib.heads import StandardizedLinear
from wbclib.morphology import PAPER_FEATURES, MahalanobisFilter
from wbclib.pipeline import (Isolation, Member, Pipeline, RescueStage, Restoration, ScaleNormalization,
                             StainNormalization)
from wbclib.rescue import SuppressAndRescue

REPO = Path(__file__).resolve().parent.parent
CLASSES = ["neutrophil", "lymphocyte", "monocyte", "eosinophil"]
ZHENG1_CODES = "1=neutrophil,2=lymphocyte,3=monocyte,4=eosinophil,5=basophil"


def zheng1_paths(root: Path, n: int):
    return [root / "zheng1" / "images" / f"{i:03d}.png" for i in range(1, n + 1)]


@pytest.fixture(scope="module")
def tiny_pipeline(root):
    """A pipeline with every stage fitted on 10 zheng1 images, an untrained
    EfficientNet-Lite0 (random weights, seeded) and a random head, and a
    rescue rule that uses the Mahalanobis filter: no training, every tensor kind
    a bundle holds."""
    torch.manual_seed(0)
    images = [load_image(p) for p in zheng1_paths(root, 10)]
    restoration = Restoration.fit(images)
    scale = ScaleNormalization.fit(images, crop_factors={"zheng1": 1.0})
    stain = StainNormalization.fit([scale(im)[0] for im in images])
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0).eval()
    mean, std = torch.randn(model.num_features), torch.rand(model.num_features) + 0.5
    head = StandardizedLinear(mean, std, len(CLASSES)).eval()
    member = Member("tf_efficientnet_lite0", model, head, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "dihedral_jitter")
    rng = np.random.default_rng(0)
    filt = MahalanobisFilter().fit(rng.normal(size=(40, 3)), np.repeat(CLASSES, 10))
    rule = SuppressAndRescue(rare_classes=["eosinophil"], boosts={"eosinophil": 50.0}, verify=False,
                             morphology={"eosinophil": "mahalanobis"}, tau_m={"eosinophil": 3.0}, mahalanobis=filt,
                             mahalanobis_features=PAPER_FEATURES)
    return Pipeline(classes=CLASSES, image_size=32, members=[member], restoration=restoration, scale=scale,
                    stain=stain, rescue=RescueStage(rule), tta_views=4, abstain_threshold=0.3)


def test_stages_fit_real_numbers_and_switch_off(tiny_pipeline, root):
    p = tiny_pipeline
    assert p.stain.stain_matrix.shape == (3, 2) and np.isfinite(p.stain.stain_matrix).all()
    assert 0 < p.scale.target_fraction < 1
    # The detector's threshold separates these clean images from salt-and-pepper copies of them.
    image = load_image(zheng1_paths(root, 1)[0])
    assert not p.restoration(image)[1]["restored"]
    noisy = image.copy()
    noisy.reshape(-1, 3)[::20] = 255
    restored, decision = p.restoration(noisy)
    assert decision["restored"] and np.abs(restored.astype(int) - image).mean() < np.abs(noisy.astype(int) - image).mean()
    x, d = p.preprocess(image)
    assert x.shape == (32, 32, 3) and x.dtype == np.uint8 and d["stain_normalized"] and d["scale_factor"] > 0
    # Each stage off changes what the network sees (or its decision) and says so.
    x_off, d_off = p.without("stain").preprocess(image)
    assert not d_off["stain_normalized"] and not np.array_equal(x, x_off)
    assert p.without("scale").preprocess(image)[1]["scale_factor"] == 1.0
    assert p.without("restore").preprocess(noisy)[1]["restored"] is False
    assert p.views() == 4 and p.without("tta").views() == 1
    assert (p.without("rescue").predict_images([image])["rescue"] == "off").all()
    with pytest.raises(ValueError, match="unknown stages"):
        p.without("colour")


def test_per_image_measurements_same_side_by_side(root, monkeypatch):
    """Morphology rows and noise scores (as the restoration fit computes them)
    run in chunks over forked workers: the same numbers as in this process."""
    from wbclib import _parallel, pipeline as P

    images = [load_image(p) for p in zheng1_paths(root, 6)]
    monkeypatch.setattr(P, "CHUNK", 2)  # 3 jobs
    results = {}
    for processes in (2, 1):
        monkeypatch.setattr(_parallel, "job_processes", lambda: processes)
        results[processes] = (P.morphology_rows(images), P.impulse_scores(images),
                              Restoration.fit(images, seed=3).threshold)
    pd.testing.assert_frame_equal(results[2][0], results[1][0])
    assert results[2][1:] == results[1][1:] and len(results[2][1]) == 6
    assert len(results[2][0]) == 6 and results[2][0]["nucleus_area"].notna().all()


def test_bundle_round_trip_in_a_fresh_process(tiny_pipeline, root, tmp_path):
    paths = zheng1_paths(root, 6)
    expected = tiny_pipeline.predict_files(paths, tta=True, progress=False)
    folder = bundle.save(tiny_pipeline, tmp_path / "model", training=dict(labs=["zheng1"], profile="test"),
                         metrics=dict(val=dict(macro_f1=0.5)), card=dict(known_failures=["untrained"]))
    config = json.loads((folder / "pipeline.json").read_text())
    assert config["classes"] == CLASSES and config["image_size"] == 32
    assert np.allclose(config["stages"]["stain"]["stain_matrix"], tiny_pipeline.stain.stain_matrix)
    assert "zheng1" in (folder / "MODEL_CARD.md").read_text() and "Not for diagnosis" in (folder / "MODEL_CARD.md").read_text()
    # The backbone file loads into a plain timm model: no wrapper prefixes.
    import timm
    from safetensors.torch import load_file

    plain = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    plain.load_state_dict(load_file(str(folder / "backbone_0.safetensors")), strict=True)

    loaded = bundle.load(folder)
    again = loaded.predict_files(paths, tta=True, progress=False)
    probs = [f"prob_{c}" for c in CLASSES]
    np.testing.assert_allclose(again[probs].to_numpy(float), expected[probs].to_numpy(float), atol=1e-6)
    assert loaded.rescue.rule.mahalanobis.classes_ == tiny_pipeline.rescue.rule.mahalanobis.classes_
    # Abstain thresholds per number of TTA views come back and are used for that number.
    import copy

    per_views = copy.copy(tiny_pipeline)
    per_views.abstain_by_views = {1: 1.01, 4: 0.0}
    reloaded = bundle.load(bundle.save(per_views, tmp_path / "per_views"))
    assert reloaded.abstain_by_views == {1: 1.01, 4: 0.0}
    assert reloaded.predict_files(paths, tta=False, progress=False)["abstain"].all()
    assert not reloaded.predict_files(paths, tta=True, progress=False)["abstain"].any()

    # A new interpreter with no data root: the bundle alone predicts the same.
    out = tmp_path / "fresh.npy"
    code = ("import sys, numpy as np; from wbclib import bundle; p = bundle.load(sys.argv[1]); "
            "t = p.predict_files(sys.argv[3:], tta=True, progress=False); "
            "np.save(sys.argv[2], t[[c for c in t.columns if c.startswith('prob_')]].to_numpy(float)); "
            "print(list(t['pred']))")
    env = dict(os.environ, WBC_DATA_ROOT=str(tmp_path / "no-data-here"))
    done = subprocess.run([sys.executable, "-c", code, str(folder), str(out), *map(str, paths)], env=env,
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    np.testing.assert_allclose(np.load(out), expected[probs].to_numpy(float), atol=1e-5)
    assert done.stdout.strip() == str(list(expected["pred"]))


def test_pix2pix_restorer_and_ensembles_survive_the_bundle(tiny_pipeline, root, tmp_path):
    """A Pix2Pix restorer (threshold -1: every image restored) and two members:
    the generator's weights and both members come back, and two copies of one
    member average to that member's probabilities."""
    import copy

    from wbclib.pix2pix import UNetGenerator

    torch.manual_seed(1)
    config = dict(channels=4, depth=2, residual=True, full_res=True)
    generator = UNetGenerator(**config).eval()
    p = copy.copy(tiny_pipeline)
    p.restoration = Restoration(threshold=-1.0, method="pix2pix", generator=generator, generator_config=config)
    twin = copy.copy(p)
    twin.members = [p.members[0], p.members[0]]
    images = [load_image(path) for path in zheng1_paths(root, 3)]
    one = p.without("rescue").predict_images(images)
    two = twin.without("rescue").predict_images(images)
    probs = [f"prob_{c}" for c in CLASSES]
    np.testing.assert_allclose(two[probs].to_numpy(float), one[probs].to_numpy(float), atol=1e-6)
    assert two["restored"].all()
    loaded = bundle.load(bundle.save(twin, tmp_path / "model"))
    assert len(loaded.members) == 2 and loaded.restoration.method == "pix2pix"
    assert (tmp_path / "model" / "backbone_1.safetensors").is_file()
    again = loaded.without("rescue").predict_images(images)
    np.testing.assert_allclose(again[probs].to_numpy(float), two[probs].to_numpy(float), atol=1e-6)
    # The restorer really runs: its output differs from the unrestored pipeline's input.
    x_on, _ = loaded.preprocess(images[0])
    x_off, _ = loaded.without("restore").preprocess(images[0])
    assert not np.array_equal(x_on, x_off)


def test_images_listed_from_a_csv(root, tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.png").write_bytes((root / "zheng1" / "images" / "001.png").read_bytes())
    pd.DataFrame({"path": ["sub/a.png", str(root / "zheng1" / "images" / "002.png")]}).to_csv(
        tmp_path / "list.csv", index=False)
    assert apply.list_images(tmp_path / "list.csv") == [tmp_path / "sub" / "a.png",
                                                       root / "zheng1" / "images" / "002.png"]
    assert apply.list_images(tmp_path / "sub" / "a.png") == [tmp_path / "sub" / "a.png"]
    with pytest.raises(Exception, match="neither an image folder"):
        apply.list_images(tmp_path / "missing")


def test_predict_files_reports_each_bad_file_and_goes_on(tiny_pipeline, root, tmp_path):
    folder = tmp_path / "mine"
    (folder / "a").mkdir(parents=True)
    good = zheng1_paths(root, 3)
    for p in good:
        (folder / "a" / p.name).write_bytes(p.read_bytes())
    (folder / "notes.png").write_text("not an image")
    (folder / "cut.png").write_bytes(good[0].read_bytes()[:200])
    (folder / "readme.txt").write_text("ignored: not an image name")
    paths = apply.list_images(folder)
    assert {p.name for p in paths} == {"001.png", "002.png", "003.png", "notes.png", "cut.png"}
    reported = []
    table = tiny_pipeline.predict_files(paths, progress=False, on_error=lambda p, m: reported.append(p))
    assert len(table) == 5 and list(table["path"]) == [str(p) for p in paths]
    bad = table["error"] != ""
    assert set(table.loc[bad, "path"].map(lambda s: Path(s).name)) == {"notes.png", "cut.png"}
    assert all(Path(p).name in ("notes.png", "cut.png") for p in reported) and len(reported) == 2
    assert table.loc[bad, "pred"].isna().all() and table.loc[~bad, "pred"].isin(CLASSES).all()
    probs = table.loc[~bad, [f"prob_{c}" for c in CLASSES]].to_numpy(float)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert (table.loc[~bad, "abstain"] == (table.loc[~bad, "max_prob"] < 0.3)).all()


def test_whole_fields_are_located_and_crops_pass_through(tiny_pipeline, root):
    from wbclib.segment import box_iou, read_voc_boxes

    name = "BloodImage_00001"
    field = load_image(root / "bccd" / "fields" / f"{name}.jpg")
    truth = read_voc_boxes(root / "bccd" / "annotations" / f"{name}.xml")
    auto = Isolation("auto")
    assert auto.is_field(field)
    crop, decision = Isolation("field")(field)
    box = tuple(int(v) for v in decision["box"].split())
    assert decision["field"] and max(box_iou(box, t) for t in truth) > 0.3
    assert crop.shape[0] == crop.shape[1] and crop.shape[0] < min(field.shape[:2])
    # A single-cell crop is neither located nor changed, in crop and in auto mode.
    cell = load_image(zheng1_paths(root, 1)[0])
    for mode in ("crop", "auto"):
        same, d = Isolation(mode)(cell)
        assert same is cell and not d["field"]
    # The field pipeline classifies the located cell: the same as handing it that crop.
    fields = tiny_pipeline.with_isolation("field").without("rescue").predict_images([field])
    crops = tiny_pipeline.with_isolation("crop").without("rescue").predict_images([crop])
    probs = [f"prob_{c}" for c in CLASSES]
    np.testing.assert_allclose(fields[probs].to_numpy(float), crops[probs].to_numpy(float), atol=1e-6)
    assert bool(fields["field"].iloc[0]) and not bool(crops["field"].iloc[0])


def test_evaluate_agrees_with_scikit_learn(tmp_path):
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score, precision_score

    rng = np.random.default_rng(3)
    classes = ["neutrophil", "lymphocyte", "monocyte", "basophil"]
    n = 120
    truth = rng.choice(classes[:3], n, p=[0.6, 0.3, 0.1])  # basophil never true: only predicted
    pred = np.where(rng.random(n) < 0.6, truth, rng.choice(classes, n))
    probs = rng.dirichlet(np.ones(len(classes)), n)
    table = pd.DataFrame({"path": [f"/data/img/{i:03d}.png" for i in range(1, n + 1)], "pred": pred})
    for j, c in enumerate(classes):
        table[f"prob_{c}"] = probs[:, j]
    table["abstain"] = False
    table["error"] = ""
    table.loc[0, ["pred", "error"]] = [np.nan, "broken file"]
    codes = {"neutrophil": "1", "lymphocyte": "2", "monocyte": "3"}
    # zheng1-style labels: numeric image ids and numeric class codes, one unknown class (7), one unlabelled image.
    labels = pd.DataFrame({"image ID": range(1, n + 1), "class label": [codes[t] for t in truth]})
    labels.loc[5, "class label"] = "7"
    labels = labels.drop(index=9)
    labels.to_csv(tmp_path / "labels.csv", index=False)
    result = apply.evaluate(table, apply.read_labels(tmp_path / "labels.csv"),
                            apply.parse_mapping("1=neutrophil,2=lymphocyte,3=monocyte"), n_boot=20)
    assert result["errors"] == 1 and result["unlabelled"] == 1 and result["unknown"] == {"7": 1}
    keep = np.ones(n, bool)
    keep[[0, 5, 9]] = False
    y, p = truth[keep], pred[keep]
    s = result["scores"]
    assert result["scored"] == keep.sum()
    assert s["macro_f1"] == pytest.approx(f1_score(y, p, average="macro", zero_division=0))
    assert s["macro_precision"] == pytest.approx(precision_score(y, p, average="macro", zero_division=0))
    assert s["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p))
    present = sorted(set(y) | set(p))
    cm = confusion_matrix(y, p, labels=present)
    tn = cm.sum() - cm.sum(0) - cm.sum(1) + np.diag(cm)
    assert s["macro_specificity"] == pytest.approx(np.mean(tn / (tn + cm.sum(0) - np.diag(cm))))
    assert s["macro_f1_low"] <= s["macro_f1"] <= s["macro_f1_high"]
    np.testing.assert_array_equal(result["confusion"], confusion_matrix(y, p, labels=classes))
    assert result["per_class"].loc["basophil", "support"] == 0
    # Mapping to a class the model does not have is an error, not a guess.
    with pytest.raises(ValueError, match="not model classes"):
        apply.evaluate(table, apply.read_labels(tmp_path / "labels.csv"), {"1": "blast"})


def test_labels_from_folder_names_and_mapping_files(tmp_path):
    for cls in ("Blast", "lymphocyte"):
        (tmp_path / "set" / cls).mkdir(parents=True)
        (tmp_path / "set" / cls / f"{cls}1.png").write_bytes(b"")
    labels = apply.read_labels(tmp_path / "set")
    assert dict(zip(labels["path"].map(lambda s: Path(s).name), labels["label"])) == {"Blast1.png": "Blast",
                                                                                       "lymphocyte1.png": "lymphocyte"}
    (tmp_path / "map.csv").write_text("user,model\nBlast,ig\nlymphocyte,lymphocyte\n")
    assert apply.parse_mapping(str(tmp_path / "map.csv")) == {"Blast": "ig", "lymphocyte": "lymphocyte"}
    with pytest.raises(ValueError, match="twice"):
        apply.parse_mapping("a=b,a=c")


def _wbc(*args, cwd):
    return subprocess.run([sys.executable, "-m", "wbclib", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, env=dict(os.environ, WBC_WORKERS="0"))


def test_command_line_train_predict_evaluate(root, tmp_path):
    """``wbc train --profile smoke``, then ``wbc predict`` on 20 zheng1 images
    plus a text file named .png and a truncated PNG, then ``wbc evaluate``."""
    done = _wbc("train", "--profile", "smoke", "--out", tmp_path / "model", "--data-root", root, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "bundle written" in done.stdout
    # Self-describing: the stages are those BEST_PIPELINE names (a stain stage, when
    # there is one, carries its reference as matrices), and nothing points into the data root.
    config_text = (tmp_path / "model" / "pipeline.json").read_text()
    config = json.loads(config_text)
    assert ("stain" in config["stages"]) == system.BEST_PIPELINE["smoke"]["stain"]
    if "stain" in config["stages"]:
        assert np.asarray(config["stages"]["stain"]["stain_matrix"]).shape == (3, 2)
    assert "restore" in config["stages"] and "rescue" in config["stages"]
    assert str(Path(root).resolve()) not in config_text and str(tmp_path) not in config_text
    splits = pd.read_csv(tmp_path / "model" / "training_data.csv")
    assert set(splits["split"]) == {"train", "val", "test"} and set(splits["lab"]) == {"pbc"}
    images = tmp_path / "images"
    images.mkdir()
    for p in zheng1_paths(root, 20):
        (images / p.name).write_bytes(p.read_bytes())
    (images / "junk.png").write_text("this is text, not a picture")
    (images / "truncated.png").write_bytes((root / "zheng1" / "images" / "021.png").read_bytes()[:300])
    done = _wbc("predict", "--model", tmp_path / "model", "--images", images, "--out", tmp_path / "p.csv",
                "--no-progress", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "junk.png" in done.stderr and "truncated.png" in done.stderr
    pred = pd.read_csv(tmp_path / "p.csv", keep_default_na=False)
    assert len(pred) == 22
    junk = pred["path"].map(lambda s: Path(s).name).isin(["junk.png", "truncated.png"])
    assert (pred.loc[junk, "error"] != "").all() and (pred.loc[~junk, "error"] == "").all()
    classes = json.loads((tmp_path / "model" / "pipeline.json").read_text())["classes"]
    assert pred.loc[~junk, "pred"].isin(classes).all() and (pred.loc[junk, "pred"] == "").all()
    assert {"restored", "rescue", "abstain", "scale_factor", "stain_normalized"} <= set(pred.columns)
    done = _wbc("evaluate", "--pred", tmp_path / "p.csv", "--labels", root / "zheng1" / "labels.csv",
                "--map", ZHENG1_CODES, "--n-boot", "50", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "scored 20 of 22 rows (2 with errors, 0 without a label" in done.stdout
    assert "macro_f1" in done.stdout and (tmp_path / "p_confusion.png").stat().st_size > 0
    # The same scores as evaluate() on the table, so the printed numbers are the library's.
    result = apply.evaluate(pd.read_csv(tmp_path / "p.csv"), apply.read_labels(root / "zheng1" / "labels.csv"),
                            apply.parse_mapping(ZHENG1_CODES), n_boot=0)
    assert f"macro_f1: {result['scores']['macro_f1']:.3f}" in done.stdout
    assert not math.isnan(result["scores"]["macro_f1"])
