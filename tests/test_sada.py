"""SADA: stain statistics, pseudo-domains, re-staining, its losses and the registered method."""
import numpy as np
import pytest
import torch
from torch import nn

from wbclib import methods, sada
from wbclib.stain import restain

# Tiny models: one intra-op thread is faster on shared cores, and deterministic.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


#: Two stain populations (RGB absorption of the nuclear and the cytoplasm stain,
#: columns). Every channel absorbs enough that stained pixels pass the
#: normalisers' "OD >= 0.15 in every channel" rule.
STAINS = {
    "purple": np.array([[0.65, 0.30], [0.70, 0.90], [0.29, 0.32]]),
    "teal": np.array([[0.80, 0.35], [0.35, 0.85], [0.50, 0.40]]),
}


def synthetic_cells(n: int, stain: str, size: int = 24, seed: int = 0) -> np.ndarray:
    """uint8 (n, size, size, 3) images made exactly by Beer-Lambert from two
    stain densities: a dark round 'nucleus' on a light 'cytoplasm' disc."""
    rng = np.random.default_rng(seed)
    w = STAINS[stain] / np.linalg.norm(STAINS[stain], axis=0)
    yy, xx = np.mgrid[:size, :size]
    out = []
    for _ in range(n):
        cy, cx = rng.uniform(0.35, 0.65, 2) * size
        r = np.hypot(yy - cy, xx - cx)
        nucleus = (r < size * rng.uniform(0.15, 0.25)) * rng.uniform(0.8, 1.2)
        cytoplasm = (r < size * 0.4) * rng.uniform(0.6, 0.9)
        density = np.stack([nucleus, cytoplasm]) + rng.uniform(0, 0.03, (2, size, size))
        od = np.einsum("cs,shw->hwc", w, density)
        out.append(np.clip(256 * np.exp(-od) - 1, 0, 255).round().astype(np.uint8))
    return np.stack(out)


class TinyMaps(nn.Module):
    """A featurizer with the map interface SADA uses: conv maps, then mean pooling."""

    map_channels = 8

    def __init__(self, in_channels: int = 3):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())

    def feature_map(self, x):
        return self.body(x.float() / 255.0 if x.dtype == torch.uint8 else x.float())

    def pool(self, maps):
        return maps.mean((2, 3))

    def forward(self, x):
        return self.pool(self.feature_map(x))


def make_sada(**hparams):
    torch.manual_seed(0)
    return methods.create_method("sada", TinyMaps(), 8, 3, num_domains=1,
                                 hparams={"k": 3, "stage1_epochs": 1, "lr": 1e-2, **hparams})


def test_sada_is_registered_and_has_its_hparams():
    assert "sada" in methods.METHODS.names() and "erm_restain" in methods.METHODS.names()
    model = make_sada(beta=0.5)
    assert model.hparams["beta"] == 0.5 and model.hparams["anchors"] == "mean"
    with pytest.raises(KeyError):
        make_sada(not_a_setting=1)
    with pytest.raises(ValueError):
        make_sada(k=1)


def test_restain_reproduces_an_image_with_its_own_stains():
    images = synthetic_cells(6, "purple")
    matrices, maxima = sada.stain_statistics(images)
    same = restain(images, matrices, matrices, maxima)
    error = np.abs(same.astype(int) - images.astype(int))
    assert error.mean() < 1.5 and error.max() <= 4
    # restain_views with every image as its own donor is the same operation
    views = sada.restain_views(torch.from_numpy(images), matrices, maxima, torch.arange(6).view(1, 6))
    assert views.shape == (1, 6, 24, 24, 3)
    assert np.array_equal(views[0].numpy(), same)


