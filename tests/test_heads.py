"""Decoupled classifier heads on a long-tailed 2-D Gaussian problem."""
import copy

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, recall_score

from wbclib.heads import (
    HEADS, StandardizedLinear, choose_tau, crt, fit_linear_head, fit_lws, make_head, predict_proba, single_torch_thread,
    tau_normalize,
)

# Tiny models: one intra-op thread is faster on shared cores, and deterministic.
pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAIN_COUNTS = [1000, 200, 40, 10]
TAIL = [2, 3]
# Four unit-variance Gaussians with means on a circle of radius 2: neighbours overlap, so the prior matters.
MEANS = 2.0 * np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
# The training set has 1250 points: 500 steps of batch 256 are needed to converge.
FIT = dict(epochs=100, lr=0.05)


def gaussians(counts, rng):
    y = np.repeat(np.arange(4), counts)
    return (MEANS[y] + rng.normal(size=(len(y), 2))).astype(np.float32), y


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return dict(train=gaussians(TRAIN_COUNTS, rng), val=gaussians([100] * 4, rng), test=gaussians([500] * 4, rng),
                test_long_tailed=gaussians(TRAIN_COUNTS, rng))


@pytest.fixture(scope="module")
def probe(data):
    return fit_linear_head(*data["train"], 4, seed=0, **FIT)


def predict(head, x):
    return predict_proba(head, x).argmax(1)


def balanced_accuracy_and_tail_recall(head, data):
    x, y = data["test"]
    pred = predict(head, x)
    return balanced_accuracy_score(y, pred), recall_score(y, pred, average=None)[TAIL].mean()


def bayes_predictions(x, prior):
    # Equal-covariance Gaussians: argmax_c log prior_c - ||x - mu_c||^2 / 2.
    score = np.log(prior) - 0.5 * ((x[:, None, :] - MEANS[None]) ** 2).sum(-1)
    return score.argmax(1)


def test_linear_probe_is_near_bayes_accuracy(probe, data):
    x, y = data["test_long_tailed"]
    bayes = (bayes_predictions(x, np.array(TRAIN_COUNTS) / 1250) == y).mean()
    assert bayes > 0.85
    assert (predict(probe, x) == y).mean() > bayes - 0.02


def test_instance_balanced_probe_neglects_the_tail(probe, data):
    bacc, tail_recall = balanced_accuracy_and_tail_recall(probe, data)
    x, y = data["test"]
    balanced_bayes = balanced_accuracy_score(y, bayes_predictions(x, np.full(4, 0.25)))
    assert bacc < balanced_bayes - 0.1
    assert tail_recall < 0.5


def test_crt_raises_tail_recall_and_balanced_accuracy(probe, data):
    head = crt(*data["train"], 4, seed=0, **FIT)
    bacc, tail_recall = balanced_accuracy_and_tail_recall(head, data)
    probe_bacc, probe_tail_recall = balanced_accuracy_and_tail_recall(probe, data)
    assert bacc > probe_bacc + 0.03
    assert tail_recall > probe_tail_recall + 0.3


def test_tau_norm_raises_tail_recall_and_balanced_accuracy(probe, data):
    tau = choose_tau(probe, *data["val"])
    bacc, tail_recall = balanced_accuracy_and_tail_recall(tau_normalize(probe, tau), data)
    probe_bacc, probe_tail_recall = balanced_accuracy_and_tail_recall(probe, data)
    assert bacc > probe_bacc + 0.03
    assert tail_recall > probe_tail_recall + 0.2


def test_tau_zero_keeps_weights_and_drops_bias(probe, data):
    x = torch.as_tensor(data["test"][0])
    bias_free = copy.deepcopy(probe)
    with torch.no_grad():
        bias_free.linear.bias.zero_()
    torch.testing.assert_close(tau_normalize(bias_free, 0.0)(x), bias_free(x))
    with torch.no_grad():
        torch.testing.assert_close(tau_normalize(probe, 0.0)(x), probe(x) - probe.linear.bias)
    assert tau_normalize(probe, 0.0).linear.bias is None


