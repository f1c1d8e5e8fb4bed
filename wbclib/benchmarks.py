"""Benchmarks as deterministic split tables written to disk.

* **PBC-LT** – the 9 sub-typed WBC classes of pbc; a stratified 20 % held-out
  test, 5-fold CV on the rest, and the training part sub-sampled to an
  exponential long tail with imbalance ratio rho (head chosen by the seed).
* **Shift** – every validation and test image gets a deterministic
  (degradation kind, severity) for the "phase 2" evaluation (:func:`phase2`);
  split rows are pristine (``severity`` 0) until it is switched on.
* **Cross-lab** – the classes the labs share; train on pbc and test on zheng1
  and bccd crops, and leave-one-lab-out over the three labs.

A split table has one row per image with ``path`` (relative to the data root),
``label`` (class name), ``split`` (train / val / test) and, for PBC-LT,
``degradation`` and ``severity`` columns read by the image loader.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold, train_test_split

from . import _io, data
from .runs import code_version, files_fingerprint
from .degrade import assign_degradations

PBC_LT_CLASSES = ("SNE", "BNE", "MY", "MMY", "PMY", "EO", "BA", "LY", "MO")
CROSSLAB_CLASSES = ("neutrophil", "lymphocyte", "monocyte", "eosinophil")
LABS = ("pbc", "zheng1", "bccd")
RHOS = (1, 10, 100)


# --------------------------------------------------------------------------
# PBC-LT
# --------------------------------------------------------------------------


@dataclass
class PbcLtDefinition:
    """The recorded choices behind a PBC-LT split table."""

    seed: int
    test_fraction: float
    n_folds: int
    head_order: List[str]
    counts_available: Dict[str, int] = field(default_factory=dict)


def _check_class_sizes(labels: pd.Series, needed: int, what: str) -> None:
    """A clear error naming every class with fewer than ``needed`` images (the
    stratified splits need them), instead of scikit-learn's message."""
    counts = labels.value_counts()
    small = counts[counts < needed]
    missing = [c for c in PBC_LT_CLASSES if c not in counts.index]
    if len(small) or missing:
        listed = [f"{c} ({n})" for c, n in small.items()] + [f"{c} (0)" for c in missing]
        raise data.DataError(f"{what} needs at least {needed} images per class; too few for: {', '.join(listed)}")


def make_pbc_lt(manifest: pd.DataFrame, seed: int = 0, test_fraction: float = 0.2,
                n_folds: int = 5) -> tuple:
    """Build the PBC-LT table from the (de-duplicated) pbc manifest.

    Returns ``(table, definition)``. The table has ``path``, ``label`` (fine
    class), ``split`` (test or cv), ``fold`` (0..n_folds-1, -1 for test) and
    ``rank`` (a seeded order within each class that decides which training
    images survive the long-tail sub-sampling), plus each image's phase-2
    ``degradation`` kind and ``phase2_severity`` (1-4).
    """
    df = manifest[manifest["fine_label"].isin(PBC_LT_CLASSES)][["path", "fine_label"]]
    df = df.rename(columns={"fine_label": "label"}).sort_values("path").reset_index(drop=True)
    _check_class_sizes(df["label"], needed=n_folds + 2, what="PBC-LT (a held-out test image and one per fold)")
    rest, test = train_test_split(df, test_size=test_fraction, stratify=df["label"], random_state=seed)
    test = test.assign(split="test", fold=-1)
    rest = rest.assign(split="cv", fold=-1)
    folds = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (_, idx) in enumerate(folds.split(rest, rest["label"])):
        rest.iloc[idx, rest.columns.get_loc("fold")] = k
    table = pd.concat([rest, test]).sort_values("path").reset_index(drop=True)
    rng = np.random.default_rng(seed)
    table["rank"] = 0
    for label, idx in table.groupby("label").groups.items():
        table.loc[idx, "rank"] = rng.permutation(len(idx))
    kinds, levels = assign_degradations(table["path"], seed)
    table["degradation"], table["phase2_severity"] = kinds, levels
    head_order = list(np.random.default_rng(seed + 1).permutation(PBC_LT_CLASSES))
    definition = PbcLtDefinition(
        seed=seed, test_fraction=test_fraction, n_folds=n_folds, head_order=head_order,
        counts_available=table[table.split == "cv"]["label"].value_counts().to_dict(),
    )
    return table, definition


def long_tail_counts(head_order: Sequence[str], n_max: int, rho: float) -> Dict[str, int]:
    """Exponential profile n_i = n_max * rho^(-i / (C - 1)), i = 0 for the head."""
    c = len(head_order)
    return {cls: max(1, int(round(n_max * rho ** (-i / (c - 1))))) for i, cls in enumerate(head_order)}


