"""Images per second for decoding + augmentation, feature extraction and a
training step, at 128 and 224 px, on real pbc images.

    python bench/bench_throughput.py [--root DIR] [--n 128] [--sizes 128 224] [--backbone tf_efficientnet_lite0]
"""
from __future__ import annotations

import argparse
import time

import pandas as pd
import torch
from torch.utils.data import DataLoader

from wbclib import data
from wbclib.augment import make_augmentation
from wbclib.methods import create_method
from wbclib.models import ImageTable, Normalized, create_backbone, default_device, default_workers


def rate(n: int, fn) -> float:
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root")
    parser.add_argument("--n", type=int, default=128, help="images per measurement")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    root = data.data_root(args.root)
    table = data.manifest("pbc", root, hashes=False).sample(args.n, random_state=0)
    device = default_device()
    backbone = create_backbone(args.backbone, pretrained=args.backbone.startswith("tf_efficientnet_lite"))
    model = Normalized(backbone).to(device)
    print(f"device {device}, torch threads {torch.get_num_threads()}, loader workers {default_workers()}, "
          f"{args.n} pbc images, backbone {args.backbone}")
    rows = []
    for size in args.sizes:
        ds = ImageTable(table, root, sorted(table.label.unique()), size,
                        transform=make_augmentation("dihedral_jitter", size))
        loader = DataLoader(ds, batch_size=args.batch_size, num_workers=default_workers())
        batches = []
        decode = rate(args.n, lambda: batches.extend(x for x, _, _ in loader))

        @torch.no_grad()
        def extract():
            model.eval()
            for x in batches:
                model(x.to(device))

        extract()  # warm-up
        features = rate(args.n, extract)
        method = create_method("erm", model, backbone.num_features, 6).to(device)
        y = torch.zeros(args.batch_size, dtype=torch.long, device=device)

        def train_steps():
            method.train()
            for x in batches:
                method.update([(x.to(device), y[: len(x)])])

        train_steps()  # warm-up
        step = rate(args.n, train_steps)
        rows.append(dict(size=size, decode_augment=decode, feature_extraction=features, train_step=step))
    print(pd.DataFrame(rows).set_index("size").round(1).to_string())
    print("(images per second)")


if __name__ == "__main__":
    main()
