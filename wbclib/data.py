"""Data sources, manifests, label taxonomy, integrity and image loading.

The data root holds one folder per public source (``pbc``, ``zheng1``,
``bccd``) exactly as described in ``data/README.md``. It is found, in order,
from an explicit argument, the ``WBC_DATA_ROOT`` environment variable, or
``../shared/datasets`` beside the project checkout.

Bad input is reported, not dropped: building a manifest decodes every image
and checks the folder layout and label tables, and every problem found in one
pass is raised together in one :class:`DataError` that names each file.
Hidden entries (``.ipynb_checkpoints``, macOS ``._*`` files, ``__MACOSX``)
are skipped everywhere.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

PathLike = Union[str, Path]
PROJECT_ROOT = Path(__file__).resolve().parent.parent
ENV_VAR = "WBC_DATA_ROOT"
#: At most this many problems are spelled out in one error message.
MAX_SHOWN_PROBLEMS = 20


class DataError(RuntimeError):
    """Bad or missing input data; the message names the file and the problem."""


class DataWarning(UserWarning):
    """Usable but suspicious input data (transparency, tiny images); names the file."""


def report_problems(what: str, problems: Sequence[str]) -> None:
    """Raise one :class:`DataError` listing every problem (each ``"<file>: <problem>"``).

    A single problem is raised as is; several get a count and one line each
    (the first :data:`MAX_SHOWN_PROBLEMS`, then how many more).
    """
    if not problems:
        return
    if len(problems) == 1:
        raise DataError(problems[0])
    shown = "\n  ".join(problems[:MAX_SHOWN_PROBLEMS])
    more = len(problems) - MAX_SHOWN_PROBLEMS
    tail = f"\n  ... and {more} more" if more > 0 else ""
    raise DataError(f"{len(problems)} problems in {what}:\n  {shown}{tail}")


def data_root(root: Optional[PathLike] = None) -> Path:
    """Resolve the data root and check that it is an existing folder.

    An explicit empty path is an error (it would otherwise mean the current
    directory).
    """
    if root is not None and not str(root).strip():
        raise DataError(f"empty data root path {str(root)!r}; pass a folder, or leave it out to use "
                        f"${ENV_VAR} or ../shared/datasets")
    if root is None:
        root = os.environ.get(ENV_VAR) or PROJECT_ROOT.parent / "shared" / "datasets"
    root = Path(root).expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise DataError(f"data root {root} is not a directory; pass the folder that holds pbc/, zheng1/ and bccd/")
    if not root.is_dir():
        raise DataError(
            f"data root {root} does not exist; pass root=..., set {ENV_VAR}, "
            "or see data/README.md for how to obtain the public sets"
        )
    return root


# --------------------------------------------------------------------------
# Reading and checking image files
# --------------------------------------------------------------------------

#: PIL modes that :func:`load_image` converts to 8-bit RGB without loss of meaning.
SUPPORTED_MODES = ("RGB", "L", "P", "RGBA", "LA", "CMYK", "YCbCr")
#: Images with a side shorter than this are accepted with a :class:`DataWarning`.
MIN_SIDE = 16
#: Errors PIL raises for a file it cannot decode.
_DECODE_ERRORS = (Image.DecompressionBombError, OSError, SyntaxError, ValueError)


def _decode_problem(exc: BaseException) -> str:
    """What is wrong with a file PIL could not decode, in words."""
    if isinstance(exc, UnidentifiedImageError):
        return "not a readable image (corrupt or unknown format)"
    if isinstance(exc, Image.DecompressionBombError):
        return f"image too large to decode safely, a possible decompression bomb ({exc})"
    return f"corrupt or truncated image ({exc})"


def read_image(path: PathLike, what: str = "image") -> Image.Image:
    """Open and fully decode an image file (any mode).

    Raises :class:`DataError` naming the file for a missing, unreadable,
    truncated, oversized or unknown-format file; ``what`` names the kind of
    file in the "missing" message (e.g. "expert mask").
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such {what} file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: unreadable file ({exc.strerror or exc})") from None
    try:
        # Decoding from memory leaves no file handle to close, so the loaded
        # image stays usable after this function returns.
        im = Image.open(io.BytesIO(raw))
        im.load()
        return im
    except _DECODE_ERRORS as exc:
        raise DataError(f"{path}: {_decode_problem(exc)}") from None


