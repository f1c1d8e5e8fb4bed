"""How much bf16 autocast (and compiling) changes embeddings and a linear
probe's predictions, against float32, on real pbc images.

    python bench/agreement_precision.py [--n 200] [--size 224] [--compile] [--root DIR]

Draws 2N pbc images (stratified by class, seeded): a linear probe (logistic
regression) is fitted on the float32 embeddings of the first N, then
predicts the other N from their float32 and from their reduced-precision
embeddings. Prints the per-image cosine similarity of the embeddings (mean,
minimum), the share of images whose predicted class is unchanged, and the
probe's macro-F1 with its 95% bootstrap interval under each precision.
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from wbclib import data, precision
from wbclib import metrics as M
from wbclib.models import create_backbone, extract_embeddings


def embed(backbone, table, root, size, setting: str, compile: bool = False) -> np.ndarray:
    """Embeddings under the precision ``setting`` (through ``$WBC_PRECISION``,
    as a user would set it), optionally compiled."""
    os.environ[precision.PRECISION_ENV] = setting
    os.environ[precision.COMPILE_ENV] = "1" if compile else "0"
    try:
        return extract_embeddings(backbone, table, root, size, batch_size=32, num_workers=1)
    finally:
        del os.environ[precision.PRECISION_ENV], os.environ[precision.COMPILE_ENV]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="probe-training images; as many are tested")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--compile", action="store_true", help="also compare the compiled extraction")
    parser.add_argument("--root")
    args = parser.parse_args()
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    root = data.data_root(args.root)
    table = data.manifest("pbc", root, hashes=False)
    sample, _ = train_test_split(table, train_size=2 * args.n, stratify=table["label"], random_state=0)
    train, test = train_test_split(sample, train_size=args.n, stratify=sample["label"], random_state=0)
    classes = sorted(table["label"].unique())
    backbone = create_backbone("tf_efficientnet_lite0", pretrained=True)
    print(f"{args.n} probe-training + {len(test)} test pbc images at {args.size} px; "
          f"reduced precision here: {precision.precision_tag('cpu', 'auto')}")

    probe = LogisticRegression(max_iter=2000).fit(embed(backbone, train, root, args.size, "fp32"), train["label"])
    truth = test["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    reference = embed(backbone, test, root, args.size, "fp32")
    variants = {"bf16-autocast": embed(backbone, test, root, args.size, "auto")}
    if args.compile:
        variants["bf16-autocast+compiled"] = embed(backbone, test, root, args.size, "auto", compile=True)

    def scores(features):
        predicted = np.searchsorted(classes, probe.predict(features))
        return predicted, M.evaluate(truth, predicted, len(classes), n_boot=1000)

    base_pred, base = scores(reference)
    print(f"fp32: macro-F1 {base['macro_f1']:.3f} [{base['macro_f1_low']:.3f}, {base['macro_f1_high']:.3f}]")
    for name, features in variants.items():
        cosine = (features * reference).sum(1) / (np.linalg.norm(features, axis=1) * np.linalg.norm(reference, axis=1))
        predicted, result = scores(features)
        print(f"{name}: cosine to fp32 mean {cosine.mean():.5f} min {cosine.min():.5f}; "
              f"predictions unchanged {np.mean(predicted == base_pred):.3f}; "
              f"macro-F1 {result['macro_f1']:.3f} [{result['macro_f1_low']:.3f}, {result['macro_f1_high']:.3f}]")


if __name__ == "__main__":
    main()
