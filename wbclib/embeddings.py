"""Embeddings of every table row an experiment needs, extracted once and looked up by row.

:class:`EmbeddingStore` asks :func:`models.extract_embeddings` for the
embeddings of the unique (path, degradation, severity, view, stain, cell crop) rows of
its tables, in one content-keyed cache entry (:func:`models.embedding_entry`),
and returns them for any table of those rows; :class:`ChainedStore` looks rows
up in several stores.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from . import _io
from .models import create_backbone, default_device, embedding_entry, extract_embeddings
from .precision import precision_tag


_KEY = ["path", "degradation", "severity", "view", "stain", "stain_reference", "cell_crop"]


_DEFAULTS = {"degradation": "none", "severity": 0, "view": 0, "stain": "none", "stain_reference": "", "cell_crop": 0.0}


class EmbeddingStore:
    """Embeddings of every row any experiment needs, extracted once (cached on
    disk) and looked up by (path, degradation, severity, view, stain, cell crop).

    ``backbone`` (a :class:`models.Backbone`, e.g. a fine-tuned one) replaces
    the pretrained ``backbone_name``; it then needs a ``weights_tag``. A
    ``transform`` (the evaluation transform of a training preset) needs a
    ``transform_tag``; both enter the cache key.
    """

    def __init__(self, tables: Sequence[pd.DataFrame], backbone_name: str, image_size: int, root: Path,
                 cache_dir: Path, desc: str = "embeddings", backbone=None, weights_tag: str = "",
                 transform=None, transform_tag: str = "", batch_size: int = 64):
        needed = pd.concat([self._keyed(t) for t in tables])[_KEY + ["label"]]
        needed = needed.drop_duplicates(_KEY).sort_values(_KEY).reset_index(drop=True)
        entry = None
        if backbone is None and cache_dir is not None:
            entry = embedding_entry(cache_dir, backbone_name, True, image_size, needed, 0, weights_tag,
                                    transform_tag, root, precision_tag(default_device()))
        if entry is not None and entry.exists():
            # A cache hit needs no model (building one costs seconds); it is validated all the same.
            self.features = _io.load_npy(entry.path, shape=(len(needed), None), dtype=np.float32)
        else:
            backbone = backbone if backbone is not None else create_backbone(backbone_name, pretrained=True)
            self.features = extract_embeddings(backbone, needed, root, image_size, cache_dir=cache_dir, desc=desc,
                                               weights_tag=weights_tag, transform=transform,
                                               transform_tag=transform_tag, batch_size=batch_size)
        self.index = {k: i for i, k in enumerate(map(tuple, needed[_KEY].astype(str).to_numpy()))}

    @staticmethod
    def _keyed(table: pd.DataFrame) -> pd.DataFrame:
        out = table.copy()
        for col, default in _DEFAULTS.items():
            if col not in out:
                out[col] = default
        out["stain_reference"] = out["stain_reference"].fillna("")
        out["cell_crop"] = out["cell_crop"].fillna(0.0).astype(float)
        return out

    def positions(self, table: pd.DataFrame) -> np.ndarray:
        """Row of ``features`` for each row of ``table``, -1 where this store lacks it."""
        keys = map(tuple, self._keyed(table)[_KEY].astype(str).to_numpy())
        return np.array([self.index.get(k, -1) for k in keys], dtype=np.int64)

    def __call__(self, table: pd.DataFrame) -> np.ndarray:
        pos = self.positions(table)
        if (pos < 0).any():
            missing = self._keyed(table)[_KEY].iloc[int(np.flatnonzero(pos < 0)[0])].to_dict()
            raise KeyError(f"no embedding for {missing} ({int((pos < 0).sum())} rows missing)")
        return self.features[pos]


class ChainedStore:
    """Look rows up in several stores (e.g. plain embeddings and extra TTA views); first match wins."""

    def __init__(self, *stores):
        self.stores = [s for s in stores if s is not None]

    def __call__(self, table: pd.DataFrame) -> np.ndarray:
        out, found = None, np.zeros(len(table), dtype=bool)
        for store in self.stores:
            pos = store.positions(table)
            take = (pos >= 0) & ~found
            if out is None:
                out = np.zeros((len(table), store.features.shape[1]), dtype=store.features.dtype)
            out[take] = store.features[pos[take]]
            found |= take
        if out is None or not found.all():
            raise KeyError(f"{int((~found).sum())} of {len(table)} rows are in none of the stores")
        return out


def embeddings_cached(tables: Sequence[pd.DataFrame], backbone: str, image_size: int, cache_dir: Path,
                      root: Path) -> bool:
    """Whether an :class:`EmbeddingStore` of these tables would be a cache hit."""
    if cache_dir is None:
        return False
    needed = pd.concat([EmbeddingStore._keyed(t) for t in tables])[_KEY + ["label"]]
    needed = needed.drop_duplicates(_KEY).sort_values(_KEY).reset_index(drop=True)
    return embedding_entry(cache_dir, backbone, True, image_size, needed, root=root,
                           precision=precision_tag(default_device())).exists()
