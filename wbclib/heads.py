"""Classifier heads trained on fixed embeddings (linear probe, decoupled re-training).

Head-only experiments read cached embeddings (see ``models.extract_embeddings``)
and train in seconds on a CPU.

The decoupled classifiers follow Kang et al. 2020 ("Decoupling representation
and classifier for long-tailed recognition"): keep the embeddings, then

* ``crt`` re-trains a freshly initialised linear head with class-balanced
  sampling (here with the hybrid loss of Le et al. 2026, Sec. 2.2.2);
* ``tau_normalize`` rescales each class's weight vector by ``1 / ||w_c||^tau``;
* ``fit_lws`` freezes the head and learns one scale per class.

``HEADS`` names complete recipes with one signature so notebooks can sweep them.
"""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from sklearn.metrics import f1_score
from torch import nn

from .losses import make_loss
from .registry import Registry
from .samplers import make_sampler


@contextmanager
def single_torch_thread() -> Iterator[None]:
    """Run heads and other small matrix products on one torch thread: on
    shared cores extra threads only add contention (several times slower).
    Random training transforms use it too (``augment``): torch rounds some
    operations differently with 1 and 2 threads, and a draw must not depend
    on whether a loader worker or the main process computes it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


HEADS = Registry("head")


def train_on_embeddings(
    module: nn.Module,
    params: Sequence[nn.Parameter],
    x: torch.Tensor,
    y: torch.Tensor,
    criterion,
    sampler: str,
    epochs: int,
    lr: float,
    weight_decay: float,
    batch_size: int,
    seed: int,
    min_batch: int = 1,
) -> None:
    """The one training loop for heads on fixed embeddings (linear heads here,
    the rescue chapter's contrastive verifier): AdamW with a cosine schedule
    over ``epochs`` passes of the named sampler.

    Batches are the sampler's indices in consecutive chunks of ``batch_size``
    (what a ``DataLoader`` with that sampler yields), gathered from the
    tensors directly: per-sample dataset access and collation would cost more
    than the training steps themselves. ``criterion(outputs, labels)``;
    batches smaller than ``min_batch`` are skipped (a contrastive loss needs
    two rows); the schedule counts them all the same.
    """
    index_sampler = make_sampler(sampler, y.numpy(), seed=seed)
    steps_per_epoch = math.ceil(len(index_sampler) / batch_size)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    module.train()
    for epoch in range(epochs):
        if hasattr(criterion, "set_epoch"):
            criterion.set_epoch(epoch)
        order = torch.as_tensor(list(iter(index_sampler)), dtype=torch.long)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            if len(idx) < min_batch:
                continue
            optimizer.zero_grad(set_to_none=True)
            criterion(module(x[idx]), y[idx]).backward()
            optimizer.step()
            scheduler.step()
    module.eval()


def _as_tensors(features: np.ndarray, labels: Sequence[int]):
    x = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    y = torch.as_tensor(np.array(labels, dtype=np.int64))  # a copy: pandas may hand out read-only arrays
    return x, y


def fit_linear_head(
    features: np.ndarray,
    labels: Sequence[int],
    num_classes: int,
    loss: str = "ce",
    sampler: str = "instance",
    epochs: int = 30,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    batch_size: int = 256,
    seed: int = 0,
    loss_hparams: Optional[dict] = None,
    standardize: bool = True,
) -> nn.Module:
    """Train a linear classifier on fixed ``features`` (N, D) with a named loss and sampler.

    Returns a module mapping features to logits; when ``standardize`` is set the
    per-dimension mean/std of the training features are folded in, so callers
    pass raw embeddings at prediction time too.
    """
    torch.manual_seed(seed)
    x, y = _as_tensors(features, labels)
    counts = np.bincount(y.numpy(), minlength=num_classes)
    mean = x.mean(0) if standardize else torch.zeros(x.shape[1])
    std = x.std(0).clamp_min(1e-6) if standardize else torch.ones(x.shape[1])
    head = StandardizedLinear(mean, std, num_classes)
    criterion = make_loss(loss, counts.tolist(), **(loss_hparams or {}))
    # Standardised once rather than per batch: an element-wise step, so the same numbers,
    # and each step only runs the linear layer (a sixth of a fit's time went to it).
    train_on_embeddings(head.linear, list(head.parameters()), (x - mean) / std, y, criterion, sampler, epochs, lr,
                        weight_decay, batch_size, seed)
    head.eval()
    return head


def crt(
    features: np.ndarray,
    labels: Sequence[int],
    num_classes: int,
    loss: str = "hybrid",
    sampler: str = "class_balanced",
    **fit_kwargs,
) -> nn.Module:
    """Classifier re-training (cRT): a new linear head on fixed embeddings, re-balanced.

    Defaults are Stage 2 of Le et al. 2026: class-balanced sampling and the
    hybrid CB-CE + CB-focal loss. Note that the two re-balance twice (uniform
    class sampling, then weights close to ``1 / n_c``), as in the paper.
    Other arguments go to ``fit_linear_head``.
    """
    return fit_linear_head(features, labels, num_classes, loss=loss, sampler=sampler, **fit_kwargs)


class StandardizedLinear(nn.Module):
    """``Linear((x - mean) / std)`` with the statistics stored as buffers."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, num_classes: int, bias: bool = True):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.linear = nn.Linear(mean.numel(), num_classes, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear((x - self.mean) / self.std)


@torch.no_grad()
def tau_normalize(head: StandardizedLinear, tau: float) -> StandardizedLinear:
    """A copy of ``head`` with weight rows ``w_c / ||w_c||^tau`` and no bias (Kang et al. 2020).

    Instance-balanced training gives head classes larger weight norms; tau = 1
    equalises them, tau = 0 keeps them. Kang et al. drop the bias, so tau = 0
    reproduces ``head`` only when its bias is zero. On standardised features
    the bias also carries the class prior, so dropping it is a re-balancing
    step of its own.
    """
    norms = head.linear.weight.norm(dim=1, keepdim=True)
    normalized = StandardizedLinear(head.mean.clone(), head.std.clone(), head.linear.out_features, bias=False)
    normalized.linear.weight.copy_(head.linear.weight / norms.pow(tau))
    return normalized.eval()


def _macro_f1(head: nn.Module, features: np.ndarray, labels: Sequence[int]) -> float:
    pred = predict_proba(head, features).argmax(1)
    return float(f1_score(np.asarray(labels), pred, average="macro", zero_division=0))


def choose_tau(
    head: StandardizedLinear,
    val_features: np.ndarray,
    val_labels: Sequence[int],
    taus: Sequence[float] = tuple(np.linspace(0.0, 1.0, 11)),
) -> float:
    """The tau in ``taus`` whose tau-normalised head has the best validation macro-F1 (first on ties)."""
    scores = [_macro_f1(tau_normalize(head, tau), val_features, val_labels) for tau in taus]
    return float(taus[int(np.argmax(scores))])


class LearnableWeightScaling(nn.Module):
    """``f_c * head(x)_c``: a frozen head times one learnt scale per class (Kang et al. 2020, LWS).

    As in the authors' code the scale multiplies the whole logit, bias included.
    """

    def __init__(self, head: nn.Module, num_classes: int):
        super().__init__()
        self.head = head
        self.head.requires_grad_(False)
        self.scales = nn.Parameter(torch.ones(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x) * self.scales


def fit_lws(
    head: nn.Module,
    features: np.ndarray,
    labels: Sequence[int],
    loss: str = "ce",
    sampler: str = "class_balanced",
    epochs: int = 10,
    lr: float = 1e-2,
    batch_size: int = 256,
    seed: int = 0,
    loss_hparams: Optional[dict] = None,
) -> LearnableWeightScaling:
    """Learn per-class logit scales for a copy of ``head`` with class-balanced sampling.

    ``head`` itself is left untouched. No weight decay: it would pull the
    scales towards 0 rather than towards the identity.
    """
    torch.manual_seed(seed)
    x, y = _as_tensors(features, labels)
    with torch.no_grad():
        num_classes = head(x[:1]).shape[1]
    scaled = LearnableWeightScaling(copy.deepcopy(head), num_classes)
    counts = np.bincount(y.numpy(), minlength=num_classes)
    criterion = make_loss(loss, counts.tolist(), **(loss_hparams or {}))
    train_on_embeddings(scaled, [scaled.scales], x, y, criterion, sampler, epochs, lr, 0.0, batch_size, seed)
    return scaled


@torch.no_grad()
def predict_proba(head: nn.Module, features: np.ndarray) -> np.ndarray:
    x = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    return torch.softmax(head(x), dim=1).numpy()


def make_head(
    name: str,
    train_features: np.ndarray,
    train_labels: Sequence[int],
    val_features: np.ndarray,
    val_labels: Sequence[int],
    num_classes: int,
    seed: int = 0,
    **hparams,
) -> nn.Module:
    """Fit the head recipe registered as ``name``; recipes that tune nothing ignore the validation set."""
    return HEADS.create(name, train_features, train_labels, val_features, val_labels, num_classes, seed, **hparams)


@HEADS.register("linear_probe")
def linear_probe_recipe(train_features, train_labels, val_features, val_labels, num_classes, seed, **fit_kwargs):
    """Plain linear head, instance-balanced CE unless ``fit_kwargs`` say otherwise."""
    return fit_linear_head(train_features, train_labels, num_classes, seed=seed, **fit_kwargs)


@HEADS.register("crt")
def crt_recipe(train_features, train_labels, val_features, val_labels, num_classes, seed, **crt_kwargs):
    """Classifier re-training with class-balanced sampling and the hybrid loss (see ``crt``)."""
    return crt(train_features, train_labels, num_classes, seed=seed, **crt_kwargs)


@HEADS.register("tau_norm")
def tau_norm_recipe(
    train_features, train_labels, val_features, val_labels, num_classes, seed,
    tau: Optional[float] = None, taus: Sequence[float] = tuple(np.linspace(0.0, 1.0, 11)), **probe_kwargs,
):
    """Instance-balanced linear probe, then tau-normalised; tau chosen on validation macro-F1 unless given."""
    probe = fit_linear_head(train_features, train_labels, num_classes, seed=seed, **probe_kwargs)
    if tau is None:
        tau = choose_tau(probe, val_features, val_labels, taus)
    return tau_normalize(probe, tau)


@HEADS.register("lws")
def lws_recipe(
    train_features, train_labels, val_features, val_labels, num_classes, seed,
    lws_epochs: int = 10, lws_lr: float = 1e-2, **probe_kwargs,
):
    """Instance-balanced linear probe, then learnable weight scaling with class-balanced sampling."""
    probe = fit_linear_head(train_features, train_labels, num_classes, seed=seed, **probe_kwargs)
    return fit_lws(probe, train_features, train_labels, epochs=lws_epochs, lr=lws_lr, seed=seed)
