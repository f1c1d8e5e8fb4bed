"""The system chapter's cumulative ablation: rows in order with paired
intervals, each stage switched on changes what it should (and only that),
shared preprocessing gives the same predictions as ``wbc predict``, and the
chapter executes under the smoke profile."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from wbclib import apply, bundle, runbook
from wbclib.data import load_image
from wbclib.protocols import system

from test_pipeline import CLASSES, tiny_pipeline, zheng1_paths  # noqa: F401 - the fixture is reused

ROWS = list(system.ABLATION_ROWS)


@pytest.fixture(scope="module")
def stage1_heads(tiny_pipeline):  # noqa: F811
    torch.manual_seed(1)
    return [nn.Linear(tiny_pipeline.members[0].model.num_features, len(CLASSES)).eval()]


def test_rows_switch_on_one_stage_group_at_a_time(tiny_pipeline, stage1_heads):  # noqa: F811
    rows = system.ablation_pipelines(tiny_pipeline, stage1_heads)
    assert list(rows) == ROWS
    on = {name: {s for s, v in p.enabled.items() if v} for name, p in rows.items()}
    assert on["base"] == set()
    # Cumulative: each row keeps everything the row above had.
    for above, below in zip(ROWS, ROWS[1:]):
        assert on[above] <= on[below], (above, below)
    assert on["+ ensemble + TTA"] - on["+ decoupled heads"] == {"tta"}
    assert on["+ rescue"] - on["+ ensemble + TTA"] == {"rescue"}
    # Heads: the stage-1 classifier up to "+ stain", the bundle's decoupled heads after; networks shared.
    assert rows["+ stain"].members[0].head is stage1_heads[0]
    assert rows["+ decoupled heads"].members[0].head is tiny_pipeline.members[0].head
    assert all(p.members[0].model is tiny_pipeline.members[0].model for p in rows.values())
    assert tiny_pipeline.enabled == {s: True for s in tiny_pipeline.enabled}  # the bundle's pipeline is untouched


def test_a_stage_switched_on_changes_predictions_where_it_should(tiny_pipeline, stage1_heads, root):  # noqa: F811
    rows = system.ablation_pipelines(tiny_pipeline, stage1_heads)
    clean = load_image(zheng1_paths(root, 1)[0])
    noisy = clean.copy()
    noisy.reshape(-1, 3)[::20] = 255
    field = load_image(root / "bccd" / "fields" / "BloodImage_00001.jpg")
    # Restoration acts on a noisy image and leaves a clean one as it was.
    assert not np.array_equal(rows["base"].preprocess(noisy)[0], rows["+ restoration"].preprocess(noisy)[0])
    assert np.array_equal(rows["base"].preprocess(clean)[0], rows["+ restoration"].preprocess(clean)[0])
    # Isolation crops a whole field (once the images are called fields); scale and stain change the pixels.
    as_fields = {k: p.with_isolation("field") for k, p in rows.items()}
    x_before, d_before = as_fields["+ restoration"].preprocess(field)
    x_after, d_after = as_fields["+ isolation/scale"].preprocess(field)
    assert not d_before["field"] and d_after["field"] and not np.array_equal(x_before, x_after)
    assert not np.array_equal(rows["+ isolation/scale"].preprocess(clean)[0], rows["+ stain"].preprocess(clean)[0])
    # The head swap and TTA change probabilities, not the network's input.
    x = np.stack([rows["+ stain"].preprocess(clean)[0]])
    assert np.array_equal(x[0], rows["+ decoupled heads"].preprocess(clean)[0])
    p_stain, p_heads = rows["+ stain"].proba(x), rows["+ decoupled heads"].proba(x)
    p_tta = rows["+ ensemble + TTA"].proba(x, tta=True)
    assert not np.allclose(p_stain, p_heads) and not np.allclose(p_heads, p_tta)
    assert np.allclose(rows["+ ensemble + TTA"].proba(x, tta=False), p_heads)
    # Rescue changes decisions only: same probabilities, and the rows it did not rescue keep their class.
    images = [load_image(p) for p in zheng1_paths(root, 8)]
    before = rows["+ ensemble + TTA"].predict_images(images, tta=True)
    after = rows["+ rescue"].predict_images(images, tta=True)
    probs = [f"prob_{c}" for c in CLASSES]
    np.testing.assert_allclose(before[probs].to_numpy(float), after[probs].to_numpy(float))
    assert (before["rescue"] == "off").all() and (after["rescue"] != "off").all()
    kept = ~after["rescued"].astype(bool)
    assert (after.loc[kept, "pred"] == before.loc[kept, "pred"]).all()
    assert (after.loc[~kept, "pred"] == "eosinophil").all()  # the tiny rule's one rare class


def test_shared_preprocessing_predicts_as_wbc_predict(tiny_pipeline, stage1_heads, root, tmp_path):  # noqa: F811
    """The ablation's rows (preprocessing shared between them) give, row for
    row, the predictions of the same pipeline without sharing; the full row is
    what ``wbc predict --tta`` gives on the saved bundle."""
    images = pd.DataFrame(dict(path=[str(p) for p in zheng1_paths(root, 6)],
                               label=["neutrophil", "lymphocyte", "neutrophil", "monocyte", "eosinophil",
                                      "neutrophil"]))
    preds = system.ablation_predictions(tiny_pipeline, stage1_heads, images, False, tmp_path)
    assert list(preds) == ROWS
    plain = system.ablation_pipelines(tiny_pipeline, stage1_heads)
    for name in ("base", "+ stain", "+ rescue"):
        p = plain[name]
        direct = p.predict_files(images["path"].tolist(), tta=p.enabled["tta"], progress=False)
        cols = ["pred", *[f"prob_{c}" for c in CLASSES], "restored", "scale_factor", "rescue"]
        pd.testing.assert_frame_equal(preds[name][cols].reset_index(drop=True), direct[cols].reset_index(drop=True))
    assert type(tiny_pipeline).__name__ == "Pipeline"  # sharing never leaks into the bundle's pipeline
    bundle.save(tiny_pipeline, tmp_path / "model")
    cli = apply.predict(tmp_path / "model", tmp_path / "images.csv", tta=True, progress=False)
    np.testing.assert_allclose(cli[[f"prob_{c}" for c in CLASSES]].to_numpy(float),
                               preds["+ rescue"][[f"prob_{c}" for c in CLASSES]].to_numpy(float), atol=1e-6)
    assert (cli["pred"] == preds["+ rescue"]["pred"]).all()


def test_score_ablation_pairs_each_row_with_the_one_above():
    rng = np.random.default_rng(0)
    labels = rng.choice(CLASSES, 200)
    preds, current = {}, rng.choice(CLASSES, 200)
    for k, row in enumerate(ROWS):
        fix = rng.random(200) < 0.12 * k
        current = np.where(fix, labels, current)
        preds[row] = pd.DataFrame(dict(path=[f"{i}.png" for i in range(200)], label=labels, pred=current,
                                       error="", restored=False, field=False, rescued=False, abstain=False))
    table = system.score_ablation(preds, CLASSES, n_boot=200)
    assert table["row"].tolist() == ROWS and table["step"].tolist() == list(range(len(ROWS)))
    assert table.loc[0, ["gain", "gain_low", "gain_high"]].isna().all()
    assert (table["macro_f1_low"] <= table["macro_f1"]).all() and (table["macro_f1"] <= table["macro_f1_high"]).all()
    later = table.iloc[1:]
    np.testing.assert_allclose(later["gain"].to_numpy(), np.diff(table["macro_f1"].to_numpy()), atol=1e-12)
    assert ((later["gain_low"] <= later["gain"]) & (later["gain"] <= later["gain_high"])).all()
    assert (later["changed"] > 0).all()


def test_pbc_set_is_drawn_from_the_phase2_test_mix_like_test_degraded():
    """Chapter 11's pbc set: the phase-2 test mix (about 40 % pristine,
    severities skewed harder), each image's kind and severity those of the
    chapters' ``test_degraded``; not the all-degraded stress draw."""
    from wbclib import benchmarks as B
    from wbclib.degrade import PHASE2_MIXES, assign_degradations

    paths = [f"pbc/{c}/{c}_{i}.jpg" for c in ("neutrophil", "lymphocyte") for i in range(100)]
    kinds, levels = system.phase2_test_draw(paths, seed=0)
    assert kinds == assign_degradations(paths, 0)[0]
    shares = pd.Series(levels).value_counts(normalize=True).reindex(range(5), fill_value=0.0)
    declared = PHASE2_MIXES["test"].shares()
    for severity in range(5):
        assert abs(shares[severity] - declared[severity]) < 0.1, (severity, shares.to_dict(), declared)
    assert 0.25 < shares[0] < 0.55  # pristine images are part of the set (the stress draw has none)
    # the same draw as PBC-LT's test_degraded for the same paths
    rows = pd.DataFrame(dict(path=paths, label="x", split="test"))
    drawn = B.phase2(rows.assign(**{f"{r}_severity": v for r, v in B.assign_phase2(
        paths, 0, {r: PHASE2_MIXES[r] for r in B.PHASE2_ROLES}).items()}))
    assert drawn["severity"].tolist() == levels


