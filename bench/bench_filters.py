"""The filters, k-means and decoding wbclib now takes from OpenCV and
scikit-learn, timed against the code they replaced and the raw library calls.

    python bench/bench_filters.py [--n 16] [--threads 1] [--root DIR]

On N native-size pbc images (the noise detector runs the median on every
image at native size). After one warm-up call of each, the timed passes
alternate between the methods so machine load hits all alike. Prints
``NAME ratio X.XX`` lines, each the reference's time over ours (> 1: ours is
faster):

* ``median3x3`` / ``bilateral`` / ``kmeans_cells``: against the numpy code
  they replaced (``bench/reference_filters.py``);
* ``median3x3_vs_opencv`` / ``bilateral_vs_opencv``: against the bare OpenCV
  call (what the border handling around it costs);
* ``kmeans_stain_matrices``: against the torch k-means SADA used before, on
  its problem (64 stain matrices, 6-D, 3 clusters, 5 restarts);
* ``decode_opencv_vs_pil``: OpenCV's JPEG decoding against PIL's (what
  ``wbclib.data.load_image`` uses), for the record.
"""
from __future__ import annotations

import argparse

import cv2
import numpy as np
import torch

import reference_filters as ref
from timing import seconds_per_pass  # bench/timing.py (the scripts run from bench/)
from wbclib import cluster
from wbclib import morphology as M
from wbclib import restore as R
from wbclib.data import data_root, load_image
from wbclib.segment import segment_cell




def report(name: str, ours: float, reference: float, unit: str = "ms per pass") -> None:
    print(f"  ours {1e3 * ours:9.2f}  reference {1e3 * reference:9.2f}  ({unit})")
    print(f"{name} ratio {reference / ours:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16, help="pbc images")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch and OpenCV threads")
    parser.add_argument("--root", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)

    paths = sorted((data_root(args.root) / "pbc").glob("*/*.jpg"))
    paths = [paths[i] for i in np.linspace(0, len(paths) - 1, args.n).astype(int)]
    images = [load_image(p) for p in paths]
    print(f"{args.n} native-size pbc images, OpenCV {cv2.__version__}, {args.threads} thread(s)")

    def each(fn):
        return lambda: [fn(image) for image in images]

    t = seconds_per_pass({"ours": each(R.median3x3), "numpy": each(ref.median3x3_numpy),
                          "opencv": each(lambda im: cv2.medianBlur(im, 3))}, args.repeats)
    report("median3x3", t["ours"], t["numpy"])
    report("median3x3_vs_opencv", t["ours"], t["opencv"])

    bilateral_images = images[: max(2, args.n // 4)]  # the numpy filter takes ~0.2 s an image
    t = seconds_per_pass({
        "ours": lambda: [R.bilateral(im) for im in bilateral_images],
        "numpy": lambda: [ref.bilateral_numpy(im) for im in bilateral_images],
        "opencv": lambda: [cv2.bilateralFilter(im, 5, 45.0, 1.5) for im in bilateral_images]}, args.repeats)
    report("bilateral", t["ours"], t["numpy"])
    report("bilateral_vs_opencv", t["ours"], t["opencv"])

    cells = [M.optical_density(im, M.background_rgb(im))[segment_cell(im).cell] for im in images]
    t = seconds_per_pass({
        "ours": lambda: [cluster.kmeans(od, 2, seed=0, max_fit=M.KMEANS_MAX_FIT) for od in cells],
        "numpy": lambda: [ref.kmeans_numpy(od, 2, 0) for od in cells]}, args.repeats)
    report("kmeans_cells", t["ours"], t["numpy"])

    rng = np.random.default_rng(0)
    stain_matrices = np.concatenate([rng.normal(c, 0.05, (22, 6)) for c in rng.normal(0, 0.3, (3, 6))])[:64]
    as_tensor = torch.tensor(stain_matrices, dtype=torch.float32)
    t = seconds_per_pass({
        "ours": lambda: cluster.kmeans(stain_matrices, 3, seed=0, n_init=5),
        "torch": lambda: ref.kmeans_torch(as_tensor, 3, generator=torch.Generator().manual_seed(0))},
        max(args.repeats, 10))
    report("kmeans_stain_matrices", t["ours"], t["torch"], "ms per call")

    encoded = [np.fromfile(p, np.uint8) for p in paths]

    def pil_decode():
        from io import BytesIO

        from PIL import Image
        for data in encoded:
            np.asarray(Image.open(BytesIO(data.tobytes())).convert("RGB"))

    def opencv_decode():
        for data in encoded:
            cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)

    t = seconds_per_pass({"opencv": opencv_decode, "pil": pil_decode}, args.repeats)
    report("decode_opencv_vs_pil", t["opencv"], t["pil"])


if __name__ == "__main__":
    main()
