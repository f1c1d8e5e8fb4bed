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


def pristine_and_degraded(root: Path, rows: pd.DataFrame, seed: int = 0) -> plt.Figure:
    """Each row's image pristine (top) and under its own ``degradation`` at
    ``severity`` (bottom, titled with both), drawn as the benchmark draws it."""
    fig, axes = plt.subplots(2, len(rows), figsize=(1.75 * len(rows), 4), squeeze=False)
    for i, (_, row) in enumerate(rows.iterrows()):
        image = load_image(Path(root) / row["path"])
        axes[0, i].imshow(image)
        axes[1, i].imshow(degrade(image, row["degradation"], row["severity"], image_rng(row["path"], seed)))
        axes[1, i].set_title(f"{row['degradation'].replace('_', ' ')} {row['severity']}", fontsize=8)
        for ax in axes[:, i]:
            ax.axis("off")
    axes[0, 0].set_title("pristine", fontsize=8, loc="left")
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


def severity_mixes(shares: pd.DataFrame, title: str = "") -> plt.Figure:
    """Share of images per phase-2 severity (0 = pristine) for each split:
    bars for the declared mix (``declared``), dots for the images drawn
    (``realised``, when present). ``shares`` has ``split``, ``severity`` and
    those columns (:func:`wbclib.benchmarks.phase2_share_table`)."""
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    order = list(dict.fromkeys(shares["split"]))
    sns.barplot(data=shares, x="severity", y="declared", hue="split", hue_order=order, ax=ax, alpha=0.85)
    if "realised" in shares:
        width = 0.8 / len(order)
        for j, split in enumerate(order):
            rows = shares[shares["split"] == split].sort_values("severity")
            xs = rows["severity"].to_numpy() - 0.4 + width * (j + 0.5)
            ax.plot(xs, rows["realised"], "k.", markersize=6, label="drawn" if j == 0 else None)
    ax.set_xlabel("severity (0 = pristine)")
    ax.set_ylabel("share of the split's images")
    ax.set_title(title)
    ax.legend(fontsize=8)
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


def paired_differences(table: pd.DataFrame, y: str, hue: str, metrics: Sequence[str] = ("macro_f1",),
                       columns: Optional[str] = None, order: Optional[Sequence[str]] = None,
                       scale: float = 100.0, title: str = "") -> plt.Figure:
    """Point and 95 % interval of each row's paired difference ``d_<metric>``
    (``d_<metric>_low`` / ``_high``), one line per ``y`` value (e.g. recipe),
    ``hue`` (e.g. representation) side by side; one panel per metric and per
    value of ``columns``. Zero (no difference to the baseline) is marked."""
    panels = [(m, c) for m in metrics for c in (list(dict.fromkeys(table[columns])) if columns else [None])]
    order = list(order) if order is not None else list(dict.fromkeys(table[y]))
    hues = list(dict.fromkeys(table[hue]))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels) + 1.5, 0.38 * len(order) + 1.4),
                             sharey=True, squeeze=False)
    colors = dict(zip(hues, sns.color_palette(n_colors=len(hues))))
    offsets = np.linspace(-0.18, 0.18, len(hues)) if len(hues) > 1 else [0.0]
    for ax, (metric, col) in zip(axes[0], panels):
        part = table if col is None else table[table[columns] == col]
        for h, dy in zip(hues, offsets):
            rows = part[part[hue] == h].set_index(y).reindex(order).dropna(subset=[f"d_{metric}"])
            pos = np.array([order.index(r) for r in rows.index]) + dy
            centre = scale * rows[f"d_{metric}"].to_numpy()
            err = np.abs(scale * rows[[f"d_{metric}_low", f"d_{metric}_high"]].to_numpy().T - centre)
            ax.errorbar(centre, pos, xerr=err, fmt="o", ms=4, capsize=2, color=colors[h], label=str(h))
        ax.axvline(0, color="grey", lw=1, ls="--")
        ax.set_yticks(range(len(order)))
        ax.set_yticklabels(order)
        ax.set_xlabel("Δ vs baseline (points)")
        name = {"macro_f1": "macro-F1", "balanced_accuracy": "balanced accuracy"}.get(metric, metric)
        ax.set_title(name if col is None else f"{name}, {col}", fontsize=10)
    axes[0][0].invert_yaxis()  # shared: the first recipe on top in every panel
    fig.legend(*axes[0][0].get_legend_handles_labels(), title=hue, loc="lower center", ncol=len(hues),
               bbox_to_anchor=(0.5, 0.0), fontsize=9)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig


