"""Images per second of the real CPU training loop (loader workers feeding
Lite0's update in the main process, in the trainer's precision: float32 on CPU) with the loader workers at the
caller's priority and at the lowest priority (``_parallel.image_loader``).

    python bench/loader_priority.py [--root DIR] [--n 1120] [--size 128] [--batch-size 32]
                                    [--settings equal:1 equal:2 low:1 low:2]

Each setting is ``priority:workers``. The images are pbc images, centred on
their cell as in the book, with phase-2 degradations and the book's
fine-tuning augmentation (``dihedral_jitter_degrade``); the first 5 batches
are a warm-up and are not timed. The settings run one after another in this
process, so run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from wbclib import _parallel, data, precision
from wbclib.augment import make_augmentation
from wbclib.cellcrop import COMMON_RATIO
from wbclib.degrade import KINDS, SEVERITIES
from wbclib.models import ImageTable
from wbclib.samplers import SeededDraws
from wbclib.train import TrainConfig, build_method, split_by_domain

WARMUP = 5


def images_per_second(dataset, batch_size: int, workers: int, lowest: bool, classes: int) -> float:
    method = build_method(TrainConfig(image_size=dataset.image_size, batch_size=batch_size), classes, 1,
                          [10] * classes)
    method.train()
    draws = SeededDraws(range(len(dataset)), seed=0, epoch=0)
    if lowest:
        loader = _parallel.image_loader(dataset, batch_size, "cpu", workers, sampler=draws)
    else:
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, sampler=draws)
    seen = 0
    for step, (x, y, d) in enumerate(loader):
        if step == WARMUP:
            start, seen = time.perf_counter(), 0
        with precision.autocast("cpu", training=True):
            method.update(split_by_domain(x, y, d, 1))
        seen += len(x)
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root")
    parser.add_argument("--n", type=int, default=1120)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--settings", nargs="+", default=["equal:1", "equal:2", "low:1", "low:2"])
    args = parser.parse_args()
    root = data.data_root(args.root)
    table = data.manifest("pbc", root, hashes=False).sample(args.n, random_state=0).reset_index(drop=True)
    rng = np.random.default_rng(0)
    # Half the images degraded at native size, as in PBC-LT's phase 2 training split.
    kinds = rng.choice(list(KINDS), size=len(table))
    degraded = rng.random(len(table)) < 0.5
    table["degradation"] = np.where(degraded, kinds, "none")
    table["severity"] = np.where(degraded, rng.choice(list(SEVERITIES), size=len(table)), 0)
    table["cell_crop"] = COMMON_RATIO
    classes = sorted(table["label"].unique())
    dataset = ImageTable(table, root, classes, args.size,
                         transform=make_augmentation("dihedral_jitter_degrade", args.size))
    print(f"{len(table)} pbc images at {args.size} px, batch {args.batch_size}, "
          f"{torch.get_num_threads()} torch threads, {len(classes)} classes")
    for setting in args.settings:
        priority, workers = setting.split(":")
        rate = images_per_second(dataset, args.batch_size, int(workers), priority == "low", len(classes))
        print(f"{priority:>5} priority, {workers} worker(s): {rate:5.1f} images/s", flush=True)


if __name__ == "__main__":
    main()
