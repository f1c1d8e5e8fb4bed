"""Cross-lab domain generalisation machinery for SADA's Table I on the public labs
(the chapter's protocol, run folders and tables: :mod:`wbclib.protocols.crosslab_dg`).

Four classes (neutrophil, lymphocyte, monocyte, eosinophil), leave-one-lab-out
over {pbc, zheng1, bccd} and train-on-pbc / test-on-the-others
(``benchmarks.CROSSLAB_SETTINGS``); every method of :data:`ROWS` for every
setting and seed; F1-macro and F1-micro (= accuracy for one label per image)
per target lab with bootstrap intervals; SWAD weight averaging for every
method alike.

Two regimes, chosen by the profile's ``dg_regime``:

* ``"maps"`` (``smoke``/``cpu``) – a frozen ImageNet EfficientNet-Lite0 trunk
  turns every image into its final feature map (1280 x 4 x 4 at 128 px),
  computed once and cached; each method's featurizer is a small trainable
  conv head on those maps (:class:`MapHead`). SADA's re-stained views are
  precomputed too: the stain matrices of the setting's training images are
  clustered once (k-means), every training image is re-stained once towards
  a random member of each other cluster, and the trunk maps of those copies
  are cached – an approximation of SADA's per-batch clustering and random
  re-staining (same clusters and donors for every epoch).
* ``"end_to_end"`` (``gpu``) – every method fine-tunes the whole backbone on
  images through :func:`train.train_run` (SADA re-stains inside each batch).

Besides either regime, the rows of the profile's ``dg_finetune_rows`` are also
trained like chapter 04's strong ERM (pbc→others, ``crosslab_frozen_stages``
frozen, colour, stain and blur jitter, every profile;
:func:`wbclib.protocols.crosslab_dg.finetuned_rows`), ERM being chapter 04's run.

With one source lab (pbc→others) the domain-aware baselines (CORAL, DANN,
BoDA) get stain-colour clusters of the training images as domains (the
pseudo-domains SADA uses), since one lab alone gives nothing to align.

Scale: :func:`scale_factors` measures each lab's nucleus-to-image ratio and
returns the per-lab centre crop (``crop`` column, applied by the image
loader before resizing) that equalises the lab medians.
"""
from __future__ import annotations

import functools
import hashlib
import re
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import _io, cache
from . import benchmarks as B
from . import scale as SC
from .benchmarks import CROSSLAB_SETTINGS
from .cellcrop import COMMON_RATIO
from .method_base import METHODS
from .methods import create_method
from ._parallel import batches, chunks, loader_workers, map_in_processes
from .models import ImageTable, Normalized, create_backbone
from .sada import align_stain_order, feature_maps, pick_targets, pseudo_domains, restain_views, stain_statistics
from .swad import SWAD, update_bn
from .runs import files_fingerprint, inputs_fingerprint
from .train import split_by_domain, train_epoch, validation_step

CLASSES = list(B.CROSSLAB_CLASSES)
#: Versions of the run configuration, of the cached images/maps/stain statistics, and of the cached views.
VERSION = "dg-v3"  # v3: L_LA sums eq. 4 over channels (it averaged them)
CACHE_VERSION = "dg-v1"
VIEWS_VERSION = "views-v2"
#: Methods that train on SADA's re-stained views (the maps regime feeds them precomputed views).
VIEW_METHODS = ("sada", "erm_restain")

#: Table rows: label -> (registered method, hyper-parameter overrides, options).
#: Option ``decoupled`` re-trains the classifier with class-balanced sampling
#: on the frozen features afterwards (BoDA's "Ours+").
ROWS: Dict[str, Tuple[str, dict, dict]] = {
    "ERM": ("erm", {}, {}),
    "CORAL": ("coral", {}, {}),
    "DANN": ("dann", {}, {}),
    "Mixup": ("mixup", {}, {}),
    "SelfReg": ("selfreg", {}, {}),
    "BoDA": ("boda", {}, {}),
    "BoDA decoupled": ("boda", {}, {"decoupled": True}),
    "SADA": ("sada", {}, {}),
    # ablations (SADA's Table III; M1 is ERM) and a control
    "M2: SADA without L_LA": ("sada", {"beta": 0.0}, {}),
    "M3: SupCon, no L_LA": ("sada", {"anchors": "self", "beta": 0.0}, {}),
    "ERM + re-stained views": ("erm_restain", {}, {}),
}

