"""Behaviour of every registered training method on tiny synthetic multi-domain data."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wbclib.methods import METHODS, Method, boda_calibration, coral_distance, create_method

# Tiny models: one intra-op thread is faster on shared cores, and deterministic.
pytestmark = pytest.mark.usefixtures("one_torch_thread")

NUM_DOMAINS, NUM_CLASSES, NUM_FEATURES = 3, 4, 16
# Hyper-parameters the generic tests override: BoDA's term would otherwise only
# start after 500 warm-up updates.
TEST_HPARAMS = {"boda": {"warmup_steps": 0}}


def tiny_featurizer() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, NUM_FEATURES), nn.ReLU())


def make_method(name: str, num_domains: int = NUM_DOMAINS, hparams: dict | None = None, **kwargs) -> Method:
    torch.manual_seed(0)
    merged = {**TEST_HPARAMS.get(name, {}), **(hparams or {})}
    return create_method(name, tiny_featurizer(), NUM_FEATURES, NUM_CLASSES, num_domains=num_domains,
                         hparams=merged, **kwargs)


#: Methods that train on re-stained views: here they get two precomputed views
#: per image, (N, 1 + 2, 3, 8, 8), as in the frozen-map regime.
VIEW_METHODS = ("sada", "erm_restain")


def domain_batch(domain: int, classes, per_class: int = 3, seed: int = 0, views: bool = False):
    """Images 3x8x8 whose mean depends on the class and whose colour channels
    are offset by the domain (a lab's stain); with ``views``, each image is
    followed by two copies with other colour offsets (re-stained views)."""
    g = torch.Generator().manual_seed(seed * 100 + domain)
    y = torch.tensor([c for c in classes for _ in range(per_class)])
    x = torch.randn(len(y), 3, 8, 8, generator=g) * 0.5 + y[:, None, None, None].float()
    colour = torch.tensor([0.8, -0.5, 0.3])
    x = x + colour[None, :, None, None] * (domain - 1)
    if views:
        x = torch.stack([x] + [x + colour[None, :, None, None] * shift for shift in (-1.0, 1.5)], 1)
    return x, y


def batches(num_domains: int = NUM_DOMAINS, views: bool = False):
    return [domain_batch(d, range(NUM_CLASSES), views=views) for d in range(num_domains)]


def train(method: Method, minibatches, steps: int = 30):
    return [method.update(minibatches) for _ in range(steps)]


# --------------------------------------------------------------------------- every method

@pytest.mark.parametrize("name", METHODS.names())
def test_defaults_resolved_and_unknown_rejected(name):
    cls = METHODS.get(name)
    expected = {}
    for klass in reversed(cls.__mro__):  # a subclass's defaults override its parents'
        expected.update(vars(klass).get("defaults", {}))
    assert make_method(name, hparams={}).hparams == {**expected, **TEST_HPARAMS.get(name, {})}
    assert make_method(name, hparams={"lr": 0.5}).hparams["lr"] == 0.5
    with pytest.raises(KeyError, match="not_a_hparam"):
        make_method(name, hparams={"not_a_hparam": 1})


@pytest.mark.parametrize("name", METHODS.names())
def test_updates_lower_the_loss(name):
    method = make_method(name)
    logs = train(method, batches(views=name in VIEW_METHODS))
    losses = [log["loss"] for log in logs]
    assert all(math.isfinite(v) for log in logs for v in log.values())
    assert np.mean(losses[-3:]) < np.mean(losses[:3])


@pytest.mark.parametrize("name", METHODS.names())
def test_predict_and_featurize_shapes(name):
    method = make_method(name)
    x = torch.randn(5, 3, 8, 8)
    assert method.predict(x).shape == (5, NUM_CLASSES)
    assert method.featurize(x).shape == (5, NUM_FEATURES)


@pytest.mark.parametrize("name", METHODS.names())
def test_copes_with_missing_classes_and_an_empty_domain(name):
    method = make_method(name)
    views = name in VIEW_METHODS
    empty = (torch.zeros((0, 3, 3, 8, 8) if views else (0, 3, 8, 8)), torch.zeros(0, dtype=torch.long))
    # Domain 1 has a single image: too few for a covariance, enough for everything else.
    minibatches = [domain_batch(0, [0, 1, 2], views=views), domain_batch(1, [3], per_class=1, views=views), empty]
    for log in train(method, minibatches, steps=3):
        assert math.isfinite(log["loss"])


@pytest.mark.parametrize("name", METHODS.names())
def test_single_domain_training(name):
    method = make_method(name, num_domains=1)
    losses = [log["loss"] for log in train(method, batches(1, views=name in VIEW_METHODS))]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])


@pytest.mark.parametrize("name", METHODS.names())
def test_optimizers_cover_every_trainable_parameter_once(name):
    method = make_method(name)
    optimised = [id(p) for opt in method.optimizers() for group in opt.param_groups for p in group["params"]]
    assert len(optimised) == len(set(optimised))
    assert set(optimised) == {id(p) for p in method.parameters() if p.requires_grad}


@pytest.mark.parametrize("name", METHODS.names())
def test_state_dict_round_trip_restores_predictions(name):
    method = make_method(name)
    train(method, batches(views=name in VIEW_METHODS), steps=3)
    restored = make_method(name)
    restored.load_state_dict(method.state_dict())
    x = torch.randn(4, 3, 8, 8)
    method.eval(), restored.eval()
    torch.testing.assert_close(restored.predict(x), method.predict(x))


# --------------------------------------------------------------------------- CORAL

def test_coral_distance_matches_hand_computation():
    a = torch.randn(50, 4)
    assert coral_distance(a, a).item() == pytest.approx(0.0, abs=1e-7)
    # A shift moves only the means: mean over 4 entries of 2**2.
    assert coral_distance(a, a + 2.0).item() == pytest.approx(4.0, rel=1e-5)
    # Scaling by 2 keeps a zero mean difference only for centred data; the covariances differ by 3 * cov.
    c = a - a.mean(0)
    cov = c.T @ c / 49
    assert coral_distance(c, 2 * c).item() == pytest.approx((3 * cov).pow(2).mean().item(), rel=1e-4)


def test_coral_penalty_decreases():
    logs = train(make_method("coral"), batches())
    assert logs[0]["penalty"] > 0
    assert np.mean([log["penalty"] for log in logs[-3:]]) < np.mean([log["penalty"] for log in logs[:3]])


def test_coral_with_one_domain_is_erm():
    logs = train(make_method("coral", num_domains=1), batches(1), steps=2)
    assert all(log["penalty"] == 0 and log["loss"] == log["ce"] for log in logs)


# --------------------------------------------------------------------------- DANN

def _snapshot(module: nn.Module):
    return [p.detach().clone() for p in module.parameters()]


def _changed(before, module: nn.Module) -> bool:
    return any(not torch.equal(b, p) for b, p in zip(before, module.parameters()))


def test_dann_alternates_discriminator_and_generator_steps():
    method = make_method("dann", hparams={"d_steps_per_g": 1})
    minibatches = batches()
    for expect_discriminator_step in (False, True, False, True):
        disc, net = _snapshot(method.discriminator), _snapshot(method.featurizer) + _snapshot(method.classifier)
        log = method.update(minibatches)
        assert {"loss", "disc_loss", "disc_acc"} <= set(log)
        assert _changed(disc, method.discriminator) == expect_discriminator_step
        net_changed = _changed(net[:2], method.featurizer) or _changed(net[2:], method.classifier)
        assert net_changed != expect_discriminator_step


def test_dann_discriminator_learns_the_domains():
    # Practically only discriminator steps: the colour offsets make the labs easy to tell apart.
    method = make_method("dann", hparams={"d_steps_per_g": 1000, "grad_penalty": 0.1})
    logs = train(method, batches(), steps=40)
    assert logs[-1]["disc_acc"] > 0.9
    assert logs[-1]["disc_loss"] < logs[0]["disc_loss"]


def test_dann_generator_steps_fool_the_discriminator():
    method = make_method("dann", hparams={"d_steps_per_g": 1000})
    minibatches = batches()
    train(method, minibatches, steps=40)
    method.hparams["d_steps_per_g"] = 0  # from now on every step is a generator step
    logs = train(method, minibatches, steps=20)
    assert logs[-1]["disc_loss"] > logs[0]["disc_loss"]


def test_dann_with_one_domain_never_steps_the_discriminator():
    method = make_method("dann", num_domains=1)
    disc = _snapshot(method.discriminator)
    train(method, batches(1), steps=4)
    assert not _changed(disc, method.discriminator)


def test_dann_rejects_minibatches_out_of_domain_order():
    with pytest.raises(ValueError, match="one \\(x, y\\) pair per training domain"):
        make_method("dann").update(batches(2))


# --------------------------------------------------------------------------- Mixup

class RecordingFeaturizer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = tiny_featurizer()
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.inner(x)


def test_mixup_mixes_each_domain_with_another():
    # Constant images per domain (0, 1, 3) and lam ~ Beta(1e4, 1e4) ~= 0.5: every
    # mixed image is the average of two different domains' values.
    torch.manual_seed(0)
    recorder = RecordingFeaturizer()
    method = create_method("mixup", recorder, NUM_FEATURES, NUM_CLASSES, num_domains=3,
                           hparams={"mixup_alpha": 1e4})
    minibatches = [(torch.full((4, 3, 8, 8), v), torch.arange(4)) for v in (0.0, 1.0, 3.0)]
    method.update(minibatches)
    (mixed,) = recorder.inputs  # one forward pass over every pair's mixed images
    assert mixed.shape[0] == 12
    seen = sorted({round(float(v), 1) for v in mixed.mean((1, 2, 3))})
    assert seen == pytest.approx([0.5, 1.5, 2.0], abs=0.05)


def test_mixup_with_one_domain_mixes_within_it():
    torch.manual_seed(0)
    recorder = RecordingFeaturizer()
    method = create_method("mixup", recorder, NUM_FEATURES, NUM_CLASSES, hparams={"mixup_alpha": 1e4})
    x = torch.arange(8.0)[:, None, None, None].expand(8, 3, 8, 8)
    method.update([(x, torch.arange(8) % NUM_CLASSES)])
    (mixed,) = recorder.inputs
    values = mixed[:, 0, 0, 0]
    assert not torch.allclose(values, torch.arange(8.0))  # partners were shuffled
    assert values.sum().item() == pytest.approx(28.0, rel=1e-3)  # each image used once on either side


def test_mixup_feeds_uint8_images_on_the_scale_predict_uses():
    # Regression: uint8 batches were mixed into float 0-255 tensors, which
    # ``Normalized`` (that divides only uint8 input by 255) then fed to the
    # network as if in [0, 1]: training inputs of order +-1000, test +-2.6.
    from types import SimpleNamespace

    from wbclib.models import Normalized

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.inputs = tiny_featurizer(), []

        def forward(self, x):
            self.inputs.append(x.detach().float().clone())
            return self.inner(x)

    torch.manual_seed(0)
    recorder = Recorder()
    backbone = SimpleNamespace(model=recorder, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    method = create_method("mixup", Normalized(backbone), NUM_FEATURES, NUM_CLASSES, num_domains=2)
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (6, 3, 8, 8), generator=g, dtype=torch.uint8) for _ in range(2)]
    method.update([(x, torch.arange(6) % NUM_CLASSES) for x in images])
    (trained_on,) = recorder.inputs
    with torch.no_grad():
        method.predict(torch.cat(images))
    predicted_on = recorder.inputs[1]
    # Convex mixtures of the same images: per channel within the unmixed range,
    # and of the same order of magnitude (|x| <= ~2.6 for ImageNet statistics).
    low = predicted_on.amin((0, 2, 3))[None, :, None, None]
    high = predicted_on.amax((0, 2, 3))[None, :, None, None]
    assert trained_on.abs().max() < 3.0
    assert ((trained_on >= low - 1e-4) & (trained_on <= high + 1e-4)).all()
    assert trained_on.mean().item() == pytest.approx(predicted_on.mean().item(), abs=0.2)


def test_mixup_leaves_float_inputs_unscaled():
    # Float inputs (e.g. cached feature maps) are mixed as they are.
    torch.manual_seed(0)
    recorder = RecordingFeaturizer()
    method = create_method("mixup", recorder, NUM_FEATURES, NUM_CLASSES, num_domains=2,
                           hparams={"mixup_alpha": 1e4})
    method.update([(torch.full((4, 3, 8, 8), v), torch.arange(4)) for v in (100.0, 300.0)])
    (mixed,) = recorder.inputs
    assert mixed.mean().item() == pytest.approx(200.0, rel=0.02)


# --------------------------------------------------------------------------- SelfReg

def test_selfreg_partners_share_the_class_and_permute_it():
    torch.manual_seed(0)
    y = torch.tensor([2, 0, 2, 1, 0, 2, 3])
    partner = METHODS.get("selfreg").same_class_partner(y)
    assert torch.equal(y[partner], y)
    assert sorted(partner.tolist()) == list(range(len(y)))
    assert partner[6] == 6  # alone in its class: paired with itself


def test_selfreg_trains_its_projection():
    method = make_method("selfreg")
    before = _snapshot(method.projection)
    method.update(batches())
    assert _changed(before, method.projection)


def test_selfreg_reports_a_regulariser_that_shrinks():
    logs = train(make_method("selfreg"), batches())
    assert logs[0]["regulariser"] > 0
    assert np.mean([log["regulariser"] for log in logs[-3:]]) < np.mean([log["regulariser"] for log in logs[:3]])


# --------------------------------------------------------------------------- BoDA

def test_boda_calibration_matches_hand_computation():
    counts = torch.tensor([[10.0, 0.0, 40.0], [5.0, 20.0, 1.0]])
    w = boda_calibration(counts, nu=0.5)
    assert w.shape == (6, 6)
    pair = lambda d, c: d * 3 + c  # noqa: E731 - flattened (domain, class) index
    assert w[pair(0, 0), pair(1, 1)].item() == pytest.approx((20 / 10) ** 0.5)
    assert w[pair(1, 2), pair(0, 2)].item() == pytest.approx((40 / 1) ** 0.5)
    assert w[pair(0, 2), pair(1, 0)].item() == pytest.approx((5 / 40) ** 0.5)
    assert torch.allclose(torch.diagonal(w), torch.ones(6))
    assert torch.isfinite(w).all()  # the empty pair (0, 1) is clamped to one sample


def test_boda_statistics_update_seen_pairs_only():
    method = make_method("boda", hparams={"warmup_steps": 10**6, "momentum": 0.9})
    minibatches = [domain_batch(0, [0, 1, 2]), domain_batch(1, [1, 3], per_class=2),
                   (torch.zeros(0, 3, 8, 8), torch.zeros(0, dtype=torch.long))]
    seen = torch.zeros(NUM_DOMAINS, NUM_CLASSES, dtype=torch.bool)
    seen[0, [0, 1, 2]] = True
    seen[1, [1, 3]] = True

    def batch_means():
        with torch.no_grad():
            return {(d, c): method.featurize(x[y == c]).mean(0)
                    for d, (x, y) in enumerate(minibatches) for c in range(NUM_CLASSES) if seen[d, c]}

    first = batch_means()
    method.update(minibatches)
    assert torch.equal(method.observed_counts > 0, seen)
    assert method.observed_counts[0, 0] == 3 and method.observed_counts[1, 3] == 2
    assert (method.centroids[~seen] == 0).all()
    for (d, c), mean in first.items():  # a pair's first batch sets its centroid
        torch.testing.assert_close(method.centroids[d, c], mean)

    second = batch_means()  # the features moved with the optimiser step
    method.update(minibatches)
    for (d, c), mean in second.items():
        torch.testing.assert_close(method.centroids[d, c], 0.9 * first[(d, c)] + 0.1 * mean)
    assert (method.centroids[~seen] == 0).all()


def test_boda_domain_class_counts_declared_or_estimated():
    declared = [[10, 0, 5, 1], [3, 3, 3, 3], [1, 2, 3, 4]]
    method = make_method("boda", hparams={"domain_class_counts": declared})
    assert torch.equal(method.domain_class_counts(), torch.tensor(declared, dtype=torch.float32))
    with pytest.raises(ValueError, match="shape"):
        make_method("boda", hparams={"domain_class_counts": [[1, 2], [3, 4]]})

    # Estimated: each class's total split by the domain shares seen in batches.
    method = make_method("boda", class_counts=[100, 40, 10, 60], hparams={"warmup_steps": 10**6})
    method.update([domain_batch(0, [0, 1], per_class=3), domain_batch(1, [0], per_class=1),
                   domain_batch(2, [1, 3], per_class=2)])
    expected = torch.tensor([[75.0, 24.0, 0, 0], [25.0, 0, 0, 0], [0, 16.0, 0, 60.0]])
    torch.testing.assert_close(method.domain_class_counts(), expected)


def reference_boda_loss(z, d, y, centroids, seen, counts, nu, temperature):
    """Eq. 3 written out loop by loop (mean over (image, positive) pairs)."""
    terms = []
    num_domains, num_classes = seen.shape
    for i in range(len(z)):
        n_i = counts[d[i], y[i]]

        def logit(dd, cc):
            w = (counts[dd, cc] / n_i) ** nu
            return -w * np.linalg.norm(z[i] - centroids[dd, cc]) / n_i / temperature

        others = [(dd, cc) for dd in range(num_domains) for cc in range(num_classes)
                  if seen[dd, cc] and (dd, cc) != (d[i], y[i])]
        log_denominator = np.log(sum(np.exp(logit(dd, cc)) for dd, cc in others))
        terms += [-(logit(dd, y[i]) - log_denominator) for dd in range(num_domains) if dd != d[i] and seen[dd, y[i]]]
    return np.mean(terms)


def test_boda_loss_matches_equation_3():
    method = make_method("boda", hparams={"nu": 0.5, "temperature": 0.7,
                                          "domain_class_counts": [[4, 2, 1, 0], [8, 0, 3, 2], [1, 1, 6, 5]]})
    rng = np.random.default_rng(0)
    centroids = rng.normal(size=(NUM_DOMAINS, NUM_CLASSES, NUM_FEATURES))
    seen = np.array([[1, 1, 1, 0], [1, 0, 1, 1], [1, 1, 1, 1]], dtype=bool)
    method.centroids.copy_(torch.as_tensor(centroids * seen[..., None], dtype=torch.float32))
    method.observed_counts.copy_(torch.as_tensor(seen, dtype=torch.float32))
    z = rng.normal(size=(6, NUM_FEATURES))
    d = np.array([0, 0, 1, 1, 2, 2])
    y = np.array([0, 2, 0, 3, 1, 2])
    counts = np.array([[4, 2, 1, 0], [8, 0, 3, 2], [1, 1, 6, 5]], dtype=float)
    got = method.boda_loss(torch.as_tensor(z, dtype=torch.float32), torch.as_tensor(d * NUM_CLASSES + y),
                           torch.as_tensor(y))
    expected = reference_boda_loss(z, d, y, centroids, seen, counts, 0.5, 0.7)
    assert got.item() == pytest.approx(expected, rel=1e-4)


class FixedFeatures(nn.Module):
    """A featurizer whose features are parameters, looked up by the input's
    first entry (an index): gradients of a method's loss land on ``self.z``."""

    def __init__(self, z: torch.Tensor):
        super().__init__()
        self.z = nn.Parameter(z.clone())

    def forward(self, x):
        return self.z[x[:, 0].long()]


def test_boda_adds_the_authors_coral_term_by_default():
    # The authors' BoDA.update always adds macro_weight (1.0) x CORAL between the
    # domains' features; it was off here (coral_weight 0). Two domains of two
    # 2-d features, classifier zeroed (CE = log 4), BoDA term still in warm-up:
    # means (1, 0) and (1, 2) -> mean term (0 + 4) / 2 = 2; covariances
    # diag(2, 0) and diag(0, 2) -> covariance term (4 + 4) / 4 = 2; CORAL = 4.
    assert METHODS.get("boda").defaults["coral_weight"] == 1.0
    z = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 1.0], [1.0, 3.0]])
    method = create_method("boda", FixedFeatures(z), 2, NUM_CLASSES, num_domains=2,
                           hparams={"warmup_steps": 10**6})
    with torch.no_grad():
        method.classifier.weight.zero_()
        method.classifier.bias.zero_()
    index = torch.arange(4.0)[:, None]
    stats = method.update([(index[:2], torch.tensor([0, 1])), (index[2:], torch.tensor([0, 1]))])
    assert stats["penalty"] == pytest.approx(4.0, rel=1e-6)
    assert stats["ce"] == pytest.approx(math.log(NUM_CLASSES), rel=1e-6)
    assert stats["loss"] == pytest.approx(math.log(NUM_CLASSES) + 4.0, rel=1e-6)


