# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # WBC isolation, segmentation and morphology
#
# The hybrid-rescue pipeline {cite}`nguyen2026hybrid` isolates each
# leukocyte with Cellpose {cite}`stringer2021cellpose` before classification
# and later reads the cell's morphology (nucleus-to-cytoplasm ratio, contour
# spikiness, staining, nucleus position) to accept or veto a rare-class
# prediction. Neither step is measured in the paper. This chapter measures
# both on public ground truth:
#
# * **segmentation**: nucleus and whole-cell Dice against the expert masks of
#   zheng1 (300 images), for two back-ends behind one function,
#   `wbclib.segment.segment_cell`: a classical stain-aware segmenter (the CPU
#   default) and Cellpose 3.1 trained *from scratch* on zheng1 with k-fold
#   cross-validation (no pretrained Cellpose weights exist offline);
# * **localisation**: the intersection-over-union of the box found around the
#   primary WBC in whole BCCD smear fields against their Pascal VOC boxes, and
#   crops centred on it;
# * **morphology**: the features per cell, from the segmentation masks and
#   from the paper's K-means (K = 2) pixel clustering, per class; which of
#   them separate classes; and the class-conditional Mahalanobis filter the
#   rescue chapter uses.

# %% tags=["parameters"]
profile = "cpu"
data_root = None
cache_dir = None
splits_dir = None
results_dir = None
seed = 0
overrides = None  # profile keys to change, e.g. {"probe_epochs": 60} (validated; see wbclib/profiles.py)

# %%
import numpy as np
import pandas as pd
import seaborn as sns
from IPython.display import Markdown, display
from matplotlib import pyplot as plt

from wbclib import benchmarks as B
from wbclib import data, plots, profiles
from wbclib import morphology as MO
from wbclib import segment as S
from wbclib.protocols import segmentation

ctx = profiles.setup(profile, data_root, cache_dir, splits_dir, results_dir, seed, overrides)
cfg, root, cache, splits, results = ctx.cfg, ctx.root, ctx.cache, ctx.splits, ctx.results
print(f"profile {cfg.name}: zheng1 images {cfg.seg_zheng1_images or 'all'}, bccd fields {cfg.seg_bccd_fields or 'all'}, "
      f"{cfg.morph_per_class} pbc cells per fine class; cellpose: {cfg.cellpose_images or 'all'} images, "
      f"{cfg.cellpose_folds} folds, {cfg.cellpose_epochs} epochs")

# %% [markdown]
# ## The classical segmenter against zheng1's expert masks
#
# The classical back-end works in optical density relative to the slide's own
# background: a nucleus score (red and green absorbed, blue not, which rules
# out haemoglobin) thresholded by Otsu gives the nucleus, and a watershed
# grows the cell over stained pixels from it, with a colour test that removes
# red cells pressed against the leukocyte. Its parameters were tuned on zheng1
# images 1-100, so the table also reports the untouched images 101-300
# separately.

# %%
classical = S.evaluate_zheng1(root, backend="classical", limit=cfg.seg_zheng1_images)
display(S.summarize_dice(classical))
held_out = classical[classical["image_id"] > 100]
if len(held_out):
    print(f"images 101-300 (not used for tuning, n={len(held_out)}): nucleus Dice "
          f"{held_out.nucleus_dice.mean():.3f}, cell Dice {held_out.cell_dice.mean():.3f}")

