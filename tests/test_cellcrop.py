"""Cell-centred inputs (wbclib.cellcrop): localisation, the crop at the common
ratio, the box cache, the fallback, and the switch reaching run identities and
embedding cache keys."""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from wbclib import cellcrop, models, runs
from wbclib.cellcrop import COMMON_RATIO, cell_boxes, centre_on_cell, crop_square, locate_cell
from wbclib.protocols.common import cell_centred

BACKGROUND = (236, 226, 214)


def cell_image(h: int = 200, w: int = 300, cx: int = 220, cy: int = 62, radius: int = 30) -> np.ndarray:
    """A light field with one leukocyte: a pale violet cytoplasm disc of
    ``radius`` around a dark nucleus, centred off the image centre, plus two red cells."""
    yy, xx = np.mgrid[:h, :w]
    image = np.empty((h, w, 3), np.uint8)
    image[:] = BACKGROUND
    for rx, ry in [(60, 150), (110, 160)]:
        image[(xx - rx) ** 2 + (yy - ry) ** 2 <= 18 ** 2] = (214, 150, 150)
    image[(xx - cx) ** 2 + (yy - cy) ** 2 <= radius ** 2] = (196, 178, 212)
    image[(xx - cx) ** 2 + (yy - cy) ** 2 <= (0.6 * radius) ** 2] = (92, 58, 142)
    return image


def test_locates_an_off_centre_cell_and_crops_it_to_the_ratio():
    image = cell_image()
    box = locate_cell(image)
    assert box.found
    assert abs(box.cx - 220) <= 4 and abs(box.cy - 62) <= 4
    assert 0.8 * 60 <= box.side <= 1.15 * 60
    crop = centre_on_cell(image, box.cx, box.cy, box.side)
    assert crop.shape[0] == crop.shape[1] == round(box.side / COMMON_RATIO)
    again = locate_cell(crop)
    side = crop.shape[0]
    assert abs(again.cx - side / 2) <= 0.05 * side and abs(again.cy - side / 2) <= 0.05 * side
    assert abs(again.side / side - COMMON_RATIO) <= 0.08


def test_a_square_beyond_the_image_is_padded_by_reflection():
    image = cell_image(h=80, w=90, cx=10, cy=12, radius=8)
    crop = crop_square(image, 5, 5, 70)
    assert crop.shape == (70, 70, 3)
    # reflection: the row just above the image mirrors the row just below its top one
    top = 35 - 5  # rows of padding above the image
    np.testing.assert_array_equal(crop[top - 1], crop[top + 1])
    huge = crop_square(image, 45, 40, 400)
    assert huge.shape == (400, 400, 3)


def test_a_blank_image_falls_back_and_the_table_records_it(tmp_path):
    Image.fromarray(cell_image()).save(tmp_path / "cell.png")
    Image.fromarray(np.full((120, 160, 3), 230, np.uint8)).save(tmp_path / "blank.png")
    assert not locate_cell(np.full((50, 50, 3), 230, np.uint8)).found
    boxes = cell_boxes(tmp_path, ["cell.png", "blank.png"], ["lab", "lab"]).set_index("path")
    assert bool(boxes.loc["cell.png", "found"]) and not bool(boxes.loc["blank.png", "found"])
    blank = boxes.loc["blank.png"]
    assert (blank["cx"], blank["cy"]) == (80, 60)
    # the lab's median cell-to-image share (from the found image) sets the fallback size
    share = boxes.loc["cell.png", "side"] / 200
    assert blank["side"] == pytest.approx(share * 120, rel=1e-6)


def test_the_box_cache_is_reused_and_invalidated_when_the_file_changes(tmp_path):
    cache = tmp_path / "cache"
    path = tmp_path / "data" / "a.png"
    path.parent.mkdir()
    Image.fromarray(cell_image()).save(path)
    first = cell_boxes(tmp_path / "data", ["a.png"], cache_dir=cache)
    files = sorted((cache / "cell_boxes").glob("*.csv"))
    assert len(files) == 1
    assert cell_boxes(tmp_path / "data", ["a.png"], cache_dir=cache).equals(first)
    assert len(sorted((cache / "cell_boxes").glob("*.csv"))) == 1
    Image.fromarray(cell_image(cx=236, cy=140)).save(path)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    moved = cell_boxes(tmp_path / "data", ["a.png"], cache_dir=cache)
    assert len(sorted((cache / "cell_boxes").glob("*.csv"))) == 2
    assert abs(moved["cx"].iloc[0] - 236) <= 4 and abs(moved["cy"].iloc[0] - 140) <= 4