def pbc_lt_split(table: pd.DataFrame, definition: PbcLtDefinition, rho: float, fold: int,
                 n_max: Optional[int] = None, val_per_class: Optional[int] = None,
                 test_per_class: Optional[int] = None) -> pd.DataFrame:
    """Train / val / test rows for one (rho, fold).

    ``n_max`` (head-class size) defaults to the smallest number of training
    images any class has in this fold, so every class can fill its quota; a
    smaller value caps the whole benchmark (the ``cpu`` profile). Validation
    and test keep their natural class mix unless capped per class.
    """
    cv = table[table["split"] == "cv"]
    train_pool = cv[cv["fold"] != fold]
    available = train_pool["label"].value_counts()
    n_max = int(min(available.min(), n_max or available.min()))
    quotas = long_tail_counts(definition.head_order, n_max, rho)
    train = _take_quota(train_pool, quotas)
    val = _cap(cv[cv["fold"] == fold], val_per_class)
    test = _cap(table[table["split"] == "test"], test_per_class)
    out = pd.concat([train.assign(split="train"), val.assign(split="val"), test.assign(split="test")])
    return out.assign(severity=0).reset_index(drop=True)


def phase2(rows: pd.DataFrame) -> pd.DataFrame:
    """The same rows with their assigned phase-2 degradation switched on."""
    return rows.assign(severity=rows["phase2_severity"])


def at_severity(rows: pd.DataFrame, kind: str, severity: int) -> pd.DataFrame:
    """The same rows all degraded by ``kind`` at ``severity`` (0 = pristine)."""
    return rows.assign(degradation=kind, severity=severity)


def _take_quota(pool: pd.DataFrame, quotas: Dict[str, int]) -> pd.DataFrame:
    parts = [g.sort_values("rank").head(quotas[label]) for label, g in pool.groupby("label")]
    return pd.concat(parts)


def _cap(df: pd.DataFrame, per_class: Optional[int]) -> pd.DataFrame:
    if per_class is None:
        return df
    return pd.concat([g.sort_values("rank").head(per_class) for _, g in df.groupby("label")])


# --------------------------------------------------------------------------
# Cross-lab
# --------------------------------------------------------------------------


def make_crosslab(manifests: pd.DataFrame, seed: int = 0, val_fraction: float = 0.2,
                  classes: Sequence[str] = CROSSLAB_CLASSES) -> pd.DataFrame:
    """One table over all labs: ``path``, ``lab``, ``label`` (common class),
    ``part`` (train or val within its lab, stratified), ``rank`` (seeded order
    within lab and class, for per-class caps)."""
    df = manifests[manifests["label"].isin(classes)][["path", "lab", "label"]]
    df = df.sort_values("path").reset_index(drop=True)
    df["part"] = "train"
    rng = np.random.default_rng(seed)
    df["rank"] = 0
    for (lab, label), idx in df.groupby(["lab", "label"]).groups.items():
        order = rng.permutation(len(idx))
        df.loc[idx, "rank"] = order
        n_val = int(round(val_fraction * len(idx)))
        df.loc[idx[order < n_val], "part"] = "val"
    return df


#: (name, source labs, target labs): train on pbc, and leave-one-lab-out.
CROSSLAB_SETTINGS = [
    ("pbc→others", ["pbc"], ["zheng1", "bccd"]),
    ("LOLO:pbc", ["zheng1", "bccd"], ["pbc"]),
    ("LOLO:zheng1", ["pbc", "bccd"], ["zheng1"]),
    ("LOLO:bccd", ["pbc", "zheng1"], ["bccd"]),
]


def setting_key(name: str) -> str:
    """A setting's configuration key (``pbc_to_others``, ``LOLO_zheng1``) from its name."""
    return name.replace("→", "_to_").replace(":", "_")


def crosslab_split(table: pd.DataFrame, target_labs: Sequence[str], source_labs: Optional[Sequence[str]] = None,
                   train_per_class: Optional[int] = None, val_per_class: Optional[int] = None) -> pd.DataFrame:
    """Train and validate on the source labs (in-domain validation), test on
    every image of each target lab. ``split`` is train / val / test."""
    source_labs = [l for l in LABS if l not in target_labs] if source_labs is None else list(source_labs)
    src = table[table["lab"].isin(source_labs)]
    train = _cap_lab(src[src["part"] == "train"], train_per_class)
    val = _cap_lab(src[src["part"] == "val"], val_per_class)
    test = table[table["lab"].isin(target_labs)]
    out = pd.concat([train.assign(split="train"), val.assign(split="val"), test.assign(split="test")])
    return out.reset_index(drop=True)


def _cap_lab(df: pd.DataFrame, per_class: Optional[int]) -> pd.DataFrame:
    if per_class is None:
        return df
    return pd.concat([g.sort_values("rank").head(per_class) for _, g in df.groupby(["lab", "label"])])


