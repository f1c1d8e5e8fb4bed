"""Figures for the book (matplotlib/seaborn); each returns its Figure."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from .data import load_image
from .degrade import KINDS, SEVERITIES, degrade, image_rng

sns.set_theme(style="whitegrid", context="notebook")


def class_counts(table: pd.DataFrame, x: str = "label", hue: Optional[str] = "lab", log: bool = True,
                 title: str = "") -> plt.Figure:
    """Bar chart of images per class (and per lab)."""
    fig, ax = plt.subplots(figsize=(9, 3.8))
    counts = table.groupby([x] + ([hue] if hue else [])).size().rename("images").reset_index()
    sns.barplot(data=counts, x=x, y="images", hue=hue, ax=ax)
    if log:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return fig


def sample_grid(table: pd.DataFrame, root: Path, row: str = "label", n: int = 6, seed: int = 0,
                size: int = 96, title: str = "") -> plt.Figure:
    """``n`` random images for each value of ``row`` (a class, or lab/class)."""
    groups = sorted(table[row].unique())
    fig, axes = plt.subplots(len(groups), n, figsize=(1.3 * n, 1.35 * len(groups)), squeeze=False)
    for r, value in enumerate(groups):
        rows = table[table[row] == value]
        pick = rows.sample(min(n, len(rows)), random_state=seed)
        for c in range(n):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(pick):
                ax.imshow(load_image(Path(root) / pick.iloc[c]["path"]))
        axes[r, 0].text(-0.1, 0.5, str(value), transform=axes[r, 0].transAxes, ha="right", va="center", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def degradation_grid(path: Path, key: str, seed: int = 0) -> plt.Figure:
    """One image under every degradation kind (rows) and severity (columns)."""
    image = load_image(path)
    fig, axes = plt.subplots(len(KINDS), len(SEVERITIES) + 1, figsize=(2.0 * (len(SEVERITIES) + 1), 2.1 * len(KINDS)))
    for r, kind in enumerate(KINDS):
        for c, level in enumerate((0,) + tuple(SEVERITIES)):
            ax = axes[r, c]
            shown = image if level == 0 else degrade(image, kind, level, image_rng(key, seed))
            ax.imshow(shown)
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title("pristine" if level == 0 else f"severity {level}", fontsize=10)
            if c == 0:
                ax.set_ylabel(kind.replace("_", " "), fontsize=10)
    fig.tight_layout()
    return fig


def long_tail_curves(counts: Dict[str, Dict[str, int]]) -> plt.Figure:
    """Training images per class (head to tail) for each imbalance ratio."""
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for name, per_class in counts.items():
        ordered = sorted(per_class.items(), key=lambda kv: -kv[1])
        ax.plot([k for k, _ in ordered], [v for _, v in ordered], marker="o", label=name)
    ax.set_yscale("log")
    ax.set_ylabel("training images")
    ax.set_xlabel("class (head → tail)")
    ax.legend()
    fig.tight_layout()
    return fig


def confusion_matrix(cm: np.ndarray, classes: Sequence[str], normalize: bool = True, title: str = "") -> plt.Figure:
    """Heat map of a confusion matrix, rows normalised to recall by default."""
    values = cm / np.maximum(cm.sum(1, keepdims=True), 1) if normalize else cm
    fig, ax = plt.subplots(figsize=(0.55 * len(classes) + 2.5, 0.55 * len(classes) + 1.8))
    sns.heatmap(values, annot=True, fmt=".2f" if normalize else "d", cmap="Blues", cbar=False,
                xticklabels=classes, yticklabels=classes, ax=ax, vmin=0, vmax=1 if normalize else None,
                annot_kws={"fontsize": 8})
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def metric_bars(table: pd.DataFrame, x: str, y: str, hue: Optional[str] = None, low: Optional[str] = None,
                high: Optional[str] = None, title: str = "", ylabel: str = "") -> plt.Figure:
    """Grouped bars with optional error bars from ``low``/``high`` columns."""
    fig, ax = plt.subplots(figsize=(8, 3.8))
    sns.barplot(data=table, x=x, y=y, hue=hue, ax=ax, errorbar=None)
    if low and high:
        for bar, (_, row) in zip(_bars_in_data_order(ax, table, x, hue), table.iterrows()):
            cx = bar.get_x() + bar.get_width() / 2
            ax.plot([cx, cx], [row[low], row[high]], color="black", lw=1.2)
    ax.set_ylabel(ylabel or y)
    ax.set_title(title)
    if hue:
        ax.legend(title=hue, fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def _bars_in_data_order(ax, table, x, hue):
    """Map seaborn's bars (ordered hue-major) back to the table's row order."""
    xs = list(dict.fromkeys(table[x]))
    hues = list(dict.fromkeys(table[hue])) if hue else [None]
    bars = [p for p in ax.patches if p.get_height() == p.get_height() and p.get_width() > 0][: len(xs) * len(hues)]
    lookup = {}
    for i, bar in enumerate(bars):
        lookup[(xs[i % len(xs)], hues[i // len(xs)])] = bar
    return [lookup[(r[x], r[hue] if hue else None)] for _, r in table.iterrows()]


def per_class_f1(table: pd.DataFrame, order: Sequence[str], hue: str, title: str = "") -> plt.Figure:
    """Per-class F1 from head to tail for several settings (``hue``)."""
    fig, ax = plt.subplots(figsize=(8, 3.8))
    sns.pointplot(data=table, x="class", y="f1", hue=hue, order=list(order), ax=ax, dodge=0.3)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("class (head → tail)")
    ax.set_title(title)
    fig.tight_layout()
    return fig