def test_an_image_is_located_once_across_cached_sets(tmp_path, monkeypatch):
    data_dir, cache = tmp_path / "data", tmp_path / "cache"
    data_dir.mkdir()
    for name, cx in [("a.png", 200), ("b.png", 220), ("c.png", 240)]:
        Image.fromarray(cell_image(cx=cx)).save(data_dir / name)
    calls = []
    real = cellcrop.locate_cell
    monkeypatch.setattr(cellcrop, "locate_cell", lambda image: calls.append(1) or real(image))
    monkeypatch.setattr(cellcrop, "_MEMO", {})
    first = cell_boxes(data_dir, ["a.png", "b.png"], cache_dir=cache)
    assert len(calls) == 2
    monkeypatch.setattr(cellcrop, "_MEMO", {})  # a new process: only the disk cache is left
    second = cell_boxes(data_dir, ["b.png", "c.png"], cache_dir=cache)
    assert len(calls) == 3  # only c.png was located
    assert second.set_index("path").loc["b.png", "cx"] == first.set_index("path").loc["b.png", "cx"]


def test_the_loader_crops_around_the_cell(tmp_path):
    Image.fromarray(cell_image()).save(tmp_path / "a.png")
    table = pd.DataFrame(dict(path=["a.png"], label=["x"]))
    plain = models.ImageTable(table, tmp_path, ["x"], 64)[0][0]
    cropped = models.ImageTable(table.assign(cell_crop=COMMON_RATIO), tmp_path, ["x"], 64,
                                box_cache=tmp_path / "cache")[0][0]
    dark = lambda x: (x.float().mean(0) < 150).float().mean().item()  # the nucleus' share of the input
    assert dark(cropped) > 4 * dark(plain)
    # centred: the nucleus' centroid is at the input's centre
    ys, xs = np.nonzero(cropped.float().mean(0).numpy() < 150)
    assert abs(xs.mean() - 31.5) <= 3 and abs(ys.mean() - 31.5) <= 3


def test_the_switch_changes_run_identity_and_embedding_keys(tmp_path):
    table = pd.DataFrame(dict(path=["a.png", "b.png"], label=["x", "y"], split=["train", "test"]))
    on = cell_centred(table, SimpleNamespace(cell_crop=True))
    off = cell_centred(table, SimpleNamespace(cell_crop=False))
    assert off is table and (on["cell_crop"] == COMMON_RATIO).all()
    assert runs.table_fingerprint(on) != runs.table_fingerprint(off)
    key = lambda t: models.embedding_entry(tmp_path, "tf_efficientnet_lite0", True, 32, t).path
    assert key(on) != key(off)
    # the rows an EmbeddingStore extracts keep the column (so the loader crops them), and its key differs
    from wbclib.embeddings import _KEY, EmbeddingStore

    needed = lambda t: EmbeddingStore._keyed(t)[_KEY + ["label"]]
    assert (needed(on)["cell_crop"] == COMMON_RATIO).all()
    assert key(needed(on)) != key(needed(off))
    # switched off, the keys are the ones from before the column existed
    assert key(needed(off)) == key(needed(off).drop(columns="cell_crop"))


def test_profiles_switch_it_on_everywhere():
    from wbclib import profiles

    for name in profiles.PROFILES:
        assert profiles.get(name).cell_crop is True


def test_dg_scale_is_off_when_cells_are_cropped(tmp_path, root):
    from wbclib import benchmarks as B
    from wbclib.crosslab import scale_factors

    table = pd.concat([pd.DataFrame(dict(path=[p], lab=[lab], label=["neutrophil"], rank=[0]))
                       for lab, p in [("pbc", _first(root, "pbc/neutrophil")), ("zheng1", "zheng1/images/001.png"),
                                      ("bccd", _first(root, "bccd/crops/Neutrophil"))]], ignore_index=True)
    cfg = SimpleNamespace(dg_scale="max", dg_scale_per_lab=1, cell_crop=True)
    factors, _ = scale_factors(cfg, table, root, tmp_path)
    assert factors == {lab: 1.0 for lab in B.LABS}


def _first(root: Path, folder: str) -> str:
    return str(sorted((root / folder).iterdir())[0].relative_to(root))


def test_real_cells_fill_the_common_ratio_after_the_crop(root):
    rows = []
    for lab, folder in [("pbc", "pbc/lymphocyte"), ("pbc", "pbc/neutrophil"), ("zheng1", "zheng1/images"),
                        ("bccd", "bccd/crops/Neutrophil")]:
        files = sorted((root / folder).iterdir())[:4]
        rows += [dict(path=str(f.relative_to(root)), lab=lab) for f in files]
    ratios = cellcrop.ratio_table(pd.DataFrame(rows), root)
    assert ratios["found"].all()
    summary = cellcrop.summarize_ratios(ratios).set_index("lab")
    assert (summary["after"] - COMMON_RATIO).abs().max() <= 0.1
    # before the crop the labs differ (pbc fields are loose, bccd crops tight)
    assert summary.loc["pbc", "before"] < COMMON_RATIO - 0.2
