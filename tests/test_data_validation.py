"""Bad input is reported, not dropped: checksum lists, manifests, label tables,
folder layouts, masks and the CLI's error path (the reliability review's
data cases). Every test builds its own tiny data root from synthetic images."""
from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import write_png
from wbclib import cli, data

PROJECT_ROOT = Path(__file__).resolve().parent.parent
#: pbc's published layout: group folder -> fine classes (file-name prefixes).
PBC_GROUPS = {"neutrophil": ("SNE", "BNE", "NEUTROPHIL"), "ig": ("MY", "MMY", "PMY", "IG"), "eosinophil": ("EO",),
              "basophil": ("BA",), "lymphocyte": ("LY",), "monocyte": ("MO",)}
BCCD_CLASSES = ("Neutrophil", "Lymphocyte", "Monocyte", "Eosinophil", "Basophil")
ZHENG1_LABELS = "image ID,class label\n1,1\n2,2\n3,3\n"


def noise(seed: int, size: int = 32, channels: int = 3) -> np.ndarray:
    """Random pixels: every file differs, and JPEGs have a long scan to truncate."""
    shape = (size, size, channels) if channels > 1 else (size, size)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def write_jpeg(path: Path, seed: int, size: int = 32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(noise(seed, size)).save(path, quality=90)
    return path


def truncate(path: Path, fraction: float = 0.6) -> Path:
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * fraction)])
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def source_files(root: Path) -> list:
    return sorted(p.relative_to(root).as_posix() for s in data.SOURCES for p in (root / s).rglob("*") if p.is_file())


def write_sums(root: Path, lines=None) -> Path:
    """SHA256SUMS in GNU format for every file under the sources (or the given lines)."""
    if lines is None:
        lines = [f"{sha256(root / rel)}  ./{rel}" for rel in source_files(root)]
    sums = root / "SHA256SUMS"
    sums.write_text("".join(line + "\n" for line in lines))
    return sums


def make_root(base: Path) -> Path:
    """A complete, valid data root: one pbc image per fine class, three zheng1
    images with masks, one bccd crop per class, and SHA256SUMS."""
    root = base / "root"
    seed = 0
    for group, prefixes in PBC_GROUPS.items():
        for prefix in prefixes:
            seed += 1
            write_jpeg(root / "pbc" / group / f"{prefix}_{seed}.jpg", seed)
    for image_id in (1, 2, 3):
        write_png(root / "zheng1" / "images" / f"{image_id:03d}.png", noise(100 + image_id))
        mask = np.zeros((32, 32), np.uint8)
        mask[8:24, 8:24], mask[12:20, 12:20] = 128, 255
        write_png(root / "zheng1" / "masks" / f"{image_id:03d}.png", mask)
    (root / "zheng1" / "labels.csv").write_text(ZHENG1_LABELS)
    for i, name in enumerate(BCCD_CLASSES):
        write_jpeg(root / "bccd" / "crops" / name / f"{name}_{i}.jpg", 200 + i)
    write_sums(root)
    return root


@pytest.fixture
def tiny(tmp_path) -> Path:
    return make_root(tmp_path)


# -- wbc data verify ---------------------------------------------------------------------


def test_verify_accepts_gnu_bsd_any_case_and_crlf(tiny):
    files = source_files(tiny)
    lines = []
    for i, rel in enumerate(files):
        digest = sha256(tiny / rel)
        lines.append([f"{digest.upper()} *{rel}", f"SHA256 (./{rel}) = {digest}", f"{digest}  ./{rel}"][i % 3])
    (tiny / "SHA256SUMS").write_bytes("\r\n".join(lines).encode() + b"\r\n")
    problems = data.verify_checksums(tiny)
    assert problems.empty and problems.attrs["checked"] == len(files)
    bsd_listed = files[1]  # a BSD-format line still catches a changed file
    (tiny / bsd_listed).write_bytes((tiny / bsd_listed).read_bytes() + b"x")
    assert data.verify_checksums(tiny).set_index("path").problem.to_dict() == {bsd_listed: "mismatch"}