def profile_hparams(cfg) -> Dict[str, dict]:
    """The profile's overrides of method defaults, by registered method name:
    ``sada_k`` (stain clusters, for SADA and the re-stained-views control) and
    ``sada_beta`` (L_LA weight), each only when set (None keeps the method's
    declared default, ``Method.defaults``)."""
    k, beta = getattr(cfg, "sada_k", None), getattr(cfg, "sada_beta", None)
    views = {} if k is None else {"k": k}
    return {"sada": dict(views, **({} if beta is None else {"beta": beta})), "erm_restain": dict(views)}


def row_hparams(cfg, row: str, extra: Optional[dict] = None) -> Tuple[str, dict, dict]:
    """The one place a table row's hyper-parameters are resolved, in this order
    (later wins): the method's declared defaults, the profile's overrides
    (:func:`profile_hparams`), the row's own (:data:`ROWS`, e.g. an ablation's
    beta 0), ``extra`` (a sweep). Returns ``(method name, hparams, options)``;
    names left out take the method's default when it is built (the code version
    in every run's identity covers those)."""
    if row not in ROWS:
        raise KeyError(f"unknown row {row!r}; known: {list(ROWS)}")
    method_name, own, options = ROWS[row]
    hparams = {**profile_hparams(cfg).get(method_name, {}), **own, **(extra or {})}
    return method_name, hparams, dict(options)


def resolved_hparams(cfg, row: str) -> dict:
    """Every hyper-parameter of ``row`` as its method will use it (defaults filled in)."""
    method_name, hparams, _ = row_hparams(cfg, row)
    return METHODS.get(method_name).resolve_hparams(hparams)


def stain_clusters_k(cfg) -> int:
    """How many stain-colour clusters SADA uses (the profile's ``sada_k``, else SADA's default)."""
    return int(resolved_hparams(cfg, "SADA")["k"])


#: SADA's Table I (ResNet-50, four source labs, five classes; leave-one-domain-out), mean ± std of 3 trials.
SADA_TABLE_I = pd.DataFrame(
    [
        ["ERM", 70.0, 71.3, 83.8, 67.0, 86.9, 59.1, 77.8, 55.4, 79.6, 63.2],
        ["CORAL", 70.7, 73.6, 84.2, 66.7, 87.2, 61.0, 77.7, 57.3, 79.9, 64.7],
        ["Mixup", 67.0, 69.3, 83.4, 67.6, 87.4, 61.9, 77.0, 54.2, 78.7, 63.3],
        ["SelfReg", 68.4, 70.3, 84.5, 67.8, 86.8, 60.0, 76.5, 53.4, 79.0, 62.9],
        ["BoDA", 70.5, 73.6, 82.2, 65.8, 86.8, 60.6, 80.5, 58.7, 80.0, 64.7],
        ["SADA", 79.9, 81.6, 86.0, 68.2, 87.4, 61.9, 84.3, 62.6, 84.4, 68.6],
    ],
    columns=["method"] + [f"{lab}|{m}" for lab in ("Acevedo-20", "LDWBC", "Raabin-WBC", "Zheng-18", "average")
                          for m in ("F1-micro", "F1-macro")],
).set_index("method")

#: SADA's Table III (average over its four public target sets).
SADA_TABLE_III = pd.DataFrame(
    [["M1 (ERM)", 79.6, 63.2], ["M2 (no L_LA)", 83.9, 68.2], ["M3 (SupCon, no L_LA)", 78.8, 62.2],
     ["SADA", 84.4, 68.6]], columns=["variant", "F1-micro", "F1-macro"]).set_index("variant")


#: Batches of trunk maps per job of :meth:`MapStore.trunk_maps`.
_MAP_BATCHES = 4


