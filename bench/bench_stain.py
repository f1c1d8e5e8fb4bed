"""Throughput of batched stain normalisation against torchstain's per-image loop.

Loads N real pbc images resized to SIZE x SIZE, fits every normaliser on the
first one and, after a warm-up call of each, times REPEATS passes over the
batch, alternating between the methods:

    python bench/bench_stain.py --n 64 --size 224 [--threads 1]

Prints images/s for our batched Macenko, torchstain's torch Macenko called
image by image (stains=False, so it computes only what ours does), their
ratio, and our batched Vahadane.
"""
from __future__ import annotations

import argparse
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from wbclib.data import data_root, load_image
from wbclib.stain import MacenkoNormalizer, VahadaneNormalizer


def load_pbc_batch(root: Path, n: int, size: int) -> np.ndarray:
    """N pbc images spread evenly over the sorted file list (so every class
    appears), resized to size x size: (N, size, size, 3) uint8."""
    paths = sorted((root / "pbc").glob("*/*.jpg"))
    if len(paths) < n:
        raise SystemExit(f"only {len(paths)} pbc images under {root / 'pbc'}, asked for {n}")
    chosen = [paths[i] for i in np.linspace(0, len(paths) - 1, n).astype(int)]
    return np.stack([
        np.asarray(Image.fromarray(load_image(p)).resize((size, size), Image.BILINEAR)) for p in chosen
    ])


def images_per_second(runs: dict, n_images: int, repeats: int) -> dict:
    """Images/s of each named callable. After one warm-up call each (first-call
    allocations, kernel selection), the timed calls alternate between the
    callables so a change in machine load hits all of them alike."""
    for run in runs.values():
        run()
    seconds = dict.fromkeys(runs, 0.0)
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[name] += time.perf_counter() - start
    return {name: repeats * n_images / seconds[name] for name in runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="images in the batch")
    parser.add_argument("--size", type=int, default=224, help="images are resized to size x size")
    parser.add_argument("--root", default=None, help="data root (default: wbclib.data.data_root())")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes after the warm-up")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's own choice); DataLoader workers use 1")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    import torchstain  # dev extra; imported here so --help works without it

    images = load_pbc_batch(data_root(args.root), args.n, args.size)
    batch = torch.from_numpy(images)
    chw_images = [torch.from_numpy(image).permute(2, 0, 1) for image in images]
    print(f"{args.n} pbc images at {args.size}x{args.size}, torch {torch.__version__}, "
          f"torchstain {version('torchstain')}, {torch.get_num_threads()} CPU threads")

    ours = MacenkoNormalizer().fit(images[0])
    theirs = torchstain.normalizers.MacenkoNormalizer(backend="torch")
    theirs.fit(chw_images[0])

    def torchstain_loop():
        for image in chw_images:
            theirs.normalize(image, stains=False)

    vahadane = VahadaneNormalizer().fit(images[0])
    rates = images_per_second(
        {"macenko ours (batched)": lambda: ours.transform(batch),
         "macenko torchstain (loop)": torchstain_loop,
         "vahadane ours (batched)": lambda: vahadane.transform(batch)},
        args.n, args.repeats,
    )
    for name, rate in rates.items():
        print(f"{name:27s}{rate:8.1f} images/s")
    ratio = rates["macenko ours (batched)"] / rates["macenko torchstain (loop)"]
    print(f"{'macenko ours / torchstain':27s}{ratio:8.2f}x")


if __name__ == "__main__":
    main()