def test_kmeans_pseudo_domains_separate_two_stain_populations():
    images = np.concatenate([synthetic_cells(10, "purple", seed=1), synthetic_cells(10, "teal", seed=2)])
    matrices, _ = sada.stain_statistics(images)
    labels = sada.pseudo_domains(matrices, 2, torch.Generator().manual_seed(0)).numpy()
    truth = np.repeat([0, 1], 10)
    assert (labels == truth).all() or (labels == 1 - truth).all()
    # and on points directly, with more clusters than populations each cluster stays pure
    rng = np.random.default_rng(0)
    points = torch.tensor(np.concatenate([rng.normal(0, 0.05, (30, 6)), rng.normal(1, 0.05, (30, 6))]))
    labels, centres = sada.kmeans(points, 3, generator=torch.Generator().manual_seed(0))
    assert centres.shape == (3, 6)
    for c in labels.unique():
        members = (labels == c).nonzero().flatten()
        assert len(set((members >= 30).tolist())) == 1


def test_donors_come_from_the_other_clusters():
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    targets = sada.pick_targets(labels, 3, torch.Generator().manual_seed(0))
    assert targets.shape == (2, 7)
    for i, own in enumerate(labels.tolist()):
        donor_clusters = sorted(labels[targets[:, i]].tolist())
        assert donor_clusters == [c for c in range(3) if c != own]
    # a cluster with no members is replaced by any image outside the own cluster
    targets = sada.pick_targets(torch.tensor([0, 0, 1]), 3, torch.Generator().manual_seed(0))
    assert (torch.tensor([0, 0, 1])[targets[:, :2]] != 0).all()


def test_disc_loss_prefers_class_clusters_and_local_alignment_prefers_equal_views():
    torch.manual_seed(0)
    y = torch.tensor([0, 0, 1, 1])
    centres = torch.randn(2, 16) * 3
    aligned = centres[y.repeat(3)] + 0.01 * torch.randn(12, 16)
    shuffled = aligned[torch.randperm(12)]
    assert sada.disc_loss(aligned, y, 2, 0.1) < sada.disc_loss(shuffled, y, 2, 0.1)
    assert sada.disc_loss(aligned, y, 2, 0.1, anchors="self") < sada.disc_loss(shuffled, y, 2, 0.1, anchors="self")
    maps = torch.randn(4, 5, 3, 3)
    assert sada.local_alignment_loss(maps.repeat(3, 1, 1, 1), 2) < 1e-6
    assert sada.local_alignment_loss(torch.randn(12, 5, 3, 3), 2) > 0.1


def test_local_alignment_is_eq4_on_unit_vectors_averaged_over_channels_as_the_authors_code():
    # One image, one position, D = 3: raw along x; view 1 along y (squared
    # distance 2, i.e. 2/3 per channel), view 2 along x scaled (0). The
    # authors' Local_Alignment_Loss takes the MSE over channels (not eq. 4's
    # sum: beta = 0.1 is in those units), averaged over views -> 1/3.
    # (This test asserted the channel sum, 1.0, before: 128x the authors' value
    # at local_dim 128.)
    raw = torch.tensor([2.0, 0.0, 0.0])
    views = [torch.tensor([0.0, 5.0, 0.0]), torch.tensor([7.0, 0.0, 0.0])]
    maps = torch.stack([raw, *views]).view(3, 3, 1, 1)
    assert sada.local_alignment_loss(maps, 2).item() == pytest.approx(1 / 3)
    # positions and images are averaged: repeating the map changes nothing
    assert sada.local_alignment_loss(maps.repeat(1, 1, 2, 2), 2).item() == pytest.approx(1 / 3)
    # D = 2, two positions, one view: position 0 orthogonal ((1 + 1) / 2 = 1), position 1 equal (0) -> 0.5
    two = torch.tensor([[[[1.0, 3.0]], [[0.0, 0.0]]],  # raw: (1, 0) and (3, 0)
                        [[[0.0, 2.0]], [[4.0, 0.0]]]])  # view: (0, 4) and (2, 0)
    assert sada.local_alignment_loss(two, 1).item() == pytest.approx(0.5)