def test_verify_names_the_malformed_line(tiny):
    sums = tiny / "SHA256SUMS"
    count = len(sums.read_text().splitlines())
    sums.write_text(sums.read_text() + "garbage-line-without-path\n")
    with pytest.raises(data.DataError, match=rf"SHA256SUMS line {count + 1}: not a SHA-256 checksum line"):
        data.verify_checksums(tiny)


def test_verify_never_reads_outside_the_root(tiny, tmp_path, monkeypatch):
    secret = tmp_path / "secret.txt"
    secret.write_text("not data")
    sums = tiny / "SHA256SUMS"
    sums.write_text(sums.read_text() + f"{sha256(secret)}  ./pbc/../../secret.txt\n{sha256(secret)}  {secret}\n")
    hashed = []
    real = data.sha256_file
    monkeypatch.setattr(data, "sha256_file", lambda path, *a: hashed.append(Path(path).resolve()) or real(path, *a))
    problems = data.verify_checksums(tiny)
    assert problems.problem.tolist() == ["outside the root", "outside the root"]
    assert set(problems.path) == {"./pbc/../../secret.txt", str(secret)}
    assert secret.resolve() not in hashed


def test_verify_reports_files_the_list_does_not_name(tiny):
    write_jpeg(tiny / "pbc" / "basophil" / "BA_99.jpg", 99)
    truncate(write_jpeg(tiny / "bccd" / "crops" / "Neutrophil" / "extra.jpg", 98))
    problems = data.verify_checksums(tiny)
    assert problems.set_index("path").problem.to_dict() == {"pbc/basophil/BA_99.jpg": "unlisted",
                                                            "bccd/crops/Neutrophil/extra.jpg": "unlisted"}


def test_verify_with_nothing_to_check_fails(tiny, capsys):
    (tiny / "SHA256SUMS").write_text("")
    with pytest.raises(data.DataError, match="SHA256SUMS: lists no files under pbc, zheng1, bccd; nothing was checked"):
        data.verify_checksums(tiny)
    assert cli.main(["data", "verify", "--root", str(tiny)]) == 2
    assert "nothing was checked" in capsys.readouterr().err


def test_verify_decode_finds_images_that_match_their_checksum_but_do_not_decode(tiny, capsys):
    broken = truncate(next((tiny / "pbc" / "basophil").glob("BA_*.jpg")))
    write_sums(tiny)  # the list agrees with the truncated file: only decoding can tell
    assert data.verify_checksums(tiny).empty
    problems = data.verify_checksums(tiny, decode=True)
    assert problems.path.tolist() == [broken.relative_to(tiny).as_posix()]
    assert problems.problem.tolist() == ["undecodable"] and "truncated" in problems.detail[0]
    n_files, n_images = len(source_files(tiny)), 11 + 6 + 5
    assert cli.main(["data", "verify", "--root", str(tiny)]) == 0
    assert capsys.readouterr().out.strip().endswith(f"checked {n_files} files listed in SHA256SUMS under {tiny}: "
                                                    "all match SHA256SUMS")
    assert cli.main(["data", "verify", "--decode", "--root", str(tiny)]) == 1
    out = capsys.readouterr().out
    assert "undecodable" in out and broken.name in out
    assert out.strip().splitlines()[-1].endswith(f"{n_files} files listed in SHA256SUMS under {tiny}, "
                                                 f"{n_images} images decoded: 1 problem(s)")


# -- manifests decode every image ---------------------------------------------------------