def load_image(path: PathLike) -> np.ndarray:
    """Read an image file as an RGB ``uint8`` array of shape (H, W, 3).

    Raises :class:`DataError` naming the file for a missing, unreadable,
    truncated, oversized or unsupported-mode image.
    """
    im = read_image(path)
    if im.mode == "RGB":
        return np.array(im)
    if im.mode in SUPPORTED_MODES:
        return np.array(im.convert("RGB"))
    raise DataError(f"{path}: unsupported image mode {im.mode!r} (expected RGB, L, P or RGBA)")


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class ImageCheck:
    """What checking one image file found: its size, optional sha256, the
    problem that makes it unusable (empty when usable) and any warnings."""

    width: int = 0
    height: int = 0
    sha256: str = ""
    problem: str = ""
    warnings: Tuple[str, ...] = ()


def _has_transparency(im: Image.Image) -> bool:
    """True when some pixel is not fully opaque (alpha channel or transparency key)."""
    if im.mode in ("RGBA", "LA"):
        return im.getchannel("A").getextrema()[0] < 255
    if "transparency" in im.info:
        return im.convert("RGBA").getchannel("A").getextrema()[0] < 255
    return False


def _image_warnings(im: Image.Image, width: int, height: int) -> Tuple[str, ...]:
    """Warnings for a decoded, usable image of the given (full) size: real
    transparency, tiny sizes, and sizes PIL itself only warns about (without
    naming the file)."""
    notes = []
    if _has_transparency(im):
        notes.append("has transparent pixels; the alpha channel is dropped, so transparent areas "
                     "take their stored colour")
    if min(width, height) < MIN_SIDE:
        notes.append(f"tiny image ({width}x{height} px, a side under {MIN_SIDE} px); it will be upsampled")
    if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
        notes.append(f"very large image ({width}x{height} px, over PIL's decompression-bomb limit of "
                     f"{Image.MAX_IMAGE_PIXELS} pixels)")
    return tuple(notes)


