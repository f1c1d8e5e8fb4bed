"""Download the three public sets from their original sources and check them.

``wbc data fetch`` builds the data-root layout of ``data/README.md``:

* ``pbc`` – Acevedo et al. 2020, Mendeley Data doi:10.17632/snkd93bnjr.1
  (CC BY 4.0): the archive's leukocyte folders, without the platelet and
  erythroblast ones;
* ``zheng1`` – Zheng et al. 2018, github.com/zxaoyou/segmentation_WBC
  (GPL-3.0): ``Dataset 1``'s BMP images become ``images/NNN.png`` (lossless),
  its PNG masks ``masks/NNN.png`` and its class table ``labels.csv``;
* ``bccd`` – github.com/Shenggan/BCCD_Dataset (MIT): the fields and their
  VOC boxes, the per-field class list of the data BCCD re-organised
  (github.com/cosmicad/dataset, ``labels.csv``), and one crop per field
  whose class list names a single class, cut square around its first WBC box.

Each set is then checked: the number of files in every folder of the
layout, that :func:`wbclib.data.manifest` loads it, the digest of every
download that has one pinned, and, where the data root holds a
``SHA256SUMS``, every file of the set against it. A fresh download need not
match the project's ``SHA256SUMS`` byte for byte (its JPEGs were re-packed
losslessly); those differences are reported, and only fail the check with
``strict=True``.

The download step is a parameter (``download(url, target)``), so tests and
mirrors can serve the archives from ``file://`` URLs or local copies.
"""
from __future__ import annotations

import csv
import os
import shutil
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .data import ENV_VAR, PROJECT_ROOT, DataError, PathLike, sha256_file

#: ``download(url, target)``: fetch ``url`` into the file ``target``.
Downloader = Callable[[str, Path], None]


class FetchError(DataError):
    """A download failed its pinned digest, or a fetched set does not have the expected layout."""


@dataclass(frozen=True)
class Download:
    """One file to download: its URL, the name it is saved under, and its SHA-256 when pinned."""

    url: str
    filename: str
    sha256: Optional[str] = None


@dataclass(frozen=True)
class Source:
    """A public set: where it comes from, how to lay it out, what a complete copy holds.

    ``prepare(downloads, target)`` turns the downloaded files (name -> path)
    into the set's folder ``target``; ``expected`` maps a glob relative to
    the data root to the (lowest, highest) number of files it must match.
    """

    name: str
    citation: str
    licence: str
    downloads: Tuple[Download, ...]
    prepare: Callable[[Dict[str, Path], Path], None]
    expected: Dict[str, Tuple[int, int]] = field(default_factory=dict)


def urllib_download(url: str, target: Path) -> None:
    """Stream ``url`` (``https://``, ``file://``) into ``target`` with a progress bar."""
    import urllib.request

    from tqdm.auto import tqdm

    partial = target.with_name(target.name + ".part")
    request = urllib.request.Request(url, headers={"User-Agent": "wbclib-fetch"})
    with urllib.request.urlopen(request) as response, open(partial, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=target.name) as bar:
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
                bar.update(len(block))
    partial.replace(target)


# --- unpacking helpers -------------------------------------------------------

def _unpack(archive: Path, into: Path) -> Path:
    """Unpack a zip or tar archive into ``into`` (a new folder) and return it."""
    into.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(into)
    else:
        shutil.unpack_archive(str(archive), str(into))
    return into


def _find_dir(top: Path, wanted: Callable[[Path], bool], nested_archives: bool = True) -> Optional[Path]:
    """The first folder under ``top`` (itself included) for which ``wanted`` holds.

    Archives inside the archive (Mendeley's "download all" wraps the set's
    zip in another zip) are unpacked and searched too; macOS metadata
    folders are skipped.
    """
    for folder, subdirs, files in os.walk(top):
        subdirs[:] = sorted(d for d in subdirs if d != "__MACOSX")
        if wanted(Path(folder)):
            return Path(folder)
    if nested_archives:
        for inner in sorted(top.rglob("*.zip")):
            if "__MACOSX" not in inner.parts:
                found = _find_dir(_unpack(inner, inner.with_suffix("")), wanted, nested_archives=False)
                if found is not None:
                    return found
    return None


def _require_dir(top: Path, wanted: Callable[[Path], bool], what: str) -> Path:
    found = _find_dir(top, wanted)
    if found is None:
        raise FetchError(f"{what} not found in the downloaded archive")
    return found


# --- pbc ---------------------------------------------------------------------

