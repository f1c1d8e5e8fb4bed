"""Cell-centred inputs (wbclib.cellcrop, the loader's box table in
wbclib._cellboxes): localisation, the crop at the common ratio, the box cache,
boxes located on degraded images, the fallback, and the switch reaching run
identities and embedding cache keys."""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from wbclib import _cellboxes, cellcrop, models, runs
from wbclib._cellboxes import cell_boxes
from wbclib.cellcrop import COMMON_RATIO, centre_on_cell, crop_square, fallback_box, locate_cell
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


def test_a_blank_image_falls_back_to_a_fixed_box_of_its_lab(tmp_path, monkeypatch):
    monkeypatch.delenv("WBC_CACHE_DIR", raising=False)
    for folder in ("pbc", "zheng1", "elsewhere"):
        (tmp_path / folder).mkdir()
        Image.fromarray(cell_image()).save(tmp_path / folder / "cell.png")
        Image.fromarray(np.full((120, 160, 3), 230, np.uint8)).save(tmp_path / folder / "blank.png")
    assert not locate_cell(np.full((50, 50, 3), 230, np.uint8)).found
    every = [f"{lab}/{name}" for lab in ("pbc", "zheng1", "elsewhere") for name in ("cell.png", "blank.png")]
    together = cell_boxes(tmp_path, every).set_index("path")
    assert bool(together.loc["pbc/cell.png", "found"]) and not bool(together.loc["pbc/blank.png", "found"])
    for lab, share in [("pbc", 0.425), ("zheng1", 0.650), ("elsewhere", COMMON_RATIO)]:
        blank = together.loc[f"{lab}/blank.png"]
        assert (blank["cx"], blank["cy"], blank["side"]) == pytest.approx((80, 60, share * 120))
        assert fallback_box(160, 120, lab) == cellcrop.CellBox(80, 60, pytest.approx(share * 120), False)
        # a fixed function of the image: the same box alone as with the other images
        alone = cell_boxes(tmp_path, [f"{lab}/blank.png"]).set_index("path").loc[f"{lab}/blank.png"]
        assert alone[["cx", "cy", "side", "found"]].tolist() == blank[["cx", "cy", "side", "found"]].tolist()
    # and the loader cuts it the same whatever else it loads, with or without a lab column
    rows = pd.DataFrame(dict(path=every, label="x", cell_crop=COMMON_RATIO, lab="pbc"))
    one = models.ImageTable(rows.iloc[[1]], tmp_path, ["x"], 32).cell_boxes[0]
    assert models.ImageTable(rows.drop(columns="lab"), tmp_path, ["x"], 32).cell_boxes[1] == one
    assert one == pytest.approx((80, 60, 0.425 * 120))


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
    monkeypatch.setattr(_cellboxes, "locate_cell", lambda image: calls.append(1) or real(image))
    monkeypatch.setattr(_cellboxes, "_MEMO", {})
    first = cell_boxes(data_dir, ["a.png", "b.png"], cache_dir=cache)
    assert len(calls) == 2
    monkeypatch.setattr(_cellboxes, "_MEMO", {})  # a new process: only the disk cache is left
    second = cell_boxes(data_dir, ["b.png", "c.png"], cache_dir=cache)
    assert len(calls) == 3  # only c.png was located
    assert second.set_index("path").loc["b.png", "cx"] == first.set_index("path").loc["b.png", "cx"]


def test_a_degraded_row_is_cropped_at_the_box_located_on_its_degraded_image(tmp_path, root, monkeypatch):
    rel = str(sorted((root / "pbc" / "neutrophil").iterdir())[1].relative_to(root))
    cache = tmp_path / "cache"
    monkeypatch.setattr(_cellboxes, "_MEMO", {})
    table = pd.DataFrame(dict(path=[rel, rel], label=["neutrophil"] * 2, degradation=["gaussian_blur"] * 2,
                              severity=[0, 4], cell_crop=COMMON_RATIO))
    ds = models.ImageTable(table, root, ["neutrophil"], 32, degrade_seed=3, box_cache=cache)
    pristine, degraded = ds.cell_boxes
    located = lambda image: (lambda b: (round(b.cx, 2), round(b.cy, 2), round(b.side, 2)))(locate_cell(image))
    assert pristine == pytest.approx(located(models.load_table_image(root, rel)))
    on_degraded = models.load_table_image(root, rel, "gaussian_blur", 4, 3)
    assert degraded == pytest.approx(located(on_degraded))
    assert degraded != pytest.approx(pristine, abs=1.0)  # heavy blur moves this cell's box
    # the crop the model gets is cut at that box
    expected = models.ImageTable(table.iloc[[1]].drop(columns="cell_crop"), root, ["neutrophil"], 32,
                                 degrade_seed=3)
    expected.native_image = lambda i: centre_on_cell(on_degraded, *degraded, ratio=COMMON_RATIO)
    assert (ds[1][0] == expected[0][0]).all()
    # cached apart: pristine rows under their path-only key, degraded rows per (path, kind, severity, seed)
    entries = sorted(f.name for f in (cache / "cell_boxes").glob("*.csv"))
    assert len(entries) == 2 and sum(name.startswith("cell_boxes_degraded_") for name in entries) == 1
    monkeypatch.setattr(_cellboxes, "_MEMO", {})
    again = models.ImageTable(table, root, ["neutrophil"], 32, degrade_seed=3, box_cache=cache)
    assert again.cell_boxes == ds.cell_boxes
    assert len(list((cache / "cell_boxes").glob("*.csv"))) == 2  # read back, nothing new
    models.ImageTable(table, root, ["neutrophil"], 32, degrade_seed=4, box_cache=cache)
    assert len(list((cache / "cell_boxes").glob("cell_boxes_degraded_*.csv"))) == 2  # another seed, another key
    assert len(list((cache / "cell_boxes").glob("*.csv"))) == 3  # the pristine entry is shared


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


def test_boxes_located_side_by_side_are_the_ones_located_alone(root, monkeypatch):
    """Images without a box are located in chunks over forked workers: the
    same boxes, rows in the order asked, pristine and degraded alike."""
    from wbclib import _cellboxes, _parallel

    paths = [f"zheng1/images/{i:03d}.png" for i in range(1, 8)]
    kinds = ["none", "gaussian_blur", "none", "salt_pepper", "none", "none", "illumination"]
    levels = [0, 2, 0, 3, 0, 0, 1]
    monkeypatch.setattr(_cellboxes, "_LOCATE_CHUNK", 2)
    boxes = {}
    for processes in (2, 1):
        monkeypatch.setattr(_cellboxes, "_MEMO", {})
        monkeypatch.setattr(_parallel, "job_processes", lambda: processes)
        boxes[processes] = cell_boxes(root, paths, kinds, levels, degrade_seed=5)
    pd.testing.assert_frame_equal(boxes[2], boxes[1])
    assert len(boxes[2]) == 7 and boxes[2]["found"].all()
