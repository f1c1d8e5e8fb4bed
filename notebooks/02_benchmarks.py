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
# # Building the benchmarks
#
# WBCBench 2026 is not public, so this chapter rebuilds the same kind of
# benchmark on the public sets. Every split is a deterministic, seeded table
# written to disk (`splits/`): rebuilding it from the same data gives the same
# files.
#
# * **PBC-LT** – pbc's nine sub-typed classes; a stratified 20 % held-out test,
#   5-fold cross-validation on the rest, and the training part sub-sampled to
#   an exponential long tail $n_i = n_{max}\,\rho^{-i/(C-1)}$ with
#   $\rho \in \{1, 10, 100\}$. Which class is the head is a seeded choice,
#   recorded with the split.
# * **Phase 2 (shift)** – every validation and test image gets one
#   deterministic degradation (salt-and-pepper noise, Gaussian blur, or an
#   illumination/colour cast) at one of four severities; the pristine image is
#   kept for comparison.
# * **Cross-lab** – the four classes all labs share; train on pbc and test on
#   zheng1 and bccd, and leave-one-lab-out.

# %% tags=["parameters"]
profile = "cpu"
data_root = None
cache_dir = None
splits_dir = None
seed = 0
overrides = None  # profile keys to change, e.g. {"probe_epochs": 60} (validated; see wbclib/profiles.py)

# %%
import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import display

from wbclib import benchmarks as B
from wbclib import data, plots, profiles
from wbclib.degrade import SEVERITY_PARAMS, degrade, image_rng

cfg = profiles.get(profile, overrides)
root = data.data_root(data_root)
splits = B.ensure_benchmarks(profiles.output_dir("splits", splits_dir), root, seed,
                             cache_dir=profiles.output_dir("cache", cache_dir))
table, definition = B.read_pbc_lt(splits, seed)
print("head-to-tail class order (seeded):", " > ".join(definition.head_order))
display(table.groupby(["label", "split"]).size().unstack())

# %% [markdown]
# ## The long tail
#
# By default the head class has as many images as the smallest class can
# supply in every fold ($n_{max}$ below), so each rho is an exact exponential
# profile. The profile in use may cap $n_{max}$ further to fit a CPU budget.

# %%
curves = {}
for rho in cfg.rhos:
    split = B.pbc_lt_split(table, definition, rho, 0)
    curves[f"rho={rho} (full)"] = split[split.split == "train"].label.value_counts().to_dict()
    if cfg.n_max:
        capped = B.pbc_lt_split(table, definition, rho, 0, n_max=cfg.n_max)
        curves[f"rho={rho} ({cfg.name} profile)"] = capped[capped.split == "train"].label.value_counts().to_dict()
plots.long_tail_curves(curves);
display(pd.DataFrame(curves).loc[definition.head_order])

# %% [markdown]
# ## Degradations
#
# Strengths are relative to the image size, so a 120 px zheng1 crop and a
# 360 px pbc field degrade alike. Parameters per severity:

# %%
display(pd.DataFrame(SEVERITY_PARAMS).rename_axis("severity"))
example = table[table.label == definition.head_order[0]].iloc[0]
plots.degradation_grid(root / example["path"], example["path"], seed);

# %% [markdown]
# Each validation and test image is assigned one kind and severity by a hash
# of its path and the seed; the assignment is balanced:

# %%
held_out = table[table.split == "test"]
display(pd.crosstab(held_out["degradation"], held_out["phase2_severity"]))
sample = B.phase2(held_out.sample(8, random_state=seed))
fig, axes = plt.subplots(2, 8, figsize=(14, 4))
for i, (_, row) in enumerate(sample.iterrows()):
    image = data.load_image(root / row["path"])
    axes[0, i].imshow(image)
    axes[1, i].imshow(degrade(image, row["degradation"], row["severity"], image_rng(row["path"], seed)))
    axes[1, i].set_title(f"{row['degradation'].replace('_', ' ')} {row['severity']}", fontsize=8)
    for ax in axes[:, i]:
        ax.axis("off")
axes[0, 0].set_title("pristine", fontsize=8, loc="left")
fig.tight_layout()

# %% [markdown]
# ## Cross-lab
#
# Shared classes only; within each lab 20 % of every class is held out for
# in-domain validation. A target lab is always tested on all of its images.

# %%
cross = B.read_crosslab(splits, seed)
display(cross.pivot_table(index="label", columns=["lab", "part"], values="path", aggfunc="size", fill_value=0))
