"""One run-folder mechanism for every protocol, and the index that finds runs.

A run folder is named by its configuration keys and a short hash of its
*identity*: the protocol, its full configuration, a fingerprint of its inputs
(the table rows it reads and the files behind them) and the library's code
version. Change any of these and the run gets a new folder and is computed
afresh; nothing computed earlier is overwritten. Inside a folder:

* ``config.json`` – the identity (checked on every open: a folder whose
  stored identity differs from the one its name promises raises
  :class:`RunMismatch`) plus provenance (times, wbclib/torch versions);
* the protocol's files, each written atomically (:mod:`wbclib._io`);
* ``metrics.json`` then ``done`` – written last; a folder without ``done`` is
  unfinished and is resumed (checkpoints) or recomputed.

Notebooks never build result paths: protocols return the runs they made, and
:func:`find` queries the folders by protocol and configuration keys
(DomainBed style: records, not paths).
"""
from __future__ import annotations

import ast
import hashlib
import json
import platform
import re
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

import pandas as pd

from . import _io

#: Modules that only present or drive results; editing them does not change any number.
PRESENTATION_MODULES = {"__init__.py", "__main__.py", "cli.py", "plots.py", "runbook.py", "fetch.py"}
#: Columns of a table row that decide what the image loader produces for it.
ROW_COLUMNS = ("path", "label", "lab", "split", "degradation", "severity", "view", "stain", "stain_reference",
               "crop", "cell_crop", "domain")


class RunMismatch(RuntimeError):
    """A run folder holds a run of another identity (configuration, inputs or code)."""


def digest(obj: Any, length: int = 16) -> str:
    """Stable short hash of a JSON-able object (keys sorted)."""
    payload = json.dumps(obj, sort_keys=True, default=_io._json_default)
    return hashlib.sha256(payload.encode()).hexdigest()[:length]


