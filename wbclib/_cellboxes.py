"""The loader's table of located cell boxes, cached (machinery behind
:class:`models.ImageTable`'s ``cell_crop`` column; the algorithms are in
:mod:`cellcrop`).

Each row's box is located on the image as the loader produces it before the
crop: the native image, degraded as the row says (kind, severity, the seeded
per-image generator of :func:`degrade.image_rng`). Boxes are cached with
:mod:`cache` in folder ``cell_boxes``:

* pristine rows (no degradation, or severity 0) per set of paths, keyed by
  the data root, each file's size and modification time,
  :data:`cellcrop.LOCATE_VERSION` and the code (the key these entries had
  before degraded rows were located on their own pixels);
* degraded rows per set of (path, degradation, severity), keyed as well by
  the degrade seed and the code of :mod:`degrade`.

An image already located in another cached set of the same kind (same root,
code and settings) is not located again, and images located in this process
are remembered (:data:`_MEMO`), so loaders built without a cache folder
locate each image once per process. A failed localisation is stored as it
is and filled on reading by :func:`cellcrop.fallback_box`, a fixed function
of the image.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import pandas as pd

from . import _io, cache
from ._parallel import chunks, map_in_processes
from .cellcrop import LOCATE_VERSION, WORK_SIDE, fallback_box, lab_of, locate_cell
from .data import load_image
from .degrade import degrade, image_rng
from .runs import files_fingerprint

#: Columns of a cached table of pristine boxes.
BOX_COLUMNS = ["path", "width", "height", "cx", "cy", "side", "found", "size", "mtime_ns"]
#: Columns of a cached table of degraded boxes.
DEGRADED_COLUMNS = ["path", "degradation", "severity"] + BOX_COLUMNS[1:]
#: Columns of :func:`cell_boxes`' result.
COLUMNS = ["path", "degradation", "severity", "width", "height", "cx", "cy", "side", "found"]
#: Boxes located in this process, by (root, path, file size, mtime[, kind, severity, seed]).
_MEMO: Dict[tuple, dict] = {}


def row_key(kind, level) -> Tuple[str, int]:
    """``(degradation, severity)`` of a row as the loader applies it: ``("none", 0)``
    for a pristine row (no kind, kind ``"none"`` or severity 0)."""
    if isinstance(kind, str) and kind != "none" and int(level) > 0:
        return kind, int(level)
    return "none", 0


def cell_boxes(root: Path, paths: Iterable[str], kinds: Optional[Sequence] = None,
               levels: Optional[Sequence] = None, degrade_seed: int = 0,
               cache_dir: Optional[Path] = None) -> pd.DataFrame:
    """One box per distinct (path, degradation, severity) of the rows
    (``kinds``/``levels`` aligned with ``paths``; absent: pristine), located on
    that row's (degraded) image; columns :data:`COLUMNS`, pristine rows with
    ``degradation`` ``"none"`` and ``severity`` 0. Boxes whose cell was not
    found (``found`` False) hold :func:`cellcrop.fallback_box`."""
    root = Path(root)
    paths = [str(p) for p in paths]
    n = len(paths)
    kinds = list(kinds) if kinds is not None else [None] * n
    levels = list(levels) if levels is not None else [0] * n
    keys = sorted({(p,) + row_key(k, lv) for p, k, lv in zip(paths, kinds, levels)})
    pristine = [p for p, kind, _ in keys if kind == "none"]
    degraded = [k for k in keys if k[1] != "none"]
    parts = []
    if pristine:
        parts.append(_pristine_boxes(root, pristine, cache_dir).assign(degradation="none", severity=0))
    if degraded:
        parts.append(_degraded_boxes(root, degraded, int(degrade_seed), cache_dir))
    if not parts:
        return pd.DataFrame(columns=COLUMNS)
    table = pd.concat(parts, ignore_index=True)
    table["found"] = table["found"].astype(str).str.lower().isin(["true", "1"])
    table["severity"] = table["severity"].astype(int)
    return _fill_fallbacks(table[COLUMNS])


def _pristine_boxes(root: Path, paths: List[str], cache_dir: Optional[Path]) -> pd.DataFrame:
    items = [(p, "none", 0) for p in paths]
    if cache_dir is None:
        return _locate(root, items, None)
    listing = hashlib.sha256("\n".join(paths).encode()).hexdigest()[:20]
    entry = cache.entry(cache_dir, "cell_boxes", dict(version=LOCATE_VERSION, work_side=WORK_SIDE),
                        dict(root=str(root.resolve()), listing=listing, files=files_fingerprint(root, paths)),
                        modules=("cellcrop.py", "_cellboxes.py", "data.py"), suffix=".csv")
    return cache.frame(entry, lambda: _locate(root, items, None, _cached_boxes(entry))[BOX_COLUMNS],
                       columns=BOX_COLUMNS, dtype={"path": str}, keep_default_na=False)


def _degraded_boxes(root: Path, items: List[tuple], seed: int, cache_dir: Optional[Path]) -> pd.DataFrame:
    if cache_dir is None:
        return _locate(root, items, seed)
    lines = [f"{p}|{kind}|{level}" for p, kind, level in items]
    listing = hashlib.sha256("\n".join(lines).encode()).hexdigest()[:20]
    files = files_fingerprint(root, sorted({p for p, _, _ in items}))
    entry = cache.entry(cache_dir, "cell_boxes",
                        dict(version=LOCATE_VERSION, work_side=WORK_SIDE, degrade_seed=seed),
                        dict(root=str(root.resolve()), listing=listing, files=files),
                        modules=("cellcrop.py", "_cellboxes.py", "data.py", "degrade.py"), suffix=".csv",
                        label="degraded")
    return cache.frame(entry, lambda: _locate(root, items, seed, _cached_boxes(entry))[DEGRADED_COLUMNS],
                       columns=DEGRADED_COLUMNS, dtype={"path": str, "degradation": str}, keep_default_na=False)


def _locate(root: Path, items: List[tuple], seed: Optional[int],
            known: Optional[Dict[tuple, dict]] = None) -> pd.DataFrame:
    """Boxes of ``items`` ((path, kind, severity); ``seed`` None: pristine), from
    :data:`_MEMO` and ``known`` where there, else located on the loaded image
    (chunks of images side by side: a box is a function of its image alone)."""
    if known:
        _MEMO.update(known)
    keys = []
    for rel, kind, level in items:
        try:
            st = (root / rel).stat()
            key = (str(root.resolve()), rel, st.st_size, st.st_mtime_ns)
            if seed is not None:
                key += (kind, int(level), seed)
        except OSError:
            key = None
        keys.append(key)
    todo = [i for i, key in enumerate(keys) if key is None or key not in _MEMO]
    jobs = [(root, [items[i] for i in piece], seed) for piece in chunks(todo, _LOCATE_CHUNK)]
    located = dict(zip(todo, (box for part in map_in_processes(_locate_chunk, jobs, desc="locate cells")
                              for box in part)))
    rows = []
    for i, ((rel, kind, level), key) in enumerate(zip(items, keys)):
        if i in located:
            row = dict(located[i], size=key[2] if key else -1, mtime_ns=key[3] if key else -1)
            if key is None:
                rows.append(row)
                continue
            _MEMO[key] = row
        rows.append(dict(_MEMO[key], degradation=kind, severity=int(level)))
    return pd.DataFrame(rows, columns=DEGRADED_COLUMNS)


#: Images per job when boxes are located side by side.
_LOCATE_CHUNK = 64


def _locate_chunk(root: Path, items: List[tuple], seed: Optional[int]) -> List[dict]:
    out = []
    for rel, kind, level in items:
        image = load_image(root / rel)
        if seed is not None:
            image = degrade(image, kind, int(level), image_rng(rel, seed))
        box = locate_cell(image)
        out.append(dict(path=rel, degradation=kind, severity=int(level), width=image.shape[1], height=image.shape[0],
                        cx=round(box.cx, 2), cy=round(box.cy, 2), side=round(box.side, 2), found=bool(box.found)))
    return out


def _cached_boxes(entry) -> Dict[tuple, dict]:
    """Boxes of every other ``cell_boxes`` entry beside ``entry`` written by the
    same code and settings under the same root, by their :data:`_MEMO` key."""
    known: Dict[tuple, dict] = {}
    root = entry.meta["inputs"]["root"]
    seed = entry.meta["settings"].get("degrade_seed")
    columns = BOX_COLUMNS if seed is None else DEGRADED_COLUMNS
    for sidecar in sorted(entry.path.parent.glob("*.csv.json")):
        try:
            meta = _io.read_json(sidecar)
            if (meta.get("code"), meta.get("settings"), (meta.get("inputs") or {}).get("root")) != \
                    (entry.meta["code"], entry.meta["settings"], root):
                continue
            table = pd.read_csv(sidecar.with_name(sidecar.name[: -len(".json")]), dtype={"path": str},
                                keep_default_na=False)
        except (OSError, ValueError, _io.CorruptFileError):
            continue
        if not set(columns) <= set(table.columns):
            continue
        for row in table[columns].to_dict("records"):
            row["found"] = str(row["found"]).lower() in ("true", "1")
            key = (root, row["path"], int(row["size"]), int(row["mtime_ns"]))
            if seed is not None:
                key += (str(row["degradation"]), int(row["severity"]), seed)
            known[key] = row
    return known


def _fill_fallbacks(table: pd.DataFrame) -> pd.DataFrame:
    """Rows whose cell was not found get :func:`cellcrop.fallback_box` (image
    centre, the lab's fixed share): the same whatever else is in the table."""
    table = table.reset_index(drop=True).copy()
    lost = ~table["found"].astype(bool)
    for i in table.index[lost]:
        box = fallback_box(int(table.at[i, "width"]), int(table.at[i, "height"]), lab_of(table.at[i, "path"]))
        table.loc[i, ["cx", "cy", "side"]] = [box.cx, box.cy, box.side]
    return table
