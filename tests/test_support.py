"""Registry, profiles, augmentation presets, plots and the embedding store."""
import dataclasses

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
import torch

from wbclib import augment, embeddings, plots, profiles
from wbclib.registry import Registry


def test_registry_create_list_and_errors():
    reg = Registry("widget")
    reg.register("b")(lambda x=1: ("b", x))
    reg.register("a")(lambda: "a")
    assert reg.names() == ["a", "b"] and "a" in reg
    assert reg.create("b", x=3) == ("b", 3)
    with pytest.raises(KeyError, match="unknown widget 'c'; registered: a, b"):
        reg.get("c")
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("a")(lambda: None)


def test_profiles_and_output_dirs(tmp_path, monkeypatch):
    assert profiles.get("cpu").image_size == 128
    assert profiles.get("gpu").n_max is None
    assert set(profiles.PROFILES["smoke"]) == set(profiles.PROFILES["cpu"]) == set(profiles.PROFILES["gpu"])
    with pytest.raises(profiles.ProfileError, match="unknown profile 'big'"):
        profiles.get("big")
    monkeypatch.setenv("WBC_RESULTS_DIR", str(tmp_path / "r"))
    assert profiles.output_dir("results") == (tmp_path / "r").resolve() and (tmp_path / "r").is_dir()
    assert profiles.output_dir("results", tmp_path / "x") == (tmp_path / "x").resolve()


def test_profile_overrides_are_typed_and_validated(monkeypatch):
    cfg = profiles.get("cpu", {"probe_epochs": "60", "rescue_strengths": "[0, 1, 2]", "n_max": "null"})
    assert cfg.probe_epochs == 60 and cfg.rescue_strengths == [0.0, 1.0, 2.0] and cfg.n_max is None
    assert profiles.get("cpu", lr=1).lr == 1.0 and isinstance(profiles.get("cpu", lr=1).lr, float)
    with pytest.raises(profiles.ProfileError, match="did you mean 'probe_epochs'"):
        profiles.get("cpu", {"probe_epoch": 3})
    with pytest.raises(profiles.ProfileError, match="'probe_epochs' takes int"):
        profiles.get("cpu", {"probe_epochs": "many"})
    with pytest.raises(profiles.ProfileError, match="takes bool"):
        profiles.get("cpu", dg_swad=1)
    with pytest.raises(profiles.ProfileError, match="key=value"):
        profiles.parse_overrides(["probe_epochs"])
    monkeypatch.setenv("WBC_SET", "probe_epochs=7; lt_backbones=[tf_efficientnet_lite0]")
    cfg = profiles.get("smoke")
    assert cfg.probe_epochs == 7 and cfg.lt_backbones == ["tf_efficientnet_lite0"]
    assert profiles.get("smoke", probe_epochs=9).probe_epochs == 9  # explicit beats the environment
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.probe_epochs = 1
    assert cfg.replace(tta_views=4).tta_views == 4 and cfg.tta_views == 8
    assert profiles.get("smoke", "{probe_epochs: 11}").probe_epochs == 11  # a string, as papermill -p passes it


def test_dihedral_jitter_keeps_shape_and_is_seeded():
    x = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    aug = augment.make_augmentation("dihedral_jitter", 16)
    torch.manual_seed(0)
    a = aug(x)
    torch.manual_seed(0)
    b = aug(x)
    assert a.shape == x.shape and a.dtype == torch.uint8 and torch.equal(a, b)
    assert augment.make_augmentation("none", 16) is None
    rotations = {tuple(augment.RandomRot90()(x).flatten()[:4].tolist()) for _ in range(50)}
    assert len(rotations) == 4


def test_plots_return_figures_with_the_expected_panels(root):
    table = pd.DataFrame({"label": ["a", "a", "b"], "lab": ["x", "y", "x"]})
    assert len(plots.class_counts(table).axes) == 1
    cm = np.array([[3, 1], [0, 4]])
    fig = plots.confusion_matrix(cm, ["a", "b"])
    assert fig.axes[0].get_xlabel() == "predicted"
    path = next((root / "zheng1" / "images").glob("*.png"))
    assert len(plots.degradation_grid(path, "k").axes) == 3 * 5
    bars = pd.DataFrame({"rho": ["1", "1", "10", "10"], "set": ["t", "d", "t", "d"], "f1": [0.5, 0.4, 0.3, 0.2],
                         "lo": [0.4, 0.3, 0.2, 0.1], "hi": [0.6, 0.5, 0.4, 0.3]})
    fig = plots.metric_bars(bars, x="rho", y="f1", hue="set", low="lo", high="hi")
    error_bars = [line for line in fig.axes[0].lines if len(line.get_xdata()) == 2]
    assert sorted(tuple(l.get_ydata()) for l in error_bars) == sorted(zip(bars.lo, bars.hi))
    matplotlib.pyplot.close("all")


def test_embedding_store_looks_rows_up_by_path_and_degradation(root, tmp_path):
    paths = sorted((root / "zheng1" / "images").glob("*.png"))[:3]
    base = pd.DataFrame({"path": [str(p.relative_to(root)) for p in paths], "label": "neutrophil",
                         "degradation": "gaussian_blur", "severity": 0})
    blurred = base.assign(severity=4)
    store = embeddings.EmbeddingStore([base, blurred, base.iloc[:1]], "tf_efficientnet_lite0", 32, root, tmp_path)
    assert store.features.shape == (6, 1280)
    np.testing.assert_array_equal(store(base.iloc[[2, 0]]), store(base)[[2, 0]])
    assert not np.allclose(store(base), store(blurred))
    with pytest.raises(KeyError):
        store(base.assign(severity=2))
