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
# # Cross-lab generalisation: BoDA, SADA and the DG baselines
#
# A classifier trained in one laboratory meets other stains, microscopes,
# cameras and magnifications in the next. This chapter rebuilds the
# comparison of SADA's Table I {cite}`li2024sada` on the public labs: ERM,
# CORAL {cite}`sun2016coral`, DANN {cite}`ganin2016dann`, Mixup
# {cite}`zhang2018mixup`, SelfReg {cite}`kim2021selfreg`, BoDA
# {cite}`yang2022boda` as used for white cells by {cite}`umer2023imbalanced`
# (coupled, and decoupled with a class-balanced classifier), and SADA itself,
# all with SWAD weight averaging {cite}`cha2021swad` as in SADA's protocol.
#
# **SADA** decomposes each image into stain colours and densities (Beer-Lambert
# law, sparse NMF as in Vahadane's normalisation {cite}`vahadane2016`),
# clusters the stain matrices with k-means into pseudo-domains, re-stains every
# image with the colours of each other cluster (densities rescaled by their
# 99th percentiles), and learns features on which raw and re-stained copies
# agree: a local alignment loss on the feature maps and a supervised
# contrastive loss whose anchors average each image's raw and re-stained
# embeddings. A classifier is trained on the frozen features afterwards.
#
# The protocol: the four classes all three labs share (neutrophil, lymphocyte,
# monocyte, eosinophil); leave-one-lab-out (LOLO) over pbc, zheng1 and bccd,
# which is SADA's protocol, plus train-on-pbc / test-on-the-others; F1-macro
# (primary) and F1-micro (accuracy) per target lab, mean ± std over seeds,
# bootstrap intervals over the test images.
#
# **Regime.** In the `gpu` profile every method fine-tunes the whole
# EfficientNet-Lite0 on images (`protocols.crosslab_dg.crosslab_dg` through
# `train.train_run`; SADA re-stains inside every mini-batch). On two CPU cores
# that is out of reach for 8 methods × 4 settings × 3 seeds, so the `cpu` and
# `smoke` profiles freeze the ImageNet trunk: each image's final feature map
# (1280 × 4 × 4 at 128 px) is computed once and cached, and each method trains
# its featurizer, a small convolutional head, on top. SADA's re-stained views
# go through the same frozen trunk; their maps are precomputed once per
# training set (clusters over the whole training set, one donor drawn per
# image and other cluster), an approximation of the paper's per-batch
# clustering and random donors. Mixup then mixes trunk maps instead of pixels.

# %% tags=["parameters"]
profile = "cpu"
data_root = None
cache_dir = None
splits_dir = None
results_dir = None
seed = 0
overrides = None  # profile keys to change, e.g. {"probe_epochs": 60} (validated; see wbclib/profiles.py)

# %%
import time

from IPython.display import Markdown, display

from wbclib import benchmarks as B
from wbclib import crosslab, plots, profiles
from wbclib.protocols import crosslab_dg as dg

started = time.time()
ctx = profiles.setup(profile, data_root, cache_dir, splits_dir, results_dir, seed, overrides)
cfg, root, cache, splits, results = ctx.cfg, ctx.root, ctx.cache, ctx.splits, ctx.results
table = B.read_crosslab(splits, seed)
print(dg.profile_summary(cfg))

# %% [markdown]
# ## Cell scale across labs
#
# pbc's fields are 360 px with the cell about a third of the width among red
# cells; zheng1's crops are 120 px and tight; bccd's crops vary in size. A
# frozen or fine-tuned network sees a neutrophil at a different size in each
# lab. Instead of guessing zoom factors, the share of each image covered by
# the stained nucleus is measured (`scale.nucleus_mask`: Otsu's threshold on
# the mean optical density of the red and green channels, which the basic
# nuclear dye absorbs and red cells and background do not; holes filled;
# only central components kept). First, how well does that rule find nuclei?
# zheng1 comes with expert masks.

# %%
agreement = dg.nucleus_agreement(cfg, table, root)
print(dg.agreement_summary(agreement))

# %% [markdown]
# Each lab's median nucleus fraction then gives a centre crop factor per lab
# that brings every median to the largest one (so images are only cropped,
# never padded); the image loader applies it before resizing (the `crop`
# column of the split). The ratios are measured again after cropping. With the
# profile's `cell_crop` on (every profile), each image is instead cropped
# around its own leukocyte at one common cell-to-input ratio (chapter 01,
# `wbclib.cellcrop`), which normalises scale per image; a per-lab crop on top
# would crop twice, so the factors are then all 1 and the two measurements
# below coincide.

# %%
crops, measured = crosslab.scale_factors(cfg, table, root, cache)
display(dg.scale_summary(measured))
plots.scale_ratios(measured, title="nucleus-to-image area ratio per lab");

