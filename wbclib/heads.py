"""Classifier heads trained on fixed embeddings (linear probe, decoupled re-training).

Head-only experiments read cached embeddings (see ``models.extract_embeddings``)
and train in seconds on a CPU.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .losses import make_loss
from .samplers import make_sampler


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
    x = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    counts = np.bincount(y.numpy(), minlength=num_classes)
    mean = x.mean(0) if standardize else torch.zeros(x.shape[1])
    std = x.std(0).clamp_min(1e-6) if standardize else torch.ones(x.shape[1])
    head = StandardizedLinear(mean, std, num_classes)
    criterion = make_loss(loss, counts.tolist(), **(loss_hparams or {}))
    loader = DataLoader(
        TensorDataset(x, y),
        batch_size=batch_size,
        sampler=make_sampler(sampler, y.numpy(), seed=seed),
    )
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * len(loader))
    head.train()
    for epoch in range(epochs):
        if hasattr(criterion, "set_epoch"):
            criterion.set_epoch(epoch)
        for xb, yb in loader:
            optimizer.zero_grad(set_to_none=True)
            criterion(head(xb), yb).backward()
            optimizer.step()
            scheduler.step()
    head.eval()
    return head


class StandardizedLinear(nn.Module):
    """``Linear((x - mean) / std)`` with the statistics stored as buffers."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, num_classes: int):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.linear = nn.Linear(mean.numel(), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear((x - self.mean) / self.std)


@torch.no_grad()
def predict_proba(head: nn.Module, features: np.ndarray) -> np.ndarray:
    x = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    return torch.softmax(head(x), dim=1).numpy()
