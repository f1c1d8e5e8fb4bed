"""SWAD: dense weight averaging over the low-validation-loss window (Cha et al. 2021).

Training is cut into *segments* (the steps between two validations). Within a
segment the weights after every optimiser step are averaged densely; at each
validation the segment is closed with its validation loss. SWAD's "loss
valley" rule then decides which segments enter the final average:

* **start** – the first segment that stays the lowest loss of the
  ``n_converge`` segments from it onwards (the loss stopped falling); the
  threshold is ``(1 + tolerance_ratio)`` times the mean loss of those
  segments, and up to ``n_tolerance - n_converge`` earlier segments whose
  loss is already under the threshold join too;
* **end** – a later segment joins while some segment among it and the next
  ``n_tolerance - 1`` has a loss under the threshold; the first that fails
  closes the window (the "dead valley").

The final weights are the mean of every step's weights in the chosen
segments. Batch-norm statistics of averaged weights should be re-estimated
(:func:`update_bn`).

The rule applies alike to every method:

* **which segments** – only steps that train the model finally kept are
  collected: a module whose ``swad_eligible`` attribute is False at a step
  (SADA during its representation-learning stage 1, whose validation loss
  scores a classifier fitted on moving features) is skipped, and so is that
  segment. This is the SADA authors' trainer, which starts SWAD at
  ``self_supervised_step``; one-stage methods are collected throughout.
* **a loss still falling at the end** – when no segment has been the lowest
  of the ``n_converge`` after it by the end of training (a loss that keeps
  falling, e.g. SADA's classifier-only stage 2 at a decaying rate), the end
  of training counts as the convergence point: the last ``n_converge``
  segments open the window with the same threshold and the same earlier
  segments as above. (The official code returns the last model alone there:
  in the cross-lab runs a method whose loss turned early then averaged 16-19
  epochs and one whose loss kept falling averaged one.) With fewer than
  ``n_converge`` segments the lowest-loss segment is used.

Any model can be averaged: call :meth:`SWAD.collect` after each step and
:meth:`SWAD.end_segment` after each validation (``train.train_run`` does,
with ``swad={...}``).
"""
from __future__ import annotations

import warnings
from collections import deque
from dataclasses import dataclass
from typing import Deque, Dict, Iterable, List, Optional

import torch
from torch import nn


@dataclass
class _Segment:
    index: int
    loss: float
    steps: int
    total: Dict[str, torch.Tensor]  # sum of the collected weights


def _averageable(module: nn.Module) -> Dict[str, torch.Tensor]:
    """Floating-point parameters and buffers by state-dict name (integer
    buffers such as batch counters are taken from the last model)."""
    return {k: v for k, v in module.state_dict().items() if torch.is_floating_point(v)}