def check_image(path: PathLike, hashes: bool = False, full: bool = False) -> ImageCheck:
    """Decode one image file and say whether it is usable; never raises for bad content.

    The whole file is decoded. JPEGs are decoded at 1/8 scale unless ``full``:
    every byte of the compressed stream is still read and entropy-decoded (so
    truncated or broken files fail), only the inverse DCT is skipped, which
    makes the check about twice as fast. With ``hashes`` the sha256 of the
    same bytes is returned.
    """
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        return ImageCheck(problem=f"unreadable file ({exc.strerror or exc})")
    digest = hashlib.sha256(raw).hexdigest() if hashes else ""
    try:
        with Image.open(io.BytesIO(raw)) as im:
            width, height = im.size
            if im.mode not in SUPPORTED_MODES:
                return ImageCheck(width, height, digest,
                                  f"unsupported image mode {im.mode!r} (expected RGB, L, P or RGBA)")
            if im.format == "JPEG" and not full:
                im.draft(im.mode, (max(1, width // 8), max(1, height // 8)))
            im.load()
            notes = _image_warnings(im, width, height)
    except _DECODE_ERRORS as exc:
        return ImageCheck(sha256=digest, problem=_decode_problem(exc))
    return ImageCheck(width, height, digest, "", notes)


def check_images(paths: Sequence[Path], hashes: bool = False, full: bool = False) -> List[ImageCheck]:
    """:func:`check_image` for many files, decoded in a few threads (PIL releases the GIL)."""
    check = partial(check_image, hashes=hashes, full=full)
    workers = min(4, os.cpu_count() or 1)
    if workers == 1 or len(paths) < 64:
        return [check(p) for p in paths]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(check, paths))


# --------------------------------------------------------------------------
# Label taxonomy
# --------------------------------------------------------------------------

#: The five common leukocyte classes shared (to varying degrees) by every lab,
#: plus immature granulocytes, which only pbc has.
COMMON_CLASSES = ("neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil", "ig")

#: pbc's file-name prefixes (fine labels) and their common class.
PBC_FINE_TO_COMMON = {
    "SNE": "neutrophil",
    "BNE": "neutrophil",
    "NEUTROPHIL": "neutrophil",
    "MY": "ig",
    "MMY": "ig",
    "PMY": "ig",
    "IG": "ig",
    "EO": "eosinophil",
    "BA": "basophil",
    "LY": "lymphocyte",
    "MO": "monocyte",
}

#: Each lab's own class names -> common class names.
LAB_LABEL_TO_COMMON = {
    "pbc": PBC_FINE_TO_COMMON,
    "zheng1": {"1": "neutrophil", "2": "lymphocyte", "3": "monocyte", "4": "eosinophil", "5": "basophil"},
    "bccd": {
        "Neutrophil": "neutrophil",
        "Lymphocyte": "lymphocyte",
        "Monocyte": "monocyte",
        "Eosinophil": "eosinophil",
        "Basophil": "basophil",
    },
}

SYNONYMS = {
    "neutrophils": "neutrophil",
    "segmented neutrophil": "neutrophil",
    "lymphocytes": "lymphocyte",
    "monocytes": "monocyte",
    "eosinophils": "eosinophil",
    "basophils": "basophil",
    "immature granulocyte": "ig",
    "immature granulocytes": "ig",
}


def to_common(lab: str, label: str, where: str = "") -> str:
    """Map a lab's own label to a common class name, or raise naming the file."""
    table = LAB_LABEL_TO_COMMON.get(lab, {})
    if label in table:
        return table[label]
    norm = str(label).strip().lower()
    norm = SYNONYMS.get(norm, norm)
    if norm in COMMON_CLASSES:
        return norm
    raise DataError(
        f"{where or lab}: unknown label {label!r} for lab {lab!r}; "
        f"known: {sorted(table) or list(COMMON_CLASSES)}"
    )


#: pbc's group folders (``pbc/<group>/``) and the fine classes (file-name
#: prefixes) each holds, as published (data/README.md).
PBC_GROUPS = {
    "neutrophil": ("SNE", "BNE", "NEUTROPHIL"),
    "ig": ("MY", "MMY", "PMY", "IG"),
    "eosinophil": ("EO",),
    "basophil": ("BA",),
    "lymphocyte": ("LY",),
    "monocyte": ("MO",),
}


# --------------------------------------------------------------------------
# Sources and manifests
# --------------------------------------------------------------------------

MANIFEST_COLUMNS = ["path", "source", "lab", "fine_label", "label", "width", "height", "sha256"]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
SOURCES = ("pbc", "zheng1", "bccd")
#: Folder names that are never data (besides names starting with a dot).
JUNK_FOLDERS = {"__MACOSX"}
#: Part of the manifest cache key: bump it when building a manifest checks
#: more, so tables cached by an older, laxer version are rebuilt (2: every
#: image is decoded, not only its header).
MANIFEST_CHECKS_VERSION = 2


def is_hidden(name: str) -> bool:
    """True for entries every reader skips: dot files and folders (``.ipynb_checkpoints``,
    macOS ``._*`` and ``.DS_Store``) and ``__MACOSX``."""
    return name.startswith(".") or name in JUNK_FOLDERS


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def walk_files(base: Path) -> List[Path]:
    """Every file under ``base`` at any depth, sorted, skipping hidden entries.

    Symbolic links are followed, and a broken link is listed (reading it then
    fails with a clear error instead of the file being dropped).
    """
    found = []
    for folder, subfolders, files in os.walk(base, followlinks=True):
        subfolders[:] = [name for name in subfolders if not is_hidden(name)]
        found.extend(Path(folder) / name for name in files if not is_hidden(name))
    return sorted(found)


def _map_labels(lab: str, named: Iterable[Tuple[str, Path]]) -> Tuple[Dict[str, str], List[str]]:
    """Common class of each distinct lab label, and one problem per unknown
    label (naming its first file and how many files carry it)."""
    files: Dict[str, List[Path]] = {}
    for label, path in named:
        files.setdefault(label, []).append(path)
    mapping, problems = {}, []
    for label, paths in files.items():
        try:
            mapping[label] = to_common(lab, label, str(paths[0]))
        except DataError as exc:
            more = f" ({len(paths) - 1} more file(s) with this label)" if len(paths) > 1 else ""
            problems.append(f"{exc}{more}")
    return mapping, problems


def _class_folder_images(base: Path, layout: str) -> Tuple[List[Path], List[str]]:
    """Images sitting directly in ``base/<class>/``, and one problem per image
    anywhere else: loose in ``base``, or in a nested folder (named once, with
    its image count). ``layout`` says in words where images belong."""
    images, stray = [], {}
    for path in walk_files(base):
        if not is_image_name(path):
            continue
        parts = path.relative_to(base).parts
        if len(parts) == 2:
            images.append(path)
        else:
            where = base / parts[0] / parts[1] if len(parts) > 2 else path
            stray[where] = stray.get(where, 0) + 1
    problems = []
    for where, count in stray.items():
        if where.is_dir():
            problems.append(f"{where}: nested folder with {count} image(s) inside a class folder; images are "
                            f"read only from {layout}, so move them up or out of the data root")
        else:
            problems.append(f"{where}: image outside a class folder; expected {layout}")
    return images, problems


def _pbc_rows(root: Path) -> Tuple[list, List[str]]:
    """pbc rows (label = file-name prefix) and every layout or label problem.

    Strict, because pbc is a published set: each group folder of
    :data:`PBC_GROUPS` must exist, every fine class must have images, and
    images in nested folders are reported rather than read or dropped.
    """
    base = root / "pbc"
    if not base.is_dir():
        raise DataError(f"{base}: pbc folder missing under the data root")
    images, problems = _class_folder_images(base, "pbc/<group>/<PREFIX>_<id>.jpg")
    fine_of = {path: path.stem.rsplit("_", 1)[0] for path in images}
    mapping, label_problems = _map_labels("pbc", ((fine, path) for path, fine in fine_of.items()))
    problems += label_problems
    rows = [dict(path=str(path.relative_to(root)), source="pbc", lab="pbc", fine_label=fine, label=mapping[fine])
            for path, fine in fine_of.items() if fine in mapping]
    found = {row["fine_label"] for row in rows}
    for group, fines in PBC_GROUPS.items():
        folder = base / group
        if not folder.is_dir():
            problems.append(f"{folder}: pbc class folder missing (expected groups: {', '.join(PBC_GROUPS)})")
        elif set(fines) - found:
            problems.append(f"{folder}: no images of fine class(es) {sorted(set(fines) - found)}")
    return rows, problems


ZHENG1_HEADER = ("image ID", "class label")


def _zheng1_header_problem(table: Path, line: str) -> str:
    """Why the first line of zheng1's labels.csv is not the expected header ('' if it is)."""
    fields = [field.strip().lower() for field in next(csv.reader([line]))]
    expected = [name.lower() for name in ZHENG1_HEADER]
    want = f"expected the header {','.join(ZHENG1_HEADER)!r}"
    if fields == expected:
        return ""
    if fields == expected[::-1]:
        return f"{table} line 1: columns swapped ({line.strip()!r}); {want}"
    if len(fields) == 1 and any(sep in line for sep in ";\t|"):
        return f"{table} line 1: wrong separator ({line.strip()!r}); the file must be comma-separated, {want}"
    if all(re.fullmatch(r"\s*-?\d+\s*", field) for field in fields):
        return f"{table} line 1: header missing (the first line is the data row {line.strip()!r}); {want}"
    return f"{table} line 1: unexpected header {line.strip()!r}; {want}"


def _zheng1_row(table: Path, number: int, line: str) -> Tuple[Optional[int], str, str]:
    """(image ID, class label, problem) of one data line of labels.csv; the
    image ID is kept when only the label is wrong (the image is listed)."""
    where = f"{table} line {number}"
    fields = [field.strip() for field in next(csv.reader([line]))]
    if len(fields) != 2:
        return None, "", (f"{where}: expected 2 comma-separated fields (image ID, class label), "
                          f"got {len(fields)}: {line.strip()!r}")
    image_id, label = fields
    if not re.fullmatch(r"\d+", image_id):
        return None, "", f"{where}: image ID {image_id!r} is not a whole number"
    image_id = int(image_id)
    known = sorted(LAB_LABEL_TO_COMMON["zheng1"])
    if not label:
        return image_id, "", f"{where}: empty class label for image {image_id}"
    if not re.fullmatch(r"\d+", label):
        return image_id, "", f"{where}: class label {label!r} for image {image_id} is not a number ({', '.join(known)})"
    if str(int(label)) not in known:
        return image_id, "", f"{where}: unknown class label {label!r} for image {image_id}; known: {known}"
    return image_id, str(int(label)), ""


def _read_zheng1_table(table: Path) -> Tuple[pd.DataFrame, List[str], set]:
    """Rows of labels.csv (``image_id``, ``class_label``, ``line``), the
    problems of its data lines, and every image ID it mentions (bad label or
    not); a missing, empty or header-less file raises."""
    if not table.is_file():
        raise DataError(f"{table}: zheng1 label table missing under the data root")
    try:
        lines = table.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{table}: unreadable label table ({exc})") from None
    if not any(line.strip() for line in lines):
        raise DataError(f"{table}: empty file; expected the header {','.join(ZHENG1_HEADER)!r} and one row per image")
    header_problem = _zheng1_header_problem(table, lines[0])
    if header_problem:
        raise DataError(header_problem)
    rows, problems, first_line, mentioned = [], [], {}, set()
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        image_id, label, problem = _zheng1_row(table, number, line)
        mentioned.add(image_id)
        if problem:
            problems.append(problem)
        elif image_id in first_line:
            problems.append(f"{table} line {number}: image {image_id} is listed again (first on line "
                            f"{first_line[image_id]}); each image must have exactly one row")
        else:
            first_line[image_id] = number
            rows.append((image_id, label, number))
    if not rows and not problems:
        raise DataError(f"{table}: header only, no rows; expected one row per image")
    mentioned.discard(None)
    return pd.DataFrame(rows, columns=["image_id", "class_label", "line"]), problems, mentioned


def zheng1_labels(root: Optional[PathLike] = None) -> pd.DataFrame:
    """zheng1's checked label table: ``image_id``, ``class_label`` ('1'-'5'),
    ``label`` (common class), ``line`` (in labels.csv).

    Every problem is raised together in one :class:`DataError` naming
    labels.csv and the line: a missing, empty or header-only file, a wrong
    header or separator, a malformed, non-numeric, empty, unknown or repeated
    row, an image that is listed but missing, and an image in ``images/`` that
    is not listed (it would otherwise be silently left out).
    """
    root = data_root(root)
    base = root / "zheng1"
    table = base / "labels.csv"
    labels, problems, mentioned = _read_zheng1_table(table)
    images = base / "images"
    listed = set()
    for image_id in sorted(mentioned):
        path = images / f"{image_id:03d}.png"
        listed.add(path.name)
        if not path.is_file():
            problems.append(f"{path}: listed in {table} but missing")
    on_disk = [path for path in walk_files(images) if is_image_name(path)] if images.is_dir() else []
    unlisted = [str(path.relative_to(images)) for path in on_disk if str(path.relative_to(images)) not in listed]
    if unlisted:
        shown = ", ".join(unlisted[:10]) + (", ..." if len(unlisted) > 10 else "")
        problems.append(f"{images}: {len(unlisted)} image(s) not listed in {table} ({shown}); "
                        "add a row for each or move them out of the data root")
    report_problems(str(table), problems)
    labels["label"] = [LAB_LABEL_TO_COMMON["zheng1"][code] for code in labels["class_label"]]
    return labels[["image_id", "class_label", "label", "line"]]


def _zheng1_rows(root: Path) -> Tuple[list, List[str]]:
    """zheng1 rows from the checked label table (which raises its own problems)."""
    labels = zheng1_labels(root)
    rows = [dict(path=f"zheng1/images/{image_id:03d}.png", source="zheng1", lab="zheng1",
                 fine_label=label, label=label)
            for image_id, label in zip(labels["image_id"], labels["label"])]
    return rows, []


def _bccd_rows(root: Path) -> Tuple[list, List[str]]:
    """bccd crop rows (label = class folder) and every layout or label problem."""
    base = root / "bccd" / "crops"
    if not base.is_dir():
        raise DataError(f"{base}: bccd crops folder missing under the data root")
    images, problems = _class_folder_images(base, "bccd/crops/<Class>/<image>")
    mapping, label_problems = _map_labels("bccd", ((path.parent.name, path) for path in images))
    problems += label_problems
    rows = [dict(path=str(path.relative_to(root)), source="bccd", lab="bccd",
                 fine_label=mapping[path.parent.name], label=mapping[path.parent.name])
            for path in images if path.parent.name in mapping]
    return rows, problems


_SOURCE_ROWS = {"pbc": _pbc_rows, "zheng1": _zheng1_rows, "bccd": _bccd_rows}


def _rows_to_manifest(rows: list, root: Path, hashes: bool, problems: Sequence[str] = (),
                      what: str = "the manifest") -> pd.DataFrame:
    """Decode every row's image (size, sha256) and raise all problems found,
    the given layout problems included, in one :class:`DataError`."""
    problems = list(problems)
    checks = check_images([root / row["path"] for row in rows], hashes=hashes)
    for row, check in zip(rows, checks):
        full = root / row["path"]
        if check.problem:
            problems.append(f"{full}: {check.problem}")
        for note in check.warnings:
            warnings.warn(f"{full}: {note}", DataWarning, stacklevel=3)
        row.update(width=check.width, height=check.height, sha256=check.sha256)
    report_problems(what, problems)
    df = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    return df.sort_values("path", kind="stable").reset_index(drop=True)


def manifest(source: str, root: Optional[PathLike] = None, hashes: bool = True,
             cache_dir: Optional[PathLike] = None) -> pd.DataFrame:
    """One row per image of a source: path (relative to the root), source, lab,
    fine label, common label, width, height, sha256.

    Every image is decoded, and layout, label and image problems are raised
    together (see the module docstring). With ``cache_dir`` the table is
    stored as CSV keyed by the root and the source's file list and
    modification times, so later calls skip the decoding.
    """
    if source not in _SOURCE_ROWS:
        raise DataError(f"unknown source {source!r}; known: {', '.join(SOURCES)} (use image_folder() for others)")
    root = data_root(root)
    rows, problems = _SOURCE_ROWS[source](root)
    what = f"the {source} data under {root}"
    if cache_dir is None or problems:
        return _rows_to_manifest(rows, root, hashes, problems, what)
    from . import cache
    from .runs import files_fingerprint

    listing = hashlib.sha256("\n".join(f"{r['path']}|{r['label']}" for r in rows).encode()).hexdigest()[:16]
    inputs = dict(root=str(root), listing=listing, files=files_fingerprint(root, [r["path"] for r in rows]))
    entry = cache.entry(cache_dir, "manifest", dict(source=source, hashes=hashes, checks=MANIFEST_CHECKS_VERSION),
                        inputs, modules=("data.py",), suffix=".csv", label=source)
    return cache.frame(entry, lambda: _rows_to_manifest(rows, root, hashes, problems, what),
                       columns=("path", "label", "sha256"), dtype={"fine_label": str, "sha256": str},
                       keep_default_na=False)


def image_folder(folder: PathLike, lab: str, hashes: bool = True) -> pd.DataFrame:
    """Manifest of a generic ``<folder>/<class name>/<image>`` tree from any lab.

    Class folder names are mapped to common names (case-insensitive, plural
    forms accepted). Images in nested folders (``<class>/batch2/x.jpg``) are
    included under their top-level class folder; hidden entries are skipped.
    Unknown class names, images outside a class folder and undecodable
    images are all reported together in one :class:`DataError`.
    """
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise DataError(f"{folder}: image folder does not exist")
    images, problems = [], []
    for path in walk_files(folder):
        if not is_image_name(path):
            continue
        if len(path.relative_to(folder).parts) < 2:
            problems.append(f"{path}: image outside a class folder; expected <folder>/<class name>/<image>")
        else:
            images.append(path)
    class_of = {path: path.relative_to(folder).parts[0] for path in images}
    mapping, label_problems = _map_labels(lab, ((name, path) for path, name in class_of.items()))
    problems += label_problems
    if not images and not problems:
        raise DataError(f"{folder}: no images found in <class>/<image> sub-folders")
    rows = [dict(path=str(path.relative_to(folder)), source=folder.name, lab=lab, fine_label=name,
                 label=mapping[name])
            for path, name in class_of.items() if name in mapping]
    return _rows_to_manifest(rows, folder, hashes, problems, f"the image folder {folder}")


def all_manifests(root: Optional[PathLike] = None, cache_dir: Optional[PathLike] = None) -> pd.DataFrame:
    return pd.concat([manifest(s, root, cache_dir=cache_dir) for s in SOURCES], ignore_index=True)


# --------------------------------------------------------------------------
# Duplicates and integrity
# --------------------------------------------------------------------------


def find_duplicates(df: pd.DataFrame) -> pd.DataFrame:
    """Groups of byte-identical files (same sha256) with more than one member.

    Adds ``group`` (the hash), ``n`` (group size) and ``cross_class`` (the
    copies carry different fine labels; always a bool column, also when
    there are no duplicates).
    """
    dup = df[df.duplicated("sha256", keep=False)].copy()
    if dup.empty:
        return dup.assign(group=pd.Series(dtype=str), n=pd.Series(dtype=int), cross_class=pd.Series(dtype=bool))
    dup["group"] = dup["sha256"]
    dup["n"] = dup.groupby("sha256")["path"].transform("size")
    dup["cross_class"] = dup.groupby("sha256")["fine_label"].transform("nunique") > 1
    return dup.sort_values(["group", "path"]).reset_index(drop=True)


def describe_duplicates(dups: pd.DataFrame) -> str:
    """One line about a :func:`find_duplicates` table: groups, files, cross-class groups."""
    cross = dups.loc[dups["cross_class"].astype(bool), "group"].nunique()
    return f"{dups['group'].nunique()} duplicate groups, {len(dups)} files; {cross} group(s) across classes"


def drop_duplicates(df: pd.DataFrame) -> pd.DataFrame:
    """Apply the duplicate policy.

    * copies that carry *different* labels are all dropped: the true label is
      unknown, and keeping either would put a wrong label in train or test;
    * copies with the *same* label keep one (the first path in sort order), so
      no image can sit in both a training and a test split.
    """
    dup = find_duplicates(df)
    cross = set(dup.loc[dup["cross_class"], "sha256"])
    kept = df[~df["sha256"].isin(cross)]
    kept = kept.sort_values("path", kind="stable").drop_duplicates("sha256", keep="first")
    return kept.sort_values("path", kind="stable").reset_index(drop=True)


@dataclass(frozen=True)
class ChecksumEntry:
    """One line of a checksum list: its line number, lower-case hex digest and path as written."""

    line: int
    digest: str
    path: str


_GNU_LINE = re.compile(r"(?P<digest>[0-9A-Fa-f]{64}) [ *](?P<path>.+)")
_BSD_LINE = re.compile(r"SHA256 ?\((?P<path>.+)\) ?= ?(?P<digest>[0-9A-Fa-f]{64})")


def _unescape_gnu(path: str) -> str:
    """Undo GNU coreutils' escaping of ``\\`` and newlines in names (lines starting with ``\\``)."""
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "r": "\r", "\\": "\\"}.get(m.group(1), m.group(0)), path)


