import os
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from wbclib import data
from wbclib._io import CorruptFileError


def test_missing_root_names_the_path_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    with pytest.raises(data.DataError, match="does not exist.*WBC_DATA_ROOT"):
        data.data_root(tmp_path / "nowhere")


def test_env_var_sets_the_root(tmp_path, monkeypatch):
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path))
    assert data.data_root() == tmp_path.resolve()


def test_load_image_rgb_and_converted_modes(tmp_path):
    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((5, 7), 99, np.uint8)).save(grey)
    arr = data.load_image(grey)
    assert arr.shape == (5, 7, 3) and arr.dtype == np.uint8 and (arr == 99).all()


def test_load_image_errors_name_file_and_problem(tmp_path, root):
    with pytest.raises(data.DataError, match="missing.png: no such image"):
        data.load_image(tmp_path / "missing.png")
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"this is not an image")
    with pytest.raises(data.DataError, match="junk.jpg: not a readable image"):
        data.load_image(junk)
    real = next((root / "pbc" / "basophil").glob("*.jpg"))
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(real.read_bytes()[: len(real.read_bytes()) // 3])
    with pytest.raises(data.DataError, match="truncated.jpg: corrupt or truncated"):
        data.load_image(truncated)
    sixteen = tmp_path / "sixteen.png"
    Image.fromarray(np.zeros((4, 4), np.uint16)).save(sixteen)
    with pytest.raises(data.DataError, match="sixteen.png: unsupported image mode"):
        data.load_image(sixteen)


def test_taxonomy_maps_lab_names_and_rejects_unknown():
    assert data.to_common("pbc", "BNE") == "neutrophil"
    assert data.to_common("pbc", "PMY") == "ig"
    assert data.to_common("zheng1", "5") == "basophil"
    assert data.to_common("other", "Lymphocytes") == "lymphocyte"
    with pytest.raises(data.DataError, match="cell.png: unknown label 'platelet'"):
        data.to_common("other", "platelet", "cell.png")


def test_manifests_of_the_small_sources(root):
    z = data.manifest("zheng1", root)
    assert list(z.columns) == data.MANIFEST_COLUMNS
    assert len(z) == 300
    assert z.label.value_counts().to_dict() == {"neutrophil": 176, "lymphocyte": 53, "monocyte": 48,
                                                "eosinophil": 22, "basophil": 1}
    assert z.sha256.str.len().eq(64).all() and (z.width <= 120).all()
    b = data.manifest("bccd", root)
    assert len(b) == 351 and set(b.label) == {"neutrophil", "eosinophil", "lymphocyte", "monocyte", "basophil"}


def test_pbc_manifest_counts_and_cache(root, tmp_path):
    first = data.manifest("pbc", root, cache_dir=tmp_path)
    assert len(first) == 13193
    assert first[first.fine_label == "SNE"].shape[0] == 1646
    cached = list(tmp_path.rglob("manifest_pbc_*.csv"))
    assert len(cached) == 1
    again = data.manifest("pbc", root, cache_dir=tmp_path)
    pd.testing.assert_frame_equal(first, again, check_dtype=False)
    # A write that stopped half-way is not silently reused (H-09: 35 of 132 rows came back).
    cached[0].write_text(cached[0].read_text()[: cached[0].stat().st_size // 3])
    with pytest.raises(CorruptFileError, match="manifest_pbc"):
        data.manifest("pbc", root, cache_dir=tmp_path)


def test_unknown_source():
    with pytest.raises(data.DataError, match="unknown source 'nope'"):
        data.manifest("nope")


def test_duplicate_policy():
    df = pd.DataFrame({
        "path": ["a", "b", "c", "d", "e"],
        "fine_label": ["EO", "EO", "EO", "BNE", "LY"],
        "sha256": ["h1", "h1", "h2", "h2", "h3"],
    })
    dups = data.find_duplicates(df)
    assert set(dups.path) == {"a", "b", "c", "d"}
    assert dups.set_index("path").cross_class.to_dict() == {"a": False, "b": False, "c": True, "d": True}
    kept = data.drop_duplicates(df)
    assert kept.path.tolist() == ["a", "e"]


def test_real_duplicates_include_a_cross_class_pair(root):
    dups = data.find_duplicates(data.manifest("pbc", root))
    cross = dups[dups.cross_class]
    assert len(cross) >= 2 and cross.fine_label.nunique() == 2


def test_verify_checksums_finds_mismatch_and_missing(root, tmp_path):
    copy = tmp_path / "root"
    lines = []
    for line in (root / "SHA256SUMS").read_text().splitlines():
        if "zheng1/images/00" in line:
            lines.append(line)
            rel = line.split(maxsplit=1)[1].removeprefix("./")
            (copy / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(root / rel, copy / rel)
    (copy / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    assert data.verify_checksums(copy, sources=("zheng1",)).empty
    files = sorted((copy / "zheng1" / "images").glob("*.png"))
    files[0].write_bytes(files[0].read_bytes() + b"x")
    os.remove(files[1])
    problems = data.verify_checksums(copy, sources=("zheng1",)).set_index("path").problem.to_dict()
    assert problems == {f"zheng1/images/{files[0].name}": "mismatch", f"zheng1/images/{files[1].name}": "missing"}


def test_image_folder_source(synthetic_root, tmp_path):
    df = data.image_folder(synthetic_root, lab="mylab")
    assert len(df) == 24 and set(df.label) == {"lymphocyte", "neutrophil"} and (df.lab == "mylab").all()
    bad = tmp_path / "bad"
    (bad / "platelets").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(bad / "platelets" / "p.png")
    with pytest.raises(data.DataError, match="p.png: unknown label 'platelets'"):
        data.image_folder(bad, lab="mylab")