def test_local_alignment_equals_the_authors_mse_on_random_maps():
    torch.manual_seed(0)
    n, views, d = 4, 2, 128
    maps = torch.randn((1 + views) * n, d, 4, 4)
    unit = torch.nn.functional.normalize(maps, dim=1).view(1 + views, n, d, 4, 4)
    authors = sum(torch.nn.functional.mse_loss(unit[0], unit[v]) for v in range(1, 1 + views)) / views
    assert sada.local_alignment_loss(maps, views).item() == pytest.approx(authors.item(), rel=1e-5)


def test_sada_step_on_precomputed_views_lowers_its_loss_and_predicts():
    model = make_sada()
    rng = np.random.default_rng(0)
    # three synthetic "domains" (stain populations) of feature inputs, 1 raw + 2 views each
    x = torch.tensor(rng.normal(size=(12, 3, 3, 8, 8)), dtype=torch.float32)
    y = torch.tensor([0, 1, 2] * 4)
    model.train()
    model.set_epoch(0)

    def stage1_loss():
        parts = model.stage1_losses(x, y)
        return float((parts["disc"] + model.hparams["beta"] * parts["la"]).detach())

    before = stage1_loss()
    stats = model.update([(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])])
    assert {"loss", "disc", "la", "ce"} <= set(stats) and np.isfinite(stats["loss"])
    assert stage1_loss() < before
    model.eval()
    assert model.predict(x[:, 0]).shape == (12, 3) and model.predict(x).shape == (12, 3)


def test_sada_restains_uint8_batches_itself_and_stage_two_trains_only_the_classifier():
    model = make_sada(k=2)
    images = np.concatenate([synthetic_cells(4, "purple", seed=3), synthetic_cells(4, "teal", seed=4)])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    raw, views = model.make_views(x)
    assert raw is x and views.shape == (1, 8, 3, 24, 24) and views.dtype == torch.uint8
    model.train()
    model.set_epoch(0)
    assert np.isfinite(model.update([(x, y)])["la"])
    model.set_epoch(1)  # stage 2
    featurizer = {k: v.clone() for k, v in model.featurizer.state_dict().items()}
    classifier = model.classifier.weight.clone()
    model.update([(x, y)])
    assert all(torch.equal(v, model.featurizer.state_dict()[k]) for k, v in featurizer.items())
    assert not torch.equal(classifier, model.classifier.weight)


def test_images_without_stain_keep_plain_copies_as_views_instead_of_failing_the_batch():
    # Strong colour jitter before SADA's on-the-fly re-staining can leave an image with no pixel
    # dark in every channel; the whole batch used to fail with NoStainError.
    model = make_sada(k=2)
    images = np.concatenate([synthetic_cells(4, "purple", seed=3), synthetic_cells(4, "teal", seed=4)])
    images[2] = 250  # blank
    images[5] = np.maximum(images[5], 235)  # washed out: every channel above the stained range
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    assert model._normalizer.has_stain(images).tolist() == [True, True, False, True, True, False, True, True]
    raw, views = model.make_views(x)
    assert views.shape == (1, 8, 3, 24, 24)
    assert torch.equal(views[0, 2], x[2]) and torch.equal(views[0, 5], x[5])
    changed = [not torch.equal(views[0, i], x[i]) for i in (0, 1, 3, 4, 6, 7)]
    assert all(changed)  # the others took another cluster's stain
    model.train()
    model.set_epoch(0)
    assert np.isfinite(model.update([(x, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))])["la"])
    # one stained image: it is its own donor, the rest stay copies
    few = x.clone()
    few[1:] = 250
    assert torch.equal(model.make_views(few)[1][0, 1:], few[1:])