def read_checksum_list(sums: Path) -> List[ChecksumEntry]:
    """Parse a SHA-256 list in GNU (``hex  path``, ``hex *path``) or BSD
    (``SHA256 (path) = hex``) format; digests in any case, LF or CRLF.

    Raises one :class:`DataError` naming the file and the line number of
    every line that is neither.
    """
    try:
        text = sums.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{sums}: unreadable checksum list ({exc})") from None
    entries, problems = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        escaped = line.startswith("\\")
        match = _GNU_LINE.fullmatch(line[1:] if escaped else line) or _BSD_LINE.fullmatch(line)
        if match is None:
            problems.append(f"{sums} line {number}: not a SHA-256 checksum line ('<64 hex digits>  <path>' or "
                            f"'SHA256 (<path>) = <64 hex digits>'): {line[:80]!r}")
            continue
        path = _unescape_gnu(match["path"]) if escaped and match.re is _GNU_LINE else match["path"]
        entries.append(ChecksumEntry(number, match["digest"].lower(), path))
    report_problems(str(sums), problems)
    return entries


def _relative_inside(path: str) -> Optional[str]:
    """``path`` as a clean relative path ('./' prefixes dropped), or None when
    it is absolute or has a '..' part (it could point outside the root)."""
    if path.startswith("/"):
        return None
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return "/".join(parts)