# %% [markdown]
# ## Stain clusters and re-stained views
#
# The training images of one LOLO setting (pbc and bccd, zheng1 held out),
# clustered by their Vahadane stain matrices. If stain colour were a lab
# label, each cluster would hold one lab; SADA's premise is that colour varies
# within labs too.

# %%
stains = dg.stain_cluster_views(cfg, root, cache, table, crops, setting="LOLO:zheng1")
display(stains.labs)
plots.restained_grid(stains.raw, stains.views,
                     title=f"SADA re-staining (k = {stains.k}): copies take other clusters' stains");

# %% [markdown]
# ## The cross-lab table
#
# Every method, every setting, every seed (finished runs are read back).
# The rows follow SADA's Table I; "BoDA decoupled" re-trains BoDA's
# classifier with class-balanced sampling on its frozen features (BoDA's
# "Ours+"). With pbc as the only source, CORAL, DANN and BoDA align stain
# clusters of the pbc images (SADA's pseudo-domains) instead of labs.

# %%
runs = dg.crosslab_dg(cfg, root, splits, cache, results, split_seed=seed, weights_for=("pbc→others", cfg.dg_seeds[0]))
print(dg.runs_summary(runs))

# %% [markdown]
# Leave-one-lab-out, in the shape of SADA's Table I (percent, mean ± std over
# seeds; the average is over the three held-out labs):

# %%
display(dg.table_one(runs, lolo=True, order=cfg.dg_rows))

# %% [markdown]
# Trained on pbc alone, tested on the two other labs:

# %%
display(dg.table_one(runs, lolo=False, order=cfg.dg_rows))

# %% [markdown]
# For reference, SADA's reported Table I (ResNet-50 fine-tuned end to end,
# four public source labs, five classes including basophils, held-out
# Acevedo-20 = our pbc and Zheng-18 = our zheng1):

# %%
display(dg.sada_reference())

# %% [markdown]
# Bootstrap 95 % intervals of macro-F1 per target lab (first seed), from the
# test images:

# %%
display(dg.interval_table(runs, cfg.dg_seeds[0], cfg.dg_rows))

# %% [markdown]
# The same leave-one-lab-out scores as bars (mean over seeds; interval of the
# first seed):

# %%
plots.lolo_bars(dg.lolo_bars(runs, cfg.dg_seeds[0], cfg.dg_rows));

# %% [markdown]
# ## Do BoDA and SADA beat ERM?
#
# The gain in macro-F1 averaged over the held-out labs, with a paired
# bootstrap over test images (both methods scored on the same resampled
# images, every seed, then averaged); a method "beats ERM" here only if the
# whole 95 % interval of its gain lies above zero.

# %%
gains = dg.gains_over_erm(runs, cfg.dg_seeds, cfg.n_boot)
display(dg.gains_table(gains))
display(Markdown(dg.gains_report(gains, cfg.name, len(cfg.dg_seeds))))

# %% [markdown]
# ## The same methods on a fine-tuned backbone
#
# On a frozen trunk every method shapes only a small head, and chapter 04
# showed how far that regime is from what a network can do across labs:
# fine-tuning EfficientNet-Lite0 (`cpu`: the last stages, stem and first three
# stages frozen; `gpu`: everything) on cell-centred pbc images with colour,
# stain and blur jitter took ERM from near chance to about 0.6 macro-F1 on
# zheng1 and bccd. Here BoDA and SADA (`cpu`; every coupled row on `gpu`) are
# trained exactly like that ERM (`dg.finetuned_rows`: the same split, epochs,
# frozen stages, augmentation and seeds, no SWAD for any row), so only the
# training objective differs. The ERM row *is* chapter 04's run, read back
# from its folder. With pbc the only source, every method that reads domains
# (BoDA; on `gpu` also CORAL, DANN, Mixup and SelfReg) sees SADA's
# stain-colour clusters of the pbc training images as domains. SADA re-stains
# inside every mini-batch and spends half the epochs on its contrastive stage,
# half on its classifier (no early stop in between).
#
# ```{warning}
# The comparison leans towards ERM: chapter 04 chose the augmentation and the
# number of epochs by ERM's scores on these very target labs (an "oracle"
# selection), and BoDA and SADA inherit that schedule without any tuning of
# their own.
# ```

# %%
finetuned = dg.finetuned_rows(cfg, root, splits, cache, results, split_seed=seed)
display(dg.table_one(finetuned, lolo=False, order=cfg.dg_finetune_rows))

# %% [markdown]
# Per target lab: the bars are the mean over seeds, the dots each seed's
# score, the line the bootstrap interval of the first seed's run over the
# test images. The seeds spread about as widely as one run's interval.

