"""Chapter 09's steps in :mod:`wbclib.protocols.segmentation`: the tables and
summaries the notebook displays, on tiny synthetic frames."""
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from wbclib import morphology as MO
from wbclib.protocols import segmentation as seg


def dice_scores(ids, nucleus, cell, label="neutrophil"):
    return pd.DataFrame(dict(image_id=ids, label=label, nucleus_dice=nucleus, cell_dice=cell))


def test_held_out_note_uses_only_images_after_the_tuning_set():
    classical = dice_scores([5, 101, 250], [0.1, 0.8, 0.6], [0.2, 0.9, 0.7])
    assert seg.held_out_note(classical) == ("images 101-300 (not used for tuning, n=2): nucleus Dice 0.700, "
                                            "cell Dice 0.800")
    assert "none among the 1 scored here" in seg.held_out_note(classical.head(1))


def test_extreme_rows_takes_low_middle_and_high():
    scores = pd.DataFrame(dict(cell_dice=[0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 0.0]))
    picked = seg.extreme_rows(scores, "cell_dice", n=2)["cell_dice"].tolist()
    assert picked == [0.0, 0.1, 0.5, 0.6, 0.8, 0.9]


def test_dice_table_compares_backends_on_the_same_images():
    classical = dice_scores([1, 2, 3], [0.5, 0.7, 0.9], [0.6, 0.8, 1.0])
    cellpose = dice_scores([2, 3], [0.6, 0.8], [0.7, 0.7]).assign(fold=[0, 1], train_seconds=[3.0, 4.0])
    scores = seg.backend_scores(classical, cellpose)
    assert sorted(scores[scores.backend == "classical"].image_id) == [2, 3]
    table = seg.dice_table(scores)
    assert list(table.columns) == ["nucleus_dice mean", "nucleus_dice std", "cell_dice mean", "cell_dice std", "images"]
    assert table.loc["classical", "nucleus_dice mean"] == 0.8
    assert table.loc["cellpose (k-fold)", "cell_dice std"] == 0.0
    assert table["images"].tolist() == [2, 2]


def test_localisation_summary_counts_fields_at_half_iou():
    scored = pd.DataFrame(dict(iou=[0.2, 0.6, 0.8, 0.9]))
    assert seg.localisation_summary(scored) == ("4 fields with a WBC box: mean IoU 0.625, median 0.700; "
                                                "IoU >= 0.5 on 75.0% of fields")


def test_morphology_sample_draws_per_class_from_the_cv_pool_only():
    table = pd.DataFrame(dict(path=[f"{c}{i}.jpg" for c in "ab" for i in range(5)],
                              label=["a"] * 5 + ["b"] * 5, split=["cv", "cv", "cv", "test", "test"] * 2))
    sample = seg.morphology_sample(table, per_class=2, seed=0)
    assert sample.columns.tolist() == ["path", "label"]
    assert sample.label.tolist() == ["a", "a", "b", "b"]
    assert set(sample.path) <= {"a0.jpg", "a1.jpg", "a2.jpg", "b0.jpg", "b1.jpg", "b2.jpg"}
    assert sample.equals(seg.morphology_sample(table, per_class=2, seed=0))
    assert list(sample.path) == sorted(sample.path)


