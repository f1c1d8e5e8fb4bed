"""Trials for the cpu book's two unmet quality targets (issue 10): chapter 03's
rho-1 fine-tune (fold 0) and chapter 04's pbc-trained ERM on zheng1 and bccd,
each run again with one setting changed, from a finished book's splits and
cache, into a results folder of its own (run folders as the book's: a rerun
reads a finished trial back).

    python bench/target_trials.py rho1 [--train JSON] [--profile JSON] [--seed 0]
    python bench/target_trials.py crosslab [--train JSON] [--profile JSON] [--swad] [--stain macenko] [--seeds 0 1 2]
    python bench/target_trials.py crosslab-ensemble --book-results results
    python bench/target_trials.py crosslab-padding --book-results results [--padding reflect|median]

Common options: ``--splits splits --cache cache`` (the book's folders, default
the repository's), ``--out trials`` (where the trial runs go), ``--data-root``.

* ``rho1``: :func:`protocols.pbc_lt.lt_finetune_config` with ``--train``
  overrides (any ``TrainConfig`` field: ``{"lr": 3e-4}``,
  ``{"augmentation": "dihedral_jitter"}``, ``{"backbone":
  "tf_efficientnet_lite1"}``) on rho 1, fold 0, after ``--profile`` overrides
  of the cpu profile (``{"n_max": 1700}``); prints macro-F1 of every
  evaluation set.
* ``crosslab``: chapter 04's strong-preset ERM
  (:func:`protocols.crosslab_erm.crosslab_finetune_config` with
  ``dihedral_colour_stain_blur``) with ``--train`` overrides
  (``{"frozen_stages": 5}``), ``--profile`` overrides
  (``{"crosslab_train_per_class": 300, "crosslab_epochs": 3}``) and, with
  ``--swad``, SWAD's weight average, and with ``--stain macenko`` every
  image (pbc training rows and the target labs) Macenko-normalised to the
  long-tail chapters' pbc reference (:func:`protocols.pbc_lt.stain_reference`);
  one line per seed and the mean.
* ``crosslab-ensemble``: the mean class probabilities of a book's three
  strong-preset runs of each fine-tuned row (ERM, BoDA, SADA), scored like one
  model; no training.
* ``crosslab-padding``: a book's strong-preset ERM runs evaluated again on
  zheng1 and bccd with cell crops padded by the border's median colour instead
  of by reflection (``cellcrop.crop_square`` replaced in this process only):
  bccd's tight crops are padded out to the common cell ratio, and the
  reflection repeats the cell's own nucleus around it. No training.

The numbers of these trials are in book/reproduce.md ("Levers tried for the
two unmet targets"). Run one trial at a time on an otherwise idle machine: two
at once on two cores take several times as long.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from wbclib import benchmarks as B
from wbclib import metrics as M
from wbclib import profiles
from wbclib.protocols import crosslab_erm, pbc_lt
from wbclib.protocols.common import cell_centred
from wbclib.train import train_in

STRONG = "dihedral_colour_stain_blur"
FINETUNED_ROWS = ("erm", "boda", "sada")


def _context(args, profile_overrides: dict):
    return profiles.setup("cpu", args.data_root, args.cache, args.splits, args.out, 0, profile_overrides)


def _macro_f1(result: dict) -> dict:
    return {k: round(v["macro_f1"], 3) for k, v in result.items() if isinstance(v, dict) and "macro_f1" in v}


def rho1(args) -> None:
    ctx = _context(args, json.loads(args.profile))
    table, definition = B.read_pbc_lt(ctx.splits, 0)
    split, eval_sets = pbc_lt.pbc_lt_sets(ctx.cfg, cell_centred(table, ctx.cfg), definition, 1, 0)
    config = pbc_lt.lt_finetune_config(ctx.cfg, "erm", args.seed, json.loads(args.train),
                                       n_train=int((split["split"] == "train").sum()))
    run, result = train_in(ctx.results, "trials/rho1", dict(rho=1, fold=0, seed=args.seed), config, split, ctx.root,
                           list(B.PBC_LT_CLASSES), eval_sets=eval_sets, n_boot=0)
    print(run.dir.name, _macro_f1(result))


def _crosslab_sets(ctx):
    table = cell_centred(B.read_crosslab(ctx.splits, 0), ctx.cfg)
    (sources, targets), = [(s, t) for name, s, t in B.CROSSLAB_SETTINGS if name == "pbc→others"]
    return crosslab_erm.crosslab_sets(ctx.cfg, table, sources, targets)


def crosslab(args) -> None:
    ctx = _context(args, json.loads(args.profile))
    split, eval_sets = _crosslab_sets(ctx)
    if args.stain == "macenko":
        table, _ = B.read_pbc_lt(ctx.splits, 0)
        reference = pbc_lt.stain_reference(table, ctx.root, ctx.results / "pbc_lt" / "stain_reference.json")
        print("Macenko reference", reference)
        # every row, training and target lab alike, mapped to the reference's stain by the loader
        stained = dict(stain="macenko", stain_reference=reference)
        split, eval_sets = split.assign(**stained), {k: v.assign(**stained) for k, v in eval_sets.items()}
    scores = []
    for seed in args.seeds:
        config = crosslab_erm.crosslab_finetune_config(ctx.cfg, "erm", seed, STRONG, json.loads(args.train))
        run, result = train_in(ctx.results, "trials/crosslab", dict(setting="pbc-to-others", seed=seed), config,
                               split, ctx.root, list(B.CROSSLAB_CLASSES), eval_sets=eval_sets, n_boot=0,
                               swad={} if args.swad else None)
        scores.append(_macro_f1(result))
        print(seed, run.dir.name, scores[-1])
    print("mean", pd.DataFrame(scores)[["zheng1", "bccd"]].mean().round(3).to_dict())


def _strong_runs(book_results: Path, method: str):
    found = sorted((book_results / "cpu" / "crosslab" / "finetune").glob(
        f"setting-pbc-to-others_method-{method}_augmentation-{STRONG.replace('_', '-')}_seed-*"))
    if not found:
        raise SystemExit(f"no finished {method} runs of the strong preset under {book_results}")
    return found


def crosslab_ensemble(args) -> None:
    classes = list(B.CROSSLAB_CLASSES)
    for method in FINETUNED_ROWS:
        line = {}
        for lab in ("zheng1", "bccd"):
            frames = [pd.read_csv(d / f"predictions_{lab}.csv") for d in _strong_runs(args.book_results, method)]
            probs = np.mean([f[[f"prob_{c}" for c in classes]].to_numpy() for f in frames], axis=0)
            labels = frames[0]["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
            seeds = [M.scores(labels, f["pred"].map({c: i for i, c in enumerate(classes)}).to_numpy(),
                              len(classes))["macro_f1"] for f in frames]
            line[lab] = dict(ensemble=round(M.scores(labels, probs.argmax(1), len(classes))["macro_f1"], 3),
                             seeds=[round(s, 3) for s in seeds])
        print(method, line)


def _median_border_padding() -> None:
    import cv2

    from wbclib import cellcrop

    reflect = cellcrop.crop_square

    def crop_square(image, cx, cy, side):
        side_px = max(1, int(round(side)))
        h, w = image.shape[:2]
        x0, y0 = int(round(cx - side_px / 2)), int(round(cy - side_px / 2))
        pad = max(0, -x0, -y0, x0 + side_px - w, y0 + side_px - h)
        if not pad:
            return reflect(image, cx, cy, side)
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        colour = np.median(border, axis=0).astype(image.dtype).tolist()
        padded = cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=colour)
        return np.ascontiguousarray(padded[y0 + pad:y0 + pad + side_px, x0 + pad:x0 + pad + side_px])

    cellcrop.crop_square = crop_square  # centre_on_cell looks it up in the module at call time


def crosslab_padding(args) -> None:
    import torch

    from wbclib.augment import eval_transform
    from wbclib.models import ImageTable
    from wbclib.train import TrainConfig, build_method, predict_proba

    if args.padding == "median":
        _median_border_padding()
    ctx = _context(args, {})
    _, eval_sets = _crosslab_sets(ctx)
    classes = list(B.CROSSLAB_CLASSES)
    for run_dir in _strong_runs(args.book_results, "erm"):
        settings = json.loads((run_dir / "config.json").read_text())["identity"]["config"]
        config = TrainConfig(**{k: v for k, v in settings.items() if k in TrainConfig.__dataclass_fields__})
        method = build_method(config, len(classes), 1, [1] * len(classes))
        method.load_state_dict(torch.load(run_dir / "best.pt", map_location="cpu", weights_only=False))
        line = {}
        for lab in ("zheng1", "bccd"):
            data = ImageTable(eval_sets[lab], ctx.root, classes, config.image_size, config.degrade_seed,
                              transform=eval_transform(config.augmentation, config.image_size))
            probs = predict_proba(method, data, desc=lab)
            line[lab] = round(M.scores(data.labels, probs.argmax(1), len(classes))["macro_f1"], 3)
        print(run_dir.name, args.padding, line)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trial", choices=["rho1", "crosslab", "crosslab-ensemble", "crosslab-padding"])
    parser.add_argument("--train", default="{}", help="TrainConfig overrides as JSON")
    parser.add_argument("--profile", default="{}", help="cpu profile overrides as JSON")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--swad", action="store_true")
    parser.add_argument("--padding", choices=["reflect", "median"], default="median")
    parser.add_argument("--stain", choices=["none", "macenko"], default="none",
                        help="crosslab: Macenko-normalise every image to chapter 05's pbc reference")
    parser.add_argument("--splits", default="splits")
    parser.add_argument("--cache", default="cache")
    parser.add_argument("--out", default="trials")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--book-results", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    {"rho1": rho1, "crosslab": crosslab, "crosslab-ensemble": crosslab_ensemble,
     "crosslab-padding": crosslab_padding}[args.trial](args)


if __name__ == "__main__":
    main()
