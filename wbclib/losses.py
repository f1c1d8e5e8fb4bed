"""Classification losses for long-tailed training, created by name.

Every factory takes ``class_counts`` (training images per class, a sequence of
ints) first, then its own keyword hyper-parameters, and returns an
``nn.Module`` mapping ``(logits, targets) -> scalar loss``. Class weights,
margins and priors are buffers, so ``.to(device)`` moves them with the module.
Losses that use the counts need every class to have at least one image.

Unless a docstring says otherwise, a batch's loss is the plain mean of the
per-sample losses (weighted per-sample losses are *not* divided by the sum of
the weights, unlike ``nn.CrossEntropyLoss(weight=...)``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .registry import Registry

LOSSES = Registry("loss")


def make_loss(name: str, class_counts: Sequence[int], **hparams) -> nn.Module:
    """Create the loss registered as ``name`` for a training set with ``class_counts``."""
    return LOSSES.create(name, class_counts, **hparams)


def _positive_counts(class_counts: Sequence[int]) -> np.ndarray:
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.ndim != 1 or (counts < 1).any():
        raise ValueError(f"every class needs at least one training image; got class_counts={list(class_counts)}")
    return counts


def _sum_to_num_classes(weights: np.ndarray) -> np.ndarray:
    # Cui et al. 2019 scale class weights to sum to C, so the loss keeps the size of unweighted CE.
    return weights * len(weights) / weights.sum()


def effective_number_weights(class_counts: Sequence[int], beta: float = 0.9999) -> np.ndarray:
    """Class-balanced weights ``(1 - beta) / (1 - beta^n_c)``, scaled to sum to C.

    Inverse effective number of samples (Cui et al. 2019; Le et al. 2026 eq. 2).
    ``beta = 0`` gives uniform weights; ``beta -> 1`` approaches ``1 / n_c``.
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must lie in [0, 1); got {beta}")
    counts = _positive_counts(class_counts)
    # -expm1(n log beta) = 1 - beta^n without cancellation for beta close to 1.
    effective_number = -np.expm1(counts * np.log(beta)) / (1.0 - beta) if beta > 0 else np.ones_like(counts)
    return _sum_to_num_classes(1.0 / effective_number)


def inverse_log_frequency_weights(class_counts: Sequence[int]) -> np.ndarray:
    """Class weights ``1 / log(1 + n_c)``, scaled to sum to C.

    The "inverse log-frequency class weights" of the hybrid-rescue paper
    (Nguyen et al. 2026, Sec. 2.3), which prints no formula; ``log(1 + n)``
    keeps a single-image class finite. The same rule as the ``inverse_log`` sampler.
    """
    return _sum_to_num_classes(1.0 / np.log1p(_positive_counts(class_counts)))


def _buffer(values: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values, dtype=np.float64), dtype=torch.float32)


class HybridFocalLoss(nn.Module):
    """``w_y * [(1 - lam) + lam * (1 - p_y)^gamma] * (-log p_y)``, averaged over the batch.

    Le et al. 2026 eq. 3-5: ``(1 - lam) * L_CE + lam * L_Focal`` with both terms
    carrying the class weight ``w_y`` (eq. 4 modulates the already weighted
    eq. 3). Special cases: ``lam = 1`` is focal loss (Lin et al. 2017) with
    alpha weights ``w``; ``lam = 0`` or ``gamma = 0`` is weighted cross-entropy.
    """

    def __init__(self, class_weights: np.ndarray, gamma: float = 2.0, lam: float = 1.0):
        super().__init__()
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must lie in [0, 1] (a convex combination); got {lam}")
        self.gamma = gamma
        self.lam = lam
        self.register_buffer("class_weights", _buffer(class_weights))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # float32 even under bf16 autocast: (1 - p)^gamma underflows in low precision.
        log_p = F.log_softmax(logits.float(), dim=1).gather(1, targets[:, None]).squeeze(1)
        modulation = (1.0 - self.lam) + self.lam * (1.0 - log_p.exp()).pow(self.gamma)
        return (self.class_weights[targets] * modulation * -log_p).mean()


class LogitAdjustedLoss(nn.Module):
    """Cross-entropy on ``logits + offsets``; predictions use the raw logits.

    Adding a per-class offset during training only makes the model learn logits
    that are lower by that offset, so at test time predictions move away from
    classes with large offsets (the head classes).
    """

    def __init__(self, offsets: np.ndarray):
        super().__init__()
        self.register_buffer("offsets", _buffer(offsets))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float() + self.offsets, targets)


