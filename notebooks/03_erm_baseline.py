# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Baseline: ERM on PBC-LT
#
# Plain empirical risk minimisation (instance-balanced sampling, cross-entropy)
# on the long-tailed pbc benchmark at $\rho = 1, 10, 100$. As in WBCBench's
# phase 2 (chapter 02), training uses the phase-2 training set (30 % of the
# images degraded, mostly mildly) and every model is evaluated on the pristine
# held-out test (`test`), the phase-2 test (`test_degraded`: 60 % of the
# images degraded, shifted to harder severities; the headline) and the stress
# test (`test_stress`: every test image degraded, the setting of earlier
# versions of this book). Two regimes:
#
# * a **linear probe** on frozen ImageNet features of EfficientNet-Lite0
#   {cite}`tan2019efficientnet` (embeddings cached on disk, so every fold and
#   rho costs seconds);
# * **fine-tuning** the whole network end to end (AdamW, cosine schedule,
#   early stopping on macro-F1 of the phase-2 validation mix, the images the
#   benchmark is about); the `cpu` profile fine-tunes
#   $\rho = 1$ and $100$ only, because the training sets now keep the head's
#   images (7,214 and 2,272 images): 2 epochs at $\rho = 1$, and at
#   $\rho = 100$ as many as schedule at least the profile's `finetune_min_steps`
#   optimiser steps (5 epochs of 71 steps): with 2 epochs the new classifier
#   saw too few steps to learn the tail.
#
# Macro-F1 is the primary metric, as in WBCBench; intervals are 95 % percentile
# bootstraps over test images, and $\pm$ is the standard deviation over folds.

# %% tags=["parameters"]
profile = "cpu"
data_root = None
cache_dir = None
splits_dir = None
results_dir = None
seed = 0
overrides = None  # profile keys to change, e.g. {"probe_epochs": 60} (validated; see wbclib/profiles.py)

# %%
import seaborn as sns
from IPython.display import display

from wbclib import plots, profiles
from wbclib.protocols import pbc_lt

ctx = profiles.setup(profile, data_root, cache_dir, splits_dir, results_dir, seed, overrides)
cfg, root, cache, splits, results = ctx.cfg, ctx.root, ctx.cache, ctx.splits, ctx.results
print(f"profile {cfg.name}: {cfg.backbone} at {cfg.image_size} px, head class capped at {cfg.n_max}, "
      f"probe folds {cfg.probe_folds}, fine-tuned folds {cfg.finetune_folds}")

# %% [markdown]
# ## Linear probe on frozen features

# %%
probe = pbc_lt.pbc_lt_probe(cfg, root, splits, cache, results, seed=seed)
display(pbc_lt.mean_std_table(probe))

# %% [markdown]
# Bootstrap intervals of macro-F1 on the first fold:

# %%
display(pbc_lt.fold_intervals(probe, cfg.probe_folds[0]))

# %%
plots.metric_bars(pbc_lt.fold_interval_bars(probe, cfg.probe_folds[0]), x="rho", y="macro_f1", hue="eval_set",
                  low="macro_f1_low", high="macro_f1_high", title="linear probe, fold 0",
                  ylabel="macro-F1");

# %% [markdown]
# ### Which degradation hurts most
#
# Macro-F1 of the probe on a per-class-capped slice of the test set, with
# every image degraded by one kind at one severity.

# %%
sns.relplot(data=pbc_lt.severity_curves(probe, cfg.probe_folds[0]), x="severity", y="macro_f1", hue="kind",
            col="rho", kind="line", marker="o", height=3, aspect=1.1,
            ).set_axis_labels("severity (0 = pristine)", "macro-F1");

# %% [markdown]
# ## Fine-tuning end to end
#
# The network is trained with instance-balanced sampling and cross-entropy.
# The profile's `finetune_frozen_stages` can keep the backbone's stem and
# first stages at their ImageNet weights (3 in `smoke`; 0 in `cpu` and `gpu`,
# the papers' full fine-tune). Freezing three stages makes Lite0's training
# step about 1.6x faster (float32), but a run also loads, validates and evaluates: the
# rho-1 run took 547 s frozen against 638 s unfrozen and scored
# 0.828 against 0.885 macro-F1 on the pristine test (rho 100: 0.485 and
# 0.479 on the phase-2 test; fold 0, one run each, measured when training
# ran under bfloat16 autocast for 2 epochs at both rhos), so `cpu`
# fine-tunes everything.
#
# Augmentation (`finetune_augmentation`, here
# `dihedral_jitter_degrade`) is flips, quarter turns and mild colour jitter
# and, for half the draws, one of the benchmark's phase-2 degradations (kind
# and severity 1-4 drawn uniformly, applied near native resolution): the model
# sees the degradation family in training. On top of the phase-2 training
# draw (30 % of images, mostly mild) this means about 65 % of the fine-tuned
# models' training draws are degraded, with severities nearer the test mix's:
# for fine-tuned models the declared "training mildest" shift is mostly
# undone by augmentation (frozen-feature heads get no augmentation and face
# it in full). These runs are also the stage 1 of chapter 05's
# learned-representation heads and of chapter 06.

# %%
finetune = pbc_lt.pbc_lt_finetune(cfg, root, splits, results, method="erm", seed=seed)
display(pbc_lt.mean_std_table(finetune))
display(pbc_lt.fold_scores(finetune))

# %% [markdown]
# ```{admonition} One seed, one fold
# :class: note
# The `cpu` profile fine-tunes one seed on fold 0, and at rho 1 the seed
# moves the pristine test by more than any setting tried: on the 2-core
# machine of the {doc}`reproducibility notes <../book/reproduce>`, seeds 0, 1
# and 2 of this recipe scored 0.881, 0.839 and 0.896 macro-F1, while a lower or
# higher learning rate, Lite1, every available training image or no
# degradations in the augmentation all stayed between 0.845 and 0.883
# (`bench/target_trials.py` reruns each). Longer or sharper training narrows
# the spread without lifting the mean: 4 epochs over three seeds average
# 0.881, 160 px inputs 0.879, and the gpu profile's 224 px with 4 epochs
# gives 0.885 for five times the time. Read one rho-1 number here as one draw
# from a spread of about five points.
# ```

# %% [markdown]
# ## Head to tail
#
# Per-class F1 on the degraded test for the most imbalanced setting, classes
# ordered from the head to the tail of the training distribution, for both
# regimes; and the confusion matrix of the fine-tuned model.

# %%
tail = pbc_lt.head_to_tail(probe, finetune, splits, max(cfg.finetune_rhos), cfg.finetune_folds[0], seed)
plots.per_class_f1(tail.per_class, tail.head_order, hue="regime", title=f"rho={tail.rho}, degraded test");

# %%
plots.confusion_matrix(tail.confusion, tail.classes, title=f"fine-tuned ERM, rho={tail.rho}, degraded test");

# %% [markdown]
# ## In the papers' terms
#
# WBCBench 2026's own report gives macro-F1 0.635 for a ResNet-50 baseline and
# 0.643 for Swin-Tiny on its (private, 13-class) degraded test; the decoupled
# paper's supervised baselines reach 65.8-71.2 % on its own held-out split
# {cite}`le2026decoupled`. PBC-LT is a different, public benchmark with nine
# classes, so only the shape of the result carries over: how far macro-F1
# falls from $\rho=1$ to $\rho=100$ and from pristine to degraded images.

# %%
display(pbc_lt.headline_table(probe, finetune))