# --------------------------------------------------------------------------
# Writing and reading split files
# --------------------------------------------------------------------------


def _benchmark_paths(out_dir: Path, seed: int) -> Dict[str, Path]:
    return {
        "pbc_lt": out_dir / f"pbc_lt_seed{seed}.csv",
        "pbc_lt_definition": out_dir / f"pbc_lt_seed{seed}.json",
        "crosslab": out_dir / f"crosslab_seed{seed}.csv",
    }


def _stamp_path(out_dir: Path, seed: int) -> Path:
    return Path(out_dir) / f"benchmarks_seed{seed}.stamp.json"


#: The modules whose code decides the benchmark tables.
BENCHMARK_MODULES = ("benchmarks.py", "data.py", "degrade.py")


def data_fingerprint(root: Path) -> dict:
    """The data root's identity: its resolved path and every file's path, size
    and modification time under the source folders (a second or two of
    ``stat`` calls, no reading)."""
    root = Path(root)
    paths = [str(p.relative_to(root)) for source in data.SOURCES if (root / source).is_dir()
             for p in (root / source).rglob("*") if p.is_file()]
    return dict(root=str(root.resolve()), files=len(paths), fingerprint=files_fingerprint(root, paths))


def _expected_stamp(root: Path, seed: int) -> dict:
    return dict(seed=seed, data=data_fingerprint(root), code=code_version(BENCHMARK_MODULES))


def write_benchmarks(out_dir: Path, root=None, seed: int = 0, cache_dir=None) -> Dict[str, Path]:
    """Build every benchmark table from the data root and write it to ``out_dir``.

    Files: ``pbc_lt_seed{seed}.csv`` + ``.json`` (definition) and
    ``crosslab_seed{seed}.csv``, each written atomically, then a stamp
    (``benchmarks_seed{seed}.stamp.json``, last) recording the data root's
    fingerprint, the code version and each file's sha256. Re-running with the
    same inputs rewrites identical files.
    """
    out_dir = Path(out_dir)
    root = data.data_root(root)
    manifests = data.drop_duplicates(data.all_manifests(root, cache_dir=cache_dir))
    table, definition = make_pbc_lt(manifests[manifests["source"] == "pbc"], seed=seed)
    paths = _benchmark_paths(out_dir, seed)
    _stamp_path(out_dir, seed).unlink(missing_ok=True)  # the files below are about to change
    _io.write_csv(paths["pbc_lt"], table)
    _io.write_json(paths["pbc_lt_definition"], asdict(definition))
    _io.write_csv(paths["crosslab"], make_crosslab(manifests, seed=seed))
    stamp = dict(_expected_stamp(root, seed), files={k: data.sha256_file(p) for k, p in paths.items()})
    _io.write_json(_stamp_path(out_dir, seed), stamp)
    return paths


def benchmarks_current(out_dir: Path, root=None, seed: int = 0) -> bool:
    """Whether ``out_dir`` holds complete benchmark files built from this data
    root (same files, sizes, times), by this code, and unaltered since."""
    out_dir = Path(out_dir)
    stamp_path = _stamp_path(out_dir, seed)
    if not stamp_path.is_file():
        return False
    try:
        stamp = _io.read_json(stamp_path)
    except _io.CorruptFileError:
        return False
    expected = json.loads(json.dumps(_expected_stamp(data.data_root(root), seed)))
    if any(stamp.get(k) != v for k, v in expected.items()):
        return False
    paths = _benchmark_paths(out_dir, seed)
    return all(p.is_file() and stamp.get("files", {}).get(k) == data.sha256_file(p) for k, p in paths.items())


def ensure_benchmarks(out_dir: Path, root=None, seed: int = 0, cache_dir=None) -> Path:
    """Write the benchmark files unless current ones are there (:func:`benchmarks_current`):
    files from another data root, older code, a failed write or an edit are rebuilt. Returns ``out_dir``."""
    out_dir = Path(out_dir)
    if not benchmarks_current(out_dir, root, seed):
        write_benchmarks(out_dir, root=root, seed=seed, cache_dir=cache_dir)
    return out_dir


def read_pbc_lt(out_dir: Path, seed: int = 0) -> tuple:
    out_dir = Path(out_dir)
    table = _io.read_csv(out_dir / f"pbc_lt_seed{seed}.csv")
    definition = PbcLtDefinition(**_io.read_json(out_dir / f"pbc_lt_seed{seed}.json"))
    return table, definition


def read_crosslab(out_dir: Path, seed: int = 0) -> pd.DataFrame:
    return _io.read_csv(Path(out_dir) / f"crosslab_seed{seed}.csv")
