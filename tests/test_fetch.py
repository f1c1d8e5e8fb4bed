"""wbc data fetch without the network: archives shaped like the originals are
built from the shared copy and served from file:// URLs or an injected
download function."""
import dataclasses
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wbclib import cli, data, fetch


def _with_downloads(source: fetch.Source, *downloads: fetch.Download, **changes) -> fetch.Source:
    return dataclasses.replace(source, downloads=tuple(downloads), **changes)


@pytest.fixture(scope="module")
def zheng1_archive(root, tmp_path_factory) -> Path:
    """The GitHub archive of zxaoyou/segmentation_WBC: 'Dataset 1' with BMP images and PNG masks."""
    archive = tmp_path_factory.mktemp("zheng1") / "master.zip"
    top = "segmentation_WBC-master"
    with zipfile.ZipFile(archive, "w") as zf:
        for image in sorted((root / "zheng1" / "images").glob("*.png")):
            with Image.open(image) as im:
                bmp = archive.parent / f"{image.stem}.bmp"
                im.save(bmp)
            zf.write(bmp, f"{top}/Dataset 1/{image.stem}.bmp")
            zf.write(root / "zheng1" / "masks" / image.name, f"{top}/Dataset 1/{image.name}")
        zf.write(root / "zheng1" / "labels.csv", f"{top}/Class Labels of Dataset 1.csv")
        zf.write(root / "zheng1" / "LICENSE", f"{top}/LICENSE")
        zf.writestr(f"{top}/README.md", "not part of the set")
    return archive


def _zheng1(archive: Path) -> fetch.Source:
    return _with_downloads(fetch.SOURCES["zheng1"], fetch.Download(archive.as_uri(), "segmentation_WBC.zip"))


def test_zheng1_from_a_file_url_matches_the_shared_copy(root, zheng1_archive, tmp_path):
    logged = []
    target = fetch.fetch(_zheng1(zheng1_archive), tmp_path, log=logged.append)
    assert target == tmp_path / "zheng1"
    assert len(list(target.glob("images/*.png"))) == len(list(target.glob("masks/*.png"))) == 300
    # masks and the class table are copied byte for byte; BMP -> PNG keeps every pixel
    assert (target / "masks" / "007.png").read_bytes() == (root / "zheng1" / "masks" / "007.png").read_bytes()
    assert (target / "labels.csv").read_bytes() == (root / "zheng1" / "labels.csv").read_bytes()
    for name in ["001.png", "150.png", "300.png"]:
        np.testing.assert_array_equal(np.asarray(Image.open(target / "images" / name)),
                                      np.asarray(Image.open(root / "zheng1" / "images" / name)))
    table = data.manifest("zheng1", tmp_path, hashes=False)
    assert (table.label == "neutrophil").sum() == 176
    assert logged[-1].startswith(f"zheng1: ready in {target}")
    # a second call finds it in place and downloads nothing
    def no_download(url, path):
        raise AssertionError("downloaded again")

    fetch.fetch(_zheng1(zheng1_archive), tmp_path, download=no_download, log=logged.append)
    assert logged[-1].startswith("zheng1: already in")