#: The groups of the original archive that are leukocytes (platelet and erythroblast are not).
PBC_GROUPS = ("basophil", "eosinophil", "ig", "lymphocyte", "monocyte", "neutrophil")
PBC_COUNTS = {"neutrophil/SNE_*": 1646, "neutrophil/BNE_*": 1633, "neutrophil/NEUTROPHIL_*": 50,
              "ig/MY_*": 1137, "ig/MMY_*": 1015, "ig/PMY_*": 592, "ig/IG_*": 151, "eosinophil/EO_*": 3117,
              "basophil/BA_*": 1218, "lymphocyte/LY_*": 1214, "monocyte/MO_*": 1420}


def _prepare_pbc(downloads: Dict[str, Path], target: Path) -> None:
    unpacked = _unpack(downloads["PBC_dataset_normal_DIB.zip"], target.parent / f".{target.name}-unpacked")
    top = _require_dir(unpacked, lambda d: all((d / g).is_dir() for g in PBC_GROUPS), "pbc's class folders")
    target.mkdir(parents=True, exist_ok=True)
    for group in PBC_GROUPS:
        (target / group).mkdir(exist_ok=True)
        for image in sorted((top / group).iterdir()):
            # The archive also holds macOS "._" resource forks and thumbnails databases.
            if image.suffix.lower() == ".jpg" and not image.name.startswith("."):
                shutil.move(str(image), target / group / image.name)
    shutil.rmtree(unpacked)


# --- zheng1 ------------------------------------------------------------------

def _prepare_zheng1(downloads: Dict[str, Path], target: Path) -> None:
    from PIL import Image

    unpacked = _unpack(downloads["segmentation_WBC.zip"], target.parent / f".{target.name}-unpacked")
    repo = _require_dir(unpacked, lambda d: (d / "Dataset 1").is_dir(), "'Dataset 1'")
    dataset = repo / "Dataset 1"
    (target / "images").mkdir(parents=True, exist_ok=True)
    (target / "masks").mkdir(exist_ok=True)
    for bmp in sorted(dataset.glob("*.bmp")):
        # BMP to PNG is lossless; the project reads PNGs only.
        with Image.open(bmp) as im:
            im.save(target / "images" / f"{bmp.stem}.png")
    for mask in sorted(dataset.glob("*.png")):
        shutil.copyfile(mask, target / "masks" / mask.name)
    shutil.copyfile(repo / "Class Labels of Dataset 1.csv", target / "labels.csv")
    if (repo / "LICENSE").is_file():
        shutil.copyfile(repo / "LICENSE", target / "LICENSE")
    shutil.rmtree(unpacked)


# --- bccd --------------------------------------------------------------------

#: labels.csv category -> crop folder.
BCCD_CLASSES = {"NEUTROPHIL": "Neutrophil", "EOSINOPHIL": "Eosinophil", "LYMPHOCYTE": "Lymphocyte",
                "MONOCYTE": "Monocyte", "BASOPHIL": "Basophil"}


def wbc_boxes(annotation: PathLike) -> List[Tuple[int, int, int, int]]:
    """The WBC boxes (xmin, ymin, xmax, ymax) of a Pascal VOC annotation, in file order."""
    boxes = []
    for obj in ET.parse(annotation).getroot().iter("object"):
        if obj.findtext("name", "").strip().upper() == "WBC":
            box = obj.find("bndbox")
            boxes.append(tuple(int(float(box.findtext(k))) for k in ("xmin", "ymin", "xmax", "ymax")))
    return boxes


