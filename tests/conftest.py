"""Shared fixtures: the real data root (tests skip cleanly without it) and small synthetic images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wbclib import data
from wbclib.heads import single_torch_thread


@pytest.fixture(scope="session")
def root() -> Path:
    try:
        return data.data_root()
    except data.DataError as exc:
        pytest.skip(f"no data root: {exc}")


def write_png(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)
    return path


@pytest.fixture
def synthetic_root(tmp_path) -> Path:
    """A tiny image-folder data set: two classes told apart by colour."""
    rng = np.random.default_rng(0)
    for cls, colour in [("lymphocyte", (120, 60, 160)), ("neutrophil", (220, 170, 190))]:
        for i in range(12):
            img = np.clip(rng.normal(colour, 12, size=(40, 40, 3)), 0, 255).astype(np.uint8)
            write_png(tmp_path / cls / f"{cls}_{i}.png", img)
    return tmp_path


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module of tiny models (``pytestmark`` opts in)."""
    with single_torch_thread():
        yield
