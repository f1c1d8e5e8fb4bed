"""Morphology features, K-means masks and the Mahalanobis filter."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from wbclib import data, segment
from wbclib import morphology as morph

SIZE = 200


def disk(centre, radius, size=SIZE):
    yy, xx = np.mgrid[:size, :size]
    return np.hypot(yy - centre[0], xx - centre[1]) < radius


def paint(nucleus, cell, nucleus_rgb=(95, 45, 140)):
    image = np.empty(cell.shape + (3,), np.uint8)
    image[:] = (238, 228, 212)
    image[cell] = (200, 170, 205)
    image[nucleus] = nucleus_rgb
    return image


CENTRE = (SIZE / 2, SIZE / 2)


# -- single features ---------------------------------------------------------


def test_star_is_spikier_than_disk_and_ellipse_is_not_spiky():
    yy, xx = np.mgrid[:SIZE, :SIZE]
    radius, angle = np.hypot(yy - 100, xx - 100), np.arctan2(yy - 100, xx - 100)
    star = radius < 45 * (1 + 0.35 * np.cos(8 * angle))
    ellipse = ((yy - 100) / 35) ** 2 + ((xx - 100) / 80) ** 2 < 1
    round_cell = disk(CENTRE, 60)
    assert morph.spikiness(round_cell) < 0.02
    assert morph.spikiness(ellipse) < 0.02  # elongated but convex: not spiky
    assert morph.spikiness(star) > 0.2
    assert np.isnan(morph.spikiness(np.zeros((10, 10), bool)))


def test_nc_ratio_and_areas_of_known_disks():
    nucleus, cell = disk(CENTRE, 20), disk(CENTRE, 40)
    f = morph.morphology_features(paint(nucleus, cell), nucleus, cell)
    assert f["nucleus_area"] == pytest.approx(np.pi * 20**2, rel=0.03)
    assert f["cell_area"] == pytest.approx(np.pi * 40**2, rel=0.03)
    assert f["nc_ratio"] == pytest.approx(20**2 / (40**2 - 20**2), rel=0.05)
    assert f["nucleus_fraction"] == pytest.approx(0.25, rel=0.05)
    assert f["lobe_count"] == 1
    assert f["nucleus_offset"] < 0.02


def test_lobe_count_of_touching_blobs_and_disk():
    lobes = disk((100, 58), 22) | disk((100, 100), 22) | disk((100, 142), 22)
    assert ndimage.label(lobes)[1] == 1  # one touching component, not three islands
    assert morph.lobe_count(lobes) == 3
    assert morph.lobe_count(disk(CENTRE, 30)) == 1
    assert morph.lobe_count(disk((50, 50), 15) | disk((150, 150), 15)) == 2
    assert morph.lobe_count(np.zeros((20, 20), bool)) == 0


def test_lobes_need_a_deep_saddle():
    bridged = disk((100, 60), 20) | disk((100, 140), 20)
    bridged[96:104, 60:140] = True  # an 8 px chromatin bridge: saddle 4 px deep vs 20 px lobes
    assert morph.lobe_count(bridged) == 2
    assert morph.lobe_count(bridged, peak_height=0.9) == 1
    # twin equal peaks across a broad waist (17 of 20 px) are one kidney-like lobe
    peanut = disk((100, 90), 20) | disk((100, 110), 20)
    assert morph.lobe_count(peanut) == 1
    assert morph.lobe_count(peanut, peak_height=0.05) == 2


def test_eccentric_nucleus_offset():
    cell = disk(CENTRE, 40)
    centred = disk(CENTRE, 15)
    eccentric = disk((100, 120), 15)  # 20 px off centre in a 40 px-radius cell
    f_centred = morph.morphology_features(paint(centred, cell), centred, cell)
    f_eccentric = morph.morphology_features(paint(eccentric, cell), eccentric, cell)
    assert f_eccentric["nucleus_offset"] == pytest.approx(0.5, abs=0.03)
    assert f_eccentric["nucleus_offset"] > f_centred["nucleus_offset"] + 0.4


def test_staining_intensity_follows_nuclear_darkness():
    nucleus, cell = disk(CENTRE, 20), disk(CENTRE, 40)
    dark = morph.morphology_features(paint(nucleus, cell, (60, 20, 120)), nucleus, cell)
    pale = morph.morphology_features(paint(nucleus, cell, (160, 130, 190)), nucleus, cell)
    assert dark["staining_intensity"] > pale["staining_intensity"] > 0


def test_empty_masks_give_nan_not_errors():
    empty = np.zeros((30, 30), bool)
    f = morph.morphology_features(np.zeros((30, 30, 3), np.uint8), empty, empty)
    assert f["nucleus_area"] == 0 and f["lobe_count"] == 0
    assert np.isnan(f["nc_ratio"]) and np.isnan(f["staining_intensity"]) and np.isnan(f["nucleus_offset"])


# -- K-means masks and the feature table ------------------------------------


def test_kmeans_masks_split_nucleus_from_cytoplasm():
    nucleus, cell = disk((105, 96), 18), disk(CENTRE, 40)
    noisy = paint(nucleus, cell) + np.random.default_rng(0).normal(0, 6, (SIZE, SIZE, 3))
    image = np.clip(noisy, 0, 255).astype(np.uint8)
    given = morph.kmeans_masks(image, cell_mask=cell)
    assert segment.dice(given.nucleus, nucleus) > 0.95
    assert not (given.nucleus & ~cell).any()
    found = morph.kmeans_masks(image)  # cell from the segmenter
    assert segment.dice(found.cell, cell) > 0.9 and segment.dice(found.nucleus, nucleus) > 0.9
    with pytest.raises(ValueError, match="k must be"):
        morph.kmeans_masks(image, k=1)


def test_features_table_from_masks_and_kmeans():
    nucleus, cell = disk(CENTRE, 20), disk(CENTRE, 40)
    image = paint(nucleus, cell)
    given = morph.features_table([image, image], ["a", "b"], masks=[(nucleus, cell)] * 2)
    assert list(given.columns) == ["label", *morph.FEATURES]
    assert given["label"].tolist() == ["a", "b"]
    assert given["nucleus_fraction"].iloc[0] == pytest.approx(0.25, rel=0.05)
    kmeans = morph.features_table([image], ["a"], source="kmeans")
    assert kmeans["nucleus_fraction"].iloc[0] == pytest.approx(0.25, rel=0.1)
    with pytest.raises(ValueError, match="source"):
        morph.features_table([image], ["a"], source="pixels")
    with pytest.raises(ValueError, match="labels"):
        morph.features_table([image], ["a", "b"], masks=[(nucleus, cell)])


# -- Mahalanobis filter ------------------------------------------------------


def gaussian_classes(n=400, seed=0):
    rng = np.random.default_rng(seed)
    cov = np.array([[1.0, 0.6, 0.0], [0.6, 1.0, 0.0], [0.0, 0.0, 4.0]])
    a = rng.multivariate_normal([0, 0, 0], cov, n)
    b = rng.multivariate_normal([5, -3, 10], np.eye(3) * 0.5, n)
    return np.vstack([a, b]), np.array(["a"] * n + ["b"] * n), cov


def test_mahalanobis_zero_at_mean_and_growing_with_distance():
    x, y, _ = gaussian_classes()
    filt = morph.MahalanobisFilter().fit(x, y)
    mean_a = x[y == "a"].mean(0)
    assert filt.distance(mean_a[None], "a")[0] == pytest.approx(0.0, abs=1e-9)
    steps = mean_a + np.outer(np.arange(6), [1.0, -1.0, 0.5])
    d = filt.distance(steps, "a")
    assert np.all(np.diff(d) > 0)
    assert filt.distance(mean_a[None], "b")[0] > 5


def test_mahalanobis_without_shrinkage_is_the_textbook_distance():
    x, y, _ = gaussian_classes()
    filt = morph.MahalanobisFilter(shrinkage=0.0).fit(x, y)
    xa = x[y == "a"]
    diff = x[:5] - xa.mean(0)
    expected = np.sqrt(np.einsum("ij,jk,ik->i", diff, np.linalg.inv(np.cov(xa, rowvar=False)), diff))
    np.testing.assert_allclose(filt.distance(x[:5], "a"), expected, rtol=1e-6)
    # full shrinkage ignores the 0.6 correlation: a different, isotropic distance
    isotropic = morph.MahalanobisFilter(shrinkage=1.0).fit(x, y)
    assert not np.allclose(isotropic.distance(x[:5], "a"), expected, rtol=1e-3)
    with pytest.raises(ValueError, match="shrinkage"):
        morph.MahalanobisFilter(shrinkage=1.5)


def test_mahalanobis_threshold_meets_target_recall():
    x, y, _ = gaussian_classes(seed=0)
    val_x, val_y, _ = gaussian_classes(seed=1)
    filt = morph.MahalanobisFilter().fit(x, y)
    threshold = filt.choose_threshold(val_x, val_y, "a", target_recall=0.9)
    accepted = filt.accepts(val_x, "a")
    assert accepted[val_y == "a"].mean() >= 0.9
    assert accepted[val_y == "b"].mean() == 0.0  # the far class is rejected
    assert filt.thresholds_["a"] == threshold
    # a chi distribution with 3 dof has its 90th percentile near 2.5
    assert 2.0 < threshold < 3.0


def test_mahalanobis_skips_tiny_classes_and_nan_rows():
    x, y, _ = gaussian_classes(n=50)
    x = np.vstack([x, [[1.0, np.nan, 0.0]], [[9.0, 9.0, 9.0]]])
    y = np.concatenate([y, ["a", "lonely"]])
    filt = morph.MahalanobisFilter(shrinkage=0.1).fit(pd.DataFrame(x), y)
    assert filt.classes_ == ["a", "b"]
    with pytest.raises(KeyError, match="lonely"):
        filt.distance(x[:1], "lonely")
    assert np.isnan(filt.distance(x[-2:-1], "a")[0])
    with pytest.raises(KeyError, match="choose_threshold"):
        filt.accepts(x, "a")


# -- real data ---------------------------------------------------------------


def test_features_separate_lymphocytes_from_neutrophils_on_zheng1(root):
    """Lymphocytes have a large round nucleus, neutrophils a small lobed one.
    On all of zheng1 (segmenter masks) the nucleus fraction is 0.60 vs 0.33
    (ROC AUC 0.998) and the lobe count 1.0 vs 2.3 (AUC 0.92)."""
    table = data.manifest("zheng1", root, hashes=False)
    picked = pd.concat([table[table["label"] == c].head(12) for c in ("lymphocyte", "neutrophil")])
    features = morph.features_table([root / p for p in picked["path"]], picked["label"])
    means = features.groupby("label")[["nucleus_fraction", "lobe_count"]].mean()
    assert means.loc["lymphocyte", "nucleus_fraction"] > means.loc["neutrophil", "nucleus_fraction"] + 0.15
    assert means.loc["neutrophil", "lobe_count"] > means.loc["lymphocyte", "lobe_count"] + 0.8
    lymph = features.loc[features["label"] == "lymphocyte", "nucleus_fraction"].to_numpy()
    neut = features.loc[features["label"] == "neutrophil", "nucleus_fraction"].to_numpy()
    auc = (lymph[:, None] > neut[None, :]).mean()
    assert auc > 0.9


def test_morphology_cache_measures_each_image_once_and_persists(tmp_path, monkeypatch):
    from conftest import write_png

    nucleus, cell = disk((105, 96), 18), disk(CENTRE, 40)
    write_png(tmp_path / "img" / "a.png", paint(nucleus, cell))
    write_png(tmp_path / "img" / "b.png", paint(disk(CENTRE, 30), cell))
    rows = pd.DataFrame({"path": ["a.png", "b.png", "a.png"], "degradation": ["none", "none", "salt_pepper"],
                         "severity": [0, 0, 3]})
    calls = []
    measure = morph.cell_morphology
    monkeypatch.setattr(morph, "cell_morphology", lambda image, **kw: calls.append(1) or measure(image, **kw))
    cache = morph.MorphologyCache(tmp_path / "img", tmp_path / "morph.csv")
    first = cache(rows)
    assert len(calls) == 3 and len(first) == 3  # the degraded copy of a.png is another image
    assert first.loc[1, "nucleus_area"] > first.loc[0, "nucleus_area"]  # radius 30 vs 18
    assert cache(rows.iloc[[1, 0]]).equals(first.iloc[[1, 0]].reset_index(drop=True))
    # a new cache reads the file back: nothing is measured again
    again = morph.MorphologyCache(tmp_path / "img", tmp_path / "morph.csv")(rows)
    assert len(calls) == 3
    pd.testing.assert_frame_equal(again, first)
    # an image replaced under the same name is measured again, not read back
    write_png(tmp_path / "img" / "b.png", paint(disk(CENTRE, 12), cell))
    changed = morph.MorphologyCache(tmp_path / "img", tmp_path / "morph.csv")(rows)
    assert len(calls) == 4 and changed.loc[1, "nucleus_area"] < first.loc[1, "nucleus_area"]


def test_morphology_cache_same_rows_measured_side_by_side(tmp_path, monkeypatch, root):
    """New rows are measured in chunks over forked workers: the same features,
    in table order, as measuring them one by one in this process."""
    from wbclib import _parallel

    table = data.manifest("zheng1", root, hashes=False).head(5)
    rows = pd.concat([table.assign(degradation="none", severity=0),
                      table.head(2).assign(degradation="gaussian_blur", severity=2)], ignore_index=True)
    monkeypatch.setattr(morph, "_MEASURE_CHUNK", 2)  # 4 jobs
    monkeypatch.setattr(_parallel, "job_processes", lambda: 2)
    forked = morph.MorphologyCache(root, tmp_path / "forked.csv")(rows)
    monkeypatch.setattr(_parallel, "job_processes", lambda: 1)
    alone = morph.MorphologyCache(root, tmp_path / "alone.csv")(rows)
    pd.testing.assert_frame_equal(forked, alone)
    assert len(forked) == 7 and forked["nucleus_area"].notna().all()
    assert not forked.iloc[0].equals(forked.iloc[5])  # the blurred copy is measured, not the pristine one