def boda_gradients(per_pair: int, hparams: dict | None = None, width: int = 128, batch: int = 32):
    """Per-image gradient norms w.r.t. the features of CE and of everything
    else BoDA adds (lambda * L_BoDA + CORAL), at the authors' defaults, on
    BN-ReLU-like features of 2 domains x 4 classes (class means apart, a domain
    shift) with ``per_pair`` training images per domain-class pair."""
    g = torch.Generator().manual_seed(0)
    class_means = torch.randn(NUM_CLASSES, width, generator=g) * 0.7
    domain_shift = torch.randn(2, width, generator=g) * 0.5

    def features(n, d, c):
        return torch.relu(torch.randn(n, width, generator=g) + class_means[c] + domain_shift[d])

    y = torch.arange(batch) % NUM_CLASSES
    domains = torch.arange(batch) // (batch // 2)
    z = torch.cat([features(1, int(d), int(c)) for d, c in zip(domains, y)])
    torch.manual_seed(0)
    method = create_method("boda", FixedFeatures(z), width, NUM_CLASSES, num_domains=2,
                           hparams={"warmup_steps": 0, "domain_class_counts": [[per_pair] * NUM_CLASSES] * 2,
                                    **(hparams or {})})
    with torch.no_grad():  # centroids of the whole (synthetic) training set, as after warm-up
        for d in range(2):
            for c in range(NUM_CLASSES):
                method.centroids[d, c] = features(per_pair, d, c).mean(0)
        method.observed_counts.fill_(per_pair)
    index = torch.arange(float(batch))[:, None]
    minibatches = [(index[domains == d], y[domains == d]) for d in range(2)]
    ce_only = torch.autograd.grad(F.cross_entropy(method.classifier(method.featurizer.z), y),
                                  method.featurizer.z)[0]
    method.update(minibatches)
    everything = method.featurizer.z.grad
    return ce_only.norm(dim=1).mean().item(), (everything - ce_only).norm(dim=1).mean().item()


