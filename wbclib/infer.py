"""Inference: test-time augmentation (TTA) and ensembles of saved predictions.

* :func:`dihedral_views` – the 8 exact flips/rotations of an image batch;
* :func:`predict_tta` – softmax probabilities averaged over K of those views
  (Le et al. 2026, eq. 6 with one model);
* :func:`average_predictions` – probability averaging of several saved
  ``predictions_<set>.csv`` tables (eq. 6 over models), with the predicted
  class re-derived from the averaged probabilities (eq. 7).

For frozen-feature heads, TTA happens in embedding space: the image table
gets a ``view`` column (see :class:`models.ImageTable`), each view's
embedding is cached, and the head's probabilities are averaged over views
(:func:`protocols.pbc_lt.head_proba`).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset

from . import precision
from .augment import dihedral, dihedral_inverse
from ._parallel import batches, image_loader

__all__ = ["dihedral", "dihedral_inverse", "dihedral_views", "predict_tta", "average_predictions",
           "prob_columns", "classes_of"]


def dihedral_views(x: torch.Tensor) -> List[torch.Tensor]:
    """The 8 views of a batch (N, C, H, W) under the symmetries of the square:
    4 rotations, each with and without a horizontal flip; view 0 is ``x``.
    Square images keep their shape; use :func:`dihedral_inverse` to undo one."""
    if x.ndim != 4:
        raise ValueError(f"expected a batch (N, C, H, W), got shape {tuple(x.shape)}")
    return [dihedral(x, k) for k in range(8)]


@torch.no_grad()
def predict_tta(method_or_fn: Union[nn.Module, Callable[[torch.Tensor], torch.Tensor]], dataset: Dataset,
                k: int = 8, batch_size: int = 128, device: Optional[torch.device] = None,
                num_workers: Optional[int] = None, desc: str = "predict (TTA)") -> np.ndarray:
    """Class probabilities (N, C) averaged over the first ``k`` dihedral views.

    ``method_or_fn`` is a :class:`methods.Method` (its ``predict`` is used), any
    module, or a function mapping an image batch to logits. ``dataset``
    yields ``(image, label, domain)`` like :class:`models.ImageTable`.
    ``k = 1`` is the plain prediction.
    """
    if not 1 <= k <= 8:
        raise ValueError(f"k must be between 1 and 8 dihedral views, got {k}")
    if isinstance(method_or_fn, nn.Module):
        module = method_or_fn.eval()
        fn = getattr(module, "predict", module)
        params = list(module.parameters())
        device = device or (params[0].device if params else torch.device("cpu"))
    else:
        fn = method_or_fn
        device = device or torch.device("cpu")
    loader = image_loader(dataset, batch_size, device, num_workers, shuffle=False)
    out = []
    for x, _, _ in batches(loader, desc=desc, leave=False):
        x = x.to(device)
        total = 0.0
        for view in dihedral_views(x)[:k]:
            with precision.autocast(device):  # the same precision as every other prediction
                logits = fn(view)
            total = total + torch.softmax(logits.float(), dim=1)
        out.append((total / k).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def prob_columns(frame: pd.DataFrame) -> List[str]:
    """The ``prob_<class>`` columns of a predictions table, in order."""
    return [c for c in frame.columns if c.startswith("prob_")]


def classes_of(frame: pd.DataFrame) -> List[str]:
    return [c[len("prob_"):] for c in prob_columns(frame)]


#: Columns that must agree row by row before predictions can be averaged.
_ROW_IDENTITY = ("path", "label", "degradation", "severity")


def average_predictions(frames: Sequence[pd.DataFrame], weights: Optional[Sequence[float]] = None) -> pd.DataFrame:
    """Average the class probabilities of several prediction tables of the same images.

    Every table must list the same images in the same order (identical
    ``path``, ``label`` and, where present, ``degradation``/``severity``) and
    the same ``prob_<class>`` columns; otherwise a ``ValueError`` names the
    first difference. Returns the first table's identity columns, ``pred``
    (argmax of the averaged probabilities) and the averaged ``prob_*``.
    ``weights`` (one per table, default equal) are normalised to sum to 1.
    """
    frames = list(frames)
    if not frames:
        raise ValueError("average_predictions needs at least one predictions table")
    first = frames[0]
    probs = prob_columns(first)
    if not probs:
        raise ValueError("predictions table 0 has no prob_<class> columns")
    for i, frame in enumerate(frames[1:], start=1):
        if len(frame) != len(first):
            raise ValueError(f"predictions table {i} has {len(frame)} rows, table 0 has {len(first)}")
        if prob_columns(frame) != probs:
            raise ValueError(f"predictions table {i} has class columns {prob_columns(frame)}, table 0 has {probs}")
        for col in _ROW_IDENTITY:
            if (col in first) != (col in frame):
                raise ValueError(f"column {col!r} is in only one of predictions tables 0 and {i}")
            if col in first:
                a, b = first[col].astype(str).to_numpy(), frame[col].astype(str).to_numpy()
                diff = np.flatnonzero(a != b)
                if len(diff):
                    j = int(diff[0])
                    raise ValueError(f"predictions table {i} differs from table 0 in {col!r} at row {j} "
                                     f"({b[j]!r} vs {a[j]!r}; {len(diff)} rows differ): not the same images in "
                                     "the same order")
    w = np.ones(len(frames)) if weights is None else np.asarray(weights, dtype=float)
    if w.shape != (len(frames),) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be {len(frames)} non-negative numbers with a positive sum, got {weights}")
    w = w / w.sum()
    mean = sum(wi * f[probs].to_numpy(dtype=np.float64) for wi, f in zip(w, frames))
    keep = [c for c in first.columns if c not in probs and c != "pred"]
    out = first[keep].reset_index(drop=True).copy()
    classes = classes_of(first)
    out["pred"] = [classes[i] for i in mean.argmax(1)]
    for j, c in enumerate(probs):
        out[c] = mean[:, j]
    return out