class SWAD:
    """Online loss-valley weight averaging; see the module docstring.

    Defaults are those of the SADA authors' configuration (``n_converge`` 4,
    ``n_tolerance`` 6, ``tolerance_ratio`` 0.3).
    """

    def __init__(self, n_converge: int = 4, n_tolerance: int = 6, tolerance_ratio: float = 0.3):
        if n_converge < 1 or n_tolerance < 1:
            raise ValueError("n_converge and n_tolerance must be at least 1")
        self.n_converge, self.n_tolerance, self.tolerance_ratio = n_converge, n_tolerance, tolerance_ratio
        self._current: Optional[Dict[str, torch.Tensor]] = None
        self._current_steps = 0
        self._recent: Deque[_Segment] = deque(maxlen=max(n_converge, n_tolerance))
        self._pending: Deque[_Segment] = deque()
        self._sum: Optional[Dict[str, torch.Tensor]] = None
        self._steps = 0
        self._best: Optional[_Segment] = None
        self.losses: List[float] = []
        self.window: List[int] = []  # indices of the segments averaged
        self.threshold: Optional[float] = None
        self.converged_at: Optional[int] = None
        self.closed = False
        self.valley_found = False  # convergence seen during training (not only at its end)
        self.segments_seen = 0  # segments closed, skipped ones included: windows index epochs
        self.skipped_steps = 0  # steps of modules that were not ``swad_eligible``

    # collecting ------------------------------------------------------------

    @torch.no_grad()
    def collect(self, module: nn.Module) -> None:
        """Add the module's current weights to the open segment, unless the module
        says its current training stage is not averaged (``swad_eligible`` False)."""
        if not getattr(module, "swad_eligible", True):
            self.skipped_steps += 1
            return
        weights = _averageable(module)
        if self._current is None:
            self._current = {k: v.detach().double().clone() for k, v in weights.items()}
        else:
            for k, v in weights.items():
                self._current[k] += v.detach().double()
        self._current_steps += 1

    def end_segment(self, val_loss: float) -> None:
        """Close the open segment with its validation loss and update the window
        (a segment with no collected step is skipped)."""
        index = self.segments_seen
        self.segments_seen += 1
        if self._current is None:
            return
        segment = _Segment(index, float(val_loss), self._current_steps, self._current)
        self._current, self._current_steps = None, 0
        self.losses.append(segment.loss)
        if self._best is None or segment.loss < self._best.loss:
            self._best = segment
        if self.closed:
            return
        self._recent.append(segment)
        if self.converged_at is None:
            self._try_converge()
        else:
            self._pending.append(segment)
            self._decide(final=False)

    def _add(self, segment: _Segment) -> None:
        if self._sum is None:
            self._sum = {k: v.clone() for k, v in segment.total.items()}
        else:
            for k, v in segment.total.items():
                self._sum[k] += v
        self._steps += segment.steps
        self.window.append(segment.index)

    def _try_converge(self, at_end: bool = False) -> None:
        """Open the window when the first of the last ``n_converge`` segments is
        their lowest; ``at_end`` (training is over) opens it there regardless."""
        recent = list(self._recent)
        if len(recent) < self.n_converge:
            return
        last = recent[-self.n_converge:]
        if not at_end and min(range(self.n_converge), key=lambda i: last[i].loss) != 0:
            return
        self.valley_found = not at_end
        start = last[0]
        self.converged_at = start.index
        self.threshold = (1 + self.tolerance_ratio) * sum(s.loss for s in last) / self.n_converge
        before = recent[: len(recent) - self.n_converge][-max(0, self.n_tolerance - self.n_converge):] \
            if self.n_tolerance > self.n_converge else []
        joined = []
        for segment in reversed(before):
            if segment.loss > self.threshold:
                break
            joined.insert(0, segment)
        for segment in joined + [start]:
            self._add(segment)
        self._pending.extend(last[1:])
        self._decide(final=False)

    def _decide(self, final: bool) -> None:
        """Admit pending segments whose look-ahead window (itself and the next
        ``n_tolerance - 1``) holds a loss under the threshold; close at the first that has none."""
        while self._pending and not self.closed:
            ahead = list(self._pending)[: self.n_tolerance]
            if len(ahead) < self.n_tolerance and not final:
                if min(s.loss for s in ahead) <= self.threshold:
                    self._add(self._pending.popleft())
                    continue
                return
            if min(s.loss for s in ahead) > self.threshold:
                self.closed = True
                self._pending.clear()
                return
            self._add(self._pending.popleft())

    # results -----------------------------------------------------------------

    @property
    def converged(self) -> bool:
        """Whether the loss valley was found during training (see :attr:`rule`)."""
        return self.converged_at is not None and self.valley_found

    @property
    def rule(self) -> str:
        """How the window was chosen: ``"valley"``, ``"end of training"`` (the
        loss still fell) or ``"lowest segment"`` (fewer than ``n_converge`` segments)."""
        if self.converged_at is None:
            return "lowest segment"
        return "valley" if self.valley_found else "end of training"

    def averaged_state(self, reference: nn.Module) -> Dict[str, torch.Tensor]:
        """A full state dict for ``reference``: the averaged floating-point
        tensors (in their original dtypes), the rest from ``reference``."""
        if self.converged_at is None and not self.closed:
            self._try_converge(at_end=True)
        if self.converged_at is not None:
            self._decide(final=True)
            total, steps = self._sum, self._steps
        elif self._best is not None:
            total, steps = self._best.total, self._best.steps
            self.window = [self._best.index]
        elif self.skipped_steps:
            warnings.warn("SWAD: no step was eligible for averaging (e.g. SADA never reached stage 2); "
                          "the final weights are kept")
            return reference.state_dict()
        else:
            raise RuntimeError("SWAD collected no segment: call collect() and end_segment() during training")
        state = reference.state_dict()
        return {k: (total[k] / steps).to(v.dtype) if k in total else v for k, v in state.items()}

    def summary(self) -> dict:
        averaged = self._steps if self.converged_at is not None else (self._best.steps if self._best else 0)
        return dict(converged=self.converged, rule=self.rule, window=list(self.window), threshold=self.threshold,
                    steps_averaged=averaged, steps_skipped=self.skipped_steps, losses=list(self.losses))

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)
        if "valley_found" not in state:  # saved before the end-of-training rule: any convergence was a valley
            self.valley_found = state.get("converged_at") is not None
            self.segments_seen = len(state.get("losses", []))


@torch.no_grad()
def update_bn(module: nn.Module, batches: Iterable, forward=None, max_batches: int = 50) -> None:
    """Re-estimate batch-norm running statistics with a pass over training
    batches (``forward(batch)`` runs the model, default ``module(batch)``);
    no-op for models without batch norm. Only the batch norms that train in
    ``module.train()`` are re-estimated: a frozen stage stays in eval mode
    there (:class:`models.Normalized`), would see no batch and keep its
    ImageNet statistics, so those are kept rather than reset (resetting them
    left mean 0 and variance 1 in the frozen stem and stages: pbc validation
    macro-F1 0.39 for a cross-lab fine-tune with three stages frozen)."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    was_training = module.training
    module.train()
    norms = [m for m in norms if m.training]
    momenta = {m: m.momentum for m in norms}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the pass
    for i, batch in enumerate(batches):
        if i >= max_batches:
            break
        (forward or module)(batch)
    for m, momentum in momenta.items():
        m.momentum = momentum
    module.train(was_training)