def test_sha256sums_differences_are_notes_unless_strict(root, zheng1_archive, tmp_path):
    lines = [line for line in (root / "SHA256SUMS").read_text().splitlines() if "./zheng1/" in line]
    (tmp_path / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    logged = []
    fetch.fetch(_zheng1(zheng1_archive), tmp_path, log=logged.append)
    note = next(line for line in logged if "SHA256SUMS" in line)
    # masks, labels.csv and LICENSE are the originals' bytes; the re-encoded PNG images are not
    assert f"of {len(lines)} files identical" in note and "missing" not in note
    identical = int(note.split("SHA256SUMS: ")[1].split(" of")[0])
    assert 302 <= identical < len(lines)
    with pytest.raises(fetch.FetchError, match="SHA256SUMS"):
        fetch.fetch(_zheng1(zheng1_archive), tmp_path, force=True, strict=True, log=logged.append)


def _jpeg(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((32, 32, 3), value, np.uint8)).save(path)


def test_pbc_inside_a_nested_zip_keeps_only_leukocyte_folders(tmp_path):
    inner_dir = tmp_path / "build" / "PBC_dataset_normal_DIB"
    groups = {"basophil": ["BA"], "eosinophil": ["EO"], "ig": ["MY", "MMY", "PMY", "IG"], "lymphocyte": ["LY"],
              "monocyte": ["MO"], "neutrophil": ["SNE", "BNE", "NEUTROPHIL"], "platelet": ["PLT"],
              "erythroblast": ["ERB"]}
    for group, prefixes in groups.items():
        for i, prefix in enumerate(prefixes):
            _jpeg(inner_dir / group / f"{prefix}_{i}.jpg", 40 * i)
    inner = tmp_path / "build" / "PBC_dataset_normal_DIB.zip"
    with zipfile.ZipFile(inner, "w") as zf:
        for path in sorted(inner_dir.rglob("*.jpg")):
            zf.write(path, path.relative_to(inner_dir.parent))
        zf.writestr("__MACOSX/PBC_dataset_normal_DIB/basophil/._BA_0.jpg", b"resource fork")
    outer = tmp_path / "snkd93bnjr-1.zip"  # Mendeley's "download all" wraps the set's zip
    with zipfile.ZipFile(outer, "w") as zf:
        zf.write(inner, "PBC_dataset_normal_DIB.zip")
    requested = []

    def local_copy(url, path):  # the injected download step: no network
        requested.append(url)
        shutil.copyfile(outer, path)

    source = dataclasses.replace(fetch.SOURCES["pbc"], expected={"pbc/*/*.jpg": (11, 11)})
    target = fetch.fetch(source, tmp_path / "data", download=local_copy, log=lambda _: None)
    assert requested == [fetch.PBC_URL]
    assert sorted(p.name for p in target.iterdir()) == sorted(fetch.PBC_GROUPS)
    assert (target / "ig" / "MMY_1.jpg").read_bytes() == (inner_dir / "ig" / "MMY_1.jpg").read_bytes()
    assert not list((tmp_path / "data").glob(".pbc-download-*")), "scratch folder left behind"
    assert set(data.manifest("pbc", tmp_path / "data", hashes=False).fine_label) == set(sum(
        (v for k, v in groups.items() if k in fetch.PBC_GROUPS), []))


def test_bccd_crops_one_square_per_single_class_field(root, tmp_path):
    # 00000: one WBC, neutrophil; 00008: basophil; 00013 and 00037: two classes or two boxes
    stems = [f"BloodImage_{n:05d}" for n in (0, 8, 13, 37)]
    archive = tmp_path / "master.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for stem in stems:
            zf.write(root / "bccd" / "fields" / f"{stem}.jpg", f"BCCD_Dataset-master/BCCD/JPEGImages/{stem}.jpg")
            zf.write(root / "bccd" / "annotations" / f"{stem}.xml", f"BCCD_Dataset-master/BCCD/Annotations/{stem}.xml")
        zf.write(root / "bccd" / "LICENSE", "BCCD_Dataset-master/LICENSE")
    source = _with_downloads(fetch.SOURCES["bccd"], fetch.Download(archive.as_uri(), "BCCD_Dataset.zip"),
                             fetch.Download((root / "bccd" / "labels.csv").as_uri(), "labels.csv"),
                             expected={"bccd/fields/*.jpg": (4, 4), "bccd/crops/*/*.jpg": (1, 4)})
    target = fetch.fetch(source, tmp_path / "data", log=lambda _: None)
    classes = fetch.bccd_field_classes(target / "labels.csv")
    crops = sorted(target.glob("crops/*/*.jpg"))
    expected = [f"crops/{classes[int(s.split('_')[1])]}/{s}_1.jpg" for s in stems
                if int(s.split("_")[1]) in classes and fetch.wbc_boxes(target / "annotations" / f"{s}.xml")]
    assert sorted(str(p.relative_to(target)) for p in crops) == sorted(expected)
    assert "crops/Neutrophil/BloodImage_00000_1.jpg" in expected and "crops/Basophil/BloodImage_00008_1.jpg" in expected
    with Image.open(target / "crops" / "Neutrophil" / "BloodImage_00000_1.jpg") as crop:
        assert crop.size == (231, 231)  # the WBC box is 231 x 199


def test_square_crop_box_is_moved_inside_the_image():
    assert fetch.square_crop_box((283, 1, 567, 106), 640, 480) == (283, 0, 567, 284)
    assert fetch.square_crop_box((600, 400, 640, 480), 640, 480) == (560, 400, 640, 480)


def test_a_pinned_digest_mismatch_fails_before_unpacking(tmp_path):
    served = tmp_path / "served.zip"
    served.write_bytes(b"not the archive")

    def unpack_never(files, target):
        raise AssertionError("unpacked a file that failed its digest")

    source = fetch.Source("zheng1", "", "", (fetch.Download(served.as_uri(), "a.zip", sha256="0" * 64),), unpack_never)
    with pytest.raises(fetch.FetchError, match="differs from the pinned"):
        fetch.fetch(source, tmp_path / "data", log=lambda _: None)


def test_cli_fetch_exit_codes(zheng1_archive, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(fetch.SOURCES, "zheng1", _zheng1(zheng1_archive))
    assert cli.main(["data", "fetch", "--root", str(tmp_path), "--source", "zheng1"]) == 0
    assert "zheng1: ready in" in capsys.readouterr().out
    broken = dataclasses.replace(_zheng1(zheng1_archive), expected={"zheng1/images/*.png": (301, 301)})
    monkeypatch.setitem(fetch.SOURCES, "zheng1", broken)
    # a copy in place that fails the check is reported, not replaced, without --force
    before = sorted(p.name for p in (tmp_path / "zheng1" / "images").iterdir())
    assert cli.main(["data", "fetch", "--root", str(tmp_path), "--source", "zheng1"]) == 1
    assert "fails its check (zheng1/images/*.png: 300 files, expected 301)" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "zheng1" / "images").iterdir()) == before
    assert cli.main(["data", "fetch", "--root", str(tmp_path), "--source", "zheng1", "--force"]) == 1
    assert "failed its check: zheng1/images/*.png: 300 files, expected 301" in capsys.readouterr().err
