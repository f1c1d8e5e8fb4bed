"""Chapter 09's protocol: cross-validated cellpose on zheng1, and the chapter's
segmentation, localisation and morphology tables, one function per notebook step."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Optional, Union

import numpy as np
import pandas as pd

from .. import data, runs, segment
from .. import morphology as MO
from ..runs import inputs_fingerprint

PathLike = Union[str, Path]


def kfold_identity(root: Path, n_folds: int, epochs: int, limit: Optional[int], seed: int, train_kwargs: dict) -> tuple:
    """(configuration, inputs) of a cellpose k-fold run: its settings, and the
    zheng1 images, expert masks and label table it reads (rows, data root,
    file sizes and times)."""
    config = dict(n_folds=n_folds, epochs=epochs, limit=limit, seed=seed, od_scale=segment.CELLPOSE_OD_SCALE,
                  **train_kwargs)
    ids = segment.zheng1_image_ids(root, limit)
    files = pd.DataFrame({"path": [f"zheng1/{kind}/{i:03d}.png" for i in ids for kind in ("images", "masks")]
                          + ["zheng1/labels.csv"]})
    return config, inputs_fingerprint(dict(files=files), root)


def cellpose_kfold(results_dir: PathLike, root: Optional[PathLike], n_folds: int = 5, epochs: int = 100,
                   limit: Optional[int] = None, seed: int = 0, **kwargs) -> pd.DataFrame:
    """:func:`wbclib.segment.cellpose_kfold` in the ``segmentation/cellpose_kfold``
    run folder named by these settings and inputs (a change of either trains
    anew in another folder; a finished run is read back). ``kwargs`` go to the
    trainer (``batch_size`` ...), ``device`` and ``threads`` only to how it runs.
    Returns the per-image Dice table with the ``run_dir``."""
    root = data.data_root(root)
    train_kwargs = {k: v for k, v in kwargs.items() if k not in ("device", "threads")}
    config, inputs = kfold_identity(root, n_folds, epochs, limit, seed, train_kwargs)
    run = runs.run(results_dir, "segmentation/cellpose_kfold", config, inputs, keys=("n_folds", "epochs", "limit"))
    if run.done:
        scores = run.read_csv("scores.csv")
    else:
        scores = segment.cellpose_kfold(root, run.dir, n_folds, epochs, limit, seed, **kwargs)
        run.write_csv("scores.csv", scores)
        run.finish(dict(nucleus_dice=float(scores["nucleus_dice"].mean()),
                        cell_dice=float(scores["cell_dice"].mean()), images=len(scores)))
    return scores.assign(run_dir=str(run.dir))


# --------------------------------------------------------------------------
# The chapter's steps, one per notebook cell (notebook 09)
# --------------------------------------------------------------------------

#: The pbc morphology features the chapter compares between classes (AUC table).
SEPARATION_FEATURES = ("nucleus_fraction", "spikiness", "staining_intensity", "nucleus_offset", "lobe_count")

#: zheng1 images 1-100 tuned the classical back-end; the others are untouched.
TUNING_IMAGES = 100


def profile_summary(cfg) -> str:
    """One line: the profile's zheng1 / bccd / pbc sample sizes and cellpose settings."""
    return (f"profile {cfg.name}: zheng1 images {cfg.seg_zheng1_images or 'all'}, bccd fields "
            f"{cfg.seg_bccd_fields or 'all'}, {cfg.morph_per_class} pbc cells per fine class; cellpose: "
            f"{cfg.cellpose_images or 'all'} images, {cfg.cellpose_folds} folds, {cfg.cellpose_epochs} epochs")


def held_out(classical: pd.DataFrame) -> pd.DataFrame:
    """The rows of zheng1 images the classical back-end was not tuned on (ids above :data:`TUNING_IMAGES`)."""
    return classical[classical["image_id"] > TUNING_IMAGES]


def held_out_note(classical: pd.DataFrame) -> str:
    """Mean nucleus and cell Dice on the images not used for tuning, or a note that none were scored."""
    rest = held_out(classical)
    if not len(rest):
        return f"images 101-300 (not used for tuning): none among the {len(classical)} scored here"
    return (f"images 101-300 (not used for tuning, n={len(rest)}): nucleus Dice "
            f"{rest.nucleus_dice.mean():.3f}, cell Dice {rest.cell_dice.mean():.3f}")


def extreme_rows(scores: pd.DataFrame, column: str, n: int = 3) -> pd.DataFrame:
    """The ``n`` lowest, ``n`` middle and ``n`` highest rows of ``scores`` by ``column``."""
    order = scores.sort_values(column)
    middle = len(order) // 2
    return pd.concat([order.head(n), order.iloc[middle: middle + n], order.tail(n)])