def test_has_stain_counts_only_the_pixels_vahadanes_estimate_looks_at():
    from wbclib.stain import VahadaneNormalizer

    image = np.full((1, 16, 16, 3), 250, np.uint8)
    image[0, 0, 1:3] = 60  # two stained pixels, both off a stride of 4 (64 of 256 pixels looked at)
    assert VahadaneNormalizer(max_pixels=4096).has_stain(image).tolist() == [True]
    assert VahadaneNormalizer(max_pixels=64).has_stain(image).tolist() == [False]
    model = make_sada(k=2, vahadane_max_pixels=64)
    batch = np.concatenate([synthetic_cells(3, "purple", size=16, seed=1), image])
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()
    views = model.make_views(x)[1]  # no NoStainError from the estimate's strided pixels
    assert torch.equal(views[0, 3], x[3])


def test_view_draws_of_an_epoch_are_those_of_a_run_resumed_there():
    model = make_sada(k=2)
    images = np.concatenate([synthetic_cells(4, "purple", seed=3), synthetic_cells(4, "teal", seed=4)])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    model.set_epoch(1)
    first = model.make_views(x)[1]
    model.make_views(x)  # later batches move the generator on
    model.set_epoch(1)  # a resumed run starts the epoch afresh
    assert torch.equal(model.make_views(x)[1], first)
    model.set_epoch(2)
    assert not torch.equal(model.make_views(x)[1], first)


def test_erm_on_restained_views_trains_on_every_view():
    torch.manual_seed(0)
    model = methods.create_method("erm_restain", TinyMaps(), 8, 3, hparams={"k": 3})
    x = torch.randn(6, 3, 3, 8, 8)
    stats = model.update([(x, torch.tensor([0, 1, 2, 0, 1, 2]))])
    assert np.isfinite(stats["loss"]) and model.predict(x[:, 0]).shape == (6, 3)


def test_stain_columns_are_aligned_across_images():
    w = torch.tensor(STAINS["purple"], dtype=torch.float32)
    w = w / w.norm(dim=0)
    matrices = torch.stack([w, w.flip(-1), w, w.flip(-1)]) + 0.01 * torch.randn(4, 3, 2)
    maxima = torch.tensor([[1.0, 2.0], [2.0, 1.0], [1.0, 2.0], [2.0, 1.0]])
    aligned, aligned_maxima = sada.align_stain_order(matrices, maxima)
    assert torch.allclose(aligned[1], matrices[1].flip(-1)) and torch.allclose(aligned[0], matrices[0])
    assert torch.equal(aligned_maxima, torch.tensor([[1.0, 2.0]] * 4))


def test_precomputed_views_follow_the_run_seed():
    # The frozen-map regime draws SADA's clusters and donors once per run; they
    # used seed 0 for every run seed. Now the run's seed draws them.
    import tempfile
    from types import SimpleNamespace

    import pandas as pd

    from wbclib import crosslab

    images = np.concatenate([synthetic_cells(4, "purple", seed=5), synthetic_cells(4, "teal", seed=6)])
    images = images.transpose(0, 3, 1, 2).copy()  # (N, 3, S, S), as MapStore.images gives
    train = pd.DataFrame(dict(path=[f"img{i}.png" for i in range(8)], label="lymphocyte", lab="pbc"))

    class SyntheticStore(crosslab.MapStore):
        def images(self, rows):
            return images[[int(p[3:-4]) for p in self._unique(rows)["path"]]]

        def stain_stats(self, rows):
            matrices, maxima = sada.stain_statistics(self.images(rows).transpose(0, 2, 3, 1).copy())
            return matrices.numpy(), maxima.numpy()

        def trunk_maps(self, batch, desc=""):
            return (batch[:, :, ::4, ::4] / 255.0).astype(np.float16)

    def views(seed, cache):
        store = SyntheticStore(SimpleNamespace(backbone="none", image_size=24, pretrained=False), ".", cache)
        from wbclib.protocols import crosslab_dg

        runner = crosslab_dg._MapsRunner.__new__(crosslab_dg._MapsRunner)
        runner.store, runner.train, runner._views = store, train, {}
        return runner.views(3, seed)

    with tempfile.TemporaryDirectory() as first, tempfile.TemporaryDirectory() as second:
        seed0, seed1 = views(0, first), views(1, first)
        again = views(0, second)  # recomputed from scratch, not read from the cache
    assert seed0.shape == (8, 2, 3, 6, 6)
    assert torch.equal(seed0, again)
    assert not torch.equal(seed0, seed1)


