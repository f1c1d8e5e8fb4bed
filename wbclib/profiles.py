"""Run profiles shared by every notebook, and where outputs go.

* ``smoke`` – seconds per notebook on tiny images; CI executes every notebook with it.
* ``cpu`` – the default main job: the whole book in under an hour on 2 CPU cores
  (capped per-class counts, 128 px, one fine-tuned fold).
* ``gpu`` – paper scale: full benchmark sizes, 224 px, every fold fine-tuned.
"""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

from .data import PROJECT_ROOT, PathLike

PROFILES = {
    "smoke": dict(
        image_size=32, batch_size=16, backbone="tf_efficientnet_lite0", pretrained=True,
        n_max=12, val_per_class=3, test_per_class=4, probe_folds=[0, 1], finetune_folds=[0],
        rhos=[1, 10, 100], finetune_rhos=[100], probe_epochs=5, finetune_epochs=1, patience=2,
        crosslab_train_per_class=12, crosslab_val_per_class=3, crosslab_test_per_class=4,
        crosslab_seeds=[0], severity_grid_per_class=2, n_boot=50, lr=1e-3,
    ),
    "cpu": dict(
        image_size=128, batch_size=32, backbone="tf_efficientnet_lite0", pretrained=True,
        n_max=200, val_per_class=30, test_per_class=60, probe_folds=[0, 1, 2, 3, 4], finetune_folds=[0],
        rhos=[1, 10, 100], finetune_rhos=[1, 10, 100], probe_epochs=40, finetune_epochs=6, patience=3,
        crosslab_train_per_class=150, crosslab_val_per_class=30, crosslab_test_per_class=300,
        crosslab_seeds=[0], severity_grid_per_class=20, n_boot=1000, lr=1e-3,
    ),
    "gpu": dict(
        image_size=224, batch_size=64, backbone="tf_efficientnet_lite0", pretrained=True,
        n_max=None, val_per_class=None, test_per_class=None, probe_folds=[0, 1, 2, 3, 4],
        finetune_folds=[0, 1, 2, 3, 4], rhos=[1, 10, 100], finetune_rhos=[1, 10, 100], probe_epochs=60,
        finetune_epochs=30, patience=6, crosslab_train_per_class=None, crosslab_val_per_class=None,
        crosslab_test_per_class=None, crosslab_seeds=[0, 1, 2], severity_grid_per_class=None, n_boot=1000,
        lr=3e-4,
    ),
}


def get(name: str) -> SimpleNamespace:
    """The settings of a profile as attributes (``cfg.image_size``)."""
    if name not in PROFILES:
        raise KeyError(f"unknown profile {name!r}; known: {', '.join(PROFILES)}")
    return SimpleNamespace(name=name, **PROFILES[name])


def output_dir(kind: str, path: Optional[PathLike] = None) -> Path:
    """``results``, ``cache`` or ``splits`` folder: the given path, else
    ``$WBC_<KIND>_DIR``, else ``<project>/<kind>``; created if missing."""
    path = path or os.environ.get(f"WBC_{kind.upper()}_DIR") or PROJECT_ROOT / kind
    path = Path(path).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path
