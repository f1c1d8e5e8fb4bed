"""Run profiles shared by every notebook, and where outputs go.

* ``smoke`` – seconds per notebook on tiny images; CI executes every notebook with it.
* ``cpu`` – the default main job on 2 CPU cores (capped per-class counts,
  128 px, one fine-tuned fold, partial fine-tuning); its target is an hour,
  and ``book/reproduce.md`` gives the time measured for each commit.
* ``gpu`` – paper scale: full benchmark sizes, 224 px, every fold fine-tuned.

``cell_crop`` (on in every profile, so CI exercises it): every chapter's
images are cropped around their leukocyte so the cell fills
``cellcrop.COMMON_RATIO`` of the input before resizing (column ``cell_crop``,
added by ``protocols.common.cell_centred``; part of every run identity and
embedding cache key). With it on, chapter 07's ``dg_scale`` per-lab crop
factors are all 1 (no double crop).

PBC-LT benchmark keys (``benchmarks.pbc_lt_split`` via ``protocols.pbc_lt.pbc_lt_sets``):

* ``n_max`` – a cap on the head class's training images (None: the head keeps
  all of them, ~1,990 per fold); rho sets every other class from the head,
  ``n_i = min(available_i, round(n_head * rho^(-i/(C-1))))``. The ``cpu``
  profile caps the head at 1,000 (10 tail images at rho 100, 7,214 training
  images at rho 1) to stay near its hour; ``gpu`` does not cap;
* ``phase2_train`` – the headline phase-2 setting: training rows carry their
  phase-2 training draw (``degrade.PHASE2_MIXES["train"]``); False trains on
  pristine images (with the ``test_stress`` set, the original stress setting).
  The ``cpu`` profile fine-tunes rho 1 and 100 only (``finetune_rhos``) for 2
  epochs (``finetune_epochs``), or more where 2 epochs would take fewer than
  ``finetune_min_steps`` optimiser steps (350: rho 1 trains 2 epochs of 225
  steps, rho 100 5 epochs of 71; ``protocols.pbc_lt.finetune_epochs``; 2 in
  ``smoke``, so CI runs the rule); 0 turns it off (``gpu``: 30 epochs
  everywhere).

The long-tail chapters' end-to-end fine-tunes (chapters 03, 05, 06, 10) keep
the backbone's stem and first ``finetune_frozen_stages`` stages frozen
(``models.Normalized``): 3 in ``smoke`` (CI runs the frozen path), 0 in
``cpu`` and ``gpu`` (everything fine-tuned, as the papers do): on two cores
freezing 3 stages made chapter 03's rho-1 fine-tune 14 % faster (547 s
against 638 s, when training ran under bfloat16 autocast) and cost 5.7 macro-F1 points on its pristine test (0.828
against 0.885, same code, fold 0). The cross-lab fine-tunes (chapter 04,
chapter 07's ``end_to_end`` regime) take ``crosslab_frozen_stages``
instead: 3 in ``smoke`` and ``cpu``, 0 in ``gpu`` (the papers' full fine-tune;
not measured at that scale). They are judged on
other labs, where ImageNet's low-level filters carry over better than ones
re-learnt on one lab's images: the system's bundle (the same Lite0, colour
and stain jitter, pbc only; two training seeds, paired over the same
images) gained 11.0 [3.5, 18.5] macro-F1 points on bccd crops, 15.1 [9.2,
20.0] on bccd fields and 3.4 [-2.2, 5.8] on zheng1 with 3 stages frozen
against none, and lost 1.0 [-3.3, 1.1] on pbc's own phase-2 test
(``protocols.system``; ``book/reproduce.md``).
The system takes its own choice (``system.BEST_PIPELINE``).

Long-tail chapter keys (``protocols.pbc_lt.pbc_lt_heads`` / ``decoupled_finetune``):

* ``lt_backbones`` – frozen ImageNet backbones whose embeddings every head
  recipe is trained on (rho 10 and 100 of ``rhos``, every probe fold; ``cpu``
  runs Lite0 and Lite1, ``gpu`` Lite0-2);
* ``lt_recipes`` – the head recipes (``protocols.pbc_lt.head_recipes``);
* ``lt_stain_backbones`` – those also run with Macenko-normalised images;
* ``lt_tta_backbones`` / ``lt_tta_stains`` – those also evaluated with
  test-time augmentation (``tta_views`` dihedral views, on ``tta_sets``);
* ``decoupled_backbones`` – backbones fine-tuned end to end (stage 1,
  ``finetune_folds``, rho 100) before classifier re-training on their
  embeddings (stage 2), with ``decoupled_augmentation``, ``decoupled_stain``
  and TTA when ``decoupled_tta``;
* ``finetune_augmentation`` – the augmentation preset of every end-to-end
  PBC-LT fine-tune (``protocols.pbc_lt.pbc_lt_finetune``, chapter 03): with
  ``dihedral_jitter_degrade`` the benchmark's degradation family is part of
  training. That run is also the stage 1 whose embeddings chapter 05's
  "fine-tuned representation" heads are trained on
  (``protocols.pbc_lt.pbc_lt_finetuned_heads``, ``finetune_rhos`` and
  ``finetune_folds`` only: no extra fine-tune); ``decoupled_augmentation``
  equal to it (smoke, cpu) lets chapter 06 reuse the same run;
* ``hub_pretrained`` – start non-Lite backbones (ResNet, Swin) from timm's hub
  weights: True in ``gpu`` (the papers' scale), False in ``smoke`` and ``cpu``;
  without a reachable hub the backbone falls back to random init with a
  warning, and the run records ``pretrained: false``.

Cross-lab ERM keys (``protocols.crosslab_erm``, notebook 04): ``crosslab_*_per_class``
cap each lab's split, ``crosslab_seeds`` are the training seeds of the probe and of
every fine-tune, ``crosslab_epochs`` each chapter-04 fine-tune's epochs (smoke 1,
cpu 6: up to 108 steps on 150 images per class, gpu 30; chapter 07's ``end_to_end``
regime trains ``dg_epochs``; on cpu 2 epochs gave 0.480 / 0.517 zheng1 / bccd
macro-F1 and 6 epochs 0.595 / 0.592 with ``dihedral_colour_stain``, 3 seeds), and
``crosslab_augmentations`` the fine-tuning augmentation presets compared
(``dihedral_jitter``, and ``dihedral_colour_stain_blur``: strong colour jitter,
``augment.RandomStainJitter`` and ``augment.RandomBlur``; chapter 04 reports the
paired gain of the second).

Cross-lab chapter keys (``protocols.crosslab_dg.crosslab_dg``, notebook 07): ``dg_*`` set
the regime, rows, seeds, sizes and schedule; ``sada_k`` and ``sada_beta``
override SADA's declared defaults (``Method.defaults``) only when set (None:
the method's own), through the one resolver ``crosslab.row_hparams``.
``dg_finetune_rows`` are the rows also trained in chapter 04's fine-tuned
regime (``crosslab_dg.finetuned_rows``: pbc→others, its split, epochs, frozen
stages, strong augmentation and seeds, no SWAD), beside ERM, on every profile.

Restoration chapter keys (``restore``, notebook 08):

* ``restore_detector_images`` – pristine images given noise at each of
  ``restore_rates`` to measure the noise detector's precision and recall;
* ``restore_pool_images`` – the phase-2 degraded "raw" set (None: every
  cross-validation image) that the detector partitions and whose clean part
  trains Pix2Pix; ``restore_heldout_images`` – pristine images for PSNR/SSIM;
* ``restore_kinds`` – the synthetic degradations Pix2Pix learns to undo;
* ``p2p_*`` – Pix2Pix: crop size, epochs, crops per image and epoch, batch,
  generator width and depth (U-Net levels), discriminator width and layers
  (3: the 70x70 PatchGAN), Adam learning rate (Isola's 2e-4 at paper scale,
  1e-3 for the short CPU schedules).

Segmentation chapter keys (notebook 09):

* ``seg_zheng1_images`` / ``seg_bccd_fields`` – zheng1 images scored against
  the expert masks and bccd fields scored for localisation (None: all);
* ``morph_per_class`` – pbc images per fine class measured for morphology;
* ``cellpose_images``, ``cellpose_folds``, ``cellpose_epochs``,
  ``cellpose_batch_size`` – the cross-validated cellpose back-end on zheng1
  (``segment.cellpose_kfold``), trained from scratch; full length (300
  epochs, all images) needs a GPU. It needs optimiser steps more than epochs:
  on 15 training images per fold, 25 epochs at batch 8 (50 steps) left every
  mask empty (Dice 0), the same at batch 4 (100 steps) gave Dice 0.91 / 0.96.

Rescue chapter keys (``protocols.rescue.pbc_lt_rescue``, notebook 10):

* ``rescue_rare`` – how many of the rarest training classes may be rescued;
* ``rescue_head_epochs`` – epochs of the supervised-contrastive verifier head;
* ``rescue_probe_folds`` – linear-probe folds rescued (the fine-tuned ERM
  uses ``finetune_folds``);
* ``rescue_strengths`` – boost exponents searched on validation;
* ``rescue_siglip_path`` – local SigLIP / MedSigLIP weights for the verifier
  (None: the profile's frozen backbone).

The assembled system (``protocols.system``, ``wbc train``, chapter 11):

* ``system_per_class`` – training images per common class (None: all). Kept
  apart from ``n_max`` (PBC-LT's head cap): the ``cpu`` value, 600 images for
  ``finetune_epochs`` (2) epochs, costs about what 200 images for 6 epochs
  cost before the PBC-LT regime changed (issue 10);
* ``system_eval_per_class`` – images per class of each set of chapter 11's
  cumulative ablation (pbc phase-2 test, zheng1, bccd crops and fields; None:
  all of them): every ablation row runs the whole pipeline, TTA included, on
  every image, so the ``cpu`` profile measures it on 30 per class.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, fields
from pathlib import Path
from types import SimpleNamespace
from typing import List, Optional, Sequence, Union, get_args, get_origin, get_type_hints

import yaml

from .data import PathLike

#: EfficientNet-Lite0/1/2, the backbones with offline ImageNet weights.
_LITE = ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"]
#: Every head recipe of ``protocols.pbc_lt.head_recipes``.
_LT_RECIPES = ["ib", "cb_sampling", "focal", "cb", "hybrid", "ldam_drw", "logit_adjusted", "crt", "tau_norm", "lws",
               "focal_ilf"]

#: Cross-lab chapter (``protocols.crosslab_dg.crosslab_dg``): the table rows, the SADA ablations and the LOLO settings.
_DG_ROWS = ["ERM", "CORAL", "DANN", "Mixup", "SelfReg", "BoDA", "BoDA decoupled", "SADA"]
_DG_ABLATIONS = ["M2: SADA without L_LA", "M3: SupCon, no L_LA", "ERM + re-stained views"]
#: Rows also trained in chapter 04's fine-tuned regime (chapter 07's fine-tuned table); ERM is chapter 04's run.
#: On CPU the paper's headline pair (about 70 and 90 s a run on 2 cores); every coupled row on the gpu profile.
_DG_FINETUNE = ["ERM", "BoDA", "SADA"]
_DG_FINETUNE_ALL = ["ERM", "CORAL", "DANN", "Mixup", "SelfReg", "BoDA", "SADA"]
_LOLO = ["LOLO:pbc", "LOLO:zheng1", "LOLO:bccd"]
#: Chapter 04's fine-tuning augmentations: the default preset, and strong colour and stain jitter with a mild blur.
_CROSSLAB_AUG = ["dihedral_jitter", "dihedral_colour_stain_blur"]

PROFILES = {
    "smoke": dict(
        image_size=32, batch_size=16, backbone="tf_efficientnet_lite0", pretrained=True, cell_crop=True,
        n_max=12, phase2_train=True, val_per_class=3, test_per_class=4, probe_folds=[0, 1], finetune_folds=[0],
        rhos=[1, 10, 100], finetune_rhos=[100], probe_epochs=5, finetune_epochs=1, finetune_min_steps=2, finetune_frozen_stages=3, patience=2,
        crosslab_frozen_stages=3, crosslab_epochs=1,
        crosslab_train_per_class=12, crosslab_val_per_class=3, crosslab_test_per_class=4,
        crosslab_seeds=[0], crosslab_augmentations=list(_CROSSLAB_AUG), severity_grid_per_class=2, n_boot=50, lr=1e-3,
        lt_backbones=["tf_efficientnet_lite0", "tf_efficientnet_lite1"], lt_recipes=list(_LT_RECIPES),
        lt_stain_backbones=["tf_efficientnet_lite0"], lt_tta_backbones=["tf_efficientnet_lite0"],
        lt_tta_stains=["none", "macenko"], tta_views=8, tta_sets=["test", "test_degraded"],
        decoupled_backbones=["tf_efficientnet_lite0"], decoupled_augmentation="dihedral_jitter_degrade",
        finetune_augmentation="dihedral_jitter_degrade",
        decoupled_stain="none", decoupled_tta=True, hub_pretrained=False,
        dg_regime="maps", dg_rows=list(_DG_ROWS), dg_seeds=[0], dg_train_per_class=8, dg_test_per_class=4,
        dg_epochs=2, dg_head_width=16, dg_swad=True, dg_scale="max", dg_scale_per_lab=6, sada_k=None, sada_beta=None,
        sada_sweep_k=[2, 3], sada_sweep_beta=[0.1], sada_sweep_settings=["LOLO:zheng1"],
        dg_ablation_rows=list(_DG_ABLATIONS), dg_finetune_rows=list(_DG_FINETUNE), dg_gradcam_per_lab=1,
        restore_detector_images=18, restore_rates=[0.1, 0.3, 0.5], restore_pool_images=27, restore_heldout_images=1,
        restore_kinds=["salt_pepper"], p2p_crop=32, p2p_epochs=1, p2p_crops_per_image=1, p2p_batch_size=8,
        p2p_channels=8, p2p_depth=3, p2p_d_channels=8, p2p_d_layers=1, p2p_lr=1e-3,
        seg_zheng1_images=12, seg_bccd_fields=4, morph_per_class=2, cellpose_images=4, cellpose_folds=2,
        cellpose_epochs=1, cellpose_batch_size=2, rescue_rare=2, rescue_head_epochs=5, rescue_probe_folds=[0],
        rescue_strengths=[0.0, 1.0, 2.0], rescue_siglip_path=None, system_per_class=12,
        system_eval_per_class=4,
    ),
    "cpu": dict(
        image_size=128, batch_size=32, backbone="tf_efficientnet_lite0", pretrained=True, cell_crop=True,
        n_max=1000, phase2_train=True, val_per_class=30, test_per_class=60, probe_folds=[0, 1, 2, 3, 4],
        finetune_folds=[0], rhos=[1, 10, 100], finetune_rhos=[1, 100], probe_epochs=40, finetune_epochs=2,
        finetune_min_steps=350,
        finetune_frozen_stages=0, patience=3, crosslab_frozen_stages=3, crosslab_epochs=6,
        crosslab_train_per_class=150, crosslab_val_per_class=30, crosslab_test_per_class=300,
        crosslab_seeds=[0, 1, 2], crosslab_augmentations=list(_CROSSLAB_AUG),
        severity_grid_per_class=20, n_boot=1000, lr=1e-3,
        lt_backbones=_LITE[:2], lt_recipes=list(_LT_RECIPES),
        lt_stain_backbones=["tf_efficientnet_lite0"], lt_tta_backbones=["tf_efficientnet_lite0"],
        lt_tta_stains=["none"], tta_views=8, tta_sets=["test_degraded"],
        decoupled_backbones=["tf_efficientnet_lite0"], decoupled_augmentation="dihedral_jitter_degrade",
        finetune_augmentation="dihedral_jitter_degrade",
        decoupled_stain="none", decoupled_tta=False, hub_pretrained=False,
        dg_regime="maps", dg_rows=list(_DG_ROWS), dg_seeds=[0, 1], dg_train_per_class=60, dg_test_per_class=150,
        dg_epochs=20, dg_head_width=128, dg_swad=True, dg_scale="max", dg_scale_per_lab=150,
        sada_k=None, sada_beta=None,
        sada_sweep_k=[2, 3, 4], sada_sweep_beta=[0.01, 0.1, 1.0], sada_sweep_settings=["LOLO:zheng1"],
        dg_ablation_rows=list(_DG_ABLATIONS), dg_finetune_rows=list(_DG_FINETUNE), dg_gradcam_per_lab=2,
        restore_detector_images=360, restore_rates=[0.1, 0.3, 0.5], restore_pool_images=450,
        restore_heldout_images=18, restore_kinds=["salt_pepper"], p2p_crop=64, p2p_epochs=6,
        p2p_crops_per_image=8, p2p_batch_size=16, p2p_channels=16, p2p_depth=4, p2p_d_channels=16, p2p_d_layers=2,
        p2p_lr=1e-3,
        seg_zheng1_images=None, seg_bccd_fields=60, morph_per_class=16, cellpose_images=30, cellpose_folds=2,
        cellpose_epochs=25, cellpose_batch_size=4, rescue_rare=2, rescue_head_epochs=30, rescue_probe_folds=[0, 1, 2],
        rescue_strengths=[0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0], rescue_siglip_path=None,
        system_per_class=600, system_eval_per_class=30,
    ),
    "gpu": dict(
        image_size=224, batch_size=64, backbone="tf_efficientnet_lite0", pretrained=True, cell_crop=True,
        n_max=None, phase2_train=True, val_per_class=None, test_per_class=None, probe_folds=[0, 1, 2, 3, 4],
        finetune_folds=[0, 1, 2, 3, 4], rhos=[1, 10, 100], finetune_rhos=[1, 10, 100], probe_epochs=60,
        finetune_epochs=30, finetune_min_steps=0, finetune_frozen_stages=0, patience=6, crosslab_frozen_stages=0, crosslab_epochs=30, crosslab_train_per_class=None, crosslab_val_per_class=None,
        crosslab_test_per_class=None, crosslab_seeds=[0, 1, 2], crosslab_augmentations=list(_CROSSLAB_AUG),
        severity_grid_per_class=None, n_boot=1000,
        lr=3e-4,
        lt_backbones=list(_LITE), lt_recipes=list(_LT_RECIPES),
        lt_stain_backbones=list(_LITE), lt_tta_backbones=list(_LITE),
        lt_tta_stains=["none", "macenko"], tta_views=8, tta_sets=["val", "val_degraded", "test", "test_degraded"],
        decoupled_backbones=["resnet50", "resnet152", "swin_t", *_LITE],
        decoupled_augmentation="decoupled", finetune_augmentation="dihedral_jitter_degrade",
        decoupled_stain="macenko", decoupled_tta=True, hub_pretrained=True,
        dg_regime="end_to_end", dg_rows=list(_DG_ROWS), dg_seeds=[0, 1, 2], dg_train_per_class=None,
        dg_test_per_class=None, dg_epochs=30, dg_head_width=128, dg_swad=True, dg_scale="max", dg_scale_per_lab=None,
        sada_k=None, sada_beta=None, sada_sweep_k=[2, 3, 4, 5], sada_sweep_beta=[0.01, 0.1, 1.0],
        sada_sweep_settings=list(_LOLO), dg_ablation_rows=list(_DG_ABLATIONS),
        dg_finetune_rows=list(_DG_FINETUNE_ALL), dg_gradcam_per_lab=3,
        restore_detector_images=2000, restore_rates=[0.1, 0.3, 0.5], restore_pool_images=None,
        restore_heldout_images=180, restore_kinds=["salt_pepper"], p2p_crop=256, p2p_epochs=20,
        p2p_crops_per_image=1, p2p_batch_size=16, p2p_channels=64, p2p_depth=8, p2p_d_channels=64, p2p_d_layers=3,
        p2p_lr=2e-4,
        seg_zheng1_images=None, seg_bccd_fields=None, morph_per_class=100, cellpose_images=None, cellpose_folds=5,
        cellpose_epochs=300, cellpose_batch_size=8, rescue_rare=2, rescue_head_epochs=60, rescue_probe_folds=[0, 1, 2, 3, 4],
        rescue_strengths=[0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0], rescue_siglip_path=None,
        system_per_class=None, system_eval_per_class=None,
    ),
}


class ProfileError(ValueError):
    """An unknown profile, an unknown key or a value of the wrong type."""


@dataclass(frozen=True)
class Profile:
    """One profile's settings, typed and validated (the keys are described in
    this module's docstring). Build it with :func:`get`; derive a variant with
    :meth:`replace`; a profile is never changed in place."""

    name: str
    # Shared scale
    image_size: int
    cell_crop: bool
    batch_size: int
    backbone: str
    pretrained: bool
    n_max: Optional[int]
    phase2_train: bool
    val_per_class: Optional[int]
    test_per_class: Optional[int]
    probe_folds: List[int]
    finetune_folds: List[int]
    rhos: List[int]
    finetune_rhos: List[int]
    probe_epochs: int
    finetune_epochs: int
    finetune_min_steps: int
    finetune_frozen_stages: int
    patience: int
    crosslab_frozen_stages: int
    crosslab_epochs: int
    crosslab_train_per_class: Optional[int]
    crosslab_val_per_class: Optional[int]
    crosslab_test_per_class: Optional[int]
    crosslab_seeds: List[int]
    crosslab_augmentations: List[str]
    severity_grid_per_class: Optional[int]
    n_boot: int
    lr: float
    # Long-tail chapters
    lt_backbones: List[str]
    lt_recipes: List[str]
    lt_stain_backbones: List[str]
    lt_tta_backbones: List[str]
    lt_tta_stains: List[str]
    tta_views: int
    tta_sets: List[str]
    decoupled_backbones: List[str]
    decoupled_augmentation: str
    finetune_augmentation: str
    decoupled_stain: str
    decoupled_tta: bool
    hub_pretrained: bool
    # Cross-lab domain generalisation
    dg_regime: str
    dg_rows: List[str]
    dg_seeds: List[int]
    dg_train_per_class: Optional[int]
    dg_test_per_class: Optional[int]
    dg_epochs: int
    dg_head_width: int
    dg_swad: bool
    dg_scale: str
    dg_scale_per_lab: Optional[int]
    sada_k: Optional[int]
    sada_beta: Optional[float]
    sada_sweep_k: List[int]
    sada_sweep_beta: List[float]
    sada_sweep_settings: List[str]
    dg_ablation_rows: List[str]
    dg_finetune_rows: List[str]
    dg_gradcam_per_lab: int
    # Restoration
    restore_detector_images: int
    restore_rates: List[float]
    restore_pool_images: Optional[int]
    restore_heldout_images: int
    restore_kinds: List[str]
    p2p_crop: int
    p2p_epochs: int
    p2p_crops_per_image: int
    p2p_batch_size: int
    p2p_channels: int
    p2p_depth: int
    p2p_d_channels: int
    p2p_d_layers: int
    p2p_lr: float
    # Segmentation and morphology
    seg_zheng1_images: Optional[int]
    seg_bccd_fields: Optional[int]
    morph_per_class: int
    cellpose_images: Optional[int]
    cellpose_folds: int
    cellpose_epochs: int
    cellpose_batch_size: int
    # Rescue
    rescue_rare: int
    rescue_head_epochs: int
    rescue_probe_folds: List[int]
    rescue_strengths: List[float]
    rescue_siglip_path: Optional[str]
    # The assembled system (chapter 11, ``wbc train``)
    system_per_class: Optional[int]
    system_eval_per_class: Optional[int]

    def __post_init__(self):
        hints = get_type_hints(Profile)
        for f in fields(self):
            value = getattr(self, f.name)
            coerced = _coerce(f.name, value, hints[f.name])
            if coerced is not value:
                object.__setattr__(self, f.name, coerced)

    def replace(self, **overrides) -> "Profile":
        """A copy with ``overrides`` (validated; an unknown key is an error)."""
        _check_keys(overrides)
        return dataclasses.replace(self, **overrides)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_keys(overrides: dict) -> None:
    known = {f.name for f in fields(Profile)} - {"name"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        hints = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
        said = ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())
        raise ProfileError(f"unknown profile key(s) {said}; see wbclib/profiles.py for the keys")


def _coerce(key: str, value, hint):
    """``value`` checked against ``hint``; strings (from the command line or the
    environment) are parsed as YAML first, ints are accepted for floats."""
    origin, args = get_origin(hint), get_args(hint)
    if isinstance(value, str) and hint is not str and not (origin is Union and str in args):
        value = yaml.safe_load(value)
    if origin is Union:  # Optional[X]
        if value is None:
            return None
        return _coerce(key, value, next(a for a in args if a is not type(None)))
    if origin in (list, List):
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ProfileError(f"profile key {key!r} takes a list, got {value!r}")
        return [_coerce(key, v, args[0]) for v in value]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool) or not isinstance(value, hint):
        raise ProfileError(f"profile key {key!r} takes {getattr(hint, '__name__', hint)}, got {value!r}")
    return value


def parse_overrides(pairs: Sequence[str]) -> dict:
    """``["key=value", ...]`` (from ``--set`` or ``$WBC_SET``, ``;``-separated) as a dict;
    values are typed and validated by :func:`get`."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ProfileError(f"override {pair!r} is not of the form key=value")
        out[key.strip()] = value.strip()
    _check_keys(out)
    return out