# --------------------------------------------------------------------------
# SWAD treats SADA like every other method
# --------------------------------------------------------------------------


def test_swad_averages_the_tail_of_a_loss_that_is_still_falling():
    # A loss that falls to the end (SADA's classifier-only stage 2) never shows a
    # valley; the lowest segment alone was used, while a loss that turns early
    # (ERM here) averaged everything after its minimum. Now the end of training
    # counts as the convergence point, with the same threshold and earlier segments.
    from wbclib.swad import SWAD

    def run(losses):
        model, averager = nn.Linear(1, 1), SWAD()  # the authors' n_converge 4, n_tolerance 6, ratio 0.3
        for segment, loss in enumerate(losses):
            for _ in range(3):
                with torch.no_grad():
                    model.weight.fill_(segment)
                averager.collect(model)
            averager.end_segment(loss)
        return averager, averager.averaged_state(model)

    falling = [1.0, 0.9, 0.8, 0.7, 0.65, 0.62, 0.6, 0.59, 0.58, 0.575]
    averager, state = run(falling)
    # last four open the window (threshold 1.3 x 0.586 = 0.762); the two before are under it
    assert averager.window == [4, 5, 6, 7, 8, 9] and averager.rule == "end of training"
    assert not averager.converged and averager.threshold == pytest.approx(1.3 * np.mean(falling[-4:]))
    assert state["weight"].item() == pytest.approx(6.5)
    turning = [1.0, 0.5, 0.55, 0.6, 0.62, 0.63, 0.64, 0.65, 0.66, 0.67]
    averager, _ = run(turning)
    assert averager.window == list(range(1, 10)) and averager.rule == "valley" and averager.converged


def test_swad_skips_sada_stage_one():
    # The SADA authors' trainer starts SWAD at stage 2; stage-1 segments (here
    # the lowest loss, 0.5) must neither open the valley nor enter the average.
    from wbclib.swad import SWAD

    model = make_sada(stage1_epochs=2)
    averager = SWAD(n_converge=2, n_tolerance=2)
    for epoch, loss in enumerate([0.5, 0.9, 1.0, 0.8, 0.7, 0.65]):
        model.set_epoch(epoch)
        for _ in range(2):
            with torch.no_grad():
                model.classifier.weight.fill_(epoch)
            averager.collect(model)
        averager.end_segment(loss)
    state = averager.averaged_state(model)
    assert averager.window == [4, 5] and averager.rule == "end of training"
    assert averager.summary()["steps_skipped"] == 4
    assert torch.allclose(state["classifier.weight"], torch.full_like(state["classifier.weight"], 4.5))
    assert methods.create_method("erm", TinyMaps(), 8, 3).swad_eligible


def test_swad_averages_erm_and_sada_alike_on_cached_maps():
    from wbclib import crosslab

    rng = np.random.default_rng(0)
    y, d = rng.integers(0, 4, 96), rng.integers(0, 2, 96)
    centres = rng.normal(0, 1, (4, 16, 1, 1))
    x = torch.tensor(centres[y] + rng.normal(0, 1.0, (96, 16, 3, 3)), dtype=torch.float32)
    views = x[:, None].repeat(1, 3, 1, 1, 1) + 0.1 * torch.randn(96, 3, 16, 3, 3)
    windows = {}
    for name, train_x in (("erm", x), ("sada", views)):
        _, _, swad = crosslab.train_on_maps(name, {"lr": 1e-2}, train_x, y, d, x[:32], y[:32], epochs=10,
                                            batch_size=16, seed=0, swad={"n_converge": 3, "n_tolerance": 4},
                                            width=8)
        windows[name] = swad["window"]
    assert all(len(w) >= 3 for w in windows.values()), windows
    assert min(windows["sada"]) >= 5  # stage 2 = epochs 5-9