# %%
masks = S.load_zheng1_masks(root, cfg.seg_zheng1_images)
order = classical.sort_values("cell_dice")
shown = pd.concat([order.head(3), order.iloc[len(order) // 2: len(order) // 2 + 3], order.tail(3)])
images, outlines, captions = [], [], []
for image_id, label, nd, cd in shown[["image_id", "label", "nucleus_dice", "cell_dice"]].itertuples(index=False):
    image = data.load_image(root / "zheng1" / "images" / f"{image_id:03d}.png")
    result = S.segment_cell(image)
    images.append(image)
    outlines.append({"expert cell": masks[image_id][1], "expert nucleus": masks[image_id][0],
                     "classical cell": result.cell, "classical nucleus": result.nucleus})
    captions.append(f"{image_id:03d} {label}\nDice N {nd:.2f} C {cd:.2f}")
fig = plots.mask_overlays(images, outlines, captions, ncols=len(images),
                          colors={"expert cell": "#1b9e77", "expert nucleus": "#1b9e77",
                                  "classical cell": "#d95f02", "classical nucleus": "#d95f02"},
                          title="zheng1: the three worst, three median and three best cells (classical back-end)")

# %% [markdown]
# ## Cellpose trained from scratch, cross-validated
#
# Cellpose 3.1 builds its U-Net without downloading anything when asked for
# no pretrained model; it is trained here on zheng1's expert cell masks, on
# the same background-relative optical density the classical back-end uses.
# With k folds, each image is scored by the model trained on the other folds
# only. On two CPU cores an epoch costs about 0.15 s per training image, so
# the CPU profile trains 25 epochs at batch 4, 2 folds, on 30 images. What
# matters is the number of optimiser steps: at batch 8 the same 25 epochs
# (50 steps) left every predicted mask empty; on 40 images, 30 epochs at
# batch 8 gave nucleus / cell Dice 0.92 / 0.96 and 100 epochs 0.92 / 0.98.
# The `gpu` profile trains 300 epochs, 5 folds, on all 300 images.

# %%
try:
    S.require_cellpose()
    have_cellpose = True
except S.SegmentationError as exc:
    have_cellpose = False
    print(f"cellpose back-end skipped: {exc}")
if have_cellpose:
    cellpose = segmentation.cellpose_kfold(results, root, n_folds=cfg.cellpose_folds, epochs=cfg.cellpose_epochs,
                                           limit=cfg.cellpose_images, seed=seed, batch_size=cfg.cellpose_batch_size)
    same = classical[classical["image_id"].isin(cellpose["image_id"])]
    backends = pd.concat([same.assign(backend="classical"), cellpose.assign(backend="cellpose (k-fold)")])
    dice_table = backends.groupby("backend")[["nucleus_dice", "cell_dice"]].agg(["mean", "std"]).round(3)
    dice_table.columns = [f"{region} {stat}" for region, stat in dice_table.columns]
    dice_table["images"] = backends.groupby("backend").size()
    display(Markdown(f"Both back-ends on the same {len(cellpose)} zheng1 images "
                     f"({cfg.cellpose_folds}-fold, {cfg.cellpose_epochs} epochs, "
                     f"{cellpose.groupby('fold').train_seconds.first().sum():.0f} s of training):"))
    display(dice_table)
    long = backends.melt(id_vars=["backend", "image_id"], value_vars=["nucleus_dice", "cell_dice"],
                         var_name="region", value_name="Dice")
    ax = sns.boxplot(data=long, x="region", y="Dice", hue="backend")
    ax.set_title("zheng1 Dice per back-end")
    plt.show()

# %% [markdown]
# ## Finding the WBC in a whole smear field (BCCD)
#
# A BCCD field is a 640 x 480 photograph holding dozens of red cells, a few
# platelets and usually one leukocyte. `locate_wbc` takes the largest central
# nucleus-like blob, grows its cell, and returns the box; the crop is a square
# centred on it. The score is the IoU with the best-matching annotated WBC box.

# %%
loc = S.evaluate_bccd_localisation(root, limit=cfg.seg_bccd_fields)
scored = loc.dropna(subset=["iou"])
print(f"{len(scored)} fields with a WBC box: mean IoU {scored.iou.mean():.3f}, median {scored.iou.median():.3f}; "
      f"IoU >= 0.5 on {100 * (scored.iou >= 0.5).mean():.1f}% of fields")
fig, ax = plt.subplots(figsize=(5, 3))
sns.histplot(scored["iou"], bins=20, ax=ax)
ax.set_xlabel("IoU with the annotated WBC box")
ax.set_title("BCCD localisation")
plt.show()

# %%
examples = pd.concat([scored.sort_values("iou").head(2), scored.sort_values("iou").tail(3)])
fields, predicted, annotated, crops, captions = [], [], [], [], []
for row in examples.itertuples(index=False):
    field = data.load_image(root / "bccd" / "fields" / f"{row.field}.jpg")
    box = (row.x0, row.y0, row.x1, row.y1)
    fields.append(field)
    predicted.append(box)
    annotated.append(S.read_voc_boxes(root / "bccd" / "annotations" / f"{row.field}.xml"))
    crops.append(S.crop_primary_wbc(field, size=160, bbox=box))
    captions.append(f"{row.field.split('_')[-1]}: IoU {row.iou:.2f}")
fig = plots.boxes_and_crops(fields, predicted, annotated, crops, captions,
                            title="BCCD fields: the two worst and three best boxes, and the centred crops")

# %% [markdown]
# ## Morphology per class
#
# Every cell gets the same features twice: from the segmenter's nucleus and
# cell masks, and with the nucleus re-drawn by the paper's K-means (K = 2)
# clustering of the cell's pixels (prefix `km_`). The cells are pbc training
# images (the cross-validation pool, never the held-out test), `morph_per_class`
# per fine class, shrunk to a 192-pixel side so their cells match zheng1's size.
#
# **Spikiness** is the solidity deficit of the cell outline,
# $1 - A_\text{cell} / A_\text{convex hull}$: zero for any convex shape,
# round or oval, and growing with the number and depth of indentations
# between protrusions, which is what villous or spiky membranes (the paper's
# prolymphocyte cue) add. Unlike the spread of radial distances it does not
# call an oval cell spiky, and unlike counting curvature sign changes it is
# not driven by pixel staircase noise.

# %%
table = B.read_pbc_lt(splits, seed)[0]
pool = table[table["split"] == "cv"]
sample = (pool.sample(frac=1, random_state=seed).groupby("label").head(cfg.morph_per_class)
          [["path", "label"]].sort_values(["label", "path"]).reset_index(drop=True))
morph = MO.MorphologyCache.in_cache(root, cache)
features = pd.concat([sample, morph(sample)], axis=1)
features["label"] = pd.Categorical(features["label"], categories=list(B.PBC_LT_CLASSES))
means = features.groupby("label", observed=True)[list(MO.FEATURES)].median().round(3)
means["cells"] = features.groupby("label", observed=True).size()
display(Markdown("Median of each feature per pbc fine class (segmentation masks):"))
display(means)

# %%
shown_features = ["nucleus_fraction", "spikiness", "staining_intensity", "nucleus_offset", "lobe_count",
                  "cell_area"]
long = features.melt(id_vars="label", value_vars=shown_features, var_name="feature")
grid = sns.catplot(data=long, x="label", y="value", col="feature", col_wrap=3, kind="box", sharey=False,
                   height=2.6, aspect=1.5, fliersize=1.5)
grid.set_titles("{col_name}")
grid.set_xticklabels(rotation=45)
grid.figure.suptitle("pbc morphology per fine class (segmentation masks)", y=1.02)
plt.show()

# %% [markdown]
# How well does each feature tell one class from the rest? The table gives the
# area under the ROC curve of the feature alone (0.5: no separation; 1 or 0:
# perfect) for each class against all others, from the masks and from the
# K-means nucleus (spikiness is a property of the cell outline, the same for
# both).

# %%
separation = []
for source, prefix in (("masks", ""), ("k-means nucleus", "km_")):
    for feature in ("nucleus_fraction", "spikiness", "staining_intensity", "nucleus_offset", "lobe_count"):
        if prefix and feature == "spikiness":
            continue
        part = MO.class_separation(features.astype({"label": str}), feature=prefix + feature)
        separation.append(part["auc"].rename(f"{feature} ({source})"))
auc = pd.concat(separation, axis=1).T.round(2)
display(auc)
fig, ax = plt.subplots(figsize=(9, 4.5))
sns.heatmap(auc, annot=True, fmt=".2f", cmap="vlag", center=0.5, vmin=0, vmax=1, ax=ax, cbar=False)
ax.set_title("one feature, one class against the rest: ROC AUC")
plt.show()

# %% [markdown]
# The same features on zheng1, where the expert masks let us see how much of
# the class signal survives segmentation errors: expert masks, classical masks
# and the K-means nucleus inside the classical cell.

# %%
ids = sorted(masks)
zheng_images = [data.load_image(root / "zheng1" / "images" / f"{i:03d}.png") for i in ids]
zheng_labels = classical.set_index("image_id").loc[ids, "label"].tolist()
sources = {
    "expert masks": MO.features_table(zheng_images, zheng_labels, masks=[masks[i] for i in ids]),
    "classical masks": MO.features_table(zheng_images, zheng_labels),
    "k-means nucleus": MO.features_table(zheng_images, zheng_labels, source="kmeans"),
}
zheng_features = pd.concat([t.assign(source=s) for s, t in sources.items()], ignore_index=True)
summary = zheng_features.groupby(["source", "label"])[["nucleus_fraction", "spikiness", "lobe_count"]].median()
display(summary.unstack("source").round(3))
long = zheng_features.melt(id_vars=["label", "source"], value_vars=["nucleus_fraction", "lobe_count"],
                           var_name="feature")
grid = sns.catplot(data=long, x="label", y="value", hue="source", col="feature", kind="box", sharey=False,
                   height=3, aspect=1.4, fliersize=1.5)
grid.figure.suptitle("zheng1: features from expert masks, classical masks and the K-means nucleus", y=1.03)
plt.show()

# %% [markdown]
# ## The Mahalanobis filter
#
# The paper's plasma-cell rule keeps a rare-class prediction only if the
# cell's vector (N:C ratio, staining intensity, nucleus offset) lies within a
# threshold of that class's mean under a class-conditional covariance. Here
# the covariances are shrunk (Ledoit-Wolf: a handful of rare-class cells
# cannot support a full 3 x 3 covariance), fitted on half of the pbc cells
# above, and each class's threshold is chosen on the other half to accept 95%
# of that class's own cells. The table shows what the filter then lets
# through: its own class (the recall target) and every other class (what it
# rejects is what the rescue can no longer get wrong).

# %%
rng = np.random.default_rng(seed)
half = rng.permutation(len(features)) % 2 == 0
vectors = features[list(MO.PAPER_FEATURES)].to_numpy(float)
labels = features["label"].astype(str).to_numpy()
filt = MO.MahalanobisFilter().fit(vectors[half], labels[half])
acceptance = {}
for cls in filt.classes_:
    if (labels[~half] == cls).sum() == 0:
        continue
    filt.choose_threshold(vectors[~half], labels[~half], cls, target_recall=0.95)
    accepted = filt.accepts(vectors[~half], cls)
    acceptance[cls] = pd.Series(accepted).groupby(labels[~half]).mean()
acceptance = pd.DataFrame(acceptance).T.reindex(columns=list(B.PBC_LT_CLASSES)) * 100
acceptance.index.name = "filter of class"
fig, ax = plt.subplots(figsize=(7, 5))
sns.heatmap(acceptance, annot=True, fmt=".0f", cmap="rocket_r", vmin=0, vmax=100, ax=ax, cbar=False)
ax.set_xlabel("true class of the cell")
ax.set_title("% of held-out cells each class's Mahalanobis filter accepts")
plt.show()
off_diagonal = acceptance.where(~np.eye(*acceptance.shape, dtype=bool)).stack().mean()
print(f"mean acceptance of other classes' cells: {off_diagonal:.1f}% (own class: target 95%)")

# %% [markdown]
# ## What this chapter shows

# %%
lines = [f"* Classical back-end on all {len(classical)} zheng1 images: nucleus Dice {classical.nucleus_dice.mean():.3f}, "
         f"cell Dice {classical.cell_dice.mean():.3f}"
         + (f" ({held_out.nucleus_dice.mean():.3f} / {held_out.cell_dice.mean():.3f} on the {len(held_out)} images "
            "it was not tuned on)." if len(held_out) else ".")]
if have_cellpose:
    lines.append(f"* Cellpose from scratch ({cfg.cellpose_folds}-fold, {cfg.cellpose_epochs} epochs, "
                 f"{len(cellpose)} images): nucleus Dice {cellpose.nucleus_dice.mean():.3f}, cell Dice "
                 f"{cellpose.cell_dice.mean():.3f}, against {same.nucleus_dice.mean():.3f} / "
                 f"{same.cell_dice.mean():.3f} for the classical back-end on the same images.")
lines.append(f"* BCCD localisation: mean IoU {scored.iou.mean():.3f} over {len(scored)} fields, "
             f"{100 * (scored.iou >= 0.5).mean():.0f}% of boxes at IoU >= 0.5.")
mask_auc = auc[~auc.index.str.contains("k-means")]
strength = (mask_auc - 0.5).abs()
for cls in mask_auc.columns:
    best = strength[cls].idxmax()
    lines.append(f"* {cls}: the most telling single feature is {best.split(' (')[0]} "
                 f"(AUC {mask_auc.loc[best, cls]:.2f}; 0.5 is chance, below 0.5 means lower than the rest).")
lines.append(f"* The Mahalanobis filter on the paper's three features lets through {off_diagonal:.0f}% of other "
             "classes' cells at a 95% recall target: on pbc's nine classes it removes only a minority of wrong "
             "candidates, which bounds what the rescue chapter's biological filter can do.")
display(Markdown("\n".join(lines)))
