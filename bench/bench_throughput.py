"""Images per second for decoding + augmentation, feature extraction and a
training step on real pbc images, each model figure against plain eager
float32 timm measured in the same run.

    python bench/bench_throughput.py [--root DIR] [--n 64] [--sizes 128 224] [--compile-sizes 224]
                                     [--backbone tf_efficientnet_lite0] [--batch-size 32]

Per image size, the loader (``ImageTable`` with the training augmentation)
decodes N images into batches once; then, alternating between the variants
after a warm-up pass of each, it times

* extraction (eval, no grad): plain eager float32 timm (NCHW, the reference);
  the project's ``Normalized`` model in channels-last float32 (before these
  levers); the same under :func:`wbclib.precision.autocast`; that with the
  batch split across CPU streams (:func:`wbclib.streams.forward_in_streams`:
  what ``extract_embeddings`` and ``predict_proba`` run, the
  ``extraction_<size>px`` line); and, for ``--compile-sizes``, the model
  through :func:`wbclib.precision.for_inference` compiled (compile time
  printed, not timed);
* a training step (ERM: forward, cross-entropy, backward, AdamW) on the plain
  eager float32 model, on ``Normalized`` in float32 (before these levers) and
  on ``Normalized`` under ``precision.autocast(training=True)`` (what
  ``train_run`` runs: float32 on CPU under the default precision since
  bfloat16's backward proved slower there, so on CPU that line now matches
  the float32 one; see ``bench/train_precision.py``).

Prints images/s and lines ``NAME ratio X.XX`` (variant / reference, > 1 is faster).
``WBC_PRECISION=fp32`` shows the same figures with autocast off.
"""
from __future__ import annotations

import argparse
import copy
import time

import timm
import torch
from torch import nn
from torch.utils.data import DataLoader

from timing import images_per_second  # bench/timing.py (the scripts run from bench/)
from wbclib import data, precision
from wbclib.augment import make_augmentation
from wbclib.methods import create_method
from wbclib.streams import forward_in_streams
from wbclib.models import PAPER_BACKBONES, ImageTable, Normalized, create_backbone, default_device, default_workers


class PlainEager(nn.Module):
    """The reference: a timm model as timm builds it (NCHW, float32), with
    the uint8 -> normalised float conversion in front."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x.float() / 255.0 - self.mean) / self.std)




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root")
    parser.add_argument("--n", type=int, default=64, help="images per pass")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    parser.add_argument("--compile-sizes", type=int, nargs="*", default=[224],
                        help="sizes at which the compiled extraction is timed too (compiling takes minutes)")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--train-n", type=int, default=32,
                        help="images per training pass (plain float32 training runs ~1.5 images/s at 224 px on 2 cores)")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes after the warm-up")
    args = parser.parse_args()

    root = data.data_root(args.root)
    table = data.manifest("pbc", root, hashes=False).sample(args.n, random_state=0)
    device = default_device()
    pretrained = args.backbone.startswith("tf_efficientnet_lite")
    backbone = create_backbone(args.backbone, pretrained=pretrained)
    plain = timm.create_model(PAPER_BACKBONES.get(args.backbone, args.backbone), num_classes=0)
    plain.load_state_dict(backbone.model.state_dict())
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, loader workers "
          f"{default_workers()}, {args.n} pbc images, batch {args.batch_size}, backbone {args.backbone}; "
          f"precision {precision.precision_tag(device)} (inference), "
          f"{precision.precision_tag(device, training=True)} (training)")

    for size in args.sizes:
        dataset = ImageTable(table, root, sorted(table.label.unique()), size,
                             transform=make_augmentation("dihedral_jitter", size))
        loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=default_workers())
        batches = []
        start = time.perf_counter()
        batches.extend(x.to(device) for x, _, _ in loader)
        print(f"[{size} px] decode_augment {args.n / (time.perf_counter() - start):.1f} images/s (loader)")

        reference = PlainEager(copy.deepcopy(plain), backbone.mean, backbone.std).to(device).eval()
        ours = Normalized(copy.deepcopy(backbone)).to(device).eval()

        def extract(model, setting=None, streams=False):
            @torch.no_grad()
            def run():
                for x in batches:
                    with precision.autocast(device, setting):
                        forward_in_streams(model, x) if streams else model(x)
            return run

        tag = precision.precision_tag(device)
        variants = {"plain eager fp32 timm": extract(reference, "fp32"),
                    "channels-last fp32": extract(ours, "fp32"),
                    f"channels-last {tag}": extract(ours),
                    f"ours ({tag}, streams)": extract(ours, streams=True)}
        if size in args.compile_sizes:
            compiled = precision.for_inference(Normalized(copy.deepcopy(backbone)).to(device), compile=True)
            start = time.perf_counter()
            extract(compiled)()
            print(f"[{size} px] compiling took {time.perf_counter() - start:.0f} s")
            variants["ours compiled"] = extract(compiled)
        rates = images_per_second(variants, args.n, args.repeats)
        for name, rate in rates.items():
            print(f"[{size} px] extraction {name:32s}{rate:8.1f} images/s")
        base = rates["plain eager fp32 timm"]
        ours_rate = rates[f"ours ({tag}, streams)"]
        print(f"extraction_{size}px ratio {ours_rate / base:.2f}")
        print(f"extraction_{size}px_vs_channels_last_fp32 ratio {ours_rate / rates['channels-last fp32']:.2f}")
        print(f"extraction_{size}px_autocast_only ratio {rates[f'channels-last {tag}'] / base:.2f}")
        if "ours compiled" in rates:
            print(f"extraction_{size}px_compiled ratio {rates['ours compiled'] / base:.2f}")

        train_batches = batches[: max(1, args.train_n // args.batch_size)]
        train_n = sum(len(x) for x in train_batches)
        labels = torch.zeros(args.batch_size, dtype=torch.long, device=device)
        num_classes = 6

        def train_steps(method, setting=None):
            def run():
                method.train()
                for x in train_batches:
                    with precision.autocast(device, setting, training=True):
                        method.update([(x, labels[: len(x)])])
            return run

        plain_method = create_method("erm", PlainEager(copy.deepcopy(plain), backbone.mean, backbone.std),
                                     backbone.num_features, num_classes).to(device)
        our_method = create_method("erm", Normalized(copy.deepcopy(backbone)), backbone.num_features,
                                   num_classes).to(device)
        today = create_method("erm", Normalized(copy.deepcopy(backbone)), backbone.num_features,
                              num_classes).to(device)
        train_tag = precision.precision_tag(device, training=True)
        rates = images_per_second({"plain eager fp32 timm": train_steps(plain_method, "fp32"),
                                   "channels-last fp32": train_steps(today, "fp32"),
                                   f"ours ({train_tag})": train_steps(our_method)}, train_n, args.repeats)
        for name, rate in rates.items():
            print(f"[{size} px] train step {name:32s}{rate:8.1f} images/s")
        ours_rate = rates[f"ours ({train_tag})"]
        print(f"train_step_{size}px ratio {ours_rate / rates['plain eager fp32 timm']:.2f}")
        print(f"train_step_{size}px_vs_channels_last_fp32 ratio {ours_rate / rates['channels-last fp32']:.2f}")


if __name__ == "__main__":
    main()
