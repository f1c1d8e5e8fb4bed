"""Training images per second of one network update in float32 and under
bfloat16 autocast, on the CPU (no data loading: one fixed random uint8 batch).

    python bench/train_precision.py [--backbone tf_efficientnet_lite0] [--batch-size 32]
                                    [--settings 128:0 128:3 224:0 64:0] [--steps 5]

Each setting is ``image_size:frozen_stages``. Both precisions build a fresh
ERM method (``train.build_method``) and take 2 warm-up steps before
``--steps`` timed ones. ``precision.autocast_dtype`` uses the result: CPU
training runs in float32. Run it on an otherwise idle machine; the torch
threads are torch's default (one per core).
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch

from wbclib.train import TrainConfig, build_method

WARMUP = 2


def images_per_second(backbone: str, size: int, frozen: int, batch_size: int, steps: int, bf16: bool) -> float:
    config = TrainConfig(method="erm", backbone=backbone, pretrained=False, image_size=size, epochs=1,
                         frozen_stages=frozen)
    method = build_method(config, num_classes=9, num_domains=1, class_counts=[1] * 9).train()
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, generator=generator)
    y = torch.randint(0, 9, (batch_size,), generator=generator)
    cast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    for step in range(WARMUP + steps):
        if step == WARMUP:
            start = time.perf_counter()
        with cast():
            method.update([(x, y)])
    return steps * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--settings", nargs="+", default=["128:0", "128:3", "224:0", "64:0"])
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    print(f"{'size':>5} {'frozen':>6} {'fp32':>8} {'bf16':>8}  images/s, {torch.get_num_threads()} threads")
    for setting in args.settings:
        size, frozen = (int(v) for v in setting.split(":"))
        fp32, bf16 = (images_per_second(args.backbone, size, frozen, args.batch_size, args.steps, cast)
                      for cast in (False, True))
        print(f"{size:>5} {frozen:>6} {fp32:>8.1f} {bf16:>8.1f}")


if __name__ == "__main__":
    main()
