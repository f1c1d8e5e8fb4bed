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
# # The data: three labs, one taxonomy
#
# Three public sets of peripheral-blood leukocyte images from three labs
# ({cite}`acevedo2020pbc`, {cite}`zheng2018micron`, {cite}`bccd2017`). This
# chapter builds one manifest per source, maps each lab's labels onto common
# names, looks for duplicated files, and shows how differently the labs image
# the same cells. How to obtain each set is in `data/README.md`.

# %% tags=["parameters"]
profile = "cpu"
data_root = None  # None: $WBC_DATA_ROOT, else ../shared/datasets beside the project
cache_dir = None  # None: ./cache (or $WBC_CACHE_DIR)
seed = 0
overrides = None  # profile keys to change, e.g. {"probe_epochs": 60} (validated; see wbclib/profiles.py)

# %%
from IPython.display import display

from wbclib import cellcrop, data, plots, profiles
from wbclib.protocols import eda

cfg = profiles.get(profile, overrides)
root = data.data_root(data_root)
cache = profiles.output_dir("cache", cache_dir)
manifests = data.all_manifests(root, cache_dir=cache)
print(f"data root: {root}; {len(manifests)} images")

# %% [markdown]
# ## Images per lab and class
#
# pbc is large and fine-grained (sub-typed neutrophils and immature
# granulocytes); zheng1 and bccd are small and dominated by neutrophils, with
# basophils almost absent. The y-axis is logarithmic.

# %%
display(eda.images_per_class_and_lab(manifests))
plots.class_counts(manifests, title="images per common class and lab");

# %%
display(eda.pbc_fine_class_counts(manifests))

# %% [markdown]
# ## What the labs look like
#
# The same cell types under three stains, microscopes and cameras: pbc's
# CellaVision fields centre one leukocyte among red cells, zheng1 crops tightly
# around the cell on a yellowish background, and bccd crops come from
# lower-magnification smear photographs.

# %%
plots.sample_grid(eda.shared_class_sample(manifests), root, row="lab / class", n=6, seed=seed);

# %%
plots.sample_grid(manifests[manifests.lab == "pbc"], root, row="fine_label", n=8, seed=seed,
                  title="pbc fine classes");

# %% [markdown]
# ## Image size and colour
#
# Sizes differ by a factor of three between labs, and so does the number of
# pixels a cell covers: a resize alone does not make the labs comparable (the
# cross-lab chapter returns to this). Mean colour per image is computed on a
# per-lab sample.

# %%
display(eda.image_size_table(manifests))

# %%
eda.colour_histograms(eda.mean_colours(manifests, root, per_lab=eda.colour_per_lab(cfg), seed=seed));

# %% [markdown]
# ## Cell-centred inputs
#
# Resizing a whole image leaves the labs' framing as it is: in a pbc field the
# leukocyte spans about two fifths of the side, in a bccd crop four fifths.
# Every chapter therefore crops each image around its own leukocyte first
# (profile key `cell_crop`, on in every profile; `wbclib.cellcrop`): the cell
# is located classically (nucleus stain, Otsu, the largest stained disc around
# the nucleus, a few milliseconds per image with OpenCV, cached per image), and
# the square around it is cut so that the cell fills one common share of the
# side, the median of the three labs' median ratios, padding by reflection
# where the square leaves the image; then the image is resized. A cell that
# cannot be found falls back to the image centre and a fixed size for its lab
# (the lab medians below: pbc 0.425, zheng1 0.650, bccd 0.820 of the shorter
# side; the `located` column says how often that happened). Degradations are
# applied to the whole field before the crop, as an acquisition would, and a
# degraded image's cell is located on the degraded image itself (a deployed
# system never sees the pristine one), so corruptions that mislead the
# localisation cost what they would cost in use. This table is measured on
# pristine images.
#
# The table measures the cell-to-input ratio (cell side / shorter image side)
# per lab, before and after the crop; the common ratio is re-measured here and
# compared with the constant the book uses.

# %%
ratios = eda.cell_crop_ratios(manifests, root, per_lab=eda.crop_per_lab(cfg), seed=seed)
display(cellcrop.summarize_ratios(ratios))
print(eda.common_ratio_note(ratios))

# %% [markdown]
# Before (the native image with the square that is cut, in yellow) and after
# (the crop at the network's input size), four images per lab.

# %%
plots.cell_crops(ratios, root, ratio=cellcrop.COMMON_RATIO, per_lab=4);

# %% [markdown]
# ## Duplicates
#
# Byte-identical files (same SHA-256). The policy applied before any split:
# copies carrying **different** labels are all dropped (the true label is
# unknown); copies with the same label keep one, so no image can sit on both
# sides of a train/test split.

# %%
dups = data.find_duplicates(manifests)
print(data.describe_duplicates(dups))
display(dups[["path", "fine_label", "n", "cross_class"]])
print(f"after the policy: {len(data.drop_duplicates(manifests))} of {len(manifests)} images kept")

# %% [markdown]
# ## Integrity
#
# Every file is checked against the data set's `SHA256SUMS` list
# (`wbc data verify` does the same from the command line).

# %%
problems = data.verify_checksums(root)
print(eda.integrity_note(problems))
display(problems.head())
