"""Chapter 09's segmentation protocol: cross-validated cellpose on zheng1."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import pandas as pd

from .. import data, runs, segment
from ..runs import inputs_fingerprint

PathLike = Union[str, Path]


def kfold_identity(root: Path, n_folds: int, epochs: int, limit: Optional[int], seed: int, train_kwargs: dict) -> tuple:
    """(configuration, inputs) of a cellpose k-fold run: its settings, and the
    zheng1 images, expert masks and label table it reads (rows, data root,
    file sizes and times)."""
    config = dict(n_folds=n_folds, epochs=epochs, limit=limit, seed=seed, od_scale=segment.CELLPOSE_OD_SCALE,
                  **train_kwargs)
    ids = segment.zheng1_image_ids(root, limit)
    files = pd.DataFrame({"path": [f"zheng1/{kind}/{i:03d}.png" for i in ids for kind in ("images", "masks")]
                          + ["zheng1/labels.csv"]})
    return config, inputs_fingerprint(dict(files=files), root)


def cellpose_kfold(results_dir: PathLike, root: Optional[PathLike], n_folds: int = 5, epochs: int = 100,
                   limit: Optional[int] = None, seed: int = 0, **kwargs) -> pd.DataFrame:
    """:func:`wbclib.segment.cellpose_kfold` in the ``segmentation/cellpose_kfold``
    run folder named by these settings and inputs (a change of either trains
    anew in another folder; a finished run is read back). ``kwargs`` go to the
    trainer (``batch_size`` ...), ``device`` and ``threads`` only to how it runs.
    Returns the per-image Dice table with the ``run_dir``."""
    root = data.data_root(root)
    train_kwargs = {k: v for k, v in kwargs.items() if k not in ("device", "threads")}
    config, inputs = kfold_identity(root, n_folds, epochs, limit, seed, train_kwargs)
    run = runs.run(results_dir, "segmentation/cellpose_kfold", config, inputs, keys=("n_folds", "epochs", "limit"))
    if run.done:
        scores = run.read_csv("scores.csv")
    else:
        scores = segment.cellpose_kfold(root, run.dir, n_folds, epochs, limit, seed, **kwargs)
        run.write_csv("scores.csv", scores)
        run.finish(dict(nucleus_dice=float(scores["nucleus_dice"].mean()),
                        cell_dice=float(scores["cell_dice"].mean()), images=len(scores)))
    return scores.assign(run_dir=str(run.dir))