def get(name: str, overrides: Optional[dict] = None, **more) -> Profile:
    """The settings of profile ``name`` as a validated :class:`Profile`, with
    ``overrides`` (and keyword overrides) applied; ``$WBC_SET`` (``key=value;...``)
    adds overrides from the environment, the explicit ones win."""
    if name not in PROFILES:
        raise ProfileError(f"unknown profile {name!r}; known: {', '.join(PROFILES)}")
    if isinstance(overrides, str):  # e.g. papermill's `-p overrides "{probe_epochs: 60}"`
        overrides = yaml.safe_load(overrides) or {}
        if not isinstance(overrides, dict):
            raise ProfileError(f"overrides must be a mapping of profile keys, got {overrides!r}")
    env = os.environ.get("WBC_SET", "").strip()
    merged = parse_overrides([p for p in env.split(";") if p.strip()]) if env else {}
    merged.update(overrides or {})
    merged.update(more)
    _check_keys(merged)
    return Profile(name=name, **{**PROFILES[name], **merged})


def output_dir(kind: str, path: Optional[PathLike] = None) -> Path:
    """``results``, ``cache`` or ``splits`` folder: the given path, else
    ``$WBC_<KIND>_DIR``, else ``<kind>`` in the current working directory
    (not the package's folder, which may be a read-only site-packages);
    created if missing."""
    path = path or os.environ.get(f"WBC_{kind.upper()}_DIR") or Path.cwd() / kind
    path = Path(path).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def setup(profile: str = "cpu", data_root: Optional[PathLike] = None, cache_dir: Optional[PathLike] = None,
          splits_dir: Optional[PathLike] = None, results_dir: Optional[PathLike] = None, seed: int = 0,
          overrides: Optional[dict] = None) -> SimpleNamespace:
    """What every chapter starts with: the profile's settings (``cfg``, with
    ``overrides`` applied and validated), the checked data ``root``, the
    ``cache`` and ``splits`` folders (benchmark files written or rebuilt unless
    current) and the profile's ``results`` folder."""
    from . import benchmarks
    from .data import data_root as resolve_root

    cfg = get(profile, overrides)  # an unknown key fails here, before any work
    root = resolve_root(data_root)
    cache = output_dir("cache", cache_dir)
    splits = benchmarks.ensure_benchmarks(output_dir("splits", splits_dir), root, seed, cache_dir=cache)
    results = output_dir("results", results_dir) / profile
    return SimpleNamespace(cfg=cfg, root=root, cache=cache, splits=splits, results=results, seed=seed)
