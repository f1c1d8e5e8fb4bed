"""Data sources, manifests, label taxonomy, integrity and image loading.

The data root holds one folder per public source (``pbc``, ``zheng1``,
``bccd``) exactly as described in ``data/README.md``. It is found, in order,
from an explicit argument, the ``WBC_DATA_ROOT`` environment variable, or
``../shared/datasets`` beside the project checkout.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

PathLike = Union[str, Path]
PROJECT_ROOT = Path(__file__).resolve().parent.parent
ENV_VAR = "WBC_DATA_ROOT"


class DataError(RuntimeError):
    """Bad or missing input data; the message names the file and the problem."""


def data_root(root: Optional[PathLike] = None) -> Path:
    """Resolve the data root and check that it exists."""
    if root is None:
        root = os.environ.get(ENV_VAR) or PROJECT_ROOT.parent / "shared" / "datasets"
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DataError(
            f"data root {root} does not exist; pass root=..., set {ENV_VAR}, "
            "or see data/README.md for how to obtain the public sets"
        )
    return root


def load_image(path: PathLike) -> np.ndarray:
    """Read an image file as an RGB ``uint8`` array of shape (H, W, 3).

    Raises :class:`DataError` naming the file for a missing, unreadable,
    truncated or unsupported-mode image.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such image file")
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("RGB",):
                arr = np.array(im)
            elif mode in ("L", "P", "RGBA", "LA", "CMYK", "YCbCr"):
                arr = np.array(im.convert("RGB"))
            else:
                raise DataError(f"{path}: unsupported image mode {mode!r} (expected RGB, L, P or RGBA)")
    except DataError:
        raise
    except UnidentifiedImageError:
        raise DataError(f"{path}: not a readable image (corrupt or unknown format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: corrupt or truncated image ({exc})") from None
    return arr


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


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


# --------------------------------------------------------------------------
# Sources and manifests
# --------------------------------------------------------------------------

MANIFEST_COLUMNS = ["path", "source", "lab", "fine_label", "label", "width", "height", "sha256"]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
SOURCES = ("pbc", "zheng1", "bccd")


def _image_size(path: Path) -> tuple:
    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{path}: not a readable image ({exc})") from None


def _rows_to_manifest(rows: list, root: Path, hashes: bool) -> pd.DataFrame:
    for row in rows:
        full = root / row["path"]
        row["width"], row["height"] = _image_size(full)
        row["sha256"] = sha256_file(full) if hashes else ""
    df = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    return df.sort_values("path", kind="stable").reset_index(drop=True)