def _maps_of(trunk: nn.Module, images: np.ndarray, rows: Sequence[int], batch_size: int) -> np.ndarray:
    """float16 trunk maps of ``images[rows]``, in batches of ``batch_size`` (one job of :meth:`MapStore.trunk_maps`)."""
    out = []
    with torch.inference_mode():
        for start in range(rows[0], rows[-1] + 1, batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[start: min(start + batch_size, rows[-1] + 1)]))
            # C-contiguous, not the maps' channels-last strides: see cache.array
            out.append(feature_maps(trunk, x.contiguous(memory_format=torch.channels_last)).half().contiguous().numpy())
    return np.concatenate(out)


def one_thread(fn):
    """Run ``fn`` with one intra-op torch thread (restored afterwards). The
    heads trained here are tiny, and on a shared 2-core machine two threads
    spin against each other: measured 20x slower for the head, 2x for the
    trunk under load. One thread also keeps results independent of the core count."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(before)

    return wrapper


#: The modules whose code decides the cached images, trunk maps, stain statistics and views.
DG_CACHE_MODULES = ("crosslab.py", "models.py", "data.py", "sada.py", "stain.py", "scale.py", "augment.py",
                    "cluster.py", "precision.py", "cellcrop.py", "_cellboxes.py")


def _hash(*parts) -> str:
    return hashlib.sha256("\n".join(map(str, parts)).encode()).hexdigest()[:20]


def _listing(rows: pd.DataFrame) -> str:
    crop = rows["crop"].astype(float).round(6).astype(str) if "crop" in rows else "1.0"
    return (rows["path"].astype(str) + "|" + crop).str.cat(sep="\n")


# --------------------------------------------------------------------------
# Scale
# --------------------------------------------------------------------------


def scale_sample(table: pd.DataFrame, per_lab: Optional[int]) -> pd.DataFrame:
    """Up to ``per_lab`` images of each lab, spread over its classes (by rank)."""
    parts = []
    for _, rows in table.groupby("lab"):
        rows = rows.sort_values(["rank", "path"])
        parts.append(rows if per_lab is None else rows.head(per_lab))
    return pd.concat(parts).reset_index(drop=True)


@one_thread
def scale_factors(cfg: SimpleNamespace, table: pd.DataFrame, root: Path, cache_dir: Path
                  ) -> Tuple[Dict[str, float], pd.DataFrame]:
    """Per-lab crop factors (:func:`scale.crop_factors` with target
    ``cfg.dg_scale``) and the nucleus fractions measured before and after them
    (column ``stage``), cached in ``cache_dir``. ``dg_scale=None`` switches
    scale normalisation off (all factors 1).

    With ``cfg.cell_crop`` on, every image is already cropped around its own
    cell at the common ratio (:mod:`cellcrop`, column ``cell_crop``), which
    normalises scale per image; a per-lab centre crop on top would crop twice,
    so the factors are then all 1 (the measured fractions still show each lab).
    """
    sample = scale_sample(table, cfg.dg_scale_per_lab)
    target = None if getattr(cfg, "cell_crop", False) else cfg.dg_scale

    def measure() -> pd.DataFrame:
        before = SC.measure(sample, root)
        factors = SC.crop_factors(before, target) if target else {l: 1.0 for l in B.LABS}
        after = SC.measure(sample, root, factors)
        return pd.concat([before.assign(stage="before"), after.assign(stage="after")])

    entry = cache.entry(cache_dir, "dg_scale", dict(target=target, version=CACHE_VERSION),
                        inputs_fingerprint(dict(sample=sample), root), modules=("scale.py", "segment.py", "data.py"))
    measured = cache.frame(entry, measure, columns=("lab", "crop", "stage"))
    after = measured[measured["stage"] == "after"]
    factors = after.groupby("lab")["crop"].first().astype(float).to_dict()
    return factors, measured


# --------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------


def dg_sets(cfg: SimpleNamespace, table: pd.DataFrame, sources: Sequence[str], targets: Sequence[str],
            crops: Optional[Dict[str, float]] = None) -> Tuple[pd.DataFrame, Dict[str, pd.DataFrame]]:
    """Train / val rows of the source labs and one capped test set per target
    lab, with ``domain`` (the lab) and ``crop`` (the lab's scale factor)."""
    split = B.crosslab_split(table, targets, sources, train_per_class=cfg.dg_train_per_class,
                             val_per_class=cfg.crosslab_val_per_class)
    split = split.assign(domain=split["lab"], crop=[float((crops or {}).get(l, 1.0)) for l in split["lab"]])
    sets = {"val": split[split["split"] == "val"]}
    test = split[split["split"] == "test"]
    for lab in targets:
        sets[lab] = B._cap_lab(test[test["lab"] == lab], cfg.dg_test_per_class)
    return split, sets


def settings_named(names: Optional[Sequence[str]] = None) -> List[tuple]:
    names = names or [n for n, _, _ in CROSSLAB_SETTINGS]
    known = {n: (n, s, t) for n, s, t in CROSSLAB_SETTINGS}
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise KeyError(f"unknown cross-lab settings {unknown}; known: {list(known)}")
    return [known[n] for n in names]


# --------------------------------------------------------------------------
# Frozen-trunk regime: cached feature maps and a trainable head
# --------------------------------------------------------------------------


class MapHead(nn.Module):
    """Featurizer on frozen-trunk feature maps (N, C, h, w): a 1x1 conv to
    ``width`` channels and a 3x3 conv, each with batch norm and ReLU, then
    global average pooling to (N, width)."""

    def __init__(self, in_channels: int, width: int = 128):
        super().__init__()
        self.map_channels = width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.float())

    def pool(self, maps: torch.Tensor) -> torch.Tensor:
        return maps.mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.feature_map(x))


