"""The ``wbc`` command line."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

#: Seeds the splitters accept (numpy and scikit-learn random states).
MAX_SEED = 2**32 - 1


def _positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _seed(text: str) -> int:
    """argparse type: a random seed between 0 and 2**32 - 1."""
    value = int(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be between 0 and {MAX_SEED}, got {value}")
    return value


def _non_empty(text: str) -> str:
    """argparse type: a path that is not empty (an empty one would silently mean the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _data_summary(args) -> int:
    import pandas as pd

    from . import data

    sources = args.source or list(data.SOURCES)
    frames = [data.manifest(s, args.root, hashes=False) for s in sources]
    table = pd.concat(frames)
    counts = table.pivot_table(index=["label", "fine_label"], columns="source", values="path",
                               aggfunc="size", fill_value=0)
    counts.loc[("total", ""), :] = counts.sum()
    print(f"data root: {data.data_root(args.root)}")
    print(counts.astype(int).to_string())
    return 0


def _data_verify(args) -> int:
    from . import data

    root = data.data_root(args.root)
    problems = data.verify_checksums(root, decode=args.decode)
    if not problems.empty:
        print(problems.to_string(index=False))
    decoded = f", {problems.attrs['decoded']} images decoded" if args.decode else ""
    verdict = "all match SHA256SUMS" if problems.empty else f"{len(problems)} problem(s)"
    print(f"checked {problems.attrs['checked']} files listed in SHA256SUMS under {root}{decoded}: {verdict}")
    return 0 if problems.empty else 1


def _data_duplicates(args) -> int:
    from . import data

    dups = data.find_duplicates(data.all_manifests(args.root))
    print(dups[["path", "fine_label", "n", "cross_class"]].to_string(index=False))
    return 0


def _splits(args) -> int:
    from pathlib import Path

    from . import benchmarks, profiles

    out = profiles.output_dir("splits", args.out)
    for name, path in benchmarks.write_benchmarks(Path(out), root=args.root, seed=args.seed).items():
        print(f"{name}: {path}")
    return 0


def _methods(args) -> int:
    from . import augment, losses, methods, samplers

    sections = [("methods", methods.METHODS), ("losses", losses.LOSSES), ("samplers", samplers.SAMPLERS),
                ("augmentations", augment.AUGMENTATIONS)]
    try:
        from . import heads

        if hasattr(heads, "HEADS"):
            sections.append(("classifier heads", heads.HEADS))
    except ImportError:
        pass
    for title, registry in sections:
        print(f"{title}: {', '.join(registry.names())}")
    return 0


def _segment(args) -> int:
    from . import segment

    if args.source != "zheng1":
        raise SystemExit("wbc segment: only --source zheng1 has expert masks to score against")
    table = segment.evaluate_zheng1(args.root, backend=args.backend, limit=args.limit, model_path=args.model)
    summary = segment.summarize_dice(table)
    print(summary.round(3).to_string())
    print(f"mean Dice over {len(table)} images: nucleus {table.nucleus_dice.mean():.3f}, cell {table.cell_dice.mean():.3f}")
    return 0


def _book_execute(args) -> int:
    from . import profiles, runbook

    overrides = profiles.parse_overrides(args.set or [])
    profiles.get(args.profile, overrides)  # validate every value before any notebook starts
    try:
        runbook.execute(args.profile, names=args.only, out_dir=args.out, notebooks_dir=args.notebooks,
                        parameters={"data_root": args.root, "results_dir": args.results,
                                    "overrides": overrides or None},
                        progress=not args.no_progress, log_output=args.log_output)
    except runbook.NotebooksNotFound as exc:
        print(f"wbc: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        # A failed cell: one line naming the chapter and the error (papermill kept the executed
        # notebook, with the full traceback, under executed/).
        if type(exc).__name__ != "PapermillExecutionError":
            raise
        print(f"wbc: error: {getattr(exc, 'notebook', 'a notebook')} failed at cell [{exc.exec_count}]: "
              f"{exc.ename}: {exc.evalue} (the executed notebook holds the traceback)", file=sys.stderr)
        return 2
    return 0


def _data_fetch(args) -> int:
    from . import fetch

    return fetch.main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wbc", description="Robust WBC classification: data, benchmarks, book.")
    sub = parser.add_subparsers(dest="command", required=True)

    data_p = sub.add_parser("data", help="inspect and check the data root")
    data_sub = data_p.add_subparsers(dest="action", required=True)
    for name, fn, text in [("summary", _data_summary, "images per source and class"),
                           ("verify", _data_verify, "check files against SHA256SUMS"),
                           ("duplicates", _data_duplicates, "byte-identical files")]:
        p = data_sub.add_parser(name, help=text)
        p.add_argument("--root", type=_non_empty, help="data root (default: $WBC_DATA_ROOT or ../shared/datasets)")
        if name == "summary":
            p.add_argument("--source", action="append", help="only this source (repeatable)")
        if name == "verify":
            p.add_argument("--decode", action="store_true",
                           help="also decode every image in full and report those that do not decode")
        p.set_defaults(func=fn)

    p = data_sub.add_parser("fetch", help="download the public sets from their sources and check them")
    p.add_argument("--root", help="where to put them (default: $WBC_DATA_ROOT or ../shared/datasets)")
    p.add_argument("--source", action="append", choices=["pbc", "zheng1", "bccd"], help="only this set (repeatable)")
    p.add_argument("--force", action="store_true", help="download again even if the set is already there")
    p.add_argument("--strict", action="store_true", help="fail on any difference from the data root's SHA256SUMS")
    p.set_defaults(func=_data_fetch)

    p = sub.add_parser("splits", help="write the benchmark split files")
    p.add_argument("--root", type=_non_empty)
    p.add_argument("--out", type=_non_empty, help="output folder (default: ./splits or $WBC_SPLITS_DIR)")
    p.add_argument("--seed", type=_seed, default=0, help=f"random seed, 0 to {MAX_SEED}")
    p.set_defaults(func=_splits)

    p = sub.add_parser("methods", help="list registered methods, losses, samplers, augmentations")
    p.set_defaults(func=_methods)

    p = sub.add_parser("segment", help="score WBC segmentation against expert masks (mean Dice)")
    p.add_argument("--source", default="zheng1")
    p.add_argument("--backend", default="classical", choices=["classical", "cellpose"])
    p.add_argument("--model", type=_non_empty, help="trained Cellpose model (cellpose back-end)")
    p.add_argument("--limit", type=_positive_int, help="only the first N images (N >= 1)")
    p.add_argument("--root", type=_non_empty)
    p.set_defaults(func=_segment)

    book_p = sub.add_parser("book", help="run the book's notebooks")
    book_sub = book_p.add_subparsers(dest="action", required=True)
    p = book_sub.add_parser("execute", help="execute the notebooks with papermill into executed/")
    p.add_argument("--profile", default="cpu", choices=["smoke", "cpu", "gpu"])
    p.add_argument("--only", action="append", help="notebook name prefix, e.g. 03 (repeatable)")
    p.add_argument("--root", type=_non_empty, help="data root")
    p.add_argument("--results", help="results folder (default: ./results or $WBC_RESULTS_DIR)")
    p.add_argument("--out", help="executed notebooks folder (default: ./executed or $WBC_EXECUTED_DIR)")
    p.add_argument("--notebooks", help="chapter sources folder (default: ./notebooks, else the installed copy)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (notebooks and cells)")
    p.add_argument("--log-output", action="store_true", help="also print every cell's output")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a profile key for every notebook, e.g. --set probe_epochs=60 (repeatable; "
                        "values are YAML: [0, 1], null, 1e-3)")
    p.set_defaults(func=_book_execute)

    runs_p = sub.add_parser("runs", help="query finished run folders")
    runs_sub = runs_p.add_subparsers(dest="action", required=True)
    p = runs_sub.add_parser("list", help="finished runs of the current code: protocol, folder, keys")
    p.add_argument("--results", type=_non_empty, help="results folder (default: ./results or $WBC_RESULTS_DIR)")
    p.add_argument("--protocol", help="only this protocol (prefix), e.g. pbc_lt")
    p.add_argument("--all", action="store_true", help="also runs made by other versions of the code")
    p.set_defaults(func=_runs_list)
    p = runs_sub.add_parser("compare", help="check that two results folders hold the same numbers (exit 1 if not)")
    p.add_argument("first", type=_non_empty)
    p.add_argument("second", type=_non_empty)
    p.set_defaults(func=_runs_compare)

    cache_p = sub.add_parser("cache", help="list or clear the derived-file cache (embeddings, manifests ...)")
    cache_sub = cache_p.add_subparsers(dest="action", required=True)
    for name, fn, text in [("info", _cache_info, "list the cache entries with their size and code version"),
                           ("clear", _cache_clear, "remove the cache entries (all, or one --kind)")]:
        p = cache_sub.add_parser(name, help=text)
        p.add_argument("--cache", type=_non_empty, help="cache folder (default: ./cache or $WBC_CACHE_DIR)")
        if name == "clear":
            p.add_argument("--kind", help="only entries of this kind (e.g. embeddings)")
        p.set_defaults(func=fn)
    _add_system_commands(sub)
    return parser


def _add_system_commands(sub) -> None:
    """``wbc train``, ``wbc predict`` and ``wbc evaluate``: the assembled system (wbclib.apply and
    wbclib.protocols.system, imported only when one of them runs: they pull in torch)."""
    def lazy(name):
        def run(args):
            from . import apply

            return getattr(apply, name)(args)
        return run

    def train_command(args):
        from .protocols.system import train_command as train

        return train(args)

    predict_command, evaluate_command = lazy("predict_command"), lazy("evaluate_command")
    p = sub.add_parser("train", help="train the book's best pipeline for a profile and write a model bundle")
    p.add_argument("--profile", default="cpu", choices=["smoke", "cpu", "gpu"])
    p.add_argument("--out", required=True, type=_non_empty, help="bundle folder to write")
    p.add_argument("--data-root", type=_non_empty, help="data root (default: $WBC_DATA_ROOT or ../shared/datasets)")
    p.add_argument("--results", help="results folder for the run folders (default: ./results or $WBC_RESULTS_DIR)")
    p.add_argument("--cache", help="cache folder (default: ./cache or $WBC_CACHE_DIR)")
    p.add_argument("--seed", type=_seed, default=0)
    p.set_defaults(func=train_command)
    p = sub.add_parser("predict", help="classify unlabelled images with a model bundle")
    p.add_argument("--model", required=True, type=_non_empty, help="bundle folder (from wbc train)")
    p.add_argument("--images", required=True, type=_non_empty, help="image folder (recursive) or CSV with a path column")
    p.add_argument("--out", required=True, type=_non_empty, help="predictions CSV to write")
    p.add_argument("--tta", action="store_true", help="average the bundle's dihedral test-time views")
    p.add_argument("--fields", action="store_true", help="images are whole smear fields: locate and crop the WBC")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=predict_command)
    p = sub.add_parser("evaluate", help="score a predictions CSV against true labels")
    p.add_argument("--pred", required=True, type=_non_empty, help="CSV written by wbc predict")
    p.add_argument("--labels", required=True, type=_non_empty,
                   help="labels CSV (path/image id and label columns) or a folder of <class>/<image>")
    p.add_argument("--map", help="user=model class mapping, 'a=b,c=d', or a two-column CSV")
    p.add_argument("--figure", help="confusion matrix image (default: <pred>_confusion.png)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the intervals (0: none)")
    p.set_defaults(func=evaluate_command)


def _runs_list(args) -> int:
    from . import profiles, runs

    table = runs.find(profiles.output_dir("results", args.results), args.protocol, current=not args.all)
    if table.empty:
        print("no finished runs" + ("" if args.all else " of the current code (--all lists every version's)"))
        return 0
    keys = [c for c in ("rho", "fold", "seed", "setting", "method", "backbone", "variant", "recipe") if c in table]
    print(table[["protocol", *keys, "run_dir"]].to_string(index=False))
    return 0


def _runs_compare(args) -> int:
    from . import runs

    differences = runs.compare(args.first, args.second)
    if differences.empty:
        print(f"every finished run under {args.first} and {args.second} has identical metrics")
        return 0
    print(differences.to_string(index=False))
    return 1


def _cache_info(args) -> int:
    from . import cache, profiles

    folder = profiles.output_dir("cache", args.cache)
    table = cache.info(folder)
    print(f"cache: {folder}")
    if table.empty:
        print("no entries")
        return 0
    summary = table.groupby("kind").agg(entries=("file", "size"), size_mb=("size_mb", "sum"))
    print(summary.round(1).to_string())
    return 0


def _cache_clear(args) -> int:
    from . import cache, profiles

    folder = profiles.output_dir("cache", args.cache)
    removed = cache.clear(folder, args.kind)
    print(f"removed {removed} files from {folder}" + (f" ({args.kind})" if args.kind else ""))
    return 0


def _user_errors() -> tuple:
    """Exceptions that mean bad input or a failed file operation, not a bug:
    printed as one ``wbc: error:`` message instead of a traceback."""
    from .data import DataError

    from ._io import CorruptFileError
    from .runs import RunMismatch

    errors = [DataError, OSError, ValueError, CorruptFileError, RunMismatch]
    segment = sys.modules.get(f"{__package__}.segment")
    if segment is not None:  # only raised once segment is imported; importing it is slow
        errors.append(segment.SegmentationError)
    return tuple(errors)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as exc:
        if not isinstance(exc, _user_errors()):
            raise
        print(f"wbc: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
