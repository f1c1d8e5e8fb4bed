"""Run profiles shared by every notebook, and where outputs go.

* ``smoke`` – seconds per notebook on tiny images; CI executes every notebook with it.
* ``cpu`` – the default main job: the whole book in under an hour on 2 CPU cores
  (capped per-class counts, 128 px, one fine-tuned fold).
* ``gpu`` – paper scale: full benchmark sizes, 224 px, every fold fine-tuned.

Long-tail chapter keys (``experiments.pbc_lt_heads`` / ``decoupled_finetune``):

* ``lt_backbones`` – frozen ImageNet backbones whose embeddings every head
  recipe is trained on (rho 10 and 100 of ``rhos``, every probe fold);
* ``lt_recipes`` – the head recipes (``experiments.head_recipes``);
* ``lt_stain_backbones`` – those also run with Macenko-normalised images;
* ``lt_tta_backbones`` / ``lt_tta_stains`` – those also evaluated with
  test-time augmentation (``tta_views`` dihedral views, on ``tta_sets``);
* ``decoupled_backbones`` – backbones fine-tuned end to end (stage 1,
  ``finetune_folds``, rho 100) before classifier re-training on their
  embeddings (stage 2), with ``decoupled_augmentation``, ``decoupled_stain``
  and TTA when ``decoupled_tta``;
* ``hub_pretrained`` – start non-Lite backbones (ResNet, Swin) from timm's hub
  weights; False here (offline: random init), set True where the hub is reachable.

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

Rescue chapter keys (``rescue.pbc_lt_rescue``, notebook 10):

* ``rescue_rare`` – how many of the rarest training classes may be rescued;
* ``rescue_head_epochs`` – epochs of the supervised-contrastive verifier head;
* ``rescue_probe_folds`` – linear-probe folds rescued (the fine-tuned ERM
  uses ``finetune_folds``);
* ``rescue_strengths`` – boost exponents searched on validation;
* ``rescue_siglip_path`` – local SigLIP / MedSigLIP weights for the verifier
  (None: the profile's frozen backbone).
"""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

from .data import PROJECT_ROOT, PathLike

#: EfficientNet-Lite0/1/2, the backbones with offline ImageNet weights.
_LITE = ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"]
#: Every head recipe of ``experiments.head_recipes``.
_LT_RECIPES = ["ib", "cb_sampling", "focal", "cb", "hybrid", "ldam_drw", "logit_adjusted", "crt", "tau_norm", "lws"]

#: Cross-lab chapter (``crosslab.crosslab_dg``): the table rows, the SADA ablations and the LOLO settings.
_DG_ROWS = ["ERM", "CORAL", "DANN", "Mixup", "SelfReg", "BoDA", "BoDA decoupled", "SADA"]
_DG_ABLATIONS = ["M2: SADA without L_LA", "M3: SupCon, no L_LA", "ERM + re-stained views"]
_LOLO = ["LOLO:pbc", "LOLO:zheng1", "LOLO:bccd"]