def test_boda_regulariser_gradient_is_within_a_stated_range_of_ce():
    # With the cpu profile's ~60 images per (lab, class), the balanced distance
    # d / N makes the authors' BoDA term (lambda 0.1, T 1) ~600x weaker than CE
    # here (~330x in the review's measurement); the authors' CORAL term (weight 1)
    # is what gives the regulariser weight. Stated range: 0.1x-1x of CE's gradient
    # (measured 0.27; 1/620 without CORAL, i.e. before coral_weight defaulted to 1).
    ce, regulariser = boda_gradients(per_pair=60)
    assert 0.1 < regulariser / ce < 1.0
    _, boda_alone = boda_gradients(per_pair=60, hparams={"coral_weight": 0.0})
    assert boda_alone / ce < 0.01  # the term itself, at the authors' scale, is weak at N = 60
    # ... and ~1/N: 12x stronger at 5 images per pair (softmax no longer flat)
    _, boda_small = boda_gradients(per_pair=5, hparams={"coral_weight": 0.0})
    assert 8 < boda_small / boda_alone < 13


def test_boda_gradient_equals_the_authors_formula():
    # The authors' code (mdlt/learning/algorithms.py, BoDA.update) with its
    # defaults, transcribed: centroids x samples, balanced distance, calibration
    # weights, temperature, mean over (image, other-domain same-class centroid).
    torch.manual_seed(1)
    counts = torch.tensor([[6.0, 2.0, 9.0, 3.0], [4.0, 7.0, 1.0, 5.0]])
    method = make_method("boda", num_domains=2, hparams={"domain_class_counts": counts.tolist()})
    method.centroids.copy_(torch.randn(2, NUM_CLASSES, NUM_FEATURES))
    method.observed_counts.fill_(1)
    z = torch.randn(8, NUM_FEATURES, requires_grad=True)
    envs, y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    ours = torch.autograd.grad(method.boda_loss(z, envs * NUM_CLASSES + y, y), z)[0]

    centroid_envs = torch.arange(2).repeat_interleave(NUM_CLASSES)
    centroid_classes = torch.arange(NUM_CLASSES).repeat(2)
    logits = -torch.cdist(method.centroids.view(-1, NUM_FEATURES), z) / counts[envs, y]
    logits = logits * (counts[centroid_envs, centroid_classes][:, None] / counts[envs, y][None, :]) ** 0.5
    logits = logits / 1.0
    same = ((centroid_classes[:, None] == y[None, :]) & (centroid_envs[:, None] == envs[None, :])).float()
    log_prob = logits - torch.log((torch.exp(logits) * (1 - same)).sum(0, keepdim=True))
    mask = ((centroid_classes[:, None] == y[None, :]) & (centroid_envs[:, None] != envs[None, :])).float()
    authors = torch.autograd.grad(-(log_prob * mask).sum() / mask.sum(), z)[0]
    torch.testing.assert_close(ours, authors, rtol=1e-4, atol=1e-7)


