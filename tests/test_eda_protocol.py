"""Chapter 01's tables in :mod:`wbclib.protocols.eda`, on tiny synthetic manifests and images."""
from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from conftest import write_png
from wbclib import cellcrop
from wbclib.protocols import eda


def manifests():
    """Six images in three labs, pbc with fine labels, a basophil and an ig that no other lab has."""
    return pd.DataFrame(dict(
        path=["pbc/a.png", "pbc/b.png", "pbc/c.png", "pbc/d.png", "zheng1/e.png", "bccd/f.png"],
        lab=["pbc", "pbc", "pbc", "pbc", "zheng1", "bccd"],
        label=["neutrophil", "neutrophil", "ig", "basophil", "neutrophil", "monocyte"],
        fine_label=["SNE", "BNE", "MY", "BA", "neutrophil", "monocyte"],
        width=[10, 11, 12, 13, 5, 7], height=[1, 2, 2, 2, 5, 8]))


def test_images_per_class_and_lab_counts_with_zeros():
    counts = eda.images_per_class_and_lab(manifests())
    assert list(counts.columns) == ["bccd", "pbc", "zheng1"]
    assert list(counts.index) == ["basophil", "ig", "monocyte", "neutrophil"]
    assert counts.loc["neutrophil", "pbc"] == 2 and counts.loc["neutrophil", "zheng1"] == 1
    assert counts.loc["monocyte", "pbc"] == 0 and counts.loc["monocyte", "bccd"] == 1


def test_pbc_fine_class_counts_is_one_row_most_frequent_first():
    m = pd.concat([manifests(), manifests().iloc[[0]]], ignore_index=True)  # two SNE
    fine = eda.pbc_fine_class_counts(m)
    assert list(fine.index) == ["images"]
    assert list(fine.columns)[0] == "SNE" and set(fine.columns) == {"SNE", "BNE", "MY", "BA"}  # no zheng1/bccd
    assert fine.loc["images"].tolist() == [2, 1, 1, 1]


def test_shared_class_sample_keeps_the_four_shared_classes_and_names_rows():
    sample = eda.shared_class_sample(manifests())
    assert sample["path"].tolist() == ["pbc/a.png", "pbc/b.png", "zheng1/e.png", "bccd/f.png"]
    assert sample["lab / class"].tolist() == ["pbc / neutrophil", "pbc / neutrophil", "zheng1 / neutrophil",
                                              "bccd / monocyte"]
    assert "lab / class" not in manifests().columns


def test_image_size_table_describes_width_and_height_per_lab_one_digit():
    sizes = eda.image_size_table(manifests())
    assert sizes.loc["pbc", ("width", "count")] == 4 and sizes.loc["pbc", ("width", "mean")] == 11.5
    assert sizes.loc["pbc", ("width", "std")] == 1.3  # std of 10..13 = 1.291
    assert sizes.loc["pbc", ("height", "mean")] == 1.8  # 7 / 4 = 1.75
    assert sizes.loc["bccd", ("height", "max")] == 8.0


def test_sample_sizes_depend_on_the_profile_name():
    smoke, cpu = SimpleNamespace(name="smoke"), SimpleNamespace(name="cpu")
    assert (eda.colour_per_lab(smoke), eda.colour_per_lab(cpu)) == (20, 200)
    assert (eda.crop_per_lab(smoke), eda.crop_per_lab(cpu)) == (8, 300)


@pytest.fixture
def coloured_root(tmp_path):
    """Three pbc images of distinct flat colours and one bccd image half black, half (200, 100, 50)."""
    for i, colour in enumerate([(10, 20, 30), (40, 50, 60), (70, 80, 90)]):
        write_png(tmp_path / f"pbc/{i}.png", np.full((4, 4, 3), colour, np.uint8))
    half = np.zeros((4, 4, 3), np.uint8)
    half[:2] = (200, 100, 50)
    write_png(tmp_path / "bccd/h.png", half)
    return tmp_path


def test_mean_colours_samples_per_lab_and_averages_pixels(coloured_root):
    table = pd.DataFrame(dict(path=["pbc/0.png", "pbc/1.png", "pbc/2.png", "bccd/h.png"],
                              lab=["pbc", "pbc", "pbc", "bccd"]))
    colour = eda.mean_colours(table, coloured_root, per_lab=2, seed=0)
    assert list(colour.columns) == ["R", "G", "B", "lab"]
    assert colour["lab"].tolist() == ["bccd", "pbc", "pbc"]
    assert colour.iloc[0][["R", "G", "B"]].tolist() == [100.0, 50.0, 25.0]
    picked = {tuple(r) for r in colour[colour.lab == "pbc"][["R", "G", "B"]].to_numpy()}
    assert len(picked) == 2 and picked <= {(10.0, 20.0, 30.0), (40.0, 50.0, 60.0), (70.0, 80.0, 90.0)}
    again = eda.mean_colours(table, coloured_root, per_lab=2, seed=0)
    pd.testing.assert_frame_equal(colour, again)
    assert len(eda.mean_colours(table, coloured_root, per_lab=5, seed=0)) == 4


def test_colour_histograms_one_panel_per_channel_labs_overlaid():
    colour = pd.DataFrame(dict(R=[1.0, 2, 3], G=[4.0, 5, 6], B=[7.0, 8, 9], lab=["a", "b", "b"]))
    fig = eda.colour_histograms(colour)
    assert [ax.get_xlabel() for ax in fig.axes] == ["mean R per image", "mean G per image", "mean B per image"]
    assert len(fig.axes[0].patches) == 2 * 25
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["a", "b"]
    plt.close(fig)


def test_cell_crop_ratios_measure_up_to_per_lab_images(coloured_root):
    table = pd.DataFrame(dict(path=["pbc/0.png", "pbc/1.png", "pbc/2.png", "bccd/h.png"],
                              lab=["pbc", "pbc", "pbc", "bccd"]))
    ratios = eda.cell_crop_ratios(table, coloured_root, per_lab=2, seed=0)
    assert ratios.groupby("lab").size().to_dict() == {"bccd": 1, "pbc": 2}
    assert {"before", "after", "found"} <= set(ratios.columns)


def test_common_ratio_note_gives_the_median_of_lab_medians_and_the_constant():
    ratios = pd.DataFrame(dict(lab=["a", "a", "b", "c", "c"], found=[True, True, True, True, False],
                               before=[0.4, 0.5, 0.6, 0.8, 0.1]))
    assert eda.common_ratio_note(ratios) == (
        f"common ratio measured on this sample: 0.600; used by every chapter: {cellcrop.COMMON_RATIO}")


def test_integrity_note_counts_problems():
    assert eda.integrity_note(pd.DataFrame(columns=["path", "problem"])) == "all files match SHA256SUMS"
    assert eda.integrity_note(pd.DataFrame(dict(path=["x", "y"], problem=["missing", "changed"]))) == "2 problem(s)"
