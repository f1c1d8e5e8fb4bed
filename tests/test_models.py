import numpy as np
import pandas as pd
import pytest
import torch

from wbclib import models


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "tf_efficientnet_lite2"])
def test_lite_weights_load_every_tensor(name):
    source = torch.load(models.lite_weights_path(name), map_location="cpu", weights_only=True)
    src = [v for k, v in source.items() if not k.endswith("num_batches_tracked")]
    backbone = models.create_backbone(name, pretrained=True)
    dst = [v for k, v in backbone.model.state_dict().items() if not k.endswith("num_batches_tracked")]
    assert len(dst) == len(src) - 2  # headless: the ImageNet classifier is dropped
    for a, b in zip(src, dst):
        assert torch.equal(a, b)
    assert backbone.mean == (0.5, 0.5, 0.5) and backbone.num_features == 1280


def test_lite_weights_with_classifier_give_confident_imagenet_logits():
    import timm

    model = timm.create_model("tf_efficientnet_lite0", num_classes=1000)
    models.load_lite_weights(model, "tf_efficientnet_lite0")
    model.eval()
    # A smooth natural-looking input: a pretrained net is far from uniform on it, a random one is not.
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 224), torch.linspace(-1, 1, 224), indexing="ij")
    x = torch.stack([torch.sin(3 * xx), torch.cos(2 * yy), xx * yy])[None]
    with torch.no_grad():
        p = model(x).softmax(1)
    assert p.max() > 0.05


def test_other_backbones_random_init_and_paper_aliases():
    backbone = models.create_backbone("resnet18", pretrained=False)
    assert not backbone.pretrained and backbone.num_features == 512
    with pytest.raises(KeyError, match="no offline weights"):
        models.lite_weights_path("resnet50")
    assert models.PAPER_BACKBONES["swin_t"].startswith("swin_tiny")


def _table(root, n=6):
    paths = sorted((root / "zheng1" / "images").glob("*.png"))[:n]
    return pd.DataFrame({"path": [str(p.relative_to(root)) for p in paths], "label": ["x"] * n})


def test_image_table_resizes_degrades_and_indexes_domains(root):
    table = _table(root).assign(domain=["b", "a", "b", "a", "a", "b"], degradation="salt_pepper", severity=0)
    ds = models.ImageTable(table, root, ["x"], image_size=48)
    x, y, d = ds[0]
    assert x.shape == (3, 48, 48) and x.dtype == torch.uint8 and y == 0 and d == 1
    noisy = models.ImageTable(table.assign(severity=4), root, ["x"], image_size=48)
    assert not torch.equal(noisy[0][0], x)
    with pytest.raises(ValueError, match="not among the classes"):
        models.ImageTable(table, root, ["y"], image_size=48)


def test_embedding_cache_is_keyed_and_reused(root, tmp_path, monkeypatch):
    backbone = models.create_backbone("tf_efficientnet_lite0", pretrained=True)
    table = _table(root)
    first = models.extract_embeddings(backbone, table, root, 32, cache_dir=tmp_path, num_workers=0)
    assert first.shape == (6, 1280) and len(list(tmp_path.rglob("*.npy"))) == 1

    def no_reading(*args, **kwargs):
        raise AssertionError("a cached embedding must not read images")

    monkeypatch.setattr(models, "load_image", no_reading)
    np.testing.assert_array_equal(first, models.extract_embeddings(backbone, table, root, 32, cache_dir=tmp_path))
    key = models.embedding_cache_key
    assert key("a", True, 32, table, 0) != key("a", True, 64, table, 0)
    assert key("a", True, 32, table, 0) != key("a", True, 32, table.assign(severity=2, degradation="gaussian_blur"), 0)
    assert key("a", True, 32, table, 0) != key("b", True, 32, table, 0)


def test_random_init_needs_a_weights_tag(root):
    backbone = models.create_backbone("resnet18", pretrained=False)
    with pytest.raises(ValueError, match="weights_tag"):
        models.extract_embeddings(backbone, _table(root), root, 32)


def test_random_init_with_a_seed_is_one_network_and_leaves_the_global_generator():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = models.create_backbone("tf_efficientnet_lite0", pretrained=False, init_seed=0).model.state_dict()
    assert torch.equal(torch.rand(1), expected_next)  # the caller's random stream is untouched
    b = models.create_backbone("tf_efficientnet_lite0", pretrained=False, init_seed=0).model.state_dict()
    c = models.create_backbone("tf_efficientnet_lite0", pretrained=False, init_seed=1).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv_stem.weight"], c["conv_stem.weight"])


def test_seeded_draws_touch_only_the_cpu_generator(root, monkeypatch):
    """A seeded draw (and a seeded random init) seeds the CPU generator that
    fork_rng restores, never the GPU's: on a GPU a loader in the main process
    would otherwise reseed the training's dropout with every image."""
    from wbclib.augment import make_augmentation

    gpu_seeds = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: gpu_seeds.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: gpu_seeds.append(seed))
    table = models.ImageTable(_table(root, 2), root, ["x"], 32, transform=make_augmentation("dihedral_jitter", 32))
    first, again, other = table[(0, 5)][0], table[(0, 5)][0], table[(0, 6)][0]
    models.create_backbone("tf_efficientnet_lite0", pretrained=False, init_seed=0)
    assert gpu_seeds == []
    assert torch.equal(first, again) and not torch.equal(first, other)


def _one_erm_step(frozen_stages: int):
    from wbclib.methods import create_method

    torch.manual_seed(0)
    backbone = models.create_backbone("tf_efficientnet_lite0", pretrained=True)
    net = models.Normalized(backbone, frozen_stages)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    method = create_method("erm", net, backbone.num_features, 3, hparams=dict(lr=1e-2))
    method.train()
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    method.update([(x, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))])
    after = net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    return net, changed


def test_frozen_stages_keep_weights_and_batch_statistics():
    net, changed = _one_erm_step(3)
    frozen_prefixes = ("model.conv_stem", "model.bn1", "model.blocks.0.", "model.blocks.1.", "model.blocks.2.")
    assert not [k for k in changed if k.startswith(frozen_prefixes)]
    # Later stages learn (weights) and update their batch statistics.
    assert any(k.startswith("model.blocks.3.") and k.endswith("weight") for k in changed)
    assert any(k.startswith("model.blocks.6.") and k.endswith("running_mean") for k in changed)
    assert not net.model.bn1.training and not net.model.blocks[2].training and net.model.blocks[3].training
    assert all(not p.requires_grad for p in net.model.blocks[2].parameters())


def test_no_frozen_stage_fine_tunes_everything():
    # The gpu profile's setting (finetune_frozen_stages=0): the stem learns too.
    net, changed = _one_erm_step(0)
    assert {"model.conv_stem.weight", "model.bn1.running_mean", "model.blocks.0.0.conv_dw.weight"} <= changed
    assert net.model.bn1.training


def test_stage_layouts_of_the_papers_backbones():
    import timm

    resnet = timm.create_model("resnet18", num_classes=0)
    stages = models.leading_stages(resnet)
    assert len(stages) == 5 and stages[1] is resnet.layer1
    frozen = models.freeze_leading_stages(resnet, 2)
    assert frozen[2] is resnet.layer2 and not any(p.requires_grad for p in resnet.layer2.parameters())
    assert all(p.requires_grad for p in resnet.layer3.parameters())
    with pytest.raises(ValueError, match="at most 3"):
        models.freeze_leading_stages(timm.create_model("resnet18", num_classes=0), 4)
    with pytest.raises(ValueError, match=">= 0"):
        models.freeze_leading_stages(resnet, -1)