def test_boda_mahalanobis_with_full_shrinkage_is_scaled_euclidean():
    method = make_method("boda", hparams={"distance": "mahalanobis", "covariance_shrinkage": 1.0,
                                          "warmup_steps": 10**6})
    method.update(batches())
    z = torch.randn(5, NUM_FEATURES)
    seen = method.observed_counts.flatten() > 0
    means = method.centroids.view(-1, NUM_FEATURES)
    second = method.second_moments.view(-1, NUM_FEATURES, NUM_FEATURES)
    variance = (torch.diagonal(second, dim1=1, dim2=2) - means ** 2)[seen].mean()
    expected = torch.cdist(z, means) / (variance + 1e-6).sqrt()
    torch.testing.assert_close(method.distances(z), expected, rtol=1e-4, atol=1e-5)


def test_boda_mahalanobis_trains():
    method = make_method("boda", hparams={"distance": "mahalanobis"})
    logs = train(method, batches())
    assert all(math.isfinite(log["boda"]) for log in logs)
    assert np.mean([log["loss"] for log in logs[-3:]]) < np.mean([log["loss"] for log in logs[:3]])


def test_boda_rejects_an_unknown_distance():
    with pytest.raises(ValueError, match="distance"):
        make_method("boda", hparams={"distance": "cosine"})


def test_boda_waits_for_warmup_and_has_no_term_with_one_domain():
    method = make_method("boda", hparams={"warmup_steps": 2})
    logs = train(method, batches(), steps=3)
    assert ["boda" in log for log in logs] == [False, False, True]
    single = make_method("boda", num_domains=1)
    assert all(log["boda"] == 0 for log in train(single, batches(1), steps=2))
