"""The four metrics the papers report, per-class tables, intervals and summaries.

Macro-F1 is the primary metric. Macro-specificity is the mean over classes of
TN / (TN + FP) in the one-vs-rest sense. Classes absent from both truth and
prediction are left out of the macro averages; a class present in one of them
scores 0 where its denominator is empty (scikit-learn's ``zero_division=0``).
"""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np
import pandas as pd

METRICS = ("macro_f1", "balanced_accuracy", "macro_precision", "macro_specificity")
#: Resampled indices held at once by :func:`bootstrap_ci` (8 bytes each).
_BOOT_INDICES = 2**22


def confusion(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> np.ndarray:
    """Confusion counts, rows true class, columns predicted class."""
    y_true = np.asarray(y_true, dtype=int)
    y_pred = np.asarray(y_pred, dtype=int)
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def _per_class_from_confusion(cm: np.ndarray) -> Dict[str, np.ndarray]:
    tp = np.diag(cm).astype(float)
    support = cm.sum(1).astype(float)
    predicted = cm.sum(0).astype(float)
    tn = cm.sum() - support - predicted + tp
    fp = predicted - tp

    def ratio(a, b):
        return np.divide(a, b, out=np.zeros_like(a), where=b > 0)

    precision = ratio(tp, predicted)
    recall = ratio(tp, support)
    f1 = ratio(2 * tp, support + predicted)
    specificity = ratio(tn, tn + fp)
    return dict(precision=precision, recall=recall, f1=f1, specificity=specificity,
                support=support, predicted=predicted)


def scores(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> Dict[str, float]:
    """Macro-F1, balanced accuracy, macro-precision, macro-specificity, accuracy."""
    return _scores_from_confusion(confusion(y_true, y_pred, num_classes))


def _scores_from_confusion(cm: np.ndarray) -> Dict[str, float]:
    pc = _per_class_from_confusion(cm)
    present = (pc["support"] + pc["predicted"]) > 0
    in_truth = pc["support"] > 0
    return {
        "macro_f1": float(pc["f1"][present].mean()),
        "balanced_accuracy": float(pc["recall"][in_truth].mean()),
        "macro_precision": float(pc["precision"][present].mean()),
        "macro_specificity": float(pc["specificity"][present].mean()),
        "accuracy": float(np.trace(cm) / max(cm.sum(), 1)),
    }


def per_class(y_true: Sequence[int], y_pred: Sequence[int], class_names: Sequence[str]) -> pd.DataFrame:
    """Precision, recall, F1, specificity and support for each class."""
    cm = confusion(y_true, y_pred, len(class_names))
    pc = _per_class_from_confusion(cm)
    table = pd.DataFrame({k: pc[k] for k in ("precision", "recall", "f1", "specificity", "support")},
                         index=pd.Index(class_names, name="class"))
    table["support"] = table["support"].astype(int)
    return table


def _metric_of_confusions(cms: np.ndarray, metric: str) -> np.ndarray:
    """:func:`scores`' ``metric`` of each confusion matrix of ``cms`` (B, C, C):
    the per-class ratios element-wise over the batch, then each row's mean over
    its own classes, so every value has the digits :func:`scores` gives."""
    if metric == "accuracy":
        return np.array([float(np.trace(cm) / max(cm.sum(), 1)) for cm in cms])
    tp = np.diagonal(cms, axis1=1, axis2=2).astype(float)
    support = cms.sum(2).astype(float)
    predicted = cms.sum(1).astype(float)

    def ratio(a, b):
        return np.divide(a, b, out=np.zeros_like(a), where=b > 0)

    if metric == "macro_f1":
        per_class, keep = ratio(2 * tp, support + predicted), (support + predicted) > 0
    elif metric == "balanced_accuracy":
        per_class, keep = ratio(tp, support), support > 0
    elif metric == "macro_precision":
        per_class, keep = ratio(tp, predicted), (support + predicted) > 0
    elif metric == "macro_specificity":
        tn = cms.sum((1, 2))[:, None] - support - predicted + tp
        per_class, keep = ratio(tn, tn + (predicted - tp)), (support + predicted) > 0
    else:
        raise KeyError(metric)
    # A row that keeps every class is averaged along the axis (the same pairwise sum as a
    # row on its own); the others one by one over their kept classes.
    out = np.empty(len(cms))
    every = keep.all(1)
    out[every] = per_class[every].mean(axis=1)
    for i in np.flatnonzero(~every):
        out[i] = per_class[i][keep[i]].mean()
    return out


def bootstrap_ci(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int,
                 metric: str = "macro_f1", n_boot: int = 1000, alpha: float = 0.05,
                 seed: int = 0) -> tuple:
    """Percentile bootstrap interval of a metric over images: ``(low, high)``."""
    y_true = np.asarray(y_true, dtype=int)
    y_pred = np.asarray(y_pred, dtype=int)
    rng = np.random.default_rng(seed)
    n = len(y_true)
    values = np.empty(n_boot)
    # Resamples are drawn a block at a time (the generator gives the same indices as one
    # draw per resample) and their confusion matrices counted in one pass.
    block = max(1, min(n_boot, _BOOT_INDICES // max(n, 1)))
    for start in range(0, n_boot, block):
        idx = rng.integers(0, n, (min(block, n_boot - start), n))
        codes = y_true[idx] * num_classes + y_pred[idx] + (np.arange(len(idx)) * num_classes**2)[:, None]
        cms = np.bincount(codes.ravel(), minlength=len(idx) * num_classes**2).reshape(-1, num_classes, num_classes)
        values[start:start + len(idx)] = _metric_of_confusions(cms, metric)
    return float(np.quantile(values, alpha / 2)), float(np.quantile(values, 1 - alpha / 2))


def evaluate(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int,
             n_boot: int = 1000, seed: int = 0) -> Dict[str, float]:
    """All scores plus a bootstrap 95 % interval for macro-F1."""
    out = scores(y_true, y_pred, num_classes)
    if n_boot:
        out["macro_f1_low"], out["macro_f1_high"] = bootstrap_ci(y_true, y_pred, num_classes, n_boot=n_boot, seed=seed)
    return out


def summarize(table: pd.DataFrame, by: Sequence[str], metrics: Sequence[str] = METRICS) -> pd.DataFrame:
    """Mean and standard deviation of ``metrics`` over the rows of each ``by`` group
    (folds or seeds), with the number of rows."""
    g = table.groupby(list(by))[list(metrics)]
    out = g.mean().add_suffix("_mean").join(g.std(ddof=1).add_suffix("_std"))
    out["n"] = g.size()
    return out


def format_mean_std(summary: pd.DataFrame, metrics: Sequence[str] = METRICS, scale: float = 100.0,
                    digits: int = 1) -> pd.DataFrame:
    """``mean ± std`` strings (in percent by default) for display."""
    out = pd.DataFrame(index=summary.index)
    for m in metrics:
        mean = summary[f"{m}_mean"] * scale
        std = summary[f"{m}_std"].fillna(0.0) * scale
        out[m] = [f"{a:.{digits}f} ± {b:.{digits}f}" for a, b in zip(mean, std)]
    return out


def _macro_scores_batched(cms: np.ndarray) -> Dict[str, np.ndarray]:
    """Macro-F1 and balanced accuracy of a stack of confusion matrices (..., K, K),
    with :func:`scores`' conventions (classes absent from truth and prediction
    left out of macro-F1; balanced accuracy over the classes in the truth)."""
    cms = cms.astype(float)
    tp = np.diagonal(cms, axis1=-2, axis2=-1)
    support, predicted = cms.sum(-1), cms.sum(-2)
    present, in_truth = (support + predicted) > 0, support > 0
    f1 = np.divide(2 * tp, support + predicted, out=np.zeros_like(tp), where=present)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=in_truth)
    return {"macro_f1": f1.sum(-1) / np.maximum(present.sum(-1), 1),
            "balanced_accuracy": recall.sum(-1) / np.maximum(in_truth.sum(-1), 1)}


PAIRED_METRICS = ("macro_f1", "balanced_accuracy")


def paired_difference(y_true: Sequence[int], pred: Sequence, base: Sequence, num_classes: int,
                      metrics: Sequence[str] = PAIRED_METRICS, n_boot: int = 1000, alpha: float = 0.05,
                      seed: int = 0) -> Dict[str, float]:
    """``metric(pred) - metric(base)`` on the same images, with a paired
    percentile bootstrap interval: each replicate draws the images once (with
    replacement) and scores both on that draw, so what the two share (the
    test images' difficulty) cancels.

    ``pred`` and ``base`` are predicted class indices, (N,) or (R, N) for R
    runs on the same images (e.g. folds): a score is then the mean over runs
    on each draw. Returns ``<metric>`` (the difference on all images),
    ``<metric>_low``/``<metric>_high`` (the ``1 - alpha`` interval) and
    ``<metric>_p_not_better`` (the share of replicates with a difference <= 0)
    for each of ``metrics`` (``macro_f1``, ``balanced_accuracy``).
    """
    unknown = sorted(set(metrics) - set(PAIRED_METRICS))
    if unknown:
        raise ValueError(f"paired_difference scores {PAIRED_METRICS}, not {unknown}")
    y = np.asarray(y_true, dtype=int)
    a, b = np.atleast_2d(np.asarray(pred, dtype=int)), np.atleast_2d(np.asarray(base, dtype=int))
    if a.shape[1] != len(y) or b.shape[1] != len(y):
        raise ValueError(f"predictions cover {a.shape[1]} and {b.shape[1]} images, the labels {len(y)}")
    k = num_classes

    def diff(idx: np.ndarray) -> Dict[str, np.ndarray]:
        # idx (B, N): confusion counts of every run on every draw at once.
        def score(p):
            cells = (y[idx][:, None, :] * k + p[:, idx].transpose(1, 0, 2))  # (B, R, N)
            offset = np.arange(cells.shape[0] * cells.shape[1]).reshape(cells.shape[:2])[..., None] * k * k
            cms = np.bincount((cells + offset).ravel(), minlength=cells.shape[0] * cells.shape[1] * k * k)
            return {m: v.mean(-1) for m, v in _macro_scores_batched(cms.reshape(*cells.shape[:2], k, k)).items()}
        sa, sb = score(a), score(b)
        return {m: sa[m] - sb[m] for m in metrics}

    point = diff(np.arange(len(y))[None])
    out = {}
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(y), (n_boot, len(y))) if n_boot else np.zeros((0, len(y)), dtype=int)
    boots = {m: np.concatenate([diff(draws[i:i + 200])[m] for i in range(0, n_boot, 200)]) if n_boot
             else np.array([]) for m in metrics}
    for m in metrics:
        out[m] = float(point[m][0])
        if n_boot:
            out[f"{m}_low"], out[f"{m}_high"] = (float(q) for q in np.quantile(boots[m], [alpha / 2, 1 - alpha / 2]))
            out[f"{m}_p_not_better"] = float((boots[m] <= 0).mean())
        else:
            out[f"{m}_low"] = out[f"{m}_high"] = out[f"{m}_p_not_better"] = float("nan")
    return out
