"""The cellpose back-end: training from scratch on a few images and the
cross-validated zheng1 protocol (skipped without cellpose 3.1)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from wbclib import runs, segment
from wbclib.protocols import segmentation
from test_segment import synthetic_cell

# Tiny models: one intra-op thread is faster on shared cores, and deterministic.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cellpose():
    try:
        segment._import_cellpose()
    except segment.SegmentationError as exc:
        pytest.skip(str(exc))


def test_train_from_scratch_on_two_images_and_segment(cellpose, tmp_path):
    pairs = [synthetic_cell(size=120, seed=s)[::2] for s in (0, 1)]  # (image, cell mask)
    path = segment.train_cellpose([p[0] for p in pairs], [p[1] for p in pairs], tmp_path, epochs=2, batch_size=2)
    assert path.is_file() and path.parent == tmp_path / "models"
    settings = json.loads(path.with_name(path.name + ".json").read_text())
    assert settings["nchan"] == 3 and settings["input"] == "od" and settings["n_train"] == 2
    assert len(settings["train_loss"]) == 2 and all(np.isfinite(settings["train_loss"]))
    # two epochs teach it little, but the model loads and returns masks of the image's size
    result = segment.segment_cell(pairs[0][0], backend="cellpose", model_path=path)
    assert result.cell.shape == (120, 120) and result.nucleus.shape == (120, 120)
    assert not (result.nucleus & ~result.cell).any()
    with pytest.raises(ValueError, match="differ in size"):
        segment.train_cellpose([pairs[0][0]], [pairs[0][1][:50]], tmp_path, epochs=1)


def test_kfold_scores_each_image_with_a_model_that_did_not_see_it(cellpose, root, tmp_path):
    table = segment.cellpose_kfold(root, tmp_path / "kfold", n_folds=2, epochs=1, limit=4, batch_size=2)
    assert list(table.columns) == ["image_id", "label", "fold", "nucleus_dice", "cell_dice", "train_seconds"]
    assert sorted(table["image_id"]) == [1, 2, 3, 4] and sorted(table["fold"]) == [0, 0, 1, 1]
    for k in (0, 1):
        settings = json.loads((tmp_path / "kfold" / f"fold{k}" / "models" / "wbc_cellpose.json").read_text())
        assert settings["n_train"] == 2  # the other fold's images only
    assert table["cell_dice"].between(0, 1).all()
    # finished folds are read back, not retrained
    again = segment.cellpose_kfold(root, tmp_path / "kfold", n_folds=2, epochs=1, limit=4, batch_size=2)
    pd.testing.assert_frame_equal(table, again)


def test_kfold_protocol_names_its_folder_by_settings_and_reads_finished_runs(cellpose, root, tmp_path, monkeypatch):
    first = segmentation.cellpose_kfold(tmp_path, root, n_folds=2, epochs=1, limit=4, batch_size=2)
    run_dir = first["run_dir"].iloc[0]
    assert run_dir.startswith(str(tmp_path / "segmentation" / "cellpose_kfold" / "n_folds-2_epochs-1_limit-4_"))
    monkeypatch.setattr(segment, "train_cellpose", lambda *a, **k: pytest.fail("a finished run is read back"))
    pd.testing.assert_frame_equal(segmentation.cellpose_kfold(tmp_path, root, n_folds=2, epochs=1, limit=4,
                                                              batch_size=2), first)
    monkeypatch.undo()
    config, inputs = segmentation.kfold_identity(root, 2, 2, 4, 0, dict(batch_size=2))  # two epochs, not one
    other = runs.run(tmp_path, "segmentation/cellpose_kfold", config, inputs, keys=("n_folds", "epochs", "limit"))
    assert str(other.dir) != run_dir