class MapStore:
    """Images, stain statistics and frozen-trunk maps of table rows (keyed by
    ``path`` and ``crop``), computed once and cached as ``.npy`` in ``cache_dir``.

    With a ``universe`` (every row any setting needs; :func:`store_for`) images
    and maps are computed for the whole universe once and looked up, so the
    settings share one cache entry; stain statistics likewise over
    ``stain_universe`` (every training row). Rows outside get their own entry.
    Arrays returned by :meth:`images`, :meth:`maps` and :meth:`stain_stats` follow
    the unique rows of the argument, sorted (index them with :meth:`index`).
    """

    def __init__(self, cfg: SimpleNamespace, root: Path, cache_dir: Path, batch_size: int = 64,
                 universe: Optional[pd.DataFrame] = None, stain_universe: Optional[pd.DataFrame] = None):
        self.cfg, self.root, self.cache_dir, self.batch_size = cfg, Path(root), Path(cache_dir), batch_size
        self.universe = None if universe is None else self._unique(universe)
        self.stain_universe = None if stain_universe is None else self._unique(stain_universe)
        #: Cell-centred crops (``cfg.cell_crop``): one ratio for every image of the store.
        self.cell_ratio = COMMON_RATIO if getattr(cfg, "cell_crop", False) else 0.0
        self._trunk: Optional[Normalized] = None

    # generic cache --------------------------------------------------------

    def _cached(self, name: str, key: str, compute, rows: pd.DataFrame):
        """``compute()`` (one entry per row of ``rows``) cached under the trunk's
        settings, ``key`` (version and row listing), the data root and the rows'
        file sizes and times; a cached entry with another row count is refused."""
        settings = dict(backbone=self.cfg.backbone, image_size=self.cfg.image_size, pretrained=self.cfg.pretrained,
                        key=key)
        if self.cell_ratio > 0:
            settings["cell_crop"] = self.cell_ratio
        inputs = dict(root=str(self.root.resolve()), files=files_fingerprint(self.root, rows["path"].astype(str)))
        entry = cache.entry(self.cache_dir, f"dg_{name}", settings, inputs, modules=DG_CACHE_MODULES,
                            label=f"{self.cfg.backbone}_{self.cfg.image_size}")
        value = cache.array(entry, compute)
        if len(value) != len(rows):
            raise _io.CorruptFileError(f"{entry.path}: holds {len(value)} rows, expected {len(rows)}; "
                                       "delete it to recompute")
        return value

    def _over(self, name: str, rows: pd.DataFrame, universe: Optional[pd.DataFrame], compute, *key) -> np.ndarray:
        """``compute(unique rows)`` cached, evaluated over ``universe`` when it holds every row."""
        unique = self._unique(rows)
        if universe is not None:
            lookup = {(p, round(float(c), 6)): i for i, (p, c) in enumerate(zip(universe["path"], universe["crop"]))}
            keys = [(p, round(float(c), 6)) for p, c in zip(unique["path"], unique["crop"])]
            if all(k in lookup for k in keys):
                values = self._cached(name, _hash(CACHE_VERSION, *key, _listing(universe)), lambda: compute(universe),
                                      universe)
                return values[[lookup[k] for k in keys]]
        return self._cached(name, _hash(CACHE_VERSION, *key, _listing(unique)), lambda: compute(unique), unique)

    @property
    def trunk(self) -> Normalized:
        if self._trunk is None:
            # Seeded init: without ImageNet weights the frozen trunk (and every cached map) is still
            # one fixed network, whichever process or run builds it.
            backbone = create_backbone(self.cfg.backbone, pretrained=self.cfg.pretrained, init_seed=0)
            self._trunk = Normalized(backbone).eval()
        return self._trunk

    # images and maps ------------------------------------------------------

    @staticmethod
    def _unique(rows: pd.DataFrame) -> pd.DataFrame:
        rows = rows[["path", "label"] + (["crop"] if "crop" in rows else [])].copy()
        if "crop" not in rows:
            rows["crop"] = 1.0
        return rows.drop_duplicates(["path", "crop"]).sort_values(["path", "crop"]).reset_index(drop=True)

    def index(self, rows: pd.DataFrame, of: pd.DataFrame) -> np.ndarray:
        """Positions of ``rows`` within the unique rows of ``of``."""
        unique = self._unique(of)
        lookup = {(p, round(float(c), 6)): i for i, (p, c) in enumerate(zip(unique["path"], unique["crop"]))}
        crops = rows["crop"] if "crop" in rows else pd.Series(1.0, index=rows.index)
        return np.array([lookup[(p, round(float(c), 6))] for p, c in zip(rows["path"], crops)], dtype=int)

    def _load(self, unique: pd.DataFrame) -> np.ndarray:
        if self.cell_ratio > 0:
            unique = unique.assign(cell_crop=self.cell_ratio)
        data = ImageTable(unique, self.root, CLASSES, self.cfg.image_size, box_cache=self.cache_dir)
        # Nothing computes here meanwhile: every core decodes (the images are the same whoever loads them).
        loader = DataLoader(data, batch_size=64, num_workers=loader_workers("cpu"))
        return torch.cat([x for x, _, _ in batches(loader, desc="images", leave=False, disable=None)]).numpy()

    @one_thread
    def images(self, rows: pd.DataFrame) -> np.ndarray:
        """uint8 (N, 3, S, S) of the rows as the training loader sees them (crop, resize)."""
        universe = self.universe if self.universe is not None else self.stain_universe
        return self._over("images", rows, universe, self._load)

    @one_thread
    def trunk_maps(self, images: np.ndarray, desc: str = "trunk maps") -> np.ndarray:
        """float16 trunk feature maps (N, C, h, w) of uint8 images (N, 3, S, S).

        Batches of ``batch_size`` images, each on one torch thread (the digits
        of a convolution depend on the thread count), several batches at a
        time in forked processes (:func:`_parallel.map_in_processes`): the
        same digits with any number of cores."""
        trunk = self.trunk  # built here, before the workers fork: they share it
        jobs = [(trunk, images, batch, self.batch_size)
                for batch in chunks(range(len(images)), self.batch_size * _MAP_BATCHES)]
        out = map_in_processes(_maps_of, jobs, desc=desc)
        return np.concatenate(out) if out else np.zeros((0,), np.float16)

    @one_thread
    def maps(self, rows: pd.DataFrame) -> np.ndarray:
        """Trunk maps of the unique rows of ``rows``."""
        return self._over("maps", rows, self.universe, lambda u: self.trunk_maps(self.images(u)), self.cfg.pretrained)

    @one_thread
    def stain_stats(self, rows: pd.DataFrame) -> Tuple[np.ndarray, np.ndarray]:
        """Vahadane stain matrices (N, 3, 2) and 99th-percentile densities (N, 2) of the unique rows."""

        def compute(unique):
            images = torch.from_numpy(self.images(unique)).permute(0, 2, 3, 1).contiguous()
            parts = [stain_statistics(images[s: s + 64]) for s in
                     tqdm(range(0, len(images), 64), desc="stain matrices", leave=False, disable=None)]
            return np.concatenate([torch.cat([w.flatten(1), m], 1).numpy() for w, m in parts])

        stats = self._over("stains", rows, self.stain_universe, compute)
        return stats[:, :6].reshape(-1, 3, 2), stats[:, 6:]

    @one_thread
    def stain_clusters(self, rows: pd.DataFrame, k: int, seed: int = 0) -> np.ndarray:
        """k-means stain-colour cluster of each unique row (pseudo-domains)."""
        stats = (torch.from_numpy(np.ascontiguousarray(a)) for a in self.stain_stats(rows))
        matrices, _ = align_stain_order(*stats)
        return pseudo_domains(matrices, k, torch.Generator().manual_seed(seed)).numpy()

    def _donors(self, unique: pd.DataFrame, k: int, seed: int):
        images = torch.from_numpy(self.images(unique)).permute(0, 2, 3, 1).contiguous()
        matrices, maxima = align_stain_order(*(torch.from_numpy(np.ascontiguousarray(a))
                                               for a in self.stain_stats(unique)))
        generator = torch.Generator().manual_seed(seed)
        labels = pseudo_domains(matrices, k, generator)
        return images, matrices, maxima, pick_targets(labels, k, generator)

    @one_thread
    def view_maps(self, train_rows: pd.DataFrame, k: int, seed: int = 0) -> np.ndarray:
        """Trunk maps (N, k - 1, C, h, w) of SADA's re-stained copies of the unique
        training rows: clusters and donors drawn once over these training rows."""
        unique = self._unique(train_rows)

        def compute():
            images, matrices, maxima, targets = self._donors(unique, k, seed)
            views = []
            for s in tqdm(range(0, len(images), 128), desc=f"re-staining (k={k})", leave=False, disable=None):
                chunk = restain_views(images[s: s + 128], matrices[s: s + 128], maxima[s: s + 128],
                                      targets[:, s: s + 128], matrices, maxima)
                views.append(chunk.permute(1, 0, 4, 2, 3).numpy())  # (n, V, 3, S, S)
            views = np.concatenate(views)
            flat = self.trunk_maps(views.reshape(-1, *views.shape[2:]), desc=f"trunk maps of views (k={k})")
            return flat.reshape(len(unique), k - 1, *flat.shape[1:])

        return self._cached("views", _hash(VIEWS_VERSION, self.cfg.pretrained, k, seed, _listing(unique)), compute,
                            unique)

    @one_thread
    def view_images(self, train_rows: pd.DataFrame, k: int, seed: int = 0, n: int = 4) -> Tuple[np.ndarray, np.ndarray]:
        """``n`` training images (one per lab in turn) and their re-stained copies
        (n, k - 1, S, S, 3), drawn as :meth:`view_maps` draws them (for figures)."""
        unique = self._unique(train_rows)
        images, matrices, maxima, targets = self._donors(unique, k, seed)
        labs = train_rows.drop_duplicates("path").set_index("path")["lab"].reindex(unique["path"]).to_numpy()
        order = pd.DataFrame(dict(lab=labs, i=range(len(labs))))
        order["turn"] = order.groupby("lab").cumcount()
        pick = torch.tensor(order.sort_values(["turn", "lab"])["i"].to_numpy()[:n])
        views = restain_views(images[pick], matrices[pick], maxima[pick], targets[:, pick], matrices, maxima)
        return images[pick].numpy(), views.transpose(0, 1).numpy()