PROFILES = {
    "smoke": dict(
        image_size=32, batch_size=16, backbone="tf_efficientnet_lite0", pretrained=True,
        n_max=12, val_per_class=3, test_per_class=4, probe_folds=[0, 1], finetune_folds=[0],
        rhos=[1, 10, 100], finetune_rhos=[100], probe_epochs=5, finetune_epochs=1, patience=2,
        crosslab_train_per_class=12, crosslab_val_per_class=3, crosslab_test_per_class=4,
        crosslab_seeds=[0], severity_grid_per_class=2, n_boot=50, lr=1e-3,
        lt_backbones=["tf_efficientnet_lite0", "tf_efficientnet_lite1"], lt_recipes=list(_LT_RECIPES),
        lt_stain_backbones=["tf_efficientnet_lite0"], lt_tta_backbones=["tf_efficientnet_lite0"],
        lt_tta_stains=["none", "macenko"], tta_views=8, tta_sets=["test", "test_degraded"],
        decoupled_backbones=["tf_efficientnet_lite0"], decoupled_augmentation="dihedral_jitter",
        decoupled_stain="none", decoupled_tta=True, hub_pretrained=False,
        dg_regime="maps", dg_rows=list(_DG_ROWS), dg_seeds=[0], dg_train_per_class=8, dg_test_per_class=4,
        dg_epochs=2, dg_head_width=16, dg_swad=True, dg_scale="max", dg_scale_per_lab=6, sada_k=3, sada_beta=0.1,
        sada_sweep_k=[2, 3], sada_sweep_beta=[0.1], sada_sweep_settings=["LOLO:zheng1"],
        dg_ablation_rows=list(_DG_ABLATIONS), dg_gradcam_per_lab=1,
        restore_detector_images=18, restore_rates=[0.1, 0.3, 0.5], restore_pool_images=27, restore_heldout_images=1,
        restore_kinds=["salt_pepper"], p2p_crop=32, p2p_epochs=1, p2p_crops_per_image=1, p2p_batch_size=8,
        p2p_channels=8, p2p_depth=3, p2p_d_channels=8, p2p_d_layers=1, p2p_lr=1e-3,
        seg_zheng1_images=12, seg_bccd_fields=4, morph_per_class=2, cellpose_images=4, cellpose_folds=2,
        cellpose_epochs=1, cellpose_batch_size=2, rescue_rare=2, rescue_head_epochs=5, rescue_probe_folds=[0],
        rescue_strengths=[0.0, 1.0, 2.0], rescue_siglip_path=None,
    ),
    "cpu": dict(
        image_size=128, batch_size=32, backbone="tf_efficientnet_lite0", pretrained=True,
        n_max=200, val_per_class=30, test_per_class=60, probe_folds=[0, 1, 2, 3, 4], finetune_folds=[0],
        rhos=[1, 10, 100], finetune_rhos=[1, 10, 100], probe_epochs=40, finetune_epochs=6, patience=3,
        crosslab_train_per_class=150, crosslab_val_per_class=30, crosslab_test_per_class=300,
        crosslab_seeds=[0], severity_grid_per_class=20, n_boot=1000, lr=1e-3,
        lt_backbones=list(_LITE), lt_recipes=list(_LT_RECIPES),
        lt_stain_backbones=["tf_efficientnet_lite0"], lt_tta_backbones=["tf_efficientnet_lite0"],
        lt_tta_stains=["none"], tta_views=8, tta_sets=["test_degraded"],
        decoupled_backbones=["tf_efficientnet_lite0"], decoupled_augmentation="dihedral_jitter",
        decoupled_stain="none", decoupled_tta=False, hub_pretrained=False,
        dg_regime="maps", dg_rows=list(_DG_ROWS), dg_seeds=[0, 1], dg_train_per_class=60, dg_test_per_class=150,
        dg_epochs=20, dg_head_width=128, dg_swad=True, dg_scale="max", dg_scale_per_lab=150, sada_k=3, sada_beta=0.1,
        sada_sweep_k=[2, 3, 4], sada_sweep_beta=[0.01, 0.1, 1.0], sada_sweep_settings=["LOLO:zheng1"],
        dg_ablation_rows=list(_DG_ABLATIONS), dg_gradcam_per_lab=2,
        restore_detector_images=360, restore_rates=[0.1, 0.3, 0.5], restore_pool_images=450,
        restore_heldout_images=18, restore_kinds=["salt_pepper"], p2p_crop=64, p2p_epochs=8,
        p2p_crops_per_image=8, p2p_batch_size=16, p2p_channels=16, p2p_depth=4, p2p_d_channels=16, p2p_d_layers=2,
        p2p_lr=1e-3,
        seg_zheng1_images=None, seg_bccd_fields=60, morph_per_class=16, cellpose_images=30, cellpose_folds=2,
        cellpose_epochs=25, cellpose_batch_size=4, rescue_rare=2, rescue_head_epochs=30, rescue_probe_folds=[0, 1, 2],
        rescue_strengths=[0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0], rescue_siglip_path=None,
    ),
    "gpu": dict(
        image_size=224, batch_size=64, backbone="tf_efficientnet_lite0", pretrained=True,
        n_max=None, val_per_class=None, test_per_class=None, probe_folds=[0, 1, 2, 3, 4],
        finetune_folds=[0, 1, 2, 3, 4], rhos=[1, 10, 100], finetune_rhos=[1, 10, 100], probe_epochs=60,
        finetune_epochs=30, patience=6, crosslab_train_per_class=None, crosslab_val_per_class=None,
        crosslab_test_per_class=None, crosslab_seeds=[0, 1, 2], severity_grid_per_class=None, n_boot=1000,
        lr=3e-4,
        lt_backbones=list(_LITE), lt_recipes=list(_LT_RECIPES),
        lt_stain_backbones=list(_LITE), lt_tta_backbones=list(_LITE),
        lt_tta_stains=["none", "macenko"], tta_views=8, tta_sets=["val", "val_degraded", "test", "test_degraded"],
        decoupled_backbones=["resnet50", "resnet152", "swin_t", *_LITE],
        decoupled_augmentation="decoupled", decoupled_stain="macenko", decoupled_tta=True, hub_pretrained=False,
        dg_regime="end_to_end", dg_rows=list(_DG_ROWS), dg_seeds=[0, 1, 2], dg_train_per_class=None,
        dg_test_per_class=None, dg_epochs=30, dg_head_width=128, dg_swad=True, dg_scale="max", dg_scale_per_lab=None,
        sada_k=3, sada_beta=0.1, sada_sweep_k=[2, 3, 4, 5], sada_sweep_beta=[0.01, 0.1, 1.0],
        sada_sweep_settings=list(_LOLO), dg_ablation_rows=list(_DG_ABLATIONS), dg_gradcam_per_lab=3,
        restore_detector_images=2000, restore_rates=[0.1, 0.3, 0.5], restore_pool_images=None,
        restore_heldout_images=180, restore_kinds=["salt_pepper"], p2p_crop=256, p2p_epochs=20,
        p2p_crops_per_image=1, p2p_batch_size=16, p2p_channels=64, p2p_depth=8, p2p_d_channels=64, p2p_d_layers=3,
        p2p_lr=2e-4,
        seg_zheng1_images=None, seg_bccd_fields=None, morph_per_class=100, cellpose_images=None, cellpose_folds=5,
        cellpose_epochs=300, cellpose_batch_size=8, rescue_rare=2, rescue_head_epochs=60, rescue_probe_folds=[0, 1, 2, 3, 4],
        rescue_strengths=[0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0], rescue_siglip_path=None,
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


def setup(profile: str = "cpu", data_root: Optional[PathLike] = None, cache_dir: Optional[PathLike] = None,
          splits_dir: Optional[PathLike] = None, results_dir: Optional[PathLike] = None, seed: int = 0) -> SimpleNamespace:
    """What every chapter starts with: the profile's settings (``cfg``), the
    checked data ``root``, the ``cache`` and ``splits`` folders (benchmark files
    written if missing) and the profile's ``results`` folder."""
    from . import benchmarks
    from .data import data_root as resolve_root

    root = resolve_root(data_root)
    cache = output_dir("cache", cache_dir)
    splits = benchmarks.ensure_benchmarks(output_dir("splits", splits_dir), root, seed, cache_dir=cache)
    results = output_dir("results", results_dir) / profile
    return SimpleNamespace(cfg=get(profile), root=root, cache=cache, splits=splits, results=results, seed=seed)
