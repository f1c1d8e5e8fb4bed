"""Losses against values worked out independently in numpy on a three-sample batch."""
import numpy as np
import pytest
import torch

from wbclib.losses import LOSSES, effective_number_weights, inverse_log_frequency_weights, make_loss

COUNTS = [50, 10, 2]
LOGITS = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-0.5, 1.5, 0.0]])
TARGETS = np.array([0, 2, 1])
# ldam_drw needs its switch epoch; everything else has defaults.
REQUIRED = {"ldam_drw": {"drw_epoch": 2}}


def loss_value(name, logits=LOGITS, **hparams):
    loss = make_loss(name, COUNTS, **{**REQUIRED.get(name, {}), **hparams})
    return loss(torch.tensor(logits, dtype=torch.float32), torch.tensor(TARGETS)).item()


def softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def p_true(z=LOGITS):
    return softmax(z)[np.arange(len(TARGETS)), TARGETS]


def cb_weights(counts, beta):
    w = (1 - beta) / (1 - beta ** np.asarray(counts, dtype=float))
    return w * len(w) / w.sum()


def test_effective_number_weights_by_hand():
    # beta = 0.9: effective numbers (1 - 0.9^n) / 0.1 = 9.948.., 6.513.., 1.9 -> inverse, scaled to sum 3.
    inv = 1 / np.array([(1 - 0.9**50) / 0.1, (1 - 0.9**10) / 0.1, 1.9])
    np.testing.assert_allclose(effective_number_weights(COUNTS, 0.9), 3 * inv / inv.sum(), rtol=1e-12)
    np.testing.assert_allclose(effective_number_weights(COUNTS, 0.9999), cb_weights(COUNTS, 0.9999), rtol=1e-9)
    assert effective_number_weights(COUNTS).sum() == pytest.approx(3.0)


def test_effective_number_weights_limits():
    np.testing.assert_allclose(effective_number_weights(COUNTS, 0.0), [1.0, 1.0, 1.0])
    # beta -> 1: proportional to 1 / n.
    inv_n = 1 / np.array(COUNTS)
    np.testing.assert_allclose(effective_number_weights(COUNTS, 1 - 1e-9), 3 * inv_n / inv_n.sum(), rtol=1e-6)


def test_counts_must_be_positive():
    with pytest.raises(ValueError, match="at least one training image"):
        make_loss("cb", [5, 0, 3])
    with pytest.raises(ValueError, match="beta"):
        effective_number_weights(COUNTS, 1.0)


def test_cross_entropy_by_hand():
    assert loss_value("ce") == pytest.approx(np.mean(-np.log(p_true())), rel=1e-6)


def test_focal_by_hand():
    p = p_true()
    assert loss_value("focal") == pytest.approx(np.mean((1 - p) ** 2 * -np.log(p)), rel=1e-6)
    alpha = np.array([0.25, 1.0, 2.0])
    expected = np.mean(alpha[TARGETS] * (1 - p) ** 2 * -np.log(p))
    assert loss_value("focal", alpha=alpha.tolist()) == pytest.approx(expected, rel=1e-6)


def test_focal_with_gamma_zero_is_cross_entropy():
    assert loss_value("focal", gamma=0.0) == pytest.approx(loss_value("ce"), rel=1e-6)


def test_class_balanced_ce_by_hand():
    w = cb_weights(COUNTS, 0.9999)
    assert loss_value("cb") == pytest.approx(np.mean(w[TARGETS] * -np.log(p_true())), rel=1e-6)
    assert loss_value("cb", beta=0.0) == pytest.approx(loss_value("ce"), rel=1e-6)


def test_class_balanced_focal_by_hand():
    w, p = cb_weights(COUNTS, 0.999), p_true()
    expected = np.mean(w[TARGETS] * (1 - p) ** 3 * -np.log(p))
    assert loss_value("cb_focal", beta=0.999, gamma=3.0) == pytest.approx(expected, rel=1e-6)


def test_hybrid_by_hand():
    # Le et al. eq. 3-5 with the paper's beta = 0.9999, gamma = 2, lambda = 0.5.
    w, p = cb_weights(COUNTS, 0.9999), p_true()
    ce = w[TARGETS] * -np.log(p)
    expected = np.mean(0.5 * ce + 0.5 * (1 - p) ** 2 * ce)
    assert loss_value("hybrid") == pytest.approx(expected, rel=1e-6)


def test_hybrid_endpoints():
    assert loss_value("hybrid", lam=0.0) == pytest.approx(loss_value("cb"), rel=1e-6)
    # Eq. 4 modulates the weighted CE, so lambda = 1 is focal loss with CB weights as alpha.
    assert loss_value("hybrid", lam=1.0) == pytest.approx(loss_value("cb_focal"), rel=1e-6)
    cb_alpha = cb_weights(COUNTS, 0.9999).tolist()
    assert loss_value("hybrid", lam=1.0) == pytest.approx(loss_value("focal", alpha=cb_alpha), rel=1e-6)
    with pytest.raises(ValueError, match="lam"):
        make_loss("hybrid", COUNTS, lam=1.5)


