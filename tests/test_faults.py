"""Fault injection for the experiment layer: each case of the reliability review
that once gave wrong numbers with exit 0 now recomputes or fails with an error
naming the file.

Data-level faults (SHA256SUMS formats, truncated and 16-bit images, labels.csv)
live in ``test_data_validation.py``.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import write_png
from wbclib import _io, benchmarks, cache, data, models, runs, train

CLASSES = ["lymphocyte", "neutrophil"]


@pytest.fixture
def split(synthetic_root):
    df = data.image_folder(synthetic_root, lab="toy")
    df["split"] = (["train"] * 6 + ["val"] * 4 + ["test"] * 2) * 2
    return df


def _config(**kw):
    base = dict(epochs=2, image_size=32, batch_size=8, lr=3e-3, patience=10, num_workers=0, backbone="resnet18",
                pretrained=False)
    base.update(kw)
    return train.TrainConfig(**base)


# --------------------------------------------------------------------------- caches


@pytest.fixture
def zheng_table(root):
    paths = sorted((root / "zheng1" / "images").glob("*.png"))[:4]
    return pd.DataFrame({"path": [f"zheng1/images/{p.name}" for p in paths], "label": ["x"] * 4})


@pytest.fixture(scope="module")
def lite0():
    return models.create_backbone("tf_efficientnet_lite0", pretrained=True)


def _copy_root(root, tmp_path, table):
    copy = tmp_path / "data"
    for rel in table["path"]:
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, copy / rel)
    return copy


def test_images_changed_under_a_warm_cache_are_embedded_again(root, tmp_path, zheng_table, lite0):
    copy = _copy_root(root, tmp_path, zheng_table)
    cache_dir = tmp_path / "cache"
    before = models.extract_embeddings(lite0, zheng_table, copy, 32, cache_dir=cache_dir, num_workers=0)
    for rel in zheng_table["path"]:  # colour-invert every image in place
        write_png(copy / rel, 255 - data.load_image(copy / rel))
    after = models.extract_embeddings(lite0, zheng_table, copy, 32, cache_dir=cache_dir, num_workers=0)
    assert not np.allclose(before, after)
    assert len(list(cache_dir.rglob("*.npy"))) == 2


def test_another_root_with_the_same_paths_does_not_share_a_cache_entry(root, tmp_path, zheng_table):
    a = _copy_root(root, tmp_path / "a", zheng_table)
    b = _copy_root(root, tmp_path / "b", zheng_table)
    key = lambda r: models.embedding_cache_key("b", True, 32, zheng_table, 0, root=r)  # noqa: E731
    assert key(a) != key(b)


@pytest.mark.parametrize("damage", ["nan", "truncated", "extra_rows", "text"])
def test_a_damaged_embedding_cache_names_the_file(root, tmp_path, zheng_table, lite0, damage):
    cache_dir = tmp_path / "cache"
    models.extract_embeddings(lite0, zheng_table, root, 32, cache_dir=cache_dir, num_workers=0)
    path = next(cache_dir.rglob("*.npy"))
    if damage == "nan":
        np.save(path, np.full((4, lite0.num_features), np.nan, np.float32))
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "extra_rows":
        np.save(path, np.zeros((8, lite0.num_features), np.float32))
    else:
        path.write_text("not an array")
    with pytest.raises(_io.CorruptFileError, match=str(path.name)):
        models.extract_embeddings(lite0, zheng_table, root, 32, cache_dir=cache_dir, num_workers=0)


def test_cache_entries_are_listed_and_cleared(tmp_path):
    entry = cache.entry(tmp_path, "demo", dict(a=1), modules=["cache.py"])
    cache.array(entry, lambda: np.arange(3.0))
    other = cache.entry(tmp_path, "demo", dict(a=2), modules=["cache.py"])
    assert other.path != entry.path
    listed = cache.info(tmp_path)
    assert listed["kind"].tolist() == ["demo"] and listed["file"].iloc[0].startswith("demo/")
    assert cache.clear(tmp_path, "demo") == 2 and cache.info(tmp_path).empty


# --------------------------------------------------------------------------- writes


def test_a_computed_cache_array_is_laid_out_as_a_loaded_one(tmp_path):
    # Channels-last feature maps (what a trunk returns) reach the caller C-contiguous whether the
    # entry was computed now or read back: a convolution over them rounds differently otherwise.
    maps = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    channels_last = maps.contiguous(memory_format=torch.channels_last).numpy()
    assert not channels_last.flags["C_CONTIGUOUS"]
    entry = cache.entry(tmp_path, "demo", dict(a=1), modules=["cache.py"])
    computed = cache.array(entry, lambda: channels_last)
    loaded = cache.array(entry, lambda: pytest.fail("recomputed"))
    assert computed.flags["C_CONTIGUOUS"] and computed.strides == loaded.strides
    assert np.array_equal(computed, loaded) and np.array_equal(computed, maps.numpy())


def test_a_failed_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "table.csv"
    _io.write_csv(target, pd.DataFrame({"a": [1, 2]}))

    class Broken(pd.DataFrame):
        def to_csv(self, path, **kwargs):
            open(path, "w").write("a\n1\n")  # half written, then the disk fills up
            raise OSError(28, "No space left on device")

    with pytest.raises(_io.WriteError, match="table.csv"):
        _io.write_csv(target, Broken({"a": [1, 2, 3]}))
    assert pd.read_csv(target)["a"].tolist() == [1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]


def test_a_partial_or_foreign_split_is_rebuilt(root, tmp_path, monkeypatch):
    splits, built = tmp_path / "splits", []
    real_write = benchmarks.write_benchmarks

    def counting_write(*args, **kwargs):
        built.append(1)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(benchmarks, "write_benchmarks", counting_write)
    monkeypatch.setattr(benchmarks, "make_pbc_lt", _tiny_pbc_lt)
    monkeypatch.setattr(benchmarks, "make_crosslab", lambda m, seed: m.head(7))
    monkeypatch.setattr(data, "all_manifests", lambda r, cache_dir=None: _fake_manifest(r))
    benchmarks.ensure_benchmarks(splits, root)
    benchmarks.ensure_benchmarks(splits, root)
    assert len(built) == 1  # current files are reused
    crosslab = splits / "crosslab_seed0.csv"
    crosslab.write_text(crosslab.read_text()[:40])  # a write that stopped half-way
    benchmarks.ensure_benchmarks(splits, root)
    assert len(built) == 2 and len(benchmarks.read_crosslab(splits)) == 7
    other = tmp_path / "other_root"
    (other / "pbc").mkdir(parents=True)
    benchmarks.ensure_benchmarks(splits, other)
    assert len(built) == 3  # built on another data root: rebuilt


def _fake_manifest(root):
    return pd.DataFrame({"path": [f"pbc/x{i}.jpg" for i in range(9)], "source": "pbc", "label": "neutrophil",
                         "sha256": [str(i) for i in range(9)]})


def _tiny_pbc_lt(manifest, seed):
    return manifest.head(5), benchmarks.PbcLtDefinition(seed=seed, test_fraction=0.2, n_folds=5, head_order=[])


# --------------------------------------------------------------------------- run folders


def test_a_changed_configuration_gets_its_own_run_folder(tmp_path):
    a = runs.run(tmp_path, "demo", dict(rho=100, probe_epochs=40), keys=["rho"])
    b = runs.run(tmp_path, "demo", dict(rho=100, probe_epochs=60), keys=["rho"])
    assert a.dir != b.dir and a.dir.name.startswith("rho-100_")
    a.finish([dict(macro_f1=0.5)])
    again = runs.run(tmp_path, "demo", dict(rho=100, probe_epochs=40), keys=["rho"])
    assert again.dir == a.dir and again.metrics() == [dict(macro_f1=0.5)] and b.metrics() is None
    assert runs.find(tmp_path, "demo", rho=100)["probe_epochs"].tolist() == [40]


def test_a_tampered_config_is_refused_with_the_differing_keys(tmp_path):
    run = runs.run(tmp_path, "demo", dict(rho=100, probe_epochs=40), keys=["rho"])
    stored = json.loads(run.path("config.json").read_text())
    stored["identity"]["config"]["probe_epochs"] = 1
    run.path("config.json").write_text(json.dumps(stored))
    with pytest.raises(runs.RunMismatch, match="config.probe_epochs"):
        runs.run(tmp_path, "demo", dict(rho=100, probe_epochs=40), keys=["rho"])


def test_corrupt_run_files_name_the_file(tmp_path):
    run = runs.run(tmp_path, "demo", dict(rho=1))
    run.finish({"ok": 1})
    run.path("metrics.json").write_text('{"ok": ')
    with pytest.raises(_io.CorruptFileError, match="metrics.json"):
        run.metrics()
    run.path("config.json").write_bytes(b"\x00\x01")
    with pytest.raises(_io.CorruptFileError, match="config.json"):
        runs.run(tmp_path, "demo", dict(rho=1))


def test_finished_run_is_not_reused_for_another_split(split, synthetic_root, tmp_path):
    config = _config(epochs=1)
    first, _ = train.train_in(tmp_path, "demo/finetune", dict(fold=0), config, split, synthetic_root, CLASSES, n_boot=0)
    swapped = split.assign(split=split["split"].map({"train": "test", "test": "train", "val": "val"}))
    second, _ = train.train_in(tmp_path, "demo/finetune", dict(fold=0), config, swapped, synthetic_root, CLASSES,
                               n_boot=0)
    assert second.dir != first.dir
    assert len(pd.read_csv(second.path("predictions_test.csv"))) == (swapped["split"] == "test").sum()


def test_an_interrupted_run_does_not_resume_on_other_data(split, synthetic_root, tmp_path):
    run = tmp_path / "run"
    train.train_run(_config(epochs=1), split, synthetic_root, run, CLASSES, n_boot=0)
    (run / "done").unlink()  # as if killed after the checkpoint
    swapped = split.assign(split=split["split"].map({"train": "test", "test": "train", "val": "val"}))
    with pytest.raises(runs.RunMismatch, match="inputs"):
        train.train_run(_config(epochs=1), swapped, synthetic_root, run, CLASSES, n_boot=0)


@pytest.mark.parametrize("damage", [b"", b"\xaf\x00garbage", None])
def test_a_corrupt_checkpoint_names_the_file(split, synthetic_root, tmp_path, damage):
    run = tmp_path / "run"
    train.train_run(_config(epochs=1), split, synthetic_root, run, CLASSES, n_boot=0)
    (run / "done").unlink()
    ckpt = run / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2] if damage is None else damage)
    with pytest.raises(_io.CorruptFileError, match="checkpoint.pt"):
        train.train_run(_config(epochs=1), split, synthetic_root, run, CLASSES, n_boot=0)


# --------------------------------------------------------------------------- determinism


def test_the_same_seed_gives_the_same_digits_with_0_or_2_workers(split, synthetic_root, tmp_path):
    torch.set_num_threads(1)
    results = {}
    for workers in (0, 2):
        run = tmp_path / f"w{workers}"
        results[workers] = train.train_run(_config(num_workers=workers, epochs=2), split, synthetic_root, run, CLASSES,
                                           n_boot=0)
        results[workers]["history"] = pd.read_csv(run / "history.csv").to_dict("list")
        results[workers]["probs"] = pd.read_csv(run / "predictions_test.csv").filter(like="prob_").to_numpy()
    np.testing.assert_array_equal(results[0].pop("probs"), results[2].pop("probs"))
    assert results[0] == results[2]
    # Both runs share one identity: the worker count is not part of it.
    ids = [json.loads((tmp_path / f"w{w}" / "config.json").read_text())["identity"] for w in (0, 2)]
    assert ids[0] == ids[1]


def test_each_draw_gets_its_own_augmentation_seed():
    from wbclib.samplers import SeededDraws, draw_seed, make_sampler

    draws = list(SeededDraws(make_sampler("class_balanced", [0, 0, 0, 1], seed=3), seed=3, epoch=1))
    assert [s for _, s in draws] == [draw_seed(3, 1, k) for k in range(4)]
    assert len({s for _, s in draws}) == 4 and draw_seed(3, 1, 0) != draw_seed(3, 2, 0)


def test_a_class_too_small_to_split_is_named():
    rows = [dict(path=f"pbc/x/{c}_{i}.jpg", fine_label=c) for c in benchmarks.PBC_LT_CLASSES for i in range(10)]
    manifest = pd.DataFrame(rows[:-9])  # the last class keeps one image
    last = benchmarks.PBC_LT_CLASSES[-1]
    with pytest.raises(data.DataError, match=f"too few for: {last} \\(1\\)"):
        benchmarks.make_pbc_lt(manifest)


def test_compare_reports_runs_whose_digits_differ(tmp_path):
    for folder, value in (("a", 0.5), ("b", 0.5)):
        runs.run(tmp_path / folder, "demo", dict(rho=1), keys=["rho"]).finish(dict(macro_f1=value))
    assert runs.compare(tmp_path / "a", tmp_path / "b").empty
    runs.run(tmp_path / "b", "demo", dict(rho=2), keys=["rho"]).finish(dict(macro_f1=0.1))
    run = runs.run(tmp_path / "b", "demo", dict(rho=1), keys=["rho"])
    run.path("metrics.json").write_text(json.dumps(dict(macro_f1=0.50000001)))
    problems = runs.compare(tmp_path / "a", tmp_path / "b")
    assert sorted(problems["problem"].str.split().str[0]) == ["metrics", "only"]


def test_a_failing_chapter_is_one_line_naming_the_notebook(tmp_path, monkeypatch, capsys):
    from wbclib import cli

    monkeypatch.chdir(tmp_path)
    rc = cli.main(["book", "execute", "--profile", "smoke", "--only", "01", "--root", str(tmp_path / "missing"),
                   "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and err.startswith("wbc: error:") and "01_data_eda.ipynb failed at cell" in err
    assert "DataError" in err and "missing does not exist" in err


def test_code_version_follows_code_not_documentation(tmp_path):
    # A docstring, comment or blank-line edit keeps every finished run; a code edit recomputes them.
    from wbclib.runs import _source_hash

    def version(source: str, name: str) -> str:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "algo.py").write_text(source)
        return _source_hash(str(folder), frozenset())

    base = version('"""Module."""\ndef f(x):\n    """Doc."""\n    return x * 2\n', "a")
    documented = version('"""Module, now documented."""\n\n# why\ndef f(x):  # doubling\n    """Other doc."""\n\n'
                         '    return x * 2\n', "b")
    changed = version('"""Module."""\ndef f(x):\n    """Doc."""\n    return x * 3\n', "c")
    string_value = version('"""Module."""\ndef f(x):\n    """Doc."""\n    return "x"\n', "d")
    string_other = version('"""Module."""\ndef f(x):\n    """Doc."""\n    return "y"\n', "e")
    assert documented == base
    assert changed != base and string_value != string_other  # strings that are values still count