def _pbc_rows(root: Path) -> list:
    base = root / "pbc"
    if not base.is_dir():
        raise DataError(f"{base}: pbc folder missing under the data root")
    rows = []
    for path in sorted(base.glob("*/*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        fine = path.stem.rsplit("_", 1)[0]
        rows.append(
            dict(path=str(path.relative_to(root)), source="pbc", lab="pbc", fine_label=fine,
                 label=to_common("pbc", fine, str(path)))
        )
    return rows


def _zheng1_rows(root: Path) -> list:
    base = root / "zheng1"
    table = base / "labels.csv"
    if not table.is_file():
        raise DataError(f"{table}: zheng1 label table missing under the data root")
    labels = pd.read_csv(table)
    rows = []
    for image_id, cls in zip(labels.iloc[:, 0], labels.iloc[:, 1]):
        path = base / "images" / f"{int(image_id):03d}.png"
        if not path.is_file():
            raise DataError(f"{path}: listed in {table} but missing")
        common = to_common("zheng1", str(int(cls)), str(path))
        rows.append(dict(path=str(path.relative_to(root)), source="zheng1", lab="zheng1",
                         fine_label=common, label=common))
    return rows


def _bccd_rows(root: Path) -> list:
    base = root / "bccd" / "crops"
    if not base.is_dir():
        raise DataError(f"{base}: bccd crops folder missing under the data root")
    rows = []
    for path in sorted(base.glob("*/*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        common = to_common("bccd", path.parent.name, str(path))
        rows.append(dict(path=str(path.relative_to(root)), source="bccd", lab="bccd",
                         fine_label=common, label=common))
    return rows


_SOURCE_ROWS = {"pbc": _pbc_rows, "zheng1": _zheng1_rows, "bccd": _bccd_rows}


def manifest(source: str, root: Optional[PathLike] = None, hashes: bool = True,
             cache_dir: Optional[PathLike] = None) -> pd.DataFrame:
    """One row per image of a source: path (relative to the root), source, lab,
    fine label, common label, width, height, sha256.

    With ``cache_dir`` the table is stored as CSV keyed by the root and the
    source's file list and modification times, so later calls are instant.
    """
    if source not in _SOURCE_ROWS:
        raise DataError(f"unknown source {source!r}; known: {', '.join(SOURCES)} (use image_folder() for others)")
    root = data_root(root)
    rows = _SOURCE_ROWS[source](root)
    if cache_dir is None:
        return _rows_to_manifest(rows, root, hashes)
    stamp = hashlib.sha256()
    for row in rows:
        st = (root / row["path"]).stat()
        stamp.update(f"{row['path']}|{row['label']}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    key = hashlib.sha256(f"{root}|{hashes}|{stamp.hexdigest()}".encode()).hexdigest()[:16]
    cached = Path(cache_dir) / f"manifest_{source}_{key}.csv"
    if cached.is_file():
        return pd.read_csv(cached, dtype={"fine_label": str, "sha256": str}, keep_default_na=False)
    df = _rows_to_manifest(rows, root, hashes)
    cached.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(cached, index=False)
    return df


def image_folder(folder: PathLike, lab: str, hashes: bool = True) -> pd.DataFrame:
    """Manifest of a generic ``<folder>/<class name>/<image>`` tree from any lab.

    Class folder names are mapped to common names (case-insensitive, plural
    forms accepted); an unknown name raises :class:`DataError`.
    """
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise DataError(f"{folder}: image folder does not exist")
    rows = []
    for path in sorted(folder.glob("*/*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        common = to_common(lab, path.parent.name, str(path))
        rows.append(dict(path=str(path.relative_to(folder)), source=folder.name, lab=lab,
                         fine_label=path.parent.name, label=common))
    if not rows:
        raise DataError(f"{folder}: no images found in <class>/<image> sub-folders")
    return _rows_to_manifest(rows, folder, hashes)


def all_manifests(root: Optional[PathLike] = None, cache_dir: Optional[PathLike] = None) -> pd.DataFrame:
    return pd.concat([manifest(s, root, cache_dir=cache_dir) for s in SOURCES], ignore_index=True)


# --------------------------------------------------------------------------
# Duplicates and integrity
# --------------------------------------------------------------------------


def find_duplicates(df: pd.DataFrame) -> pd.DataFrame:
    """Groups of byte-identical files (same sha256) with more than one member.

    Adds ``group`` (the hash), ``n`` (group size) and ``cross_class`` (the
    copies carry different fine labels).
    """
    dup = df[df.duplicated("sha256", keep=False)].copy()
    if dup.empty:
        return dup.assign(group=[], n=[], cross_class=[])
    dup["group"] = dup["sha256"]
    dup["n"] = dup.groupby("sha256")["path"].transform("size")
    dup["cross_class"] = dup.groupby("sha256")["fine_label"].transform("nunique") > 1
    return dup.sort_values(["group", "path"]).reset_index(drop=True)


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


def verify_checksums(root: Optional[PathLike] = None, sources=SOURCES) -> pd.DataFrame:
    """Check every file listed in ``SHA256SUMS`` for the given sources.

    Returns one row per problem (``path``, ``problem`` in {missing, mismatch});
    an empty table means the copy is intact.
    """
    root = data_root(root)
    sums = root / "SHA256SUMS"
    if not sums.is_file():
        raise DataError(f"{sums}: checksum list missing")
    problems = []
    for line in sums.read_text().splitlines():
        if not line.strip():
            continue
        digest, rel = line.split(maxsplit=1)
        rel = rel.lstrip("*").removeprefix("./")
        if rel.split("/", 1)[0] not in sources:
            continue
        path = root / rel
        if not path.is_file():
            problems.append((rel, "missing"))
        elif sha256_file(path) != digest:
            problems.append((rel, "mismatch"))
    return pd.DataFrame(problems, columns=["path", "problem"])
