"""Applying a trained bundle to a user's images, and scoring the result:
what ``wbc predict`` and ``wbc evaluate`` run (``wbc train`` is
:func:`protocols.system.train_command`).

* :func:`list_images` – the images of a folder (recursive) or of a CSV's
  ``path`` column; any class names, any layout;
* :func:`predict` – one row per image with the path, the predicted class,
  every class probability, the stage decisions, an abstain flag and an
  ``error`` message for a file that could not be used;
* :func:`read_labels` / :func:`match_labels` – true labels from a CSV or from
  folder names (an image's parent folder), matched to predictions by path,
  file name or image number;
* :func:`parse_mapping` – the explicit user-class -> model-class mapping
  (``--map user=model,...`` or a two-column CSV);
* :func:`evaluate` – the four metrics with bootstrap intervals, per-class
  scores and the confusion matrix; user classes that map to no model class are
  reported and left out, never guessed.
"""
from __future__ import annotations

import csv
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from . import _io
from . import metrics as M
from .data import DataError, is_hidden, is_image_name, walk_files

PathLike = Union[str, Path]

#: Column names read as an image path / a label in a user CSV (case-insensitive).
PATH_COLUMNS = ("path", "image", "file", "filename", "image id", "image_id", "id")
LABEL_COLUMNS = ("label", "class", "class label", "class_label", "y")


# --------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------


def _column(frame: pd.DataFrame, names: Sequence[str], what: str, source: PathLike) -> str:
    lower = {str(c).strip().lower(): c for c in frame.columns}
    for name in names:
        if name in lower:
            return lower[name]
    raise DataError(f"{source}: no {what} column; expected one of {list(names)}, found {list(frame.columns)}")


def list_images(source: PathLike) -> List[Path]:
    """Image files to predict: every file with an image suffix under a folder
    (recursively, hidden entries skipped, sorted), the ``path`` column of a
    CSV (relative paths are relative to the CSV's folder), or one image file. Files are not opened
    here: an unreadable one becomes an error row of :func:`predict`."""
    source = Path(source).expanduser()
    if source.is_dir():
        return [p for p in walk_files(source) if is_image_name(p) and not is_hidden(p.name)]
    if source.is_file() and source.suffix.lower() == ".csv":
        table = _io.read_csv(source, dtype=str, keep_default_na=False)
        column = _column(table, ("path", "image", "file", "filename"), "image path", source)
        return [(source.parent / p) if not Path(p).is_absolute() else Path(p) for p in table[column]]
    if source.is_file() and is_image_name(source):
        return [source]
    raise DataError(f"{source}: neither an image folder, an image, nor a CSV file with a path column")


def predict(model: PathLike, images: PathLike, tta: bool = False, fields: bool = False, progress: bool = True,
            batch_size: int = 32) -> pd.DataFrame:
    """Predictions of the bundle in ``model`` for every image of ``images`` (a
    folder or CSV): see :meth:`pipeline.Pipeline.predict_files`. ``fields``
    treats every image as a whole smear field (the leukocyte is located and
    cropped); ``tta`` averages the bundle's dihedral views. An unreadable file
    is reported on stderr and gets an ``error`` row; the others go on."""
    from . import bundle

    return predict_with(bundle.load(model), images, tta=tta, fields=fields, progress=progress, batch_size=batch_size)


def predict_with(pipeline, images: PathLike, tta: bool = False, fields: bool = False, progress: bool = True,
                 batch_size: int = 32) -> pd.DataFrame:
    """:func:`predict` with a loaded :class:`pipeline.Pipeline` (for instance one
    with stages switched off, as the system chapter's ablation runs it)."""
    if fields:
        pipeline = pipeline.with_isolation("field")
    paths = list_images(images)
    if not paths:
        raise DataError(f"{images}: no image files found")

    def report(path: str, message: str) -> None:
        print(f"wbc predict: skipped {message}", file=sys.stderr)

    return pipeline.predict_files(paths, tta=tta, batch_size=batch_size, progress=progress, on_error=report)


# --------------------------------------------------------------------------
# Labels and class mapping
# --------------------------------------------------------------------------


