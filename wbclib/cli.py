"""The ``wbc`` command line."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


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

    problems = data.verify_checksums(args.root)
    if problems.empty:
        print(f"all files under {data.data_root(args.root)} match SHA256SUMS")
        return 0
    print(problems.to_string(index=False))
    return 1


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
    from . import runbook

    runbook.execute(args.profile, names=args.only, parameters={"data_root": args.root, "results_dir": args.results})
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wbc", description="Robust WBC classification: data, benchmarks, book.")
    sub = parser.add_subparsers(dest="command", required=True)

    data_p = sub.add_parser("data", help="inspect and check the data root")
    data_sub = data_p.add_subparsers(dest="action", required=True)
    for name, fn, text in [("summary", _data_summary, "images per source and class"),
                           ("verify", _data_verify, "check files against SHA256SUMS"),
                           ("duplicates", _data_duplicates, "byte-identical files")]:
        p = data_sub.add_parser(name, help=text)
        p.add_argument("--root", help="data root (default: $WBC_DATA_ROOT or ../shared/datasets)")
        if name == "summary":
            p.add_argument("--source", action="append", help="only this source (repeatable)")
        p.set_defaults(func=fn)

    p = sub.add_parser("splits", help="write the benchmark split files")
    p.add_argument("--root")
    p.add_argument("--out", help="output folder (default: <project>/splits)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_splits)

    p = sub.add_parser("methods", help="list registered methods, losses, samplers, augmentations")
    p.set_defaults(func=_methods)

    p = sub.add_parser("segment", help="score WBC segmentation against expert masks (mean Dice)")
    p.add_argument("--source", default="zheng1")
    p.add_argument("--backend", default="classical", choices=["classical", "cellpose"])
    p.add_argument("--model", help="trained Cellpose model (cellpose back-end)")
    p.add_argument("--limit", type=int, help="only the first N images")
    p.add_argument("--root")
    p.set_defaults(func=_segment)

    book_p = sub.add_parser("book", help="run the book's notebooks")
    book_sub = book_p.add_subparsers(dest="action", required=True)
    p = book_sub.add_parser("execute", help="execute the notebooks with papermill into executed/")
    p.add_argument("--profile", default="cpu", choices=["smoke", "cpu", "gpu"])
    p.add_argument("--only", action="append", help="notebook name prefix, e.g. 03 (repeatable)")
    p.add_argument("--root", help="data root")
    p.add_argument("--results", help="results folder (default: <project>/results)")
    p.set_defaults(func=_book_execute)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from .data import DataError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DataError as exc:
        print(f"wbc: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