def extreme_cells(root: Path, classical: pd.DataFrame, limit: Optional[int] = None) -> tuple:
    """Images, outlines (expert and classical nucleus and cell) and captions of
    the three worst, three median and three best zheng1 cells by cell Dice
    (``classical``: :func:`wbclib.segment.evaluate_zheng1` on the first ``limit``
    images), for :func:`wbclib.plots.mask_overlays`."""
    masks = segment.load_zheng1_masks(root, limit)
    shown = extreme_rows(classical, "cell_dice")
    images, outlines, captions = [], [], []
    for image_id, label, nd, cd in shown[["image_id", "label", "nucleus_dice", "cell_dice"]].itertuples(index=False):
        image = data.load_image(root / "zheng1" / "images" / f"{image_id:03d}.png")
        result = segment.segment_cell(image)
        images.append(image)
        outlines.append({"expert cell": masks[image_id][1], "expert nucleus": masks[image_id][0],
                         "classical cell": result.cell, "classical nucleus": result.nucleus})
        captions.append(f"{image_id:03d} {label}\nDice N {nd:.2f} C {cd:.2f}")
    return images, outlines, captions


def backend_scores(classical: pd.DataFrame, cellpose: pd.DataFrame) -> pd.DataFrame:
    """Both back-ends' per-image Dice on the images cellpose scored, with a ``backend`` column."""
    same = classical[classical["image_id"].isin(cellpose["image_id"])]
    return pd.concat([same.assign(backend="classical"), cellpose.assign(backend="cellpose (k-fold)")])


def dice_table(scores: pd.DataFrame) -> pd.DataFrame:
    """Mean and std of nucleus and cell Dice per back-end (3 digits), and the number of images."""
    table = scores.groupby("backend")[["nucleus_dice", "cell_dice"]].agg(["mean", "std"]).round(3)
    table.columns = [f"{region} {stat}" for region, stat in table.columns]
    table["images"] = scores.groupby("backend").size()
    return table


def compare_backends(results_dir: Path, root: Path, cfg, classical: pd.DataFrame, seed: int = 0) -> SimpleNamespace:
    """Cellpose from scratch, k-fold on zheng1 (:func:`cellpose_kfold`), against
    the classical back-end on the same images.

    Returns ``available`` (False when cellpose cannot be imported: ``note``
    says why and nothing else is set), ``cellpose`` (its per-image scores),
    ``classical`` (the classical rows of the same images), ``scores`` (both,
    :func:`backend_scores`), ``table`` (:func:`dice_table`) and ``note`` (a
    sentence on the folds, epochs and training time)."""
    try:
        segment.require_cellpose()
    except segment.SegmentationError as exc:
        return SimpleNamespace(available=False, note=f"cellpose back-end skipped: {exc}", cellpose=None,
                               classical=None, scores=None, table=None)
    cellpose = cellpose_kfold(results_dir, root, n_folds=cfg.cellpose_folds, epochs=cfg.cellpose_epochs,
                              limit=cfg.cellpose_images, seed=seed, batch_size=cfg.cellpose_batch_size)
    scores = backend_scores(classical, cellpose)
    note = (f"Both back-ends on the same {len(cellpose)} zheng1 images ({cfg.cellpose_folds}-fold, "
            f"{cfg.cellpose_epochs} epochs, {cellpose.groupby('fold').train_seconds.first().sum():.0f} s of training):")
    return SimpleNamespace(available=True, note=note, cellpose=cellpose,
                           classical=scores[scores["backend"] == "classical"], scores=scores,
                           table=dice_table(scores))


def localisation(root: Path, limit: Optional[int] = None) -> pd.DataFrame:
    """:func:`wbclib.segment.evaluate_bccd_localisation` on the fields that have an annotated WBC (a finite IoU)."""
    return segment.evaluate_bccd_localisation(root, limit=limit).dropna(subset=["iou"])


def localisation_summary(scored: pd.DataFrame) -> str:
    """Mean and median IoU over the fields, and the share at IoU >= 0.5."""
    return (f"{len(scored)} fields with a WBC box: mean IoU {scored.iou.mean():.3f}, median {scored.iou.median():.3f}; "
            f"IoU >= 0.5 on {100 * (scored.iou >= 0.5).mean():.1f}% of fields")


