"""One small content-keyed cache for every expensive derived file.

An entry's key hashes everything that changes its content: the kind of
entry, its settings, a fingerprint of its inputs (data root, rows, file sizes
and modification times: :func:`runs.table_fingerprint`) and the version of
the code that computes it (:func:`runs.code_version` of the modules named).
Entries are written atomically with a ``.json`` sidecar that records the key's
contents, and are validated on load (shape, dtype, finite values); a corrupt
entry raises :class:`_io.CorruptFileError` naming the file.

``wbc cache info`` lists the entries, ``wbc cache clear`` removes them.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pandas as pd

from . import _io
from .runs import code_version, digest


@dataclass(frozen=True)
class Entry:
    """One cache entry: ``path`` (the data file) and ``meta`` (what its key hashes)."""

    path: Path
    meta: dict

    @property
    def sidecar(self) -> Path:
        return self.path.with_name(self.path.name + ".json")

    def exists(self) -> bool:
        return self.path.is_file()


def entry(cache_dir: Path, kind: str, settings: dict, inputs: Any = None, modules: Optional[Sequence[str]] = None,
          suffix: str = ".npy", label: str = "") -> Entry:
    """The entry of ``kind`` for ``settings`` and ``inputs``, computed by ``modules``
    (file names in ``wbclib``; ``None``: the whole library)."""
    meta = dict(kind=kind, settings=settings, inputs=inputs, code=code_version(modules))
    meta = json.loads(json.dumps(meta, sort_keys=True, default=_io._json_default))
    name = f"{kind}_{label}_{digest(meta, 20)}" if label else f"{kind}_{digest(meta, 20)}"
    return Entry(Path(cache_dir) / kind / f"{name}{suffix}", meta)


def _write_sidecar(e: Entry, **extra) -> None:
    _io.write_json(e.sidecar, dict(e.meta, written=time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra))


def array(e: Entry, compute: Callable[[], np.ndarray], shape: Optional[tuple] = None, dtype=None) -> np.ndarray:
    """The cached array of ``e`` (validated), else ``compute()`` saved there.

    Either way the array is C-contiguous, as ``np.load`` returns it: a
    computed array keeps its producer's memory layout otherwise (e.g. the
    channels-last strides of a network's feature maps), and a convolution
    that reads it rounds differently, so a run's digits would depend on
    whether the cache was warm."""
    if e.exists():
        return _io.load_npy(e.path, shape=shape, dtype=dtype)
    value = np.ascontiguousarray(compute())
    if shape is not None or dtype is not None:
        _check_array(value, shape, dtype, f"computed {e.meta['kind']}")
    _io.save_npy(e.path, value)
    _write_sidecar(e, shape=list(value.shape), dtype=str(value.dtype))
    return value


def frame(e: Entry, compute: Callable[[], pd.DataFrame], columns: Sequence[str] = (), **read_kwargs) -> pd.DataFrame:
    """The cached table of ``e`` (must hold ``columns``), else ``compute()`` saved there."""
    if e.exists():
        table = _io.read_csv(e.path, **read_kwargs)
        missing = [c for c in columns if c not in table]
        if missing:
            raise _io.CorruptFileError(f"{e.path}: cached table lacks columns {missing}; delete it to recompute")
        if e.sidecar.is_file():
            rows = _io.read_json(e.sidecar).get("rows")
            if rows is not None and rows != len(table):
                raise _io.CorruptFileError(f"{e.path}: cached table has {len(table)} rows, {rows} were written; "
                                           "delete it to recompute")
        return table
    table = compute()
    _io.write_csv(e.path, table)
    _write_sidecar(e, rows=len(table))
    # What a hit returns (dtypes, float digits as parsed back), so no result depends on a warm cache.
    return _io.read_csv(e.path, **read_kwargs)


def record(e: Entry, compute: Callable[[], Any]) -> Any:
    """The cached JSON record of ``e``, else ``compute()`` saved there."""
    if e.exists():
        return _io.read_json(e.path)
    value = compute()
    _io.write_json(e.path, value)
    _write_sidecar(e)
    return _io.read_json(e.path)  # what a hit returns (lists for tuples, string keys)


def _check_array(value: np.ndarray, shape, dtype, what: str) -> None:
    if shape is not None and (value.ndim != len(shape)
                              or any(s is not None and s != a for s, a in zip(shape, value.shape))):
        raise ValueError(f"{what}: shape {value.shape}, expected {shape}")
    if dtype is not None and value.dtype != np.dtype(dtype):
        raise ValueError(f"{what}: dtype {value.dtype}, expected {np.dtype(dtype)}")


def info(cache_dir: Path) -> pd.DataFrame:
    """One row per cache entry: kind, file, size, whether its code version is current."""
    rows = []
    for sidecar in sorted(Path(cache_dir).rglob("*.json")):
        data_file = sidecar.with_name(sidecar.name[: -len(".json")])
        if not data_file.is_file():
            continue
        try:
            meta = _io.read_json(sidecar)
        except _io.CorruptFileError:
            meta = {}
        kind = meta.get("kind", sidecar.parent.name)
        rows.append(dict(kind=kind, file=str(data_file.relative_to(cache_dir)),
                         size_mb=round(data_file.stat().st_size / 2**20, 3), written=meta.get("written", ""),
                         code=meta.get("code", "")))
    table = pd.DataFrame(rows, columns=["kind", "file", "size_mb", "written", "code"])
    return table


def clear(cache_dir: Path, kind: Optional[str] = None) -> int:
    """Remove every entry (or every entry of ``kind``); returns the number of files removed."""
    base = Path(cache_dir) / kind if kind else Path(cache_dir)
    if not base.is_dir():
        return 0
    removed = 0
    for path in sorted(base.rglob("*"), reverse=True):
        if path.is_file():
            path.unlink()
            removed += 1
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    return removed
