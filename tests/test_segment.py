"""Segmentation, localisation and their metrics, on synthetic cells and real data."""
from __future__ import annotations

import numpy as np
import pytest

from wbclib import segment
from wbclib.segment import box_iou, dice

BACKGROUND = (238, 228, 212)
CYTOPLASM = (200, 170, 205)
NUCLEUS = (95, 45, 140)
RED_CELL = (214, 150, 150)


def disk_mask(shape, centre, radius):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return np.hypot(yy - centre[0], xx - centre[1]) < radius


def synthetic_cell(size=160, centre=None, red_cells=(), seed=0):
    """A purple nucleus inside a pink cytoplasm disk on a pale background, with
    optional red cells given as (centre, radius); returns image, nucleus, cell."""
    shape = (size, size)
    cy, cx = centre or (size / 2, size / 2)
    image = np.empty(shape + (3,))
    image[:] = BACKGROUND
    for rc_centre, rc_radius in red_cells:
        image[disk_mask(shape, rc_centre, rc_radius)] = RED_CELL
    cell = disk_mask(shape, (cy, cx), 40)
    nucleus = disk_mask(shape, (cy + 5, cx - 4), 18)
    image[cell] = CYTOPLASM
    image[nucleus] = NUCLEUS
    noisy = image + np.random.default_rng(seed).normal(0, 6, image.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8), nucleus, cell


# -- metrics -----------------------------------------------------------------


def test_dice_perfect_disjoint_partial_and_empty():
    a = disk_mask((50, 50), (25, 25), 10)
    assert dice(a, a) == 1.0
    left, right = np.zeros((10, 10), bool), np.zeros((10, 10), bool)
    left[:, :5], right[:, 5:] = True, True
    assert dice(left, right) == 0.0
    half = np.zeros((10, 10), bool)
    half[:, :3] = True  # 30 px inside left's 50
    assert dice(half, left) == pytest.approx(2 * 30 / 80)
    assert dice(np.zeros((4, 4), bool), np.zeros((4, 4), bool)) == 1.0
    with pytest.raises(ValueError, match="shapes differ"):
        dice(a, a[:10])


def test_box_iou():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0


# -- classical segmenter on synthetic cells ----------------------------------


def test_recovers_synthetic_nucleus_and_cell():
    image, nucleus, cell = synthetic_cell()
    result = segment.segment_cell(image)
    assert dice(result.nucleus, nucleus) > 0.9
    assert dice(result.cell, cell) > 0.9
    assert result.found
    assert not (result.nucleus & ~result.cell).any()
    assert result.bbox == segment.mask_bbox(result.cell)


def test_excludes_red_cell_wrapped_around_the_leukocyte():
    # a red crescent glued along a third of the cell's rim leaves no neck for
    # the distance watershed to cut, so only colour can exclude it; free red
    # cells elsewhere give the colour reference
    size = 220
    image, nucleus, cell = synthetic_cell(size=size, red_cells=[((30, 30), 20), ((190, 30), 20), ((30, 190), 20)])
    yy, xx = np.mgrid[:size, :size]
    radius, angle = np.hypot(yy - 110, xx - 110), np.arctan2(yy - 110, xx - 110)
    crescent = (radius >= 40) & (radius < 65) & (np.abs(angle) < 1.2)
    noise = np.random.default_rng(1).normal(0, 6, (crescent.sum(), 3))
    image[crescent] = np.clip(np.array(RED_CELL) + noise, 0, 255).astype(np.uint8)
    result = segment.segment_cell(image)
    assert dice(result.cell, cell) > 0.9
    assert (result.cell & crescent).sum() < 0.05 * crescent.sum()
    # without the colour rule the crescent is swallowed
    colour_blind = segment.ClassicalParams(min_colour_separation=10.0)
    assert (segment.segment_cell(image, params=colour_blind).cell & crescent).sum() > 0.5 * crescent.sum()


def test_off_centre_cell_and_crop():
    image, nucleus, cell = synthetic_cell(size=200, centre=(60, 140))
    result = segment.segment_cell(image)
    assert dice(result.cell, cell) > 0.9
    crop = segment.crop_primary_wbc(image, size=64, margin=0.5)
    assert crop.shape == (64, 64, 3) and crop.dtype == np.uint8
    # the nucleus (shifted 5 px down, 4 left of the cell centre) is in the middle
    assert np.abs(crop[32, 30].astype(int) - NUCLEUS).max() < 40
    # a box sticking out of the image is padded with the background colour
    padded = segment.crop_primary_wbc(image, size=50, margin=0.0, bbox=(-50, -50, 50, 50))
    assert np.abs(padded[5, 5].astype(int) - BACKGROUND).max() < 20