def localisation_examples(root: Path, scored: pd.DataFrame, worst: int = 2, best: int = 3, size: int = 160) -> tuple:
    """The ``worst`` and ``best`` fields by IoU: ``(fields, predicted boxes,
    annotated boxes, centred crops of ``size`` px, captions)`` for
    :func:`wbclib.plots.boxes_and_crops`."""
    examples = pd.concat([scored.sort_values("iou").head(worst), scored.sort_values("iou").tail(best)])
    fields, predicted, annotated, crops, captions = [], [], [], [], []
    for row in examples.itertuples(index=False):
        field = data.load_image(root / "bccd" / "fields" / f"{row.field}.jpg")
        box = (row.x0, row.y0, row.x1, row.y1)
        fields.append(field)
        predicted.append(box)
        annotated.append(segment.read_voc_boxes(root / "bccd" / "annotations" / f"{row.field}.xml"))
        crops.append(segment.crop_primary_wbc(field, size=size, bbox=box))
        captions.append(f"{row.field.split('_')[-1]}: IoU {row.iou:.2f}")
    return fields, predicted, annotated, crops, captions


def morphology_sample(table: pd.DataFrame, per_class: int, seed: int = 0) -> pd.DataFrame:
    """``per_class`` random cross-validation rows (``split == "cv"``, never the
    test) of each class, as ``path, label`` sorted by label and path."""
    pool = table[table["split"] == "cv"]
    return (pool.sample(frac=1, random_state=seed).groupby("label").head(per_class)
            [["path", "label"]].sort_values(["label", "path"]).reset_index(drop=True))


def pbc_morphology(cfg, root: Path, splits_dir: Path, cache_dir: Path, seed: int = 0) -> pd.DataFrame:
    """Morphology features (:class:`wbclib.morphology.MorphologyCache`) of
    :func:`morphology_sample`'s pbc cells (``morph_per_class`` per fine class),
    with ``label`` a categorical in PBC-LT's class order."""
    from .. import benchmarks as B

    sample = morphology_sample(B.read_pbc_lt(splits_dir, seed)[0], cfg.morph_per_class, seed)
    features = pd.concat([sample, MO.MorphologyCache.in_cache(root, cache_dir)(sample)], axis=1)
    features["label"] = pd.Categorical(features["label"], categories=list(B.PBC_LT_CLASSES))
    return features


def class_medians(features: pd.DataFrame) -> pd.DataFrame:
    """Median of every morphology feature per class (3 digits) and the number of ``cells``."""
    medians = features.groupby("label", observed=True)[list(MO.FEATURES)].median().round(3)
    medians["cells"] = features.groupby("label", observed=True).size()
    return medians


def feature_separation(features: pd.DataFrame, names=SEPARATION_FEATURES) -> pd.DataFrame:
    """ROC AUC of each feature alone, each class against the rest (columns), from
    the masks and from the K-means nucleus (``km_`` columns; spikiness, a property
    of the cell outline, only once). Rows ``feature (source)``, 2 digits."""
    separation = []
    for source, prefix in (("masks", ""), ("k-means nucleus", "km_")):
        for feature in names:
            if prefix and feature == "spikiness":
                continue
            part = MO.class_separation(features.astype({"label": str}), feature=prefix + feature)
            separation.append(part["auc"].rename(f"{feature} ({source})"))
    return pd.concat(separation, axis=1).T.round(2)


def zheng1_features(root: Path, classical: pd.DataFrame, limit: Optional[int] = None) -> pd.DataFrame:
    """Morphology features of the first ``limit`` zheng1 images (those
    ``classical`` scored) from three sources (``expert masks``, ``classical
    masks``, ``k-means nucleus``), with a ``source`` column."""
    masks = segment.load_zheng1_masks(root, limit)
    ids = sorted(masks)
    images = [data.load_image(root / "zheng1" / "images" / f"{i:03d}.png") for i in ids]
    labels = classical.set_index("image_id").loc[ids, "label"].tolist()
    sources = {
        "expert masks": MO.features_table(images, labels, masks=[masks[i] for i in ids]),
        "classical masks": MO.features_table(images, labels),
        "k-means nucleus": MO.features_table(images, labels, source="kmeans"),
    }
    return pd.concat([t.assign(source=s) for s, t in sources.items()], ignore_index=True)


def source_medians(features: pd.DataFrame, names=("nucleus_fraction", "spikiness", "lobe_count")) -> pd.DataFrame:
    """Median of each feature per class (rows) and source (columns), 3 digits."""
    return features.groupby(["source", "label"])[list(names)].median().unstack("source").round(3)