def test_tau_one_gives_unit_norm_rows_and_leaves_head_alone(probe):
    before = copy.deepcopy(probe.state_dict())
    normalized = tau_normalize(probe, 1.0)
    torch.testing.assert_close(normalized.linear.weight.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(normalized.mean, probe.mean)
    for name, value in probe.state_dict().items():
        torch.testing.assert_close(value, before[name])


def test_choose_tau_by_hand():
    # Rows of norm 4 and 1. A class-1 point at (1, 2) scores (4, 2) at tau 0 (wrong), (2, 2) at
    # tau 0.5 (a tie, argmax takes class 0: wrong) and (1, 2) at tau 1 (right); class-0 points
    # at (1, 0) are right for every tau.
    head = StandardizedLinear(torch.zeros(2), torch.ones(2), 2)
    with torch.no_grad():
        head.linear.weight.copy_(torch.tensor([[4.0, 0.0], [0.0, 1.0]]))
        head.linear.bias.zero_()
    x = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 2.0]])
    y = np.array([0, 0, 1])
    assert choose_tau(head, x, y, taus=[0.0, 0.5, 1.0]) == 1.0
    # Equal macro-F1 at tau 0 and 0.5: the first wins.
    assert choose_tau(head, x, y, taus=[0.5, 0.0]) == 0.5


def test_lws_only_learns_per_class_scales(probe, data):
    before = copy.deepcopy(probe.state_dict())
    scaled = fit_lws(probe, *data["train"], seed=0, epochs=20, lr=0.05)
    assert [name for name, p in scaled.named_parameters() if p.requires_grad] == ["scales"]
    assert not torch.allclose(scaled.scales, torch.ones(4))
    for name, value in probe.state_dict().items():
        torch.testing.assert_close(value, before[name])
        torch.testing.assert_close(scaled.head.state_dict()[name], value)
    x = torch.as_tensor(data["test"][0])
    with torch.no_grad():
        torch.testing.assert_close(scaled(x), probe(x) * scaled.scales)
    bacc, tail_recall = balanced_accuracy_and_tail_recall(scaled, data)
    probe_bacc, probe_tail_recall = balanced_accuracy_and_tail_recall(probe, data)
    assert bacc > probe_bacc + 0.03
    assert tail_recall > probe_tail_recall + 0.1


def test_heads_registry(data):
    assert HEADS.names() == ["crt", "linear_probe", "lws", "tau_norm"]
    quick = dict(epochs=2, lr=0.05)
    for name in HEADS.names():
        logits = make_head(name, *data["train"], *data["val"], 4, seed=0, **quick)(torch.as_tensor(data["test"][0]))
        assert logits.shape == (2000, 4)
    # The tau-norm recipe is the probe, tau-normalised with the tau chosen on validation macro-F1.
    probe = fit_linear_head(*data["train"], 4, seed=0, **quick)
    expected = tau_normalize(probe, choose_tau(probe, *data["val"]))
    recipe = make_head("tau_norm", *data["train"], *data["val"], 4, seed=0, **quick)
    torch.testing.assert_close(recipe.linear.weight, expected.linear.weight)
    with pytest.raises(KeyError, match="crt, linear_probe, lws, tau_norm"):
        make_head("ncm", *data["train"], *data["val"], 4)


def test_single_torch_thread_restores_the_thread_count_even_after_an_error():
    outer = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError):
            with single_torch_thread():
                assert torch.get_num_threads() == 1
                raise RuntimeError("inside")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(outer)


@pytest.mark.parametrize("loss,sampler", [("ce", "instance"), ("ldam_drw", "class_balanced")])
def test_fitting_on_features_standardised_once_gives_the_per_batch_head(data, loss, sampler):
    # fit_linear_head standardises the features once; the head it returns must be the one
    # a loop standardising every batch inside the module trains, to the last bit.
    from wbclib.heads import train_on_embeddings
    from wbclib.losses import make_loss

    x, y = data["train"]
    hparams = {"drw_epoch": 2} if loss == "ldam_drw" else {}
    fitted = fit_linear_head(x, y, 4, loss=loss, sampler=sampler, epochs=3, seed=5, loss_hparams=hparams)
    torch.manual_seed(5)
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    per_batch = StandardizedLinear(xt.mean(0), xt.std(0).clamp_min(1e-6), 4)
    train_on_embeddings(per_batch, list(per_batch.parameters()), xt, yt,
                        make_loss(loss, np.bincount(y, minlength=4).tolist(), **hparams), sampler, 3, 1e-2, 1e-4, 256, 5)
    for name, tensor in per_batch.state_dict().items():
        assert torch.equal(fitted.state_dict()[name], tensor), name
    assert not fitted.training