def test_blank_image_finds_nothing():
    result = segment.segment_cell(np.full((40, 50, 3), 200, np.uint8))
    assert not result.found and not result.cell.any()
    assert result.bbox == (0, 0, 50, 40)


def test_backends_are_checked():
    image, _, _ = synthetic_cell(size=60)
    with pytest.raises(ValueError, match="unknown backend"):
        segment.segment_cell(image, backend="magic")
    # with or without cellpose installed, a missing model says how to train one
    with pytest.raises(segment.SegmentationError, match="train_cellpose"):
        segment.segment_cell(image, backend="cellpose")
    with pytest.raises(ValueError, match="RGB"):
        segment.segment_cell(image[..., 0])


# -- ground truth readers ----------------------------------------------------


def test_zheng1_mask_decoding():
    mask = np.array([[0, 128, 255, 127, 200]], np.uint8)
    nucleus, cell = segment.zheng1_regions(mask)
    assert nucleus.tolist() == [[False, False, True, False, True]]
    assert cell.tolist() == [[False, True, True, True, True]]


def test_read_voc_boxes(tmp_path):
    xml = tmp_path / "f.xml"
    xml.write_text(
        "<annotation><object><name>RBC</name><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>3</xmax><ymax>4</ymax>"
        "</bndbox></object><object><name>WBC</name><bndbox><xmin>10</xmin><ymin>20</ymin><xmax>30.0</xmax>"
        "<ymax>40</ymax></bndbox></object></annotation>")
    assert segment.read_voc_boxes(xml) == [(10, 20, 30, 40)]
    (tmp_path / "bad.xml").write_text("<annotation>")
    with pytest.raises(segment.data.DataError, match="bad.xml"):
        segment.read_voc_boxes(tmp_path / "bad.xml")


# -- real data ---------------------------------------------------------------


def test_zheng1_expert_masks_load(root):
    masks = segment.load_zheng1_masks(root, limit=3)
    assert list(masks) == [1, 2, 3]
    for nucleus, cell in masks.values():
        assert nucleus.any() and not (nucleus & ~cell).any() and cell.sum() > nucleus.sum()


def test_zheng1_dice_on_real_images(root):
    table = segment.evaluate_zheng1(root, limit=5)
    assert list(table.columns) == ["image_id", "label", "nucleus_dice", "cell_dice"]
    # measured 0.955 nucleus / 0.982 cell on these five (0.943 / 0.974 on all 300)
    assert table["nucleus_dice"].mean() > 0.90
    assert table["cell_dice"].mean() > 0.93
    summary = segment.summarize_dice(table)
    assert summary.loc["all", "n"] == 5
    assert summary.loc["all", "nucleus_dice"] == pytest.approx(table["nucleus_dice"].mean(), abs=1e-3)


def test_bccd_localisation_on_real_fields(root):
    table = segment.evaluate_bccd_localisation(root, limit=6)
    assert len(table) == 6 and (table["n_wbc"] >= 1).all()
    # measured IoU 0.39, 0.87, 0.56, 0.52, 0.88, 0.53 on these six (0.79 mean over all 358)
    assert (table["iou"] > 0.3).sum() >= 5
    assert table["iou"].mean() > 0.5


def test_zheng1_folds_are_stratified_and_seeded():
    import pandas as pd

    table = pd.DataFrame({"label": ["a"] * 10 + ["b"] * 5 + ["c"] * 1})
    folds = segment.zheng1_folds(table, 5, seed=0)
    assert sorted(np.bincount(folds).tolist()) == [3, 3, 3, 3, 4]
    for label in "ab":
        assert len(set(folds[table["label"] == label])) == 5  # every fold gets each class
    assert (folds == segment.zheng1_folds(table, 5, seed=0)).all()
    assert not (folds == segment.zheng1_folds(table, 5, seed=1)).all()
    with pytest.raises(ValueError, match="at least 2"):
        segment.zheng1_folds(table, 1)