def mahalanobis_acceptance(features: pd.DataFrame, classes, seed: int = 0,
                           target_recall: float = 0.95) -> pd.DataFrame:
    """Percent of held-out cells (columns: their true class, in ``classes`` order)
    that each class's Mahalanobis filter (rows) accepts.

    The filter (:class:`wbclib.morphology.MahalanobisFilter`, on
    :data:`~wbclib.morphology.PAPER_FEATURES`) is fitted on a random half of the
    cells; each class's threshold is chosen on the other half to accept
    ``target_recall`` of its own cells, and acceptance is measured on that half.
    Rows follow ``classes`` too (a class's own cells on the diagonal); classes
    without a cell in that half get no row."""
    rng = np.random.default_rng(seed)
    half = rng.permutation(len(features)) % 2 == 0
    vectors = features[list(MO.PAPER_FEATURES)].to_numpy(float)
    labels = features["label"].astype(str).to_numpy()
    filt = MO.MahalanobisFilter().fit(vectors[half], labels[half])
    acceptance = {}
    for cls in filt.classes_:
        if (labels[~half] == cls).sum() == 0:
            continue
        filt.choose_threshold(vectors[~half], labels[~half], cls, target_recall=target_recall)
        accepted = filt.accepts(vectors[~half], cls)
        acceptance[cls] = pd.Series(accepted).groupby(labels[~half]).mean()
    acceptance = pd.DataFrame(acceptance).T.reindex(columns=list(classes)) * 100
    acceptance = acceptance.reindex(index=[c for c in classes if c in acceptance.index])
    acceptance.index.name = "filter of class"
    return acceptance


def off_diagonal(acceptance: pd.DataFrame) -> float:
    """Mean acceptance of the cells of other classes: every cell whose filter
    (row) and true class (column) differ, matched by label, not position (NaN skipped)."""
    own = np.equal.outer(acceptance.index.to_numpy(dtype=object), acceptance.columns.to_numpy(dtype=object))
    return acceptance.where(~own).stack().mean()


def most_telling_features(auc: pd.DataFrame) -> pd.DataFrame:
    """Per class (a column of :func:`feature_separation`, mask rows only): the
    feature whose AUC lies furthest from 0.5, and that AUC."""
    mask_auc = auc[~auc.index.str.contains("k-means")]
    strength = (mask_auc - 0.5).abs()
    rows = []
    for cls in mask_auc.columns:
        best = strength[cls].idxmax()
        rows.append(dict(label=cls, feature=best.split(" (")[0], auc=mask_auc.loc[best, cls]))
    return pd.DataFrame(rows)


def chapter_summary(cfg, classical: pd.DataFrame, backends: SimpleNamespace, scored: pd.DataFrame,
                    auc: pd.DataFrame, acceptance: pd.DataFrame) -> str:
    """The chapter's closing bullet points (Markdown), every number from the tables above."""
    rest = held_out(classical)
    lines = [f"* Classical back-end on all {len(classical)} zheng1 images: nucleus Dice "
             f"{classical.nucleus_dice.mean():.3f}, cell Dice {classical.cell_dice.mean():.3f}"
             + (f" ({rest.nucleus_dice.mean():.3f} / {rest.cell_dice.mean():.3f} on the {len(rest)} images "
                "it was not tuned on)." if len(rest) else ".")]
    if backends.available:
        cellpose, same = backends.cellpose, backends.classical
        lines.append(f"* Cellpose from scratch ({cfg.cellpose_folds}-fold, {cfg.cellpose_epochs} epochs, "
                     f"{len(cellpose)} images): nucleus Dice {cellpose.nucleus_dice.mean():.3f}, cell Dice "
                     f"{cellpose.cell_dice.mean():.3f}, against {same.nucleus_dice.mean():.3f} / "
                     f"{same.cell_dice.mean():.3f} for the classical back-end on the same images.")
    lines.append(f"* BCCD localisation: mean IoU {scored.iou.mean():.3f} over {len(scored)} fields, "
                 f"{100 * (scored.iou >= 0.5).mean():.0f}% of boxes at IoU >= 0.5.")
    for r in most_telling_features(auc).itertuples(index=False):
        lines.append(f"* {r.label}: the most telling single feature is {r.feature} "
                     f"(AUC {r.auc:.2f}; 0.5 is chance, below 0.5 means lower than the rest).")
    lines.append(f"* The Mahalanobis filter on the paper's three features lets through {off_diagonal(acceptance):.0f}% "
                 "of other classes' cells at a 95% recall target: on pbc's nine classes it removes only a minority "
                 "of wrong candidates, which bounds what the rescue chapter's biological filter can do.")
    return "\n".join(lines)
