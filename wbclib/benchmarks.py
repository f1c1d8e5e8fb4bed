"""Benchmarks as deterministic split tables written to disk.

* **PBC-LT** – the 9 sub-typed WBC classes of pbc; a stratified 20 % held-out
  test, 5-fold CV on the rest, and the training part sub-sampled to an
  exponential long tail with imbalance ratio rho: classes ordered by their
  available count (the biggest is the head, which keeps all its training
  images), ``n_i = min(available_i, round(n_head * rho^(-i/(C-1))))``.
* **Shift (phase 2)** – every image gets a deterministic degradation kind and,
  per role, a severity 0-4 from that role's declared mix
  (:data:`degrade.PHASE2_MIXES`: training mildest, test harshest; 0 keeps the
  pristine image). A cross-validation image has one draw for when it serves as
  training and one for when it serves as validation. :func:`phase2` switches
  every row to its split's draw; :func:`stress` degrades every row (the
  original phase 2, kept as a stress test). Split rows are pristine
  (``severity`` 0) until switched on, except training rows when
  :func:`pbc_lt_split` is asked for the phase-2 training set.
* **Cross-lab** – the classes the labs share; train on pbc and test on zheng1
  and bccd crops, and leave-one-lab-out over the three labs.

A split table has one row per image with ``path`` (relative to the data root),
``label`` (class name), ``split`` (train / val / test) and, for PBC-LT,
``degradation`` and ``severity`` columns read by the image loader, and the
per-role draws ``train_severity``, ``val_severity``, ``test_severity`` and
``phase2_severity`` (the stress draw, 1-4).
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
from .degrade import PHASE2_MIXES, assign_degradations, assign_phase2

PBC_LT_CLASSES = ("SNE", "BNE", "MY", "MMY", "PMY", "EO", "BA", "LY", "MO")
CROSSLAB_CLASSES = ("neutrophil", "lymphocyte", "monocyte", "eosinophil")
LABS = ("pbc", "zheng1", "bccd")
RHOS = (1, 10, 100)
#: The roles with their own phase-2 draw in the PBC-LT table (``<role>_severity``).
PHASE2_ROLES = ("train", "val", "test")


# --------------------------------------------------------------------------
# PBC-LT
# --------------------------------------------------------------------------


@dataclass
class PbcLtDefinition:
    """The recorded choices behind a PBC-LT split table. ``head_order`` runs
    from the head (most available cross-validation images) to the rarest class;
    ``phase2_mixes`` records each role's declared severity mix."""

    seed: int
    test_fraction: float
    n_folds: int
    head_order: List[str]
    counts_available: Dict[str, int] = field(default_factory=dict)
    phase2_mixes: Dict[str, dict] = field(default_factory=dict)


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
    ``degradation`` kind, its severity per role (``train_severity``,
    ``val_severity``, ``test_severity``: 0-4 from :data:`degrade.PHASE2_MIXES`)
    and its stress severity ``phase2_severity`` (1-4). The head order is by
    available cross-validation images, descending (ties by name).
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
    for role, drawn in assign_phase2(table["path"], seed, {r: PHASE2_MIXES[r] for r in PHASE2_ROLES}).items():
        table[f"{role}_severity"] = drawn
    available = table[table.split == "cv"]["label"].value_counts()
    head_order = sorted(PBC_LT_CLASSES, key=lambda c: (-int(available.get(c, 0)), c))
    definition = PbcLtDefinition(
        seed=seed, test_fraction=test_fraction, n_folds=n_folds, head_order=head_order,
        counts_available={c: int(available.get(c, 0)) for c in head_order},
        phase2_mixes={r: dict(degraded=m.degraded, severities=list(m.severities)) for r, m in PHASE2_MIXES.items()},
    )
    return table, definition


def long_tail_counts(head_order: Sequence[str], n_head: int, rho: float,
                     available: Optional[Dict[str, int]] = None) -> Dict[str, int]:
    """Exponential profile from the head: n_i = min(available_i, round(n_head * rho^(-i / (C - 1)))),
    i = 0 for the head (at least 1 image). Without ``available`` no class is limited."""
    c = len(head_order)
    counts = {cls: max(1, int(round(n_head * rho ** (-i / (c - 1))))) for i, cls in enumerate(head_order)}
    if available is not None:
        counts = {cls: min(n, int(available[cls])) for cls, n in counts.items()}
    return counts