def parse_mapping(spec: Optional[str]) -> Dict[str, str]:
    """``"user=model,user2=model2"`` or the path of a CSV with two columns
    (user class, model class; a header row is skipped when its second cell is
    not a class of the rows) as a dict. Empty or None: no mapping."""
    if not spec:
        return {}
    path = Path(spec)
    pairs: List[Tuple[str, str]] = []
    if path.suffix.lower() == ".csv" and path.is_file():
        with open(path, newline="") as fh:
            for row in csv.reader(fh):
                if len(row) >= 2 and row[0].strip():
                    pairs.append((row[0].strip(), row[1].strip()))
        if pairs and pairs[0][0].lower() in ("user", "user_class", "from", "label"):
            pairs = pairs[1:]
    else:
        for item in spec.split(","):
            if not item.strip():
                continue
            user, sep, target = item.partition("=")
            if not sep or not user.strip() or not target.strip():
                raise ValueError(f"mapping item {item!r} is not of the form user_class=model_class")
            pairs.append((user.strip(), target.strip()))
    mapping: Dict[str, str] = {}
    for user, target in pairs:
        if user in mapping and mapping[user] != target:
            raise ValueError(f"user class {user!r} is mapped twice ({mapping[user]!r} and {target!r})")
        mapping[user] = target
    return mapping


def read_labels(labels: PathLike) -> pd.DataFrame:
    """True labels as a table (``path``, ``label``, both strings): from a CSV
    with a path-like column (``path``, ``image``, ``image ID`` ...) and a label
    column (``label``, ``class``, ``class label`` ...), or from a folder, each
    image labelled by its parent folder's name."""
    labels = Path(labels).expanduser()
    if labels.is_dir():
        rows = [dict(path=str(p.resolve()), label=p.parent.name)
                for p in walk_files(labels) if is_image_name(p) and p.parent != labels]
        if not rows:
            raise DataError(f"{labels}: no images in class sub-folders (<folder>/<class>/<image>)")
        return pd.DataFrame(rows)
    if not labels.is_file():
        raise DataError(f"{labels}: no such labels file or folder")
    table = _io.read_csv(labels, dtype=str, keep_default_na=False)
    path_col = _column(table, PATH_COLUMNS, "image path or id", labels)
    label_col = _column(table, LABEL_COLUMNS, "label", labels)
    out = pd.DataFrame({"path": table[path_col].str.strip(), "label": table[label_col].str.strip()})
    resolved = [str((labels.parent / p).resolve()) if (labels.parent / p).exists() else p for p in out["path"]]
    return out.assign(path=resolved)


def _keys(path: str) -> List[str]:
    """Ways a label row can name an image, most specific first: the resolved
    path, the file name, the stem, and the stem's number (zheng1's ``image ID``
    1 is ``001.png``)."""
    p = Path(path)
    keys = [str(p.resolve()) if p.exists() else str(p), p.name, p.stem]
    digits = re.fullmatch(r"0*(\d+)", p.stem)
    if digits:
        keys.append(f"#{int(digits.group(1))}")
    return keys


def match_labels(pred: pd.DataFrame, labels: pd.DataFrame) -> pd.Series:
    """The true label of each prediction row (NaN where none matches). A row
    matches on the most specific key (:func:`_keys`) that names one label row;
    a key naming several is ambiguous and not used."""
    index: Dict[str, Optional[str]] = {}
    for level in range(4):
        for path, label in zip(labels["path"], labels["label"]):
            keys = _keys(path)
            if level < len(keys):
                key = f"{level}:{keys[level]}"
                index[key] = label if key not in index or index[key] == label else None
    out = []
    for path in pred["path"].astype(str):
        found = np.nan
        for level, key in enumerate(_keys(path)):
            label = index.get(f"{level}:{key}")
            if label is not None:
                found = label
                break
        out.append(found)
    return pd.Series(out, index=pred.index, dtype=object)


# --------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------