def test_focal_inverse_log_frequency_by_hand():
    w = 1 / np.log(1 + np.array(COUNTS, dtype=float))
    w = 3 * w / w.sum()
    np.testing.assert_allclose(inverse_log_frequency_weights(COUNTS), w, rtol=1e-12)
    p = p_true()
    assert loss_value("focal_ilf") == pytest.approx(np.mean(w[TARGETS] * (1 - p) ** 2 * -np.log(p)), rel=1e-6)


def test_ldam_margins():
    margins = make_loss("ldam_drw", COUNTS, drw_epoch=1).margins.numpy()
    # m_c proportional to n_c^{-1/4}, rarest class 0.5: 0.5 * (2 / n)^{1/4}.
    np.testing.assert_allclose(margins, 0.5 * (2 / np.array(COUNTS)) ** 0.25, rtol=1e-6)
    assert margins[0] < margins[1] < margins[2] == pytest.approx(0.5)


def ldam_by_hand(weights=None):
    m = 0.5 * (2 / np.array(COUNTS)) ** 0.25
    z = LOGITS.copy()
    z[np.arange(3), TARGETS] -= m[TARGETS]
    nll = -np.log(p_true(30.0 * z))
    if weights is None:
        return nll.mean()
    return (weights[TARGETS] * nll).sum() / weights[TARGETS].sum()


def test_ldam_deferred_reweighting():
    loss = make_loss("ldam_drw", COUNTS, drw_epoch=3)
    logits, targets = torch.tensor(LOGITS, dtype=torch.float32), torch.tensor(TARGETS)
    loss.set_epoch(2)
    assert not loss.reweighting
    assert loss(logits, targets).item() == pytest.approx(ldam_by_hand(), rel=1e-5)
    loss.set_epoch(3)
    assert loss.reweighting
    assert loss(logits, targets).item() == pytest.approx(ldam_by_hand(cb_weights(COUNTS, 0.9999)), rel=1e-5)


def test_logit_adjusted_by_hand():
    log_prior = np.log(np.array(COUNTS) / 62)
    expected = np.mean(-np.log(p_true(LOGITS + 0.7 * log_prior)))
    assert loss_value("logit_adjusted", tau=0.7) == pytest.approx(expected, rel=1e-6)
    assert loss_value("logit_adjusted", tau=0.0) == pytest.approx(loss_value("ce"), rel=1e-6)


def test_balanced_softmax_by_hand_equals_logit_adjusted_tau_one():
    expected = np.mean(-np.log(p_true(LOGITS + np.log(COUNTS))))
    assert loss_value("balanced_softmax") == pytest.approx(expected, rel=1e-6)
    assert loss_value("balanced_softmax") == pytest.approx(loss_value("logit_adjusted"), rel=1e-6)


def fitted_prior(loss_name):
    """softmax(b) for the bias-only model b minimising the loss on labels with COUNTS."""
    targets = torch.repeat_interleave(torch.arange(3), torch.tensor(COUNTS))
    loss = make_loss(loss_name, COUNTS)
    bias = torch.zeros(3, requires_grad=True)
    opt = torch.optim.LBFGS([bias], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = loss(bias.expand(len(targets), 3), targets)
        value.backward()
        return value

    opt.step(closure)
    return torch.softmax(bias.detach(), 0).numpy()


def test_logit_adjustment_moves_predictions_to_the_tail():
    # With no features CE learns the label prior; the logit-adjusted loss cancels it (Menon et al. 2021).
    np.testing.assert_allclose(fitted_prior("ce"), np.array(COUNTS) / 62, atol=1e-4)
    np.testing.assert_allclose(fitted_prior("logit_adjusted"), np.full(3, 1 / 3), atol=1e-4)


@pytest.mark.parametrize("name", LOSSES.names())
def test_gradients_flow(name):
    logits = torch.tensor(LOGITS, dtype=torch.float32, requires_grad=True)
    loss = make_loss(name, COUNTS, **REQUIRED.get(name, {}))
    loss(logits, torch.tensor(TARGETS)).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "name, buffer",
    [("focal", "class_weights"), ("cb", "class_weights"), ("hybrid", "class_weights"), ("focal_ilf", "class_weights"),
     ("ldam_drw", "drw_weights"), ("ldam_drw", "margins"), ("logit_adjusted", "offsets"), ("balanced_softmax", "offsets")],
)
def test_class_tensors_are_buffers(name, buffer):
    loss = make_loss(name, COUNTS, **REQUIRED.get(name, {})).to(torch.float64)
    assert dict(loss.named_buffers())[buffer].dtype == torch.float64


def test_unknown_name_lists_registered_losses():
    with pytest.raises(KeyError, match="balanced_softmax, cb, cb_focal, ce, focal, focal_ilf, hybrid, ldam_drw, logit_adjusted"):
        make_loss("dice", COUNTS)