def store_for(cfg: SimpleNamespace, root: Path, cache_dir: Path, table: pd.DataFrame,
              crops: Optional[Dict[str, float]]) -> MapStore:
    """A :class:`MapStore` whose universe is every row of the four settings."""
    splits = [dg_sets(cfg, table, s, t, crops) for _, s, t in CROSSLAB_SETTINGS]
    train = pd.concat([sp[sp["split"] == "train"] for sp, _ in splits])
    universe = pd.concat([train] + [rows for _, sets in splits for rows in sets.values()])
    return MapStore(cfg, root, cache_dir, universe=universe, stain_universe=train)


def labels_of(rows: pd.DataFrame) -> np.ndarray:
    index = {c: i for i, c in enumerate(CLASSES)}
    return rows["label"].map(index).to_numpy()


@torch.no_grad()
def predict_on_maps(method, maps: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    method.eval()
    out = [torch.softmax(method.predict(maps[s: s + batch_size].float()), 1) for s in range(0, len(maps), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, len(CLASSES)), np.float32)


@torch.no_grad()
def features_on_maps(method, maps: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    method.eval()
    parts = [method.featurize(maps[s: s + batch_size].float()) for s in range(0, len(maps), batch_size)]
    return torch.cat(parts).numpy()


def train_on_maps(method_name: str, hparams: dict, train_x: torch.Tensor, train_y: np.ndarray, train_d: np.ndarray,
                  val_x: torch.Tensor, val_y: np.ndarray, epochs: int, batch_size: int, seed: int,
                  swad: Optional[dict] = None, width: int = 128):
    """Train a method whose featurizer is a :class:`MapHead` on cached maps.

    ``train_x`` is (N, C, h, w), or (N, 1 + V, C, h, w) with views for SADA.
    Validation (in-domain) after every epoch: the best-macro-F1 epoch is kept,
    or with ``swad`` the SWAD average (BN statistics re-estimated). Returns
    ``(method, history, swad summary or None)``.
    """
    torch.manual_seed(seed)
    np.random.seed(seed)
    in_channels = train_x.shape[-3]
    num_domains = int(train_d.max()) + 1
    counts = np.bincount(train_y, minlength=len(CLASSES))
    steps_per_epoch = max(1, len(train_y) // batch_size)
    hparams = dict(hparams)
    if method_name == "boda":
        table = np.zeros((num_domains, len(CLASSES)))
        np.add.at(table, (train_d, train_y), 1)
        hparams.setdefault("domain_class_counts", table.tolist())
        hparams.setdefault("warmup_steps", int(0.2 * epochs * steps_per_epoch))
    if method_name == "sada":
        hparams.setdefault("stage1_epochs", epochs // 2)
    if method_name in VIEW_METHODS:
        hparams.setdefault("seed", seed)
    method = create_method(method_name, MapHead(in_channels, width), width, len(CLASSES), num_domains=num_domains,
                           class_counts=counts.tolist(), hparams=hparams)
    schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=max(1, epochs * steps_per_epoch))
                  for o in method.optimizers()]
    averager = SWAD(**swad) if swad is not None else None
    y_all, d_all = torch.tensor(np.asarray(train_y)), torch.tensor(np.asarray(train_d))
    best, best_state, history = -1.0, None, []
    generator = torch.Generator().manual_seed(seed)
    # DANN steps one of its two optimisers per update; the other's scheduler still
    # advances, which PyTorch warns about (harmless: both follow the same clock).
    warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))

    def update(idx):
        return method.update(split_by_domain(train_x[idx].float(), y_all[idx], d_all[idx], method.num_domains))

    for epoch in range(epochs):
        method.train()
        method.set_epoch(epoch)
        order = torch.randperm(len(train_y), generator=generator)
        batches = (order[s * batch_size: (s + 1) * batch_size] for s in range(steps_per_epoch))
        logs = train_epoch(method, batches, update, schedulers, averager)
        val_probs = predict_on_maps(method, val_x)
        scores, loss = validation_step(val_probs, val_y, len(CLASSES), averager)
        # every logged quantity (loss, and e.g. BoDA's or SADA's terms), averaged over the epoch
        means = pd.DataFrame(logs).mean().to_dict()
        history.append(dict(epoch=epoch, **means, val_loss=loss, val_macro_f1=scores["macro_f1"]))
        if scores["macro_f1"] > best:
            best, best_state = scores["macro_f1"], {k: v.clone() for k, v in method.state_dict().items()}
    if averager is not None:
        method.load_state_dict(averager.averaged_state(method))
        raw = train_x[:, 0] if train_x.ndim == 5 else train_x
        batches = [raw[s: s + batch_size].float() for s in range(0, len(raw), batch_size)]
        update_bn(method, batches, forward=method.featurize)
    else:
        method.load_state_dict(best_state)
    method.eval()
    return method, history, (averager.summary() if averager is not None else None)