def square_crop_box(box: Tuple[int, int, int, int], width: int, height: int) -> Tuple[int, int, int, int]:
    """A square around ``box``'s centre with side its longer edge, moved (not shrunk) to lie inside the image."""
    x0, y0, x1, y1 = box
    side = min(max(x1 - x0, y1 - y0), width, height)
    left = min(max((x0 + x1) // 2 - side // 2, 0), width - side)
    top = min(max((y0 + y1) // 2 - side // 2, 0), height - side)
    return left, top, left + side, top + side


def bccd_field_classes(labels_csv: PathLike) -> Dict[int, str]:
    """Image number -> crop folder, for fields whose class list names exactly one class."""
    classes = {}
    with open(labels_csv, newline="") as fh:
        for row in csv.DictReader(fh):
            names = [n.strip().upper() for n in (row.get("Category") or "").split(",") if n.strip()]
            if len(names) == 1 and names[0] in BCCD_CLASSES:
                classes[int(row["Image"])] = BCCD_CLASSES[names[0]]
    return classes


def _prepare_bccd(downloads: Dict[str, Path], target: Path) -> None:
    from PIL import Image

    unpacked = _unpack(downloads["BCCD_Dataset.zip"], target.parent / f".{target.name}-unpacked")
    voc = _require_dir(unpacked, lambda d: (d / "Annotations").is_dir() and (d / "JPEGImages").is_dir(),
                       "BCCD's Annotations and JPEGImages")
    for name, folder in [("fields", "JPEGImages"), ("annotations", "Annotations")]:
        (target / name).mkdir(parents=True, exist_ok=True)
        for item in sorted((voc / folder).iterdir()):
            if item.suffix.lower() in {".jpg", ".xml"}:
                shutil.copyfile(item, target / name / item.name)
    shutil.copyfile(downloads["labels.csv"], target / "labels.csv")
    licence = _find_dir(unpacked, lambda d: (d / "LICENSE").is_file(), nested_archives=False)
    if licence is not None:
        shutil.copyfile(licence / "LICENSE", target / "LICENSE")
    classes = bccd_field_classes(target / "labels.csv")
    for annotation in sorted((target / "annotations").glob("BloodImage_*.xml")):
        number = int(annotation.stem.split("_")[1])
        field_image = target / "fields" / f"{annotation.stem}.jpg"
        boxes = wbc_boxes(annotation)
        if number not in classes or not boxes or not field_image.is_file():
            continue
        folder = target / "crops" / classes[number]
        folder.mkdir(parents=True, exist_ok=True)
        with Image.open(field_image) as im:
            im.crop(square_crop_box(boxes[0], *im.size)).save(folder / f"{annotation.stem}_1.jpg", quality=95)
    shutil.rmtree(unpacked)


# --- the registry --------------------------------------------------------------

PBC_URL = ("https://data.mendeley.com/public-files/datasets/snkd93bnjr/files/"
           "2fc38728-2ae7-4a62-a857-032af82334c3/file_downloaded")
ZHENG1_URL = "https://github.com/zxaoyou/segmentation_WBC/archive/refs/heads/master.zip"
BCCD_URL = "https://github.com/Shenggan/BCCD_Dataset/archive/refs/heads/master.zip"
BCCD_LABELS_URL = "https://raw.githubusercontent.com/cosmicad/dataset/master/labels.csv"

SOURCES: Dict[str, Source] = {
    "pbc": Source(
        name="pbc", licence="CC BY 4.0",
        citation="Acevedo A. et al., Data in Brief 30 (2020) 105474, doi:10.17632/snkd93bnjr.1",
        downloads=(Download(PBC_URL, "PBC_dataset_normal_DIB.zip"),),
        prepare=_prepare_pbc,
        expected={f"pbc/{pattern}.jpg": (n, n) for pattern, n in PBC_COUNTS.items()},
    ),
    "zheng1": Source(
        name="zheng1", licence="GPL-3.0",
        citation="Zheng X. et al., Micron 107 (2018) 55-71; acknowledge Jiangxi Tecom",
        downloads=(Download(ZHENG1_URL, "segmentation_WBC.zip"),),
        prepare=_prepare_zheng1,
        expected={"zheng1/images/*.png": (300, 300), "zheng1/masks/*.png": (300, 300),
                  "zheng1/labels.csv": (1, 1)},
    ),
    "bccd": Source(
        name="bccd", licence="MIT",
        citation="BCCD Dataset, github.com/Shenggan/BCCD_Dataset (2017)",
        downloads=(Download(BCCD_URL, "BCCD_Dataset.zip"), Download(BCCD_LABELS_URL, "labels.csv")),
        prepare=_prepare_bccd,
        # Crops are cut here, so their number depends on the boxes: at least one per class.
        expected={"bccd/fields/*.jpg": (364, 364), "bccd/annotations/*.xml": (364, 364),
                  "bccd/labels.csv": (1, 1),
                  **{f"bccd/crops/{c}/*.jpg": (1, 10_000) for c in BCCD_CLASSES.values()}},
    ),
}


def default_root(root: Optional[PathLike] = None) -> Path:
    """Where fetched sets go: ``root``, else ``$WBC_DATA_ROOT``, else ``../shared/datasets`` beside the project
    (the same order as :func:`wbclib.data.data_root`, without requiring the folder to exist)."""
    return Path(root or os.environ.get(ENV_VAR) or PROJECT_ROOT.parent / "shared" / "datasets").expanduser().resolve()


def check(source: Source, root: PathLike, strict: bool = False) -> Tuple[List[str], List[str]]:
    """Check a set under ``root``; returns (problems, notes).

    Problems: a folder of the layout with too few or too many files, or a
    set :func:`wbclib.data.manifest` cannot load; with ``strict``, also a
    file that is missing from or differs from ``root/SHA256SUMS``. Notes
    summarise the ``SHA256SUMS`` comparison when not strict.
    """
    from . import data

    root = Path(root)
    problems, notes = [], []
    for pattern, (low, high) in source.expected.items():
        found = len(list(root.glob(pattern)))
        if not low <= found <= high:
            want = f"{low}" if low == high else f"{low}-{high}"
            problems.append(f"{pattern}: {found} files, expected {want}")
    if not problems:
        try:
            data.manifest(source.name, root, hashes=False)
        except DataError as exc:
            problems.append(f"the project cannot load it: {exc}")
    if (root / "SHA256SUMS").is_file():
        try:
            differences = data.verify_checksums(root, sources=[source.name])
        except DataError as exc:  # e.g. a list without entries for this set
            notes.append(f"SHA256SUMS not used: {exc}")
            return problems, notes
        listed = sum(1 for line in (root / "SHA256SUMS").read_text().splitlines()
                     if line.split(maxsplit=1)[-1].lstrip("*").removeprefix("./").startswith(f"{source.name}/"))
        kinds = differences.problem.value_counts()
        identical = listed - kinds.get("mismatch", 0) - kinds.get("missing", 0)
        summary = (f"SHA256SUMS: {identical} of {listed} files identical"
                   + "".join(f", {n} {kind}" for kind, n in kinds.items()))
        if strict and len(differences):
            problems.append(summary + "; first: " + ", ".join(differences.path.head(5)))
        else:
            notes.append(summary + (" (re-encoded or re-packed files differ in bytes, not pixels)"
                                    if kinds.get("mismatch", 0) else ""))
    return problems, notes


def fetch(name_or_source, root: Optional[PathLike] = None, download: Downloader = urllib_download,
          force: bool = False, strict: bool = False, log=print) -> Path:
    """Download one set into ``root/<name>``, lay it out and check it; returns that folder.

    A set already present is checked and left alone unless ``force``: one
    that passes is reused, one that fails raises (a copy the user may have
    edited is never replaced without ``force``). ``download`` fetches each
    file (see :data:`Downloader`). Raises :class:`FetchError` when a pinned
    digest or the check fails.
    """
    source = SOURCES[name_or_source] if isinstance(name_or_source, str) else name_or_source
    root = default_root(root)
    target = root / source.name
    if target.exists() and not force:
        problems, notes = check(source, root, strict)
        if not problems:
            log(f"{source.name}: already in {target}; " + "; ".join(notes or ["layout checked"]))
            return target
        raise FetchError(f"{source.name}: {target} is there but fails its check ({'; '.join(problems)}); "
                         "fix it, or download it again with force (wbc data fetch --force)")
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{source.name}-download-", dir=root) as scratch:
        files = {}
        for item in source.downloads:
            path = Path(scratch) / item.filename
            log(f"{source.name}: downloading {item.url}")
            download(item.url, path)
            actual = sha256_file(path) if item.sha256 else None
            if actual is not None and actual != item.sha256:
                raise FetchError(f"{item.url}: SHA-256 {actual} differs from the pinned {item.sha256}")
            files[item.filename] = path
        staged = Path(scratch) / source.name
        source.prepare(files, staged)
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(staged), target)
    problems, notes = check(source, root, strict)
    for note in notes:
        log(f"{source.name}: {note}")
    if problems:
        raise FetchError(f"{source.name} in {target} failed its check: " + "; ".join(problems))
    log(f"{source.name}: ready in {target} ({source.licence}; cite {source.citation})")
    return target


def fetch_all(names: Optional[Sequence[str]] = None, root: Optional[PathLike] = None,
              download: Downloader = urllib_download, force: bool = False, strict: bool = False,
              log=print) -> Dict[str, Path]:
    """:func:`fetch` every named set (default: all three), in order."""
    return {name: fetch(name, root, download, force, strict, log) for name in (names or list(SOURCES))}


def main(args) -> int:
    """``wbc data fetch``: 0 when every set is in place and checked, 1 otherwise."""
    try:
        fetch_all(args.source, args.root, force=args.force, strict=getattr(args, "strict", False))
    except FetchError as exc:
        print(f"wbc: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # network or disk: say which, not a traceback
        print(f"wbc: error: download failed: {exc}", file=sys.stderr)
        return 1
    return 0