def _code_text(source: bytes) -> bytes:
    """What of a module's source can change a number: its syntax tree without
    docstrings (comments, blank lines and line numbers are not in the tree),
    so editing documentation does not invalidate hours of finished runs.
    Source that does not parse is taken byte for byte."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return source
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return ast.dump(tree, annotate_fields=False, include_attributes=False).encode()


@lru_cache(maxsize=None)
def _source_hash(package_dir: str, exclude: frozenset) -> str:
    h = hashlib.sha256()
    for path in sorted(Path(package_dir).rglob("*.py")):
        if path.name in exclude:
            continue
        h.update(str(path.relative_to(package_dir)).encode())
        h.update(_code_text(path.read_bytes()))
    return h.hexdigest()[:12]


def code_version(modules: Optional[Sequence[str]] = None) -> str:
    """Hash of the library's source: every module that can change a number, or
    only ``modules`` (file names such as ``"models.py"``) for caches that
    depend on a few of them."""
    package = Path(__file__).resolve().parent
    if modules is None:
        return _source_hash(str(package), frozenset(PRESENTATION_MODULES))
    everything = {p.name for p in package.rglob("*.py")}
    return _source_hash(str(package), frozenset(everything - set(modules)))


def table_fingerprint(table: pd.DataFrame, root: Optional[Path] = None, files: bool = True) -> dict:
    """What a run reads from ``table``: a hash of the rows' identifying columns
    and, with ``root``, the resolved data root and each distinct file's size
    and modification time (so edited, replaced or re-rooted images change it)."""
    cols = [c for c in ROW_COLUMNS if c in table]
    rows = table[cols].astype(str).agg("|".join, axis=1) if len(table) else pd.Series([], dtype=str)
    out = dict(rows=len(table), columns=cols,
               content=hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16])
    if root is not None:
        out["root"] = str(Path(root).resolve())
        if files and "path" in table:
            out["files"] = files_fingerprint(root, table["path"].unique())
    return out


def inputs_fingerprint(tables: Dict[str, pd.DataFrame], root: Optional[Path] = None) -> dict:
    """The inputs of a run reading several tables (split, evaluation sets ...):
    each table's rows and, with ``root``, the data root and every file's size
    and modification time (once, over the union of the tables' paths)."""
    out = dict(tables={name: table_fingerprint(t) for name, t in tables.items()})
    if root is not None:
        paths = set()
        for t in tables.values():
            if "path" in t:
                paths.update(t["path"].astype(str))
            if "stain_reference" in t:
                paths.update(r for r in t["stain_reference"].dropna().astype(str) if r)
        out.update(root=str(Path(root).resolve()), files=files_fingerprint(Path(root), paths))
    return out


def files_fingerprint(root: Path, paths: Iterable[str]) -> str:
    """Hash of (path, size, mtime) of every file; a missing file counts as such."""
    h = hashlib.sha256()
    root = Path(root)
    for rel in sorted(map(str, paths)):
        try:
            st = (root / rel).stat()
            h.update(f"{rel}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{rel}|missing\n".encode())
    return h.hexdigest()[:16]


def _slug(value: Any) -> str:
    text = str(value)
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-") or "x"


@dataclass
class Run:
    """A run folder: open it, write into it, finish it."""

    dir: Path
    identity: dict

    @property
    def id(self) -> str:
        return self.dir.name

    @property
    def config(self) -> dict:
        return self.identity["config"]

    def path(self, name: str) -> Path:
        return self.dir / name

    @property
    def done(self) -> bool:
        return (self.dir / "done").is_file()

    def open(self) -> "Run":
        """Create the folder and its ``config.json``, or check the stored one."""
        config_path = self.dir / "config.json"
        if config_path.is_file():
            stored = _io.read_json(config_path)
            if stored.get("identity") != json.loads(json.dumps(self.identity, default=_io._json_default)):
                differ = _differences(stored.get("identity", {}), self.identity)
                raise RunMismatch(f"{self.dir}: holds a run of another identity (differs in: {', '.join(differ)}); "
                                  "delete the folder or use another results folder")
        else:
            _io.write_json(config_path, dict(identity=self.identity, provenance=_provenance()))
        return self

    def metrics(self) -> Any:
        """The finished run's ``metrics.json`` (``None`` while unfinished)."""
        return _io.read_json(self.dir / "metrics.json") if self.done else None

    def finish(self, metrics: Any) -> Any:
        """Write ``metrics.json`` then the ``done`` marker (last, atomically)."""
        _io.write_json(self.dir / "metrics.json", metrics)
        _io.write_json(self.dir / "done", dict(finished=time.strftime("%Y-%m-%dT%H:%M:%S%z")))
        return metrics

    def write_csv(self, name: str, frame: pd.DataFrame, **kwargs) -> Path:
        return _io.write_csv(self.dir / name, frame, **kwargs)

    def write_json(self, name: str, obj: Any) -> Path:
        return _io.write_json(self.dir / name, obj)

    def read_csv(self, name: str, **kwargs) -> pd.DataFrame:
        return _io.read_csv(self.dir / name, **kwargs)

    def read_json(self, name: str) -> Any:
        return _io.read_json(self.dir / name)


def run(results_dir: Path, protocol: str, config: dict, inputs: Any = None, keys: Sequence[str] = (),
        code: Optional[str] = None) -> Run:
    """The run of ``protocol`` with ``config`` on ``inputs``, opened.

    The folder is ``<results_dir>/<protocol>/<k1>-<v1>_<k2>-<v2>_<hash>``, the
    ``keys`` taken from ``config`` (readable), the hash over the identity.
    """
    identity = dict(protocol=protocol, config=config, inputs=inputs, code=code or code_version())
    identity = json.loads(json.dumps(identity, default=_io._json_default))
    missing = [k for k in keys if k not in config]
    if missing:
        raise KeyError(f"run keys {missing} are not in the configuration of {protocol!r}")
    name = "_".join(f"{k}-{_slug(config[k])}" for k in keys)
    name = f"{name}_{digest(identity, 10)}" if name else digest(identity, 10)
    return Run(Path(results_dir) / protocol / name, identity).open()


def find(results_dir: Path, protocol: Optional[str] = None, done: bool = True, current: bool = True,
         **keys) -> pd.DataFrame:
    """Runs under ``results_dir`` as a table (one row per run: ``protocol``,
    ``run_dir``, ``done`` and every configuration key), filtered by protocol
    (a prefix such as ``"pbc_lt"`` matches ``pbc_lt/heads``), by configuration
    ``keys`` (``rho=100``), by finished state and, with ``current``, by the
    present code version."""
    rows = []
    code = code_version()
    for config_path in sorted(Path(results_dir).rglob("config.json")):
        try:
            identity = json.loads(config_path.read_text()).get("identity")
        except (OSError, ValueError):
            continue
        if not isinstance(identity, dict) or "protocol" not in identity:
            continue
        proto = identity["protocol"]
        if protocol is not None and not (proto == protocol or proto.startswith(protocol.rstrip("/") + "/")):
            continue
        if current and identity.get("code") != code:
            continue
        is_done = (config_path.parent / "done").is_file()
        if done and not is_done:
            continue
        config = identity.get("config") or {}
        if any(config.get(k) != _plain(v) for k, v in keys.items()):
            continue
        rows.append(dict(protocol=proto, run_dir=config_path.parent, done=is_done, **_flat(config)))
    return pd.DataFrame(rows)


def find_one(results_dir: Path, protocol: str, **keys) -> Run:
    """The single finished current run matching ``keys``; a clear error when there is none or several."""
    found = find(results_dir, protocol, **keys)
    if len(found) != 1:
        raise LookupError(f"{len(found)} finished runs of {protocol!r} with {keys} under {results_dir} "
                          "(expected exactly one; run the protocol first, or give more keys)")
    run_dir = Path(found["run_dir"].iloc[0])
    return Run(run_dir, _io.read_json(run_dir / "config.json")["identity"])


def _plain(value):
    return json.loads(json.dumps(value, default=_io._json_default))


def _flat(config: dict) -> dict:
    return {k: v for k, v in config.items() if not isinstance(v, (dict, list))}


def _differences(a: dict, b: dict, prefix: str = "") -> List[str]:
    out = []
    b = json.loads(json.dumps(b, default=_io._json_default))
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _differences(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out


def _provenance() -> dict:
    import sys

    info = dict(created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), python=sys.version.split()[0],
                platform=platform.platform())
    for name in ("torch", "timm", "numpy"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            pass
    return info


def compare(results_a: Path, results_b: Path) -> pd.DataFrame:
    """Finished runs present under both folders (same protocol and run id) whose
    ``metrics.json`` differ, and runs present under only one: one row per
    difference (``run``, ``problem``). Empty when every number agrees to the
    last digit: the check that a commit reproduces itself."""
    def finished(base: Path) -> Dict[str, Path]:
        return {str(p.parent.relative_to(base)): p.parent for p in Path(base).rglob("done")}

    a, b = finished(Path(results_a)), finished(Path(results_b))
    rows = [dict(run=r, problem=f"only under {results_a if r in a else results_b}") for r in sorted(set(a) ^ set(b))]
    for r in sorted(set(a) & set(b)):
        if (a[r] / "metrics.json").read_bytes() != (b[r] / "metrics.json").read_bytes():
            rows.append(dict(run=r, problem="metrics differ"))
    return pd.DataFrame(rows, columns=["run", "problem"])