def test_manifest_reports_every_unusable_image_in_one_error(tiny, monkeypatch):
    folder = tiny / "pbc" / "basophil"
    truncate(write_jpeg(folder / "BA_trunc.jpg", 50))
    Image.fromarray(np.zeros((32, 32), np.uint16)).save(folder / "BA_gray16.png")
    Image.fromarray(np.zeros((32, 32), np.float32)).save(folder / "BA_float.tif")
    write_png(folder / "BA_bomb.png", np.zeros((64, 64, 3), np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)  # 64x64 is over twice the limit, 32x32 is fine
    with pytest.raises(data.DataError) as caught:
        data.manifest("pbc", tiny, hashes=False)
    message = str(caught.value)
    assert message.startswith("4 problems in the pbc data under")
    assert re.search(r"BA_trunc\.jpg: corrupt or truncated image \(image file is truncated", message)
    assert "BA_gray16.png: unsupported image mode 'I;16'" in message
    assert "BA_float.tif: unsupported image mode 'F'" in message
    assert "BA_bomb.png: image too large to decode safely, a possible decompression bomb" in message


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_manifest_warns_about_transparency_and_tiny_or_huge_images(tiny, monkeypatch):
    folder = tiny / "pbc" / "basophil"
    rgba = noise(60, channels=4)
    rgba[..., 3] = 255
    write_png(folder / "BA_opaque.png", rgba)
    rgba[:, :16, 3] = 0
    write_png(folder / "BA_clear.png", rgba)
    write_png(folder / "BA_tiny.png", noise(61, size=8))
    write_png(folder / "BA_large.png", noise(62, size=40))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)  # 40x40 is over the limit, but under twice it
    with pytest.warns(data.DataWarning) as caught:
        table = data.manifest("pbc", tiny)
    messages = sorted(str(w.message) for w in caught if issubclass(w.category, data.DataWarning))
    assert len(messages) == 3
    assert messages[0].endswith("BA_clear.png: has transparent pixels; the alpha channel is dropped, so "
                                "transparent areas take their stored colour")
    assert messages[1].endswith("BA_large.png: very large image (40x40 px, over PIL's decompression-bomb limit "
                                "of 1500 pixels)")
    assert messages[2].endswith("BA_tiny.png: tiny image (8x8 px, a side under 16 px); it will be upsampled")
    assert len(table) == 15
    row = table.set_index("path").loc["pbc/basophil/BA_tiny.png"]
    assert (row.width, row.height, row.sha256) == (8, 8, sha256(folder / "BA_tiny.png"))


# -- zheng1 labels.csv --------------------------------------------------------------------

LABEL_TABLE_CASES = {
    "non-numeric label": ("image ID,class label\n1,1\n2,neutrophil\n3,3\n",
                          r"labels.csv line 3: class label 'neutrophil' for image 2 is not a number"),
    "empty label": ("image ID,class label\n1,1\n2,\n3,3\n", r"labels.csv line 3: empty class label for image 2"),
    "duplicate row": ("image ID,class label\n1,1\n2,2\n3,3\n1,1\n",
                      r"labels.csv line 5: image 1 is listed again \(first on line 2\)"),
    "header missing": ("1,1\n2,2\n3,3\n", r"labels.csv line 1: header missing"),
    "empty file": ("", r"labels.csv: empty file"),
    "header only": ("image ID,class label\n", r"labels.csv: header only, no rows"),
    "semicolons": ("image ID;class label\n1;1\n2;2\n3;3\n", r"labels.csv line 1: wrong separator"),
    "columns swapped": ("class label,image ID\n1,1\n2,2\n3,3\n", r"labels.csv line 1: columns swapped"),
    "image not listed": ("image ID,class label\n1,1\n2,2\n",
                         r"zheng1/images: 1 image\(s\) not listed in \S*labels.csv \(003.png\)"),
}


@pytest.mark.parametrize("content, message", LABEL_TABLE_CASES.values(), ids=LABEL_TABLE_CASES.keys())
def test_zheng1_label_table_problems_name_the_file_and_line(tiny, content, message):
    (tiny / "zheng1" / "labels.csv").write_text(content)
    with pytest.raises(data.DataError, match=message):
        data.manifest("zheng1", tiny, hashes=False)


def test_zheng1_label_problems_are_reported_together(tiny):
    (tiny / "zheng1" / "labels.csv").write_text("image ID,class label\n1,x\n2,9\n4,1\n")
    with pytest.raises(data.DataError) as caught:
        data.zheng1_labels(tiny)
    message = str(caught.value)
    assert message.startswith(f"4 problems in {tiny / 'zheng1' / 'labels.csv'}:")
    for part in ["line 2: class label 'x'", "line 3: unknown class label '9'", "004.png: listed in",
                 "1 image(s) not listed in", "(003.png)"]:
        assert part in message


def test_a_clean_label_table_gives_ids_labels_and_line_numbers(tiny):
    labels = data.zheng1_labels(tiny)
    assert labels[["image_id", "class_label", "label", "line"]].values.tolist() == [
        [1, "1", "neutrophil", 2], [2, "2", "lymphocyte", 3], [3, "3", "monocyte", 4]]