def per_class_f1(table: pd.DataFrame, order: Sequence[str], hue: str, title: str = "") -> plt.Figure:
    """Per-class F1 from head to tail for several settings (``hue``)."""
    fig, ax = plt.subplots(figsize=(8, 3.8))
    sns.pointplot(data=table, x="class", y="f1", hue=hue, order=list(order), ax=ax, dodge=0.3)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("class (head → tail)")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def stain_examples(root: Path, paths: Sequence[str], reference: str) -> plt.Figure:
    """Macenko normalisation at a glance: the reference image, then each image
    before (top) and after (bottom) normalisation to the reference's stain."""
    from .stain import MacenkoNormalizer

    ref = load_image(Path(root) / reference)
    normalizer = MacenkoNormalizer().fit(ref)
    n = len(paths)
    fig, axes = plt.subplots(2, n + 1, figsize=(1.5 * (n + 1), 3.2), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes[0, 0].imshow(ref)
    axes[0, 0].set_title("reference", fontsize=9)
    for c, path in enumerate(paths, start=1):
        image = load_image(Path(root) / path)
        axes[0, c].imshow(image)
        axes[1, c].imshow(normalizer.transform(image))
    axes[0, 1].set_title("original", fontsize=9, loc="left")
    axes[1, 1].set_title("Macenko", fontsize=9, loc="left")
    fig.tight_layout()
    return fig


def scale_ratios(measured: pd.DataFrame, title: str = "") -> plt.Figure:
    """Per-lab distributions of the nucleus-to-image area ratio before and after
    scale normalisation (``measured`` from ``crosslab.scale_factors``: columns
    ``lab``, ``stage``, ``nucleus_fraction``, ``crop``)."""
    stages = [s for s in ("before", "after") if s in set(measured["stage"])]
    fig, axes = plt.subplots(1, len(stages), figsize=(4.6 * len(stages), 3.6), sharey=True, squeeze=False)
    for ax, stage in zip(axes[0], stages):
        rows = measured[measured["stage"] == stage]
        sns.boxplot(data=rows, x="lab", y="nucleus_fraction", hue="lab", ax=ax, showfliers=False, legend=False)
        sns.stripplot(data=rows, x="lab", y="nucleus_fraction", ax=ax, color="black", size=2, alpha=0.4)
        medians = rows.groupby("lab")["nucleus_fraction"].median()
        crops = rows.groupby("lab")["crop"].first()
        labs = [t.get_text() for t in ax.get_xticklabels()]
        for i, lab in enumerate(labs):
            ax.text(i, medians[lab], f" {medians[lab]:.3f}", va="bottom", fontsize=8, color="darkred")
        if stage == "after":
            ax.set_xticks(range(len(labs)))
            ax.set_xticklabels([f"{lab}\n(crop {crops[lab]:.2f})" for lab in labs])
        ax.set_title(f"{stage} scale normalisation")
        ax.set_xlabel("")
        ax.set_ylabel("nucleus area / image area")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def restained_grid(images: np.ndarray, views: np.ndarray, title: str = "") -> plt.Figure:
    """Raw images (n, H, W, 3) and their re-stained copies (n, V, H, W, 3), one row each."""
    n, v = views.shape[:2]
    fig, axes = plt.subplots(n, v + 1, figsize=(1.6 * (v + 1), 1.6 * n), squeeze=False)
    for i in range(n):
        for j in range(v + 1):
            ax = axes[i, j]
            ax.imshow(images[i] if j == 0 else views[i, j - 1])
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title("raw" if j == 0 else f"re-stained {j}", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def gradcam_grid(images: np.ndarray, cams: Dict[str, np.ndarray], captions: Sequence[str], title: str = "") -> plt.Figure:
    """Images (n, H, W, 3) in the first row, then one row of Grad-CAM overlays per method."""
    n = len(images)
    fig, axes = plt.subplots(len(cams) + 1, n, figsize=(1.45 * n, 1.5 * (len(cams) + 1)), squeeze=False)
    for j in range(n):
        axes[0, j].imshow(images[j])
        axes[0, j].set_title(captions[j], fontsize=7)
        for i, (name, maps) in enumerate(cams.items(), start=1):
            axes[i, j].imshow(images[j])
            axes[i, j].imshow(maps[j], cmap="jet", alpha=0.45, vmin=0, vmax=1)
    for i, name in enumerate(["image"] + list(cams), start=0):
        axes[i, 0].set_ylabel(name, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def sweep_heatmaps(table: pd.DataFrame, row: str = "k", column: str = "beta",
                   metrics: Sequence[str] = ("micro_f1", "macro_f1"), title: str = "") -> plt.Figure:
    """One heat map per metric of a two-parameter sweep (mean over the other columns), in percent."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        grid = table.pivot_table(index=row, columns=column, values=metric, aggfunc="mean") * 100
        sns.heatmap(grid, annot=True, fmt=".1f", cmap="viridis", ax=ax, cbar=False)
        ax.set_title(metric.replace("_", "-").replace("f1", "F1"))
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def mask_overlays(images: Sequence[np.ndarray], outlines: Sequence[Dict[str, np.ndarray]],
                  captions: Sequence[str] = (), colors: Optional[Dict[str, str]] = None, ncols: int = 6,
                  title: str = "") -> plt.Figure:
    """Images with mask outlines: ``outlines[i]`` maps a name (e.g. "expert
    cell", "classical nucleus") to a boolean mask of image ``i``; each name is
    drawn in its own colour and listed in the legend."""
    from matplotlib.lines import Line2D

    names = list(dict.fromkeys(k for o in outlines for k in o))
    palette = dict(zip(names, sns.color_palette("bright", len(names)).as_hex()))
    palette.update(colors or {})
    n = len(images)
    rows = max(1, -(-n // ncols))
    fig, axes = plt.subplots(rows, ncols, figsize=(1.9 * ncols, 2.0 * rows + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (image, masks) in enumerate(zip(images, outlines)):
        ax = axes.flat[i]
        ax.imshow(image)
        for name, mask in masks.items():
            if np.asarray(mask).any():
                style = "--" if "nucleus" in name else "-"
                ax.contour(np.asarray(mask, float), levels=[0.5], colors=[palette[name]], linewidths=1.2,
                           linestyles=style)
        if i < len(captions):
            ax.set_title(captions[i], fontsize=8)
    handles = [Line2D([], [], color=palette[k], ls="--" if "nucleus" in k else "-", label=k) for k in names]
    fig.legend(handles=handles, loc="lower center", ncol=min(4, len(names)), fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def boxes_and_crops(fields: Sequence[np.ndarray], predicted: Sequence[tuple], annotated: Sequence[Sequence[tuple]],
                    crops: Sequence[np.ndarray], captions: Sequence[str] = (), title: str = "") -> plt.Figure:
    """Whole fields with the predicted box (solid) and annotated boxes (dashed)
    in the top row; the crop centred on the predicted cell below each."""
    from matplotlib.patches import Rectangle

    n = len(fields)
    fig, axes = plt.subplots(2, n, figsize=(2.6 * n, 4.6), squeeze=False,
                             gridspec_kw={"height_ratios": [1.0, 0.75]})
    for j in range(n):
        ax = axes[0, j]
        ax.imshow(fields[j])
        for (x0, y0, x1, y1) in annotated[j]:
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="lime", lw=1.4, ls="--"))
        x0, y0, x1, y1 = predicted[j]
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="red", lw=1.4))
        if j < len(captions):
            ax.set_title(captions[j], fontsize=8)
        axes[1, j].imshow(crops[j])
        for a in axes[:, j]:
            a.set_xticks([]), a.set_yticks([])
    axes[0, 0].set_ylabel("field: predicted (red),\nannotated (green)", fontsize=8)
    axes[1, 0].set_ylabel("centred crop", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def image_rows(rows: Dict[str, Sequence[np.ndarray]], captions: Optional[Dict[str, Sequence[str]]] = None,
               title: str = "") -> plt.Figure:
    """One row of images per key (its name on the left), e.g. originals and crops."""
    n = max(len(v) for v in rows.values())
    fig, axes = plt.subplots(len(rows), n, figsize=(1.6 * n, 1.75 * len(rows)), squeeze=False)
    for r, (name, images) in enumerate(rows.items()):
        for c in range(n):
            ax = axes[r, c]
            ax.set_xticks([]), ax.set_yticks([])
            if c < len(images):
                ax.imshow(images[c])
                if captions and name in captions and c < len(captions[name]):
                    ax.set_title(captions[name][c], fontsize=7)
            else:
                ax.axis("off")
        axes[r, 0].set_ylabel(name, fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def prediction_examples(images: Sequence[np.ndarray], captions: Sequence[str], ncols: int = 6,
                        title: str = "") -> plt.Figure:
    """Images in a grid, each with a multi-line caption (e.g. the true and
    predicted class and the pipeline's stage decisions: restored, located,
    rescued, abstained); a red caption marks a wrong prediction when it starts
    with ``"✗"``."""
    n = len(images)
    ncols = max(1, min(ncols, n))
    nrows = max(1, -(-n // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.9 * ncols, 2.35 * nrows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.set_xticks([]), ax.set_yticks([])
        if k >= n:
            ax.axis("off")
            continue
        ax.imshow(images[k])
        caption = captions[k] if k < len(captions) else ""
        ax.set_title(caption, fontsize=6.5, color="firebrick" if caption.startswith("✗") else "black")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def confusion_matrices(matrices: Dict[str, np.ndarray], classes: Sequence[str], title: str = "") -> plt.Figure:
    """One confusion matrix per key (e.g. per lab) side by side, rows
    normalised to recall; a class with no true image is an empty row."""
    n = len(matrices)
    fig, axes = plt.subplots(1, n, figsize=(0.5 * len(classes) * n + 1.6 * n, 0.5 * len(classes) + 1.9),
                             squeeze=False)
    for ax, (name, cm) in zip(axes[0], matrices.items()):
        cm = np.asarray(cm)
        values = cm / np.maximum(cm.sum(1, keepdims=True), 1)
        sns.heatmap(values, annot=True, fmt=".2f", cmap="Blues", cbar=False, xticklabels=classes,
                    yticklabels=classes if ax is axes[0][0] else False, ax=ax, vmin=0, vmax=1,
                    annot_kws={"fontsize": 7})
        ax.set_xlabel("predicted")
        ax.set_title(f"{name} ({int(cm.sum())} images)", fontsize=9)
    axes[0][0].set_ylabel("true")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def cell_crops(ratios: pd.DataFrame, root: Path, ratio: float, per_lab: int = 4, size: int = 128) -> plt.Figure:
    """Cell-centred inputs, before and after, per lab (one row each): for
    ``per_lab`` located images of :func:`cellcrop.ratio_table`'s ``ratios``,
    the native image with the crop square drawn (the view widened where the
    square leaves the image and is padded by reflection), then the crop
    resized to ``size``. Each row's caption gives the lab's median
    cell-to-input ratio before and after the crop."""
    from matplotlib.patches import Rectangle
    from PIL import Image

    from .cellcrop import centre_on_cell

    labs = sorted(ratios["lab"].unique())
    fig, axes = plt.subplots(len(labs), 2 * per_lab, figsize=(1.6 * 2 * per_lab, 1.95 * len(labs)), squeeze=False)
    fig.subplots_adjust(left=0.03, right=0.99, bottom=0.02, top=0.9, wspace=0.06, hspace=0.42)
    for r, lab in enumerate(labs):
        found = ratios[(ratios["lab"] == lab) & ratios["found"]]
        rows = found.head(per_lab)
        for c in range(per_lab):
            before, after = axes[r, 2 * c], axes[r, 2 * c + 1]
            for ax in (before, after):
                ax.set_xticks([])
                ax.set_yticks([])
                ax.grid(False)
            if c >= len(rows):
                before.axis("off")
                after.axis("off")
                continue
            row = rows.iloc[c]
            image = load_image(Path(root) / row["path"])
            side = row["side"] / ratio
            x0, y0 = row["cx"] - side / 2, row["cy"] - side / 2
            before.imshow(image)
            before.add_patch(Rectangle((x0, y0), side, side, fill=False, edgecolor="yellow", linewidth=1.2))
            before.set_xlim(min(-0.5, x0 - 1), max(image.shape[1] - 0.5, x0 + side + 1))
            before.set_ylim(max(image.shape[0] - 0.5, y0 + side + 1), min(-0.5, y0 - 1))
            crop = centre_on_cell(image, row["cx"], row["cy"], row["side"], ratio)
            after.imshow(np.asarray(Image.fromarray(crop).resize((size, size), Image.BILINEAR)))
            if r == 0:
                before.set_title("before", fontsize=8)
                after.set_title("after", fontsize=8)
        axes[r, 0].text(0, 1.2 if r == 0 else 1.05, f"{lab}: median cell/input {found['before'].median():.2f} before, "
                        f"{found['after'].median():.2f} after (target {ratio:.2f})",
                        transform=axes[r, 0].transAxes, fontsize=9, ha="left", va="bottom")
    return fig


# --------------------------------------------------------------------------
# Chapter 09: segmentation and morphology
# --------------------------------------------------------------------------


def dice_by_backend(scores: pd.DataFrame, title: str = "zheng1 Dice per back-end") -> plt.Figure:
    """Box plots of nucleus and cell Dice per back-end (``scores``: one row per
    image and back-end, columns ``backend``, ``image_id``, ``nucleus_dice``, ``cell_dice``)."""
    long = scores.melt(id_vars=["backend", "image_id"], value_vars=["nucleus_dice", "cell_dice"],
                       var_name="region", value_name="Dice")
    fig, ax = plt.subplots()
    sns.boxplot(data=long, x="region", y="Dice", hue="backend", ax=ax)
    ax.set_title(title)
    return fig


def iou_histogram(scored: pd.DataFrame, title: str = "BCCD localisation") -> plt.Figure:
    """Histogram of the per-field IoU with the annotated WBC box."""
    fig, ax = plt.subplots(figsize=(5, 3))
    sns.histplot(scored["iou"], bins=20, ax=ax)
    ax.set_xlabel("IoU with the annotated WBC box")
    ax.set_title(title)
    return fig


def feature_boxes(features: pd.DataFrame, names: Sequence[str], hue: Optional[str] = None, col_wrap: Optional[int] = None,
                  height: float = 2.6, aspect: float = 1.5, rotate: bool = False, title: str = "") -> plt.Figure:
    """One box plot per feature in ``names`` (a column each), the values per
    ``label`` (and ``hue``), each panel with its own y axis."""
    long = features.melt(id_vars=["label"] + ([hue] if hue else []), value_vars=list(names), var_name="feature")
    grid = sns.catplot(data=long, x="label", y="value", hue=hue, col="feature", col_wrap=col_wrap, kind="box",
                       sharey=False, height=height, aspect=aspect, fliersize=1.5)
    if not hue:
        grid.set_titles("{col_name}")
    if rotate:
        grid.set_xticklabels(rotation=45)
    grid.figure.suptitle(title, y=1.02 if not hue else 1.03)
    return grid.figure


def auc_heatmap(auc: pd.DataFrame, title: str = "one feature, one class against the rest: ROC AUC") -> plt.Figure:
    """Heat map of per-feature, per-class ROC AUC (0.5 white)."""
    fig, ax = plt.subplots(figsize=(9, 4.5))
    sns.heatmap(auc, annot=True, fmt=".2f", cmap="vlag", center=0.5, vmin=0, vmax=1, ax=ax, cbar=False)
    ax.set_title(title)
    return fig


def acceptance_heatmap(acceptance: pd.DataFrame,
                       title: str = "% of held-out cells each class's Mahalanobis filter accepts") -> plt.Figure:
    """Heat map of the percent of cells (columns: true class) each class's filter (rows) accepts."""
    fig, ax = plt.subplots(figsize=(7, 5))
    sns.heatmap(acceptance, annot=True, fmt=".0f", cmap="rocket_r", vmin=0, vmax=100, ax=ax, cbar=False)
    ax.set_xlabel("true class of the cell")
    ax.set_title(title)
    return fig


# --------------------------------------------------------------------------
# Chapter 07: cross-lab domain generalisation
# --------------------------------------------------------------------------


def lolo_bars(bars: pd.DataFrame, title: str = "leave-one-lab-out",
              ylabel: str = "macro-F1 (mean over seeds;\ninterval: first seed)",
              xlabel: str = "held-out lab", seeds: Optional[pd.DataFrame] = None) -> plt.Figure:
    """:func:`metric_bars` of macro-F1 per held-out lab (x) and method (hue),
    with the legend outside the axes (``bars``: ``eval_set``, ``method``,
    ``macro_f1``, ``macro_f1_low``, ``macro_f1_high``). ``seeds`` (the same
    columns, one row per seed) adds each seed's score as a dot on its bar, so a
    wide spread over seeds shows beside the one seed's interval."""
    fig = metric_bars(bars, x="eval_set", y="macro_f1", hue="method", low="macro_f1_low", high="macro_f1_high",
                      title=title, ylabel=ylabel)
    if seeds is not None:
        ax = fig.axes[0]
        centres = {(r["eval_set"], r["method"]): bar.get_x() + bar.get_width() / 2
                   for bar, (_, r) in zip(_bars_in_data_order(ax, bars, "eval_set", "method"), bars.iterrows())}
        shown = seeds[[(e, m) in centres for e, m in zip(seeds["eval_set"], seeds["method"])]]
        ax.scatter([centres[(e, m)] for e, m in zip(shown["eval_set"], shown["method"])], shown["macro_f1"],
                   s=14, color="black", zorder=3, label="each seed")
    fig.axes[0].legend(title="method", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.axes[0].set_xlabel(xlabel)
    fig.set_size_inches(10, 3.8)
    fig.tight_layout()
    return fig


def image_grid(rows: Sequence[Dict[str, np.ndarray]], row_titles: Sequence[str] = (), zoom: Optional[int] = None,
               size: float = 2.0):
    """Rows of images (each a ``{column title: image}`` dict, same keys in every
    row); ``zoom`` shows the central ``zoom`` x ``zoom`` pixels so single-pixel
    damage is visible. Returns the Figure."""
    columns = list(rows[0])
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(size * len(columns), size * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        for c, name in enumerate(columns):
            image = row[name]
            if zoom:
                h, w = image.shape[:2]
                y, x = max(0, (h - zoom) // 2), max(0, (w - zoom) // 2)
                image = image[y:y + zoom, x:x + zoom]
            ax = axes[r, c]
            ax.imshow(image, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=10)
            if c == 0 and r < len(row_titles):
                ax.set_ylabel(row_titles[r], fontsize=9)
    fig.tight_layout()
    return fig