def pbc_lt_split(table: pd.DataFrame, definition: PbcLtDefinition, rho: float, fold: int,
                 n_max: Optional[int] = None, val_per_class: Optional[int] = None,
                 test_per_class: Optional[int] = None, phase2_train: bool = False) -> pd.DataFrame:
    """Train / val / test rows for one (rho, fold).

    The head class (``definition.head_order[0]``) keeps all its training
    images in this fold, or ``n_max`` of them when given (a cap for a CPU
    budget); rho sets every other class from it,
    ``n_i = min(available_i, round(n_head * rho^(-i/(C-1))))``, so at rho 1 the
    training set is the (capped) natural class mix. Validation and test keep
    their natural class mix unless capped per class. Every row is pristine
    (``severity`` 0) except, with ``phase2_train`` (the headline phase-2
    setting), the training rows, which carry their phase-2 training draw, and
    the validation rows, which carry their validation draw: WBCBench's phase 2
    validates on its own degraded validation split, so epochs, thresholds and
    heads are selected on the images the benchmark is about. The test rows stay
    pristine (switch them with :func:`phase2` or :func:`stress`).
    """
    cv = table[table["split"] == "cv"]
    train_pool = cv[cv["fold"] != fold]
    quotas = train_counts(table, definition, rho, fold, n_max)
    train = _take_quota(train_pool, quotas)
    val = _cap(cv[cv["fold"] == fold], val_per_class)
    test = _cap(table[table["split"] == "test"], test_per_class)
    out = pd.concat([train.assign(split="train"), val.assign(split="val"), test.assign(split="test")])
    out = out.assign(severity=0).reset_index(drop=True)
    if phase2_train:
        for role in ("train", "val"):
            rows = out["split"] == role
            out.loc[rows, "severity"] = out.loc[rows, f"{role}_severity"]
    return out


def train_counts(table: pd.DataFrame, definition: PbcLtDefinition, rho: float, fold: int,
                 n_max: Optional[int] = None) -> Dict[str, int]:
    """Per-class training images of one (rho, fold), head first (see :func:`pbc_lt_split`)."""
    cv = table[table["split"] == "cv"]
    available = cv[cv["fold"] != fold]["label"].value_counts()
    head = definition.head_order[0]
    n_head = int(available[head]) if n_max is None else int(min(available[head], n_max))
    return long_tail_counts(definition.head_order, n_head, rho, available.to_dict())


def train_count_table(table: pd.DataFrame, definition: PbcLtDefinition, rhos: Sequence[float], fold: int = 0,
                      n_max: Optional[int] = None) -> pd.DataFrame:
    """Per-class training images (rows, head first, plus ``total``) for each rho (columns)."""
    counts = pd.DataFrame({f"rho={rho:g}": train_counts(table, definition, rho, fold, n_max) for rho in rhos})
    counts = counts.loc[list(definition.head_order)]
    counts.loc["total"] = counts.sum()
    return counts.rename_axis("class")


def phase2(rows: pd.DataFrame) -> pd.DataFrame:
    """The same rows with each row's phase-2 draw for its split switched on
    (``train`` / ``val`` / ``test``; rows of the ``cv`` pool take their
    training draw): the split's declared mix, some rows still pristine."""
    role = rows["split"].replace({"cv": "train"})
    unknown = set(role) - set(PHASE2_ROLES)
    if unknown:
        raise ValueError(f"phase 2 has no severity draw for split(s) {sorted(unknown)}")
    severity = np.select([role == r for r in PHASE2_ROLES], [rows[f"{r}_severity"] for r in PHASE2_ROLES])
    return rows.assign(severity=severity.astype(int))


def stress(rows: pd.DataFrame) -> pd.DataFrame:
    """The same rows all degraded by their stress draw (``phase2_severity``, 1-4
    uniform): the original phase 2, kept as a stress test."""
    return rows.assign(severity=rows["phase2_severity"])


def severity_shares(rows: pd.DataFrame) -> pd.Series:
    """Share of ``rows`` at each severity 0-4 (0 = pristine)."""
    return rows["severity"].value_counts(normalize=True).reindex(range(5), fill_value=0.0).rename_axis("severity")


def phase2_share_table(table: pd.DataFrame, definition: PbcLtDefinition, rho: float = 1, fold: int = 0,
                       n_max: Optional[int] = None) -> pd.DataFrame:
    """Declared and drawn severity shares of one (rho, fold)'s phase-2 sets.

    One row per (``split``, ``severity`` 0-4) for the training rows (phase-2
    training draw), the phase-2 validation and test mixes and the stress test,
    with the ``declared`` share (:data:`degrade.PHASE2_MIXES`), the
    ``realised`` share among the drawn images and their number ``n``."""
    split = pbc_lt_split(table, definition, rho, fold, n_max=n_max, phase2_train=True)
    val, test = split[split["split"] == "val"], split[split["split"] == "test"]
    sets = {"train": (split[split["split"] == "train"], "train"), "val": (phase2(val), "val"),
            "test": (phase2(test), "test"), "test_stress": (stress(test), "stress")}
    rows = []
    for name, (rows_, role) in sets.items():
        realised = severity_shares(rows_)
        for level, declared in PHASE2_MIXES[role].shares().items():
            rows.append(dict(split=name, severity=level, declared=declared, realised=float(realised[level]),
                             n=len(rows_)))
    return pd.DataFrame(rows)


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