def test_pbc_set_images_at_severity_0_are_the_pristine_files(tmp_path):
    from test_infer import cell_image
    from conftest import write_png
    from wbclib.models import load_table_image

    rng = np.random.default_rng(0)
    paths = [str(write_png(tmp_path / "data" / "pbc" / "x" / f"c{i}.png", cell_image(rng)).relative_to(
        tmp_path / "data")) for i in range(12)]
    table = pd.DataFrame(dict(path=paths, label="neutrophil"))
    out = system.phase2_images(table, tmp_path / "data", tmp_path / "cache", seed=0)
    assert out["severity"].tolist() == system.phase2_test_draw(paths, 0)[1]
    assert (out["severity"] == 0).any() and (out["severity"] > 0).any()
    for rel, row in zip(paths, out.itertuples()):
        image = load_image(row.path)
        assert np.array_equal(image, load_table_image(tmp_path / "data", rel, row.degradation, row.severity, 0))
        assert np.array_equal(image, load_image(tmp_path / "data" / rel)) == (row.severity == 0)


def test_ablation_verdicts_qualify_trained_stages_and_say_intervals_are_unadjusted():
    rows = list(system.ABLATION_ROWS)
    gains = pd.DataFrame(dict(set="zheng1", row=rows, gain=[np.nan] + [0.05] * (len(rows) - 1),
                              gain_low=[np.nan] + [0.01] * (len(rows) - 1),
                              gain_high=[np.nan] + [0.09] * (len(rows) - 1)))
    text = system.ablation_verdicts(gains)
    lines = {line.split(", ", 1)[1].split(":")[0]: line for line in text.splitlines() if line.startswith("- ")}
    assert set(lines) == set(rows[1:])
    assert system.rows_trained_with() == ["+ isolation/scale", "+ stain"]
    for row, line in lines.items():
        assert (system.TRAINED_WITH_NOTE in line) == (row in ("+ isolation/scale", "+ stain")), line
    assert "unadjusted for multiple comparisons (6 gains checked)" in text
    # a pipeline trained without stain normalisation: only the scale row carries the caveat
    no_stain = dict(system.BEST_PIPELINE["cpu"], stain=False)
    assert system.rows_trained_with(no_stain) == ["+ isolation/scale"]
    quiet = gains.assign(gain_low=-0.01)
    assert system.ablation_verdicts(quiet).startswith("No row's paired interval excludes zero on any set.")
    assert "unadjusted" in system.ablation_verdicts(quiet)


