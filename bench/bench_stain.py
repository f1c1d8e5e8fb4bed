"""Macenko stain normalisation against torchstain, on the call pattern that matters.

    python bench/bench_stain.py [--n 32] [--size 0] [--threads 1] [--root DIR]

With ``--size 0`` (the default) it times the data loader's call pattern:
:class:`wbclib.models.ImageTable` normalises each image at native resolution
(pbc: 363x360), one call per image, inside a DataLoader worker that runs one
thread. Ours is ``MacenkoNormalizer.transform(image)`` on the numpy image (the
call ``ImageTable._stain_normalize`` makes), torchstain's torch backend is
``normalize(chw_tensor, stains=False)`` (it then computes only what ours does),
both fitted to the same target and fed the same decoded images.

With ``--size S`` the images are resized to S x S first and ours gets the whole
batch in one call (the stain-augmentation pattern), torchstain still one image
per call. Vahadane is timed alongside as a figure without a reference.

After one warm-up call of each, the timed passes alternate between the
methods, so a change in machine load hits all alike. Prints images/s and
lines ``NAME ratio X.XX`` (ours / torchstain, > 1 means ours is faster).
"""
from __future__ import annotations

import argparse
from importlib.metadata import version
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from timing import images_per_second  # bench/timing.py (the scripts run from bench/)
from wbclib.data import data_root, load_image
from wbclib.stain import MacenkoNormalizer, VahadaneNormalizer


def load_pbc_images(root: Path, n: int, size: int) -> list:
    """N pbc images spread evenly over the sorted file list (so every class
    appears): native size for ``size == 0``, else resized to size x size."""
    paths = sorted((root / "pbc").glob("*/*.jpg"))
    if len(paths) < n:
        raise SystemExit(f"only {len(paths)} pbc images under {root / 'pbc'}, asked for {n}")
    images = [load_image(paths[i]) for i in np.linspace(0, len(paths) - 1, n).astype(int)]
    if size:
        images = [np.array(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in images]
    return images




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32, help="images")
    parser.add_argument("--size", type=int, default=0,
                        help="0: native size, one call per image (the loader); S: resized to S x S, one batched call")
    parser.add_argument("--root", default=None, help="data root (default: wbclib.data.data_root())")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes after the warm-up")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch and OpenCV threads (default 1, what a DataLoader worker runs)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)

    import torchstain  # dev extra; imported here so --help works without it

    images = load_pbc_images(data_root(args.root), args.n, args.size)
    chw_images = [torch.from_numpy(image).permute(2, 0, 1) for image in images]
    shapes = sorted({image.shape[:2] for image in images})
    pattern = "native size, one call per image" if not args.size else f"{args.size}x{args.size}, ours batched"
    print(f"{args.n} pbc images ({pattern}; sizes {shapes}), torch {torch.__version__}, "
          f"torchstain {version('torchstain')}, OpenCV {cv2.__version__}, {args.threads} thread(s)")

    ours = MacenkoNormalizer().fit(images[0])
    theirs = torchstain.normalizers.MacenkoNormalizer(backend="torch")
    theirs.fit(chw_images[0])
    vahadane = VahadaneNormalizer().fit(images[0])

    def torchstain_loop():
        for image in chw_images:
            theirs.normalize(image, stains=False)

    if args.size:
        batch = np.stack(images)
        runs = {"macenko ours": lambda: ours.transform(batch), "macenko torchstain": torchstain_loop,
                "vahadane ours": lambda: vahadane.transform(batch)}
        name = f"macenko_{args.size}px_batched"
    else:
        def ours_loop():
            for image in images:
                ours.transform(image)

        runs = {"macenko ours": ours_loop, "macenko torchstain": torchstain_loop}
        name = "macenko_loader_native"
    rates = images_per_second(runs, args.n, args.repeats)
    for label, rate in rates.items():
        print(f"{label:22s}{rate:8.1f} images/s")
    print(f"{name} ratio {rates['macenko ours'] / rates['macenko torchstain']:.2f}")


if __name__ == "__main__":
    main()
