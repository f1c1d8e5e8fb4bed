"""Atomic writes and checked reads for every file the library produces.

Every result and cache file is written to a temporary file in the same
folder and renamed into place, so a crash or a full disk leaves either the
old file or none, never a partial one. Every read of such a file turns a
corrupt or truncated file into a :class:`CorruptFileError` that names it and
says how to recover.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np
import pandas as pd

PathLike = Union[str, Path]


class CorruptFileError(RuntimeError):
    """A file the library wrote earlier cannot be read back; the message names it."""


class WriteError(OSError):
    """A file could not be written (disk full, read-only folder ...); the message names it."""


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` when the block succeeds.

    On any error the temporary file is removed and an :class:`OSError` is
    re-raised as :class:`WriteError` naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise WriteError(exc.errno, f"{path}: cannot write ({exc.strerror or exc})") from None
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, WriteError):
            raise WriteError(exc.errno, f"{path}: cannot write ({exc.strerror or exc})") from None
        if isinstance(exc, RuntimeError) and "inline_container" in str(exc):
            # torch.save reports a full disk as an opaque zip-writer error.
            raise WriteError(28, f"{path}: cannot write (disk full? {exc})") from None
        raise


def write_text(path: PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def write_csv(path: PathLike, frame: pd.DataFrame, **kwargs) -> Path:
    kwargs.setdefault("index", False)
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, **kwargs)
    return Path(path)


def save_npy(path: PathLike, array: np.ndarray) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array)
    return Path(path)


def torch_save(obj: Any, path: PathLike) -> Path:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def _recover_hint(path: Path) -> str:
    return f"delete {path} (or its folder) to recompute it"


def _checked_read(path: PathLike, reader: Callable[[Path], Any], what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {what}")
    try:
        return reader(path)
    except (ValueError, EOFError, OSError, RuntimeError, KeyError, IndexError, TypeError, UnicodeDecodeError,
            pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise CorruptFileError(f"{path}: corrupt or truncated {what} ({type(exc).__name__}: {exc}); "
                               f"{_recover_hint(path)}") from None
    except Exception as exc:  # unpickling errors and the like: still name the file
        if type(exc).__name__ in ("UnpicklingError",):
            raise CorruptFileError(f"{path}: corrupt {what} ({exc}); {_recover_hint(path)}") from None
        raise


def read_json(path: PathLike) -> Any:
    return _checked_read(path, lambda p: json.loads(p.read_text()), "JSON file")


def read_csv(path: PathLike, **kwargs) -> pd.DataFrame:
    return _checked_read(path, lambda p: pd.read_csv(p, **kwargs), "CSV file")


def load_npy(path: PathLike, shape: Optional[tuple] = None, dtype=None, finite: bool = True) -> np.ndarray:
    """Load an array and check what a cache hit must satisfy: its shape (``None``
    entries match anything), its dtype and that every value is finite."""
    array = _checked_read(path, lambda p: np.load(p, allow_pickle=False), "array file")
    if shape is not None and (array.ndim != len(shape)
                              or any(s is not None and s != a for s, a in zip(shape, array.shape))):
        raise CorruptFileError(f"{path}: holds an array of shape {array.shape}, expected {shape}; "
                               f"{_recover_hint(Path(path))}")
    if dtype is not None and array.dtype != np.dtype(dtype):
        raise CorruptFileError(f"{path}: holds {array.dtype} values, expected {np.dtype(dtype)}; "
                               f"{_recover_hint(Path(path))}")
    if finite and array.dtype.kind == "f" and not np.isfinite(array).all():
        raise CorruptFileError(f"{path}: holds {int((~np.isfinite(array)).sum())} non-finite values; "
                               f"{_recover_hint(Path(path))}")
    return array


def torch_load(path: PathLike, map_location="cpu", weights_only: bool = True) -> Any:
    import torch

    return _checked_read(path, lambda p: torch.load(p, map_location=map_location, weights_only=weights_only),
                         "checkpoint")


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
