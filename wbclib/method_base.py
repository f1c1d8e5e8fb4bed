"""The base of every training method: the :class:`Method` interface
(``update(minibatches) -> dict``, ``predict(x) -> logits``, declared
hyper-parameter defaults) and the ``METHODS`` registry.

It sits below both :mod:`wbclib.methods` (ERM, CORAL, DANN, Mixup, SelfReg,
BoDA) and :mod:`wbclib.sada` (SADA), so neither imports the other's module
to subclass or register.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .losses import make_loss
from .registry import Registry

METHODS = Registry("method")
Minibatches = Sequence[Tuple[torch.Tensor, torch.Tensor]]


class Method(nn.Module):
    """Base class: a featurizer, a linear classifier and AdamW."""

    defaults: Dict[str, object] = {"lr": 1e-3, "weight_decay": 1e-4, "loss": "ce", "loss_hparams": {}}
    #: Whether the current updates train the model finally kept, so that SWAD
    #: averages them (:meth:`swad.SWAD.collect`); two-stage methods say False
    #: during their first stage.
    swad_eligible: bool = True
    #: A ``torch.amp.GradScaler`` when training autocasts to float16 (the trainer
    #: sets it, see :func:`precision.autocast_dtype`); :meth:`step` then scales the loss.
    grad_scaler: Optional["torch.amp.GradScaler"] = None

    def __init__(
        self,
        featurizer: nn.Module,
        num_features: int,
        num_classes: int,
        num_domains: int = 1,
        class_counts: Optional[Sequence[int]] = None,
        hparams: Optional[dict] = None,
    ):
        super().__init__()
        self.hparams = self.resolve_hparams(hparams)
        self.num_features = num_features
        self.num_classes = num_classes
        self.num_domains = num_domains
        self.class_counts = list(class_counts) if class_counts is not None else [1] * num_classes
        self.featurizer = featurizer
        self.classifier = nn.Linear(num_features, num_classes)
        # ``loss_hparams`` are the loss's own settings (e.g. ``{"drw_epoch": 8}`` for LDAM-DRW).
        self.criterion = make_loss(self.hparams["loss"], self.class_counts, **dict(self.hparams["loss_hparams"] or {}))
        self.optimizer = self.make_optimizer(self.parameters())

    @classmethod
    def resolve_hparams(cls, hparams: Optional[dict]) -> dict:
        merged = {}
        for klass in reversed(cls.__mro__):
            merged.update(getattr(klass, "defaults", {}))
        unknown = set(hparams or {}) - set(merged)
        if unknown:
            raise KeyError(f"{cls.__name__}: unknown hyper-parameter(s) {sorted(unknown)}; known: {sorted(merged)}")
        merged.update(hparams or {})
        return merged

    def make_optimizer(self, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"])

    def optimizers(self) -> List[torch.optim.Optimizer]:
        """Every optimiser the method steps (the trainer schedules them all)."""
        return [self.optimizer]

    def set_epoch(self, epoch: int) -> None:
        """Called by the trainer at the start of each epoch (for schedules such as DRW)."""
        if hasattr(self.criterion, "set_epoch"):
            self.criterion.set_epoch(epoch)

    def featurize(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings (N, num_features), e.g. for decoupled classifier re-training."""
        return self.featurizer(x)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.featurize(x))

    def update(self, minibatches: Minibatches) -> Dict[str, float]:
        raise NotImplementedError

    def pool(self, minibatches: Minibatches) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All domains' images and labels in one batch, with each image's domain
        index (its minibatch's position)."""
        x = torch.cat([x for x, _ in minibatches])
        y = torch.cat([y for _, y in minibatches])
        domains = torch.cat([torch.full((len(y),), k, dtype=torch.long, device=y.device)
                             for k, (_, y) in enumerate(minibatches)])
        return x, y, domains

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.grad_scaler is None:
            loss.backward()
            self.optimizer.step()
            return
        # float16 training: backward through the scaled loss; the scaler unscales the gradients
        # (before any clipping a method adds), skips a step whose gradients overflowed, and adapts.
        self.grad_scaler.scale(loss).backward()
        self.grad_scaler.unscale_(self.optimizer)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()

    def require_one_pair_per_domain(self, minibatches: Minibatches) -> None:
        """For methods that use the minibatch position as the domain label."""
        if len(minibatches) != self.num_domains:
            raise ValueError(f"{type(self).__name__} needs one (x, y) pair per training domain in domain order "
                             f"(empty for a domain absent from the batch): got {len(minibatches)} pairs for "
                             f"{self.num_domains} domains")


def full_precision(t: torch.Tensor):
    """Context without autocast: second-order statistics and matrix factorisations
    lose too much in bfloat16 (the trainer runs ``update`` under autocast on GPU)."""
    return torch.autocast(t.device.type, enabled=False)