def morphology_frame(n=12, seed=0):
    """Three classes whose features differ in mean; every column of MO.FEATURES and km_ twins."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(["lymphocyte", "monocyte", "neutrophil"], n)
    centre = np.repeat([0.0, 5.0, 10.0], n)
    frame = pd.DataFrame({f: centre + rng.normal(0, 0.5, len(labels)) for f in MO.FEATURES})
    for f in MO.FEATURES:
        frame[f"km_{f}"] = frame[f]
    frame["label"] = pd.Categorical(labels, categories=["neutrophil", "lymphocyte", "monocyte", "basophil"])
    return frame


def test_class_medians_per_observed_class_with_counts():
    medians = seg.class_medians(morphology_frame())
    assert list(medians.index) == ["neutrophil", "lymphocyte", "monocyte"]  # category order, observed only
    assert medians["cells"].tolist() == [12, 12, 12]
    assert medians.loc["monocyte", "spikiness"] == pytest.approx(5.0, abs=0.5)


def test_feature_separation_rows_and_perfect_auc():
    auc = seg.feature_separation(morphology_frame())
    assert len(auc) == 9 and "spikiness (k-means nucleus)" not in auc.index
    assert auc.loc["spikiness (masks)", "neutrophil vs rest"] == 1.0  # highest values
    assert auc.loc["lobe_count (k-means nucleus)", "lymphocyte vs rest"] == 0.0  # lowest values


def test_source_medians_put_sources_in_columns():
    features = pd.DataFrame(dict(source=["a", "a", "b"], label=["x", "x", "x"], nucleus_fraction=[0.1, 0.3, 0.5],
                                 spikiness=[0.0, 0.0, 0.1], lobe_count=[1, 3, 2]))
    table = seg.source_medians(features)
    assert table.loc["x", ("nucleus_fraction", "a")] == 0.2 and table.loc["x", ("lobe_count", "b")] == 2


def test_mahalanobis_acceptance_keeps_own_class_and_rejects_far_ones():
    acceptance = seg.mahalanobis_acceptance(morphology_frame(n=40), ["neutrophil", "lymphocyte", "monocyte", "basophil"])
    assert acceptance.index.name == "filter of class"
    assert list(acceptance.columns) == ["neutrophil", "lymphocyte", "monocyte", "basophil"]
    assert list(acceptance.index) == ["neutrophil", "lymphocyte", "monocyte"]  # own class on the diagonal
    assert acceptance["basophil"].isna().all()  # no basophil cell
    for cls in acceptance.index:
        assert acceptance.loc[cls, cls] >= 90
        assert acceptance.loc[cls].drop([cls, "basophil"]).eq(0).all()
    assert seg.off_diagonal(acceptance) == 0.0


def test_off_diagonal_averages_other_classes_only():
    acceptance = pd.DataFrame([[95.0, 10.0, np.nan], [30.0, 90.0, 20.0]], index=["a", "b"], columns=["a", "b", "c"])
    assert seg.off_diagonal(acceptance) == pytest.approx(20.0)
    # matched by label: rows in another order than the columns give the same mean
    assert seg.off_diagonal(acceptance.loc[["b", "a"]]) == pytest.approx(20.0)


def test_most_telling_feature_is_furthest_from_chance_either_way():
    auc = pd.DataFrame({"a": [0.55, 0.1, 0.99], "b": [0.7, 0.6, 0.5]},
                       index=["spikiness (masks)", "lobe_count (masks)", "lobe_count (k-means nucleus)"])
    best = seg.most_telling_features(auc).set_index("label")
    assert best.loc["a", "feature"] == "lobe_count" and best.loc["a", "auc"] == 0.1  # k-means row ignored
    assert best.loc["b", "feature"] == "spikiness"


def test_chapter_summary_reports_each_part():
    cfg = SimpleNamespace(cellpose_folds=2, cellpose_epochs=1)
    classical = dice_scores([1, 150], [0.5, 0.7], [0.6, 0.8])
    backends = SimpleNamespace(available=False)
    scored = pd.DataFrame(dict(iou=[0.4, 0.8]))
    auc = pd.DataFrame({"a": [0.9]}, index=["spikiness (masks)"])
    acceptance = pd.DataFrame([[95.0, 40.0], [60.0, 95.0]], index=["a", "b"], columns=["a", "b"])
    lines = seg.chapter_summary(cfg, classical, backends, scored, auc, acceptance).split("\n")
    assert lines[0] == ("* Classical back-end on all 2 zheng1 images: nucleus Dice 0.600, cell Dice 0.700 "
                        "(0.700 / 0.800 on the 1 images it was not tuned on).")
    assert lines[1] == "* BCCD localisation: mean IoU 0.600 over 2 fields, 50% of boxes at IoU >= 0.5."
    assert lines[2].startswith("* a: the most telling single feature is spikiness (AUC 0.90;")
    assert "lets through 50% of other" in lines[3] and len(lines) == 4
    backends = SimpleNamespace(available=True, cellpose=dice_scores([1], [0.9], [0.95]), classical=classical.head(1))
    lines = seg.chapter_summary(cfg, classical, backends, scored, auc, acceptance).split("\n")
    assert lines[1] == ("* Cellpose from scratch (2-fold, 1 epochs, 1 images): nucleus Dice 0.900, cell Dice 0.950, "
                        "against 0.500 / 0.600 for the classical back-end on the same images.")
