"""Chapter 01's tables: the three labs' manifests counted, sampled and measured.

Nothing here trains or writes results; each function turns the manifests
(:func:`wbclib.data.all_manifests`: ``path``, ``lab``, ``label``,
``fine_label``, ``width``, ``height`` ...) into one table, sample or figure
of the chapter. The profile decides only the sample sizes.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .. import benchmarks as B
from .. import cellcrop, data

# --------------------------------------------------------------------------
# The chapter's tables, one per notebook step (notebook 01)
# --------------------------------------------------------------------------


def images_per_class_and_lab(manifests: pd.DataFrame) -> pd.DataFrame:
    """Images per common class (rows) and lab (columns), 0 where a lab lacks the class."""
    return manifests.pivot_table(index="label", columns="lab", values="path", aggfunc="size", fill_value=0)


def pbc_fine_class_counts(manifests: pd.DataFrame) -> pd.DataFrame:
    """pbc's images per fine class, as one row ``images`` with the classes
    as columns, most frequent first."""
    fine = manifests[manifests.lab == "pbc"].groupby("fine_label").size().sort_values(ascending=False)
    return fine.rename("images").to_frame().T


def shared_class_sample(manifests: pd.DataFrame) -> pd.DataFrame:
    """The rows of the classes every lab has (:data:`benchmarks.CROSSLAB_CLASSES`)
    with a ``lab / class`` column (e.g. ``bccd / monocyte``) to lay out the sample grid by."""
    sample = manifests[manifests.label.isin(list(B.CROSSLAB_CLASSES))].copy()
    sample["lab / class"] = sample["lab"] + " / " + sample["label"]
    return sample


def image_size_table(manifests: pd.DataFrame) -> pd.DataFrame:
    """Per lab: the distribution (count, mean, std, quartiles) of image width and height, 1 digit."""
    return manifests.groupby("lab")[["width", "height"]].describe().round(1)


def colour_per_lab(cfg: SimpleNamespace) -> int:
    """Images per lab whose mean colour the chapter measures: 20 at the smoke profile, else 200."""
    return 20 if cfg.name == "smoke" else 200


def mean_colours(manifests: pd.DataFrame, root: Path, per_lab: int, seed: int = 0) -> pd.DataFrame:
    """Mean ``R``, ``G``, ``B`` of each image in a sample of up to ``per_lab``
    images per lab (``DataFrame.sample`` with ``random_state=seed``), one row
    per image with its ``lab``, labs in sorted order."""
    colour = []
    for lab, rows in manifests.groupby("lab"):
        pick = rows.sample(min(per_lab, len(rows)), random_state=seed)
        means = np.stack([data.load_image(Path(root) / p).reshape(-1, 3).mean(0) for p in pick["path"]])
        colour.append(pd.DataFrame(means, columns=["R", "G", "B"]).assign(lab=lab))
    return pd.concat(colour, ignore_index=True)


def colour_histograms(colour: pd.DataFrame) -> plt.Figure:
    """One density histogram per channel of a :func:`mean_colours` table, the labs overlaid."""
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2), sharey=True)
    for ax, ch in zip(axes, "RGB"):
        for lab, rows in colour.groupby("lab"):
            ax.hist(rows[ch], bins=25, alpha=0.55, label=lab, density=True)
        ax.set_xlabel(f"mean {ch} per image")
    axes[0].legend()
    fig.tight_layout()
    return fig


def crop_per_lab(cfg: SimpleNamespace) -> int:
    """Images per lab on which the chapter measures the cell-to-input ratio: 8 at the smoke profile, else 300."""
    return 8 if cfg.name == "smoke" else 300


def cell_crop_ratios(manifests: pd.DataFrame, root: Path, per_lab: int, seed: int = 0) -> pd.DataFrame:
    """:func:`cellcrop.ratio_table` (cell-to-input ratio before and after the
    crop) of :func:`cellcrop.lab_sample`'s ``per_lab`` images per lab."""
    return cellcrop.ratio_table(cellcrop.lab_sample(manifests, per_lab=per_lab, seed=seed), root)


def common_ratio_note(ratios: pd.DataFrame) -> str:
    """The common ratio re-measured on a :func:`cell_crop_ratios` table beside
    :data:`cellcrop.COMMON_RATIO`, the constant every chapter uses, as one line."""
    return (f"common ratio measured on this sample: {cellcrop.common_ratio(ratios):.3f}; "
            f"used by every chapter: {cellcrop.COMMON_RATIO}")


def integrity_note(problems: pd.DataFrame) -> str:
    """One line about a :func:`data.verify_checksums` table: all files match, or how many problems."""
    return "all files match SHA256SUMS" if problems.empty else f"{len(problems)} problem(s)"