@pytest.mark.slow
def test_chapter_runs_under_smoke_and_its_ablation_reads_back(root, tmp_path_factory):
    work = tmp_path_factory.mktemp("system")
    params = {"data_root": str(root), "results_dir": str(work / "results"), "cache_dir": str(work / "cache")}
    done = runbook.execute("smoke", names=["11"], out_dir=work / "executed", parameters=params, progress=False,
                           log=lambda _: None)
    assert [p.name for p in done] == ["11_system.ipynb"]
    cells = json.loads(done[0].read_text())["cells"]
    assert sum("image/png" in o.get("data", {}) for c in cells for o in c.get("outputs", [])) >= 2
    # The protocol's table, read back from the run folders the chapter wrote.
    table = system.system_ablation("smoke", root, work / "results", work / "cache")
    assert set(table["set"]) == set(system.ABLATION_SETS)
    for _, part in table.groupby("set"):
        assert part["row"].tolist() == ROWS
        assert part[["macro_f1", "macro_f1_low", "macro_f1_high"]].notna().all().all()
        assert part.iloc[1:][["gain", "gain_low", "gain_high"]].notna().all().all()
    for run_dir in table["run_dir"].unique():
        config = json.loads((Path(run_dir) / "config.json").read_text())
        assert config["identity"]["protocol"] == "system/ablation"
    fields = table[table["set"] == "bccd fields"].set_index("row")
    assert fields.loc["base", "field"] == 0 and fields.loc["+ isolation/scale", "field"] == 1