VERIFY_COLUMNS = ["path", "problem", "detail"]


def _unlisted_files(root: Path, sources: Sequence[str], listed: set) -> List[tuple]:
    """Problem rows for files under the sources that the checksum list does not name."""
    rows = []
    for source in sources:
        if (root / source).is_dir():
            for path in walk_files(root / source):
                rel = path.relative_to(root).as_posix()
                if rel not in listed:
                    rows.append((rel, "unlisted", "not in SHA256SUMS, so not verified"))
    return rows


def _undecodable_images(root: Path, sources: Sequence[str]) -> Tuple[List[tuple], int]:
    """Problem rows for images under the sources that do not fully decode, and how many were decoded."""
    paths = [path for source in sources if (root / source).is_dir()
             for path in walk_files(root / source) if is_image_name(path)]
    rows = [(path.relative_to(root).as_posix(), "undecodable", check.problem)
            for path, check in zip(paths, check_images(paths, full=True)) if check.problem]
    return rows, len(paths)


def verify_checksums(root: Optional[PathLike] = None, sources=SOURCES, decode: bool = False) -> pd.DataFrame:
    """Check every file listed in ``SHA256SUMS`` for the given sources.

    Returns one row per problem (``path``, ``problem``, ``detail``); problems
    are ``missing``, ``mismatch``, ``listed twice``, ``outside the root``
    (an absolute or '..' path: never read), ``unlisted`` (a file under the
    sources that the list does not name) and, with ``decode``, ``undecodable``
    (every image under the sources is fully decoded). An empty table means
    the copy is intact. ``attrs['checked']`` and ``attrs['decoded']`` hold
    how many listed files were checked and images decoded. A list with no
    entry for the sources raises :class:`DataError`: nothing would be checked.
    """
    root = data_root(root)
    sums = root / "SHA256SUMS"
    if not sums.is_file():
        raise DataError(f"{sums}: checksum list missing")
    problems, listed = [], set()
    for entry in read_checksum_list(sums):
        rel = _relative_inside(entry.path)
        if rel is None:
            problems.append((entry.path, "outside the root", f"line {entry.line}: absolute or '..' path, not read"))
        elif rel.split("/", 1)[0] not in sources:
            continue
        elif rel in listed:
            problems.append((rel, "listed twice", f"line {entry.line}"))
        else:
            listed.add(rel)
            path = root / rel
            if not path.is_file():
                problems.append((rel, "missing", f"line {entry.line}"))
            elif sha256_file(path) != entry.digest:
                problems.append((rel, "mismatch", f"line {entry.line}: content differs from the listed sha256"))
    if not listed:
        raise DataError(f"{sums}: lists no files under {', '.join(sources)}; nothing was checked")
    problems += _unlisted_files(root, sources, listed)
    decoded = 0
    if decode:
        undecodable, decoded = _undecodable_images(root, sources)
        problems += undecodable
    table = pd.DataFrame(problems, columns=VERIFY_COLUMNS)
    table.attrs.update(checked=len(listed), decoded=decoded)
    return table
