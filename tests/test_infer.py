"""Test-time augmentation, probability-averaging ensembles, and the image
table's ``view`` and ``stain`` columns."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from conftest import write_png
from wbclib import infer, models

# Tiny models: one intra-op thread is faster on shared cores, and deterministic.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_eight_dihedral_views_are_distinct_and_invertible():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).reshape(2, 3, 5, 5)
    views = infer.dihedral_views(x)
    assert len(views) == 8 and torch.equal(views[0], x)
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8
    for k, v in enumerate(views):
        assert v.shape == x.shape
        assert torch.equal(infer.dihedral_inverse(v, k), x)
    # A group: composing two views gives another view.
    assert any(torch.equal(infer.dihedral(views[1], 1), v) for v in views)
    with pytest.raises(ValueError, match="0..7"):
        infer.dihedral(x, 8)
    with pytest.raises(ValueError, match="batch"):
        infer.dihedral_views(x[0])


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], 0, 0


def _images(n=5, size=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8) for _ in range(n)]


def test_tta_of_a_rotation_invariant_model_is_the_plain_prediction():
    torch.manual_seed(0)
    # Global average pooling then a linear layer: invariant to every dihedral view.
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    data = ListDataset([x.float() for x in _images()])
    plain = infer.predict_tta(model, data, k=1, batch_size=2, num_workers=0)
    tta = infer.predict_tta(model, data, k=8, batch_size=2, num_workers=0)
    assert plain.shape == (5, 3)
    np.testing.assert_allclose(tta, plain, atol=1e-6)
    np.testing.assert_allclose(tta.sum(1), 1, atol=1e-6)


def test_tta_averages_softmax_over_views_for_any_function(monkeypatch):
    monkeypatch.setenv("WBC_PRECISION", "fp32")  # compared with a float32 computation of the same average
    weight = torch.randn(3 * 6 * 6, 4, generator=torch.Generator().manual_seed(1))
    fn = lambda x: x.float().flatten(1) @ weight / 500  # noqa: E731  (orientation-sensitive)
    data = ListDataset(_images())
    batch = torch.stack(data.images)
    expected = torch.stack([torch.softmax(fn(v), 1) for v in infer.dihedral_views(batch)[:4]]).mean(0)
    got = infer.predict_tta(fn, data, k=4, batch_size=3, num_workers=0)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-6)
    assert not np.allclose(got, infer.predict_tta(fn, data, k=1, num_workers=0))
    with pytest.raises(ValueError, match="between 1 and 8"):
        infer.predict_tta(fn, data, k=9)


def _pred(probs, paths=("a", "b", "c"), labels=("x", "y", "x")):
    frame = pd.DataFrame({"path": list(paths), "label": list(labels), "pred": "x"})
    for j, c in enumerate(["x", "y"]):
        frame[f"prob_{c}"] = np.asarray(probs)[:, j]
    return frame


def test_average_predictions_averages_probabilities_and_rederives_pred():
    a = _pred([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    b = _pred([[0.7, 0.3], [0.2, 0.8], [0.4, 0.6]])
    avg = infer.average_predictions([a, b])
    np.testing.assert_allclose(avg[["prob_x", "prob_y"]].to_numpy(), [[0.8, 0.2], [0.4, 0.6], [0.3, 0.7]])
    assert avg["pred"].tolist() == ["x", "y", "y"]
    assert avg["path"].tolist() == ["a", "b", "c"] and list(avg.columns) == list(a.columns)
    weighted = infer.average_predictions([a, b], weights=[3, 1])
    np.testing.assert_allclose(weighted["prob_x"], [0.85, 0.5, 0.25])
    assert infer.average_predictions([a])["pred"].tolist() == ["x", "x", "y"]


def test_average_predictions_rejects_tables_of_different_images():
    a = _pred([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    with pytest.raises(ValueError, match="'path' at row 1"):
        infer.average_predictions([a, _pred(a[["prob_x", "prob_y"]], paths=("a", "c", "b"))])
    with pytest.raises(ValueError, match="'label'"):
        infer.average_predictions([a, _pred(a[["prob_x", "prob_y"]], labels=("x", "x", "x"))])
    with pytest.raises(ValueError, match="2 rows"):
        infer.average_predictions([a, a.iloc[:2]])
    with pytest.raises(ValueError, match="class columns"):
        infer.average_predictions([a, a.rename(columns={"prob_y": "prob_z"})])
    with pytest.raises(ValueError, match="'severity'"):
        infer.average_predictions([a.assign(severity=0), a.assign(severity=[0, 2, 0])])
    with pytest.raises(ValueError, match="at least one"):
        infer.average_predictions([])


# --------------------------------------------------------------------------
# ImageTable views and stain normalisation
# --------------------------------------------------------------------------


def cell_image(rng, nucleus=(110, 60, 150), cytoplasm=(205, 150, 180), size=40) -> np.ndarray:
    """A light background with a stained cytoplasm disc and an off-centre nucleus."""
    yy, xx = np.mgrid[:size, :size]
    image = np.empty((size, size, 3), np.float64)
    image[:] = (236, 228, 232)
    image[(yy - 20) ** 2 + (xx - 20) ** 2 < 14 ** 2] = cytoplasm
    image[(yy - 18) ** 2 + (xx - 16) ** 2 < 7 ** 2] = nucleus
    return np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)


@pytest.fixture
def cells(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, tint in enumerate([(110, 60, 150), (90, 70, 170), (140, 50, 120)]):
        paths.append(write_png(tmp_path / "cells" / f"c{i}.png", cell_image(rng, nucleus=tint)).relative_to(tmp_path))
    return tmp_path, pd.DataFrame({"path": [str(p) for p in paths], "label": "x"})


def test_image_table_view_column_is_an_exact_dihedral_view(cells):
    root, table = cells
    plain = models.ImageTable(table, root, ["x"], image_size=24)
    for k in range(8):
        viewed = models.ImageTable(table.assign(view=k), root, ["x"], image_size=24)
        assert torch.equal(viewed[1][0], infer.dihedral(plain[1][0], k))
    with pytest.raises(ValueError, match="dihedral view"):
        models.ImageTable(table.assign(view=8), root, ["x"], image_size=24)


def test_image_table_macenko_column_normalises_to_the_reference(cells):
    root, table = cells
    reference = table["path"][0]
    plain = models.ImageTable(table, root, ["x"], image_size=24)
    stained = models.ImageTable(table.assign(stain="macenko", stain_reference=reference), root, ["x"], image_size=24)
    assert not torch.equal(plain[2][0], stained[2][0])
    assert stained[2][0].dtype == torch.uint8 and stained[2][0].shape == (3, 24, 24)
    mixed = models.ImageTable(table.assign(stain=["none", "macenko", "none"], stain_reference=reference), root, ["x"], 24)
    assert torch.equal(mixed[0][0], plain[0][0])
    with pytest.raises(ValueError, match="stain_reference"):
        models.ImageTable(table.assign(stain="macenko"), root, ["x"], image_size=24)
    with pytest.raises(ValueError, match="stain must be one of"):
        models.ImageTable(table.assign(stain="vahadane"), root, ["x"], image_size=24)


def test_cache_key_covers_view_and_stain_but_not_their_defaults(cells):
    _, table = cells
    key = lambda t: models.embedding_cache_key("b", True, 32, t, 0)  # noqa: E731
    assert key(table) == key(table.assign(view=0, stain="none", stain_reference=""))
    assert key(table) != key(table.assign(view=[0, 1, 0]))
    stained = table.assign(stain="macenko", stain_reference=table["path"][0])
    assert key(table) != key(stained) != key(stained.assign(stain_reference=table["path"][1]))
    assert key(table) != models.embedding_cache_key("b", True, 32, table, 0, transform_tag="decoupled")