@pytest.mark.parametrize("profile", ["smoke", "cpu", "gpu"])
def test_stage1_freezes_what_the_pipeline_chose_on_the_profiles_schedule(profile):
    # The system's frozen stages are its own choice (BEST_PIPELINE), not the long-tail chapters' profile key:
    # the cpu profile fine-tunes everything in chapters 03/04, its bundle keeps the stem and three stages.
    from wbclib import profiles, train

    cfg = profiles.get(profile)
    choice = dict(system.BEST_PIPELINE[profile])
    config = system.stage1_config(cfg, choice, "tf_efficientnet_lite0", seed=4)
    assert config.frozen_stages == choice["frozen_stages"] == 3
    assert (config.epochs, config.image_size, config.batch_size, config.seed) == \
           (cfg.finetune_epochs, cfg.image_size, cfg.batch_size, 4)
    assert config.augmentation == choice["augmentation"] and config.method == choice["method"]
    method = train.build_method(system.stage1_config(cfg.replace(pretrained=False), dict(choice, frozen_stages=0),
                                                     "tf_efficientnet_lite0"), 6, 1, [1] * 6)
    trainable = {n.split(".")[0] for n, p in method.featurizer.model.named_parameters() if p.requires_grad}
    assert "conv_stem" in trainable  # the choice reaches the network: 0 trains the stem


def test_preprocessed_files_are_the_same_from_forked_workers(tiny_pipeline, root, tmp_path, monkeypatch):  # noqa: F811
    # write_preprocessed runs its chunks in forked workers (wbclib._parallel); the PNGs are the bytes one
    # process writes, and each is what pipeline.preprocess gives for its image.
    from wbclib import _parallel

    paths = [str(p.relative_to(root)) for p in zheng1_paths(root, 70)]  # more than one chunk of 64
    table = pd.DataFrame(dict(path=paths, label="neutrophil"))
    written = {}
    for processes in (2, 1):
        monkeypatch.setattr(_parallel, "job_processes", lambda n=processes: n)
        out = system.write_preprocessed(tiny_pipeline, table, root, tmp_path / str(processes))
        assert list(out["path"]) == [p + ".png" for p in paths] and list(out["source_path"]) == paths
        written[processes] = [(tmp_path / str(processes) / p).read_bytes() for p in out["path"]]
    assert written[1] == written[2]
    expected = tiny_pipeline.preprocess(load_image(root / paths[-1]))[0]
    assert np.array_equal(load_image(tmp_path / "2" / (paths[-1] + ".png")), expected)