class LDAMLoss(nn.Module):
    """LDAM with deferred re-weighting (Cao et al. 2019, LDAM-DRW).

    ``CE(s * (z - m_y e_y), y)`` with margins ``m_c`` proportional to
    ``n_c^{-1/4}``, the largest (rarest class) equal to ``max_margin``. From
    epoch ``drw_epoch`` on (see ``set_epoch``) samples are weighted by
    effective-number class weights; as in the authors' code the weighted batch
    loss is ``nn.CrossEntropyLoss(weight=...)``'s, i.e. divided by the sum of
    the batch's weights.

    Cao et al. apply ``s = 30`` to cosine logits (a normalised linear layer);
    on an unnormalised linear head the scale simply multiplies the logits.
    """

    def __init__(self, class_counts: Sequence[int], max_margin: float, scale: float, drw_epoch: int, beta: float):
        super().__init__()
        counts = _positive_counts(class_counts)
        margins = counts**-0.25
        self.register_buffer("margins", _buffer(margins * max_margin / margins.max()))
        self.register_buffer("drw_weights", _buffer(effective_number_weights(counts, beta)))
        self.scale = scale
        self.drw_epoch = drw_epoch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def reweighting(self) -> bool:
        return self.epoch >= self.drw_epoch

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        margin_logits = logits.float() - F.one_hot(targets, logits.shape[1]) * self.margins
        weight = self.drw_weights if self.reweighting else None
        return F.cross_entropy(self.scale * margin_logits, targets, weight=weight)


@LOSSES.register("ce")
def cross_entropy(class_counts: Sequence[int], label_smoothing: float = 0.0) -> nn.Module:
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)


@LOSSES.register("focal")
def focal(class_counts: Sequence[int], gamma: float = 2.0, alpha: Optional[Sequence[float]] = None) -> nn.Module:
    """Focal loss ``-alpha_y (1 - p_y)^gamma log p_y`` (Lin et al. 2017), softmax form; ``alpha`` default all ones."""
    alpha = np.ones(len(class_counts)) if alpha is None else np.asarray(alpha, dtype=float)
    return HybridFocalLoss(alpha, gamma=gamma, lam=1.0)


@LOSSES.register("cb")
def class_balanced_ce(class_counts: Sequence[int], beta: float = 0.9999) -> nn.Module:
    """Cross-entropy weighted by effective-number class weights (Le et al. 2026 eq. 3)."""
    return HybridFocalLoss(effective_number_weights(class_counts, beta), gamma=0.0, lam=0.0)


@LOSSES.register("cb_focal")
def class_balanced_focal(class_counts: Sequence[int], beta: float = 0.9999, gamma: float = 2.0) -> nn.Module:
    """Focal loss with effective-number class weights as alpha (Le et al. 2026 eq. 4, softmax form)."""
    return HybridFocalLoss(effective_number_weights(class_counts, beta), gamma=gamma, lam=1.0)


@LOSSES.register("hybrid")
def hybrid(class_counts: Sequence[int], beta: float = 0.9999, gamma: float = 2.0, lam: float = 0.5) -> nn.Module:
    """``(1 - lam) * CB-CE + lam * CB-focal``: the Stage-2 loss of Le et al. 2026 (eq. 2-5).

    Defaults are the paper's (beta = 0.9999, gamma = 2, lambda = 0.5).
    """
    return HybridFocalLoss(effective_number_weights(class_counts, beta), gamma=gamma, lam=lam)


@LOSSES.register("focal_ilf")
def focal_inverse_log_frequency(class_counts: Sequence[int], gamma: float = 2.0) -> nn.Module:
    """Cost-sensitive focal loss with inverse log-frequency class weights (Nguyen et al. 2026, gamma = 2)."""
    return HybridFocalLoss(inverse_log_frequency_weights(class_counts), gamma=gamma, lam=1.0)


@LOSSES.register("ldam_drw")
def ldam_drw(
    class_counts: Sequence[int],
    drw_epoch: int,
    max_margin: float = 0.5,
    scale: float = 30.0,
    beta: float = 0.9999,
) -> nn.Module:
    """LDAM margins with class-balanced re-weighting from epoch ``drw_epoch`` (Cao et al. 2019).

    ``drw_epoch`` has no default because it only makes sense relative to the
    schedule: Cao et al. switch at 160 of 200 epochs.
    """
    return LDAMLoss(class_counts, max_margin=max_margin, scale=scale, drw_epoch=drw_epoch, beta=beta)


@LOSSES.register("logit_adjusted")
def logit_adjusted(class_counts: Sequence[int], tau: float = 1.0) -> nn.Module:
    """Logit-adjusted cross-entropy ``CE(z + tau * log pi, y)``, ``pi_c = n_c / N`` (Menon et al. 2021)."""
    counts = _positive_counts(class_counts)
    return LogitAdjustedLoss(tau * np.log(counts / counts.sum()))


@LOSSES.register("balanced_softmax")
def balanced_softmax(class_counts: Sequence[int]) -> nn.Module:
    """Balanced softmax ``CE(z + log n_c, y)`` (Ren et al. 2020).

    Softmax ignores a shared shift, so this equals ``logit_adjusted`` with tau = 1.
    """
    return LogitAdjustedLoss(np.log(_positive_counts(class_counts)))