# -- zheng1 expert masks ------------------------------------------------------------------


def test_masks_use_the_checked_label_table_and_name_bad_mask_files(tiny):
    from wbclib import segment

    assert sorted(segment.load_zheng1_masks(tiny)) == [1, 2, 3]
    masks = tiny / "zheng1" / "masks"
    write_png(masks / "001.png", noise(70, channels=1))
    truncate(masks / "001.png", 0.5)
    (masks / "002.png").write_text("not a png")
    with pytest.raises(data.DataError) as caught:
        segment.load_zheng1_masks(tiny)
    message = str(caught.value)
    assert f"{masks / '001.png'}: corrupt or truncated image" in message
    assert f"{masks / '002.png'}: not a readable image" in message
    (tiny / "zheng1" / "labels.csv").write_text("image ID,class label\n1,1\n2,neutrophil\n3,3\n")
    with pytest.raises(data.DataError, match="labels.csv line 3: class label 'neutrophil'"):
        segment.load_zheng1_masks(tiny)
    with pytest.raises(ValueError, match="limit must be at least 1"):
        segment.load_zheng1_masks(tiny, limit=0)


# -- pbc layout and generic image folders -------------------------------------------------


def test_pbc_missing_class_folder_is_an_error(tiny):
    shutil.rmtree(tiny / "pbc" / "basophil")
    with pytest.raises(data.DataError, match=r"pbc/basophil: pbc class folder missing"):
        data.manifest("pbc", tiny, hashes=False)


def test_pbc_images_in_a_nested_folder_are_reported_not_dropped(tiny):
    folder = tiny / "pbc" / "basophil"
    (folder / "old").mkdir()
    for path in folder.glob("*.jpg"):
        path.rename(folder / "old" / path.name)
    with pytest.raises(data.DataError) as caught:
        data.manifest("pbc", tiny, hashes=False)
    message = str(caught.value)
    assert f"{folder / 'old'}: nested folder with 1 image(s) inside a class folder" in message
    assert f"{folder}: no images of fine class(es) ['BA']" in message


def test_pbc_skips_hidden_entries(tiny):
    folder = tiny / "pbc" / "basophil"
    (folder / "._BA_1.jpg").write_bytes(b"macOS resource fork")
    write_jpeg(folder / ".ipynb_checkpoints" / "BA_1-checkpoint.jpg", 80)
    assert len(data.manifest("pbc", tiny, hashes=False)) == 11


def test_image_folder_takes_more_formats_and_nested_folders_and_skips_hidden(tmp_path):
    folder = tmp_path / "mylab"
    lymph = folder / "lymphocyte"
    write_png(lymph / "a.png", noise(1))
    for i, suffix in enumerate([".webp", ".gif", ".tif"]):
        Image.fromarray(noise(2 + i)).save(lymph / f"b{i}{suffix}")
    write_jpeg(folder / "neutrophil" / "c.jpg", 5)
    write_jpeg(folder / "neutrophil" / "batch2" / "d.jpg", 6)
    write_jpeg(folder / ".ipynb_checkpoints" / "e-checkpoint.jpg", 7)
    (folder / "neutrophil" / "._c.jpg").write_bytes(b"macOS resource fork")
    (lymph / ".DS_Store").write_bytes(b"junk")
    table = data.image_folder(folder, lab="mylab")
    assert table.set_index("path").label.to_dict() == {
        "lymphocyte/a.png": "lymphocyte", "lymphocyte/b0.webp": "lymphocyte", "lymphocyte/b1.gif": "lymphocyte",
        "lymphocyte/b2.tif": "lymphocyte", "neutrophil/batch2/d.jpg": "neutrophil", "neutrophil/c.jpg": "neutrophil"}


def test_image_folder_reports_all_problems_at_once(tmp_path):
    folder = tmp_path / "mylab"
    write_png(folder / "platelets" / "p.png", noise(1))
    write_png(folder / "erythroblasts" / "e.png", noise(2))
    (folder / "lymphocyte").mkdir()
    (folder / "lymphocyte" / "broken.jpg").write_bytes(b"not an image")
    write_png(folder / "loose.png", noise(3))
    with pytest.raises(data.DataError) as caught:
        data.image_folder(folder, lab="mylab")
    message = str(caught.value)
    assert message.startswith("4 problems in the image folder")
    for part in ["p.png: unknown label 'platelets'", "e.png: unknown label 'erythroblasts'",
                 "broken.jpg: not a readable image", "loose.png: image outside a class folder"]:
        assert part in message