# %%
plots.lolo_bars(dg.lolo_bars(finetuned, cfg.crosslab_seeds[0], cfg.dg_finetune_rows, lolo=False),
                title=f"trained on pbc, {dg.finetuned_regime(cfg)}", xlabel="target lab",
                ylabel="macro-F1 (bars: mean over seeds;\ndots: each seed; line: first seed's interval)",
                seeds=dg.target_rows(finetuned, lolo=False));

# %% [markdown]
# And the paired bootstrap against ERM, as above (every seed, both target
# labs):

# %%
finetuned_gain = dg.finetuned_gains(finetuned, cfg.crosslab_seeds, cfg.n_boot, cfg.dg_finetune_rows)
display(dg.gains_table(finetuned_gain))
display(Markdown(dg.gains_report(finetuned_gain, cfg.name, len(cfg.crosslab_seeds))))

# %% [markdown]
# ## Ablation (SADA's Table III)
#
# M1 is ERM; M2 drops the local alignment loss (beta = 0); M3 replaces the
# domain-invariant contrastive loss by the ordinary supervised contrastive
# loss, also without local alignment (as in SADA's table). A fourth variant is
# a control the paper does not have: ERM trained on the raw images *and* the
# same re-stained copies, i.e. SADA's augmentation without its losses. The
# average is over the three LOLO held-out labs, as in SADA's table.

# %%
ablation = dg.ablation(cfg, root, splits, cache, results, runs, split_seed=seed)
display(ablation)
print("SADA's Table III for comparison:")
display(crosslab.SADA_TABLE_III)

# %% [markdown]
# Why BoDA stays close to ERM here: its loss divides each distance by the
# size of the image's domain-class pair (the "balanced distance"). With a few
# dozen images per pair and feature distances of a few units, the logits are
# close to zero and the loss sits near its value for uniform logits,
# log(pairs - 1), where its gradient is small. The BoDA term at the end of
# training, averaged over the LOLO runs:

# %%
print(dg.boda_term_report(runs, cfg.dg_seeds))

# %% [markdown]
# ## Number of clusters and alignment weight (SADA's Fig. 7)
#
# SADA with every (k, beta) of the profile's grid (first seed) on the
# profile's sweep settings (`cpu`: zheng1 held out, the paper's Zheng-18;
# `gpu`: all three LOLO settings); the cell at the default (k = 3,
# beta = 0.1) is the main run.

# %%
sweep = dg.sada_sweep(cfg, root, splits, cache, results, split_seed=seed)
plots.sweep_heatmaps(sweep, row="k", column="beta",
                     title=f"SADA, average over {', '.join(cfg.sada_sweep_settings)} (held-out labs)");

# %% [markdown]
# ## Where the models look: Grad-CAM
#
# Grad-CAM {cite}`selvaraju2017gradcam` of the true class for the models
# trained on pbc (first seed), on validation images of pbc and test images of
# zheng1 and bccd. In the frozen-trunk regime the maps come from the last
# convolution of the trainable head (4 × 4 at 128 px, upsampled), so they
# are coarse; in the `gpu` regime from the backbone's last convolution.

# %%
examples, images, cams = dg.gradcam_examples(cfg, root, splits, cache, results, rows=dg.gradcam_rows(cfg),
                                             per_lab=cfg.dg_gradcam_per_lab, seed=cfg.dg_seeds[0], split_seed=seed)
plots.gradcam_grid(images, cams, dg.gradcam_captions(examples), title="Grad-CAM of the true class (trained on pbc)");

# %% [markdown]
# ## Scale normalisation matters: ERM with and without it
#
# The same ERM runs (first seed) on whole images resized without any scale
# normalisation (neither the cell-centred crop nor the per-lab crop).

# %%
compare = dg.scale_comparison(cfg, root, splits, cache, results, runs, split_seed=seed)
display(dg.scale_table(compare))

# %% [markdown]
# ## Summary
#
# Computed from this run:

# %%
display(Markdown(dg.chapter_summary(runs, ablation, compare, gains, finetuned, finetuned_gain,
                                    dg.finetuned_regime(cfg))))

# %% [markdown]
# Two caveats when reading these numbers against the paper: with the `cpu`
# profile the main table's backbone is frozen, so SADA's losses shape only a
# small head on ImageNet features (the paper fine-tunes a ResNet-50 for 8,000
# steps; the fine-tuned section trains the last stages of a Lite0 for about
# 100 steps on 600 pbc images), and our LOLO settings have two source labs
# where SADA's have four, and four classes instead of five. The `gpu` profile
# runs the paper's regime end to end.

# %%
print(f"chapter wall time: {time.time() - started:.0f} s (profile {cfg.name})")