def evaluate(pred: pd.DataFrame, labels: pd.DataFrame, mapping: Optional[Dict[str, str]] = None,
             n_boot: int = 1000, seed: int = 0) -> dict:
    """Score a ``wbc predict`` table against true labels.

    User labels go through ``mapping`` (user -> model class; a label equal to
    a model class needs no entry). Rows whose label maps to no model class are
    counted in ``unknown`` per user class and left out; rows with an ``error``
    or no label are counted and left out. Returns ``scores`` (the four metrics
    and accuracy, each with a bootstrap 95 % interval ``<metric>_low/_high``),
    ``per_class``, ``confusion`` (rows true, columns predicted, model class
    order), ``classes``, ``abstained`` scores (on the rows not abstained) and
    the counts. Macro averages run over the classes present in the truth or
    the predictions, as scikit-learn's ``average="macro"`` does.
    """
    from .infer import classes_of

    mapping = dict(mapping or {})
    classes = classes_of(pred)
    if not classes:
        raise ValueError("the predictions table has no prob_<class> columns: not a `wbc predict` output")
    unknown_targets = sorted(set(mapping.values()) - set(classes))
    if unknown_targets:
        raise ValueError(f"the mapping names {unknown_targets}, which are not model classes {classes}")
    truth = match_labels(pred, labels)
    failed = pred["error"].fillna("").astype(str) != "" if "error" in pred else pd.Series(False, index=pred.index)
    mapped = truth.map(lambda t: t if pd.isna(t) else mapping.get(t, t if t in classes else None))
    unknown = truth[(~truth.isna()) & mapped.isna() & ~failed]
    use = ~failed & ~truth.isna() & ~mapped.isna()
    index = {c: i for i, c in enumerate(classes)}
    y = mapped[use].map(index).to_numpy(int)
    p = pred.loc[use, "pred"].map(index).to_numpy(int)
    k = len(classes)
    scores = M.scores(y, p, k)
    if n_boot and len(y):
        for metric in (*M.METRICS, "accuracy"):
            scores[f"{metric}_low"], scores[f"{metric}_high"] = M.bootstrap_ci(y, p, k, metric=metric,
                                                                                n_boot=n_boot, seed=seed)
    out = dict(classes=classes, scores=scores, per_class=M.per_class(y, p, classes),
               confusion=M.confusion(y, p, k), scored=int(use.sum()), rows=int(len(pred)),
               errors=int(failed.sum()), unlabelled=int((~failed & truth.isna()).sum()),
               unknown=unknown.value_counts().to_dict())
    if "abstain" in pred:
        kept = use & ~pred["abstain"].fillna(False).astype(bool)
        yk = mapped[kept].map(index).to_numpy(int)
        pk = pred.loc[kept, "pred"].map(index).to_numpy(int)
        out["coverage"] = float(kept.sum() / max(int(use.sum()), 1))
        out["scores_not_abstained"] = M.scores(yk, pk, k) if len(yk) else {}
    return out


def format_report(result: dict) -> str:
    """The text ``wbc evaluate`` prints."""
    s = result["scores"]
    lines = [f"scored {result['scored']} of {result['rows']} rows "
             f"({result['errors']} with errors, {result['unlabelled']} without a label, "
             f"{sum(result['unknown'].values())} with a class outside the model's)"]
    for cls, n in result["unknown"].items():
        lines.append(f"  unknown user class {cls!r}: {n} rows (map it with --map {cls}=<model class>)")
    for metric in (*M.METRICS, "accuracy"):
        interval = (f"  [{s[metric + '_low']:.3f}, {s[metric + '_high']:.3f}]" if metric + "_low" in s else "")
        lines.append(f"{metric:>18}: {s[metric]:.3f}{interval}")
    if "coverage" in result:
        kept = result.get("scores_not_abstained", {})
        shown = f", macro_f1 on them {kept['macro_f1']:.3f}" if kept else ""
        lines.append(f"{'not abstained':>18}: {result['coverage']:.1%} of scored rows{shown}")
    lines += ["", "per class:", result["per_class"].round(3).to_string()]
    return "\n".join(lines)


def confusion_figure(result: dict, path: PathLike) -> Path:
    """Save the confusion matrix (rows normalised to recall) as an image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import confusion_matrix

    fig = confusion_matrix(result["confusion"], result["classes"], title=f"{result['scored']} images")
    with _io.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)
    return Path(path)


# --------------------------------------------------------------------------
# Command-line entry points (wired in cli.py)
# --------------------------------------------------------------------------


def predict_command(args) -> int:
    table = predict(args.model, args.images, tta=args.tta, fields=args.fields, progress=not args.no_progress)
    _io.write_csv(args.out, table)
    errors = int((table["error"] != "").sum())
    abstained = int(table["abstain"].fillna(False).astype(bool).sum())
    print(f"{len(table)} rows written to {args.out}: {len(table) - errors} predicted "
          f"({abstained} flagged abstain), {errors} unreadable")
    return 0


def evaluate_command(args) -> int:
    pred = _io.read_csv(args.pred, keep_default_na=True, dtype={"path": str, "pred": str, "error": str})
    result = evaluate(pred, read_labels(args.labels), parse_mapping(args.map), n_boot=args.n_boot)
    print(format_report(result))
    figure = Path(args.figure) if args.figure else Path(args.pred).with_name(Path(args.pred).stem + "_confusion.png")
    confusion_figure(result, figure)
    print(f"confusion matrix: {figure}")
    return 0