# -- the data root ------------------------------------------------------------------------


def test_data_root_that_is_a_file_or_empty(tiny, capsys):
    with pytest.raises(data.DataError, match="SHA256SUMS is not a directory"):
        data.data_root(tiny / "SHA256SUMS")
    with pytest.raises(data.DataError, match="empty data root path ''"):
        data.data_root("")
    assert cli.main(["data", "summary", "--root", str(tiny / "SHA256SUMS")]) == 2
    assert "is not a directory" in capsys.readouterr().err


# -- duplicates and notebook 01 -----------------------------------------------------------


def _notebook_cell(path: Path, marker: str) -> str:
    """The source of the ``# %%`` cell of a py:percent notebook that contains ``marker``."""
    cells = re.split(r"^# %%.*$", path.read_text(), flags=re.M)
    return next(cell for cell in cells if marker in cell)


def test_notebook_01_duplicate_cell_runs_on_a_root_without_duplicates(tiny, capsys):
    manifests = data.all_manifests(tiny)
    dups = data.find_duplicates(manifests)
    assert dups.empty and dups["cross_class"].dtype == bool
    assert dups[dups.cross_class].empty and "group" in dups[dups.cross_class].columns
    cell = _notebook_cell(PROJECT_ROOT / "notebooks" / "01_data_eda.py", "data.find_duplicates(manifests)")
    exec(cell, {"data": data, "manifests": manifests, "display": lambda *_: None})
    assert capsys.readouterr().out.splitlines() == [
        "0 duplicate groups, 0 files; 0 group(s) across classes",
        f"after the policy: {len(manifests)} of {len(manifests)} images kept"]


# -- the CLI's error path -----------------------------------------------------------------


@pytest.mark.parametrize("error", [OSError(28, "No space left on device", "/out/x.csv"),
                                   ValueError("bad value"), data.DataError("x.jpg: bad")])
def test_cli_prints_one_line_for_library_errors(monkeypatch, capsys, tiny, error):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(data, "verify_checksums", fail)
    assert cli.main(["data", "verify", "--root", str(tiny)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("wbc: error: ") and len(err.strip().splitlines()) == 1 and str(error) in err


def test_cli_segmentation_error_is_one_line(tiny, capsys, monkeypatch):
    from wbclib import segment

    def needs_a_model(*args, **kwargs):  # what the cellpose back-end raises without --model
        raise segment.SegmentationError("backend 'cellpose' needs model_path=<trained cellpose model>")

    monkeypatch.setattr(segment, "evaluate_zheng1", needs_a_model)
    assert cli.main(["segment", "--backend", "cellpose", "--root", str(tiny)]) == 2
    assert capsys.readouterr().err == "wbc: error: backend 'cellpose' needs model_path=<trained cellpose model>\n"


@pytest.mark.parametrize("argv, message", [
    (["segment", "--limit", "0"], "argument --limit: must be at least 1, got 0"),
    (["segment", "--limit", "-28"], "argument --limit: must be at least 1, got -28"),
    (["splits", "--seed", "-1"], "argument --seed: must be between 0 and 4294967295, got -1"),
    (["data", "summary", "--root", ""], "argument --root: must not be empty"),
    (["splits", "--out", ""], "argument --out: must not be empty"),
])
def test_cli_rejects_bad_numbers_and_empty_paths(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as caught:
        cli.main(argv + (["--root", str(tmp_path / "absent")] if "--root" not in argv else []))
    assert caught.value.code == 2 and message in capsys.readouterr().err


def test_book_execute_only_matching_no_notebook_is_an_error(capsys):
    from wbclib import runbook

    pytest.importorskip("papermill")
    if not hasattr(runbook, "NotebooksNotFound"):
        pytest.skip("runbook does not check --only yet (runbook.NotebooksNotFound comes with the runbook rework)")
    assert cli.main(["book", "execute", "--profile", "smoke", "--only", "99"]) == 2
    assert "99" in capsys.readouterr().err
