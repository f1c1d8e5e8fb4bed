import json

import numpy as np
import pandas as pd
import pytest

from conftest import write_png
from wbclib import data, train


@pytest.fixture
def split(synthetic_root):
    df = data.image_folder(synthetic_root, lab="toy")
    df["split"] = (["train"] * 6 + ["val"] * 4 + ["test"] * 2) * 2
    return df


CLASSES = ["lymphocyte", "neutrophil"]


def _config(**kw):
    base = dict(epochs=3, image_size=32, batch_size=8, lr=3e-3, patience=10, num_workers=0)
    base.update(kw)
    return train.TrainConfig(**base)


def test_run_folder_contents_and_skip_when_finished(split, synthetic_root, tmp_path, monkeypatch):
    run = tmp_path / "run"
    result = train.train_run(_config(), split, synthetic_root, run, CLASSES, n_boot=20)
    for name in ["config.json", "checkpoint.pt", "best.pt", "history.csv", "metrics.json", "predictions_test.csv", "done"]:
        assert (run / name).is_file(), name
    pred = pd.read_csv(run / "predictions_test.csv")
    assert list(pred.columns[-2:]) == ["prob_lymphocyte", "prob_neutrophil"]
    assert pred[["prob_lymphocyte", "prob_neutrophil"]].sum(axis=1).round(4).eq(1).all()
    assert len(pd.read_csv(run / "history.csv")) == 3
    # The folder says which class each output column is, so it can be applied on its own.
    assert json.loads((run / "config.json").read_text())["identity"]["config"]["classes"] == CLASSES
    assert result["test"]["macro_f1"] == pytest.approx(json.loads((run / "metrics.json").read_text())["test"]["macro_f1"])

    monkeypatch.setattr(train, "build_method", lambda *a, **k: pytest.fail("a finished run must not retrain"))
    assert train.train_run(_config(), split, synthetic_root, run, CLASSES, n_boot=20) == result


def test_pretrained_erm_learns_the_colour_task(tmp_path):
    # 36 images per class: a dozen batch-norm updates are too few for the
    # running statistics to follow the fine-tuned features (measured: eval
    # collapses to one class after 4 steps, reaches F1 1.0 after 18 here).
    rng = np.random.default_rng(0)
    for cls, colour in [("lymphocyte", (120, 60, 160)), ("neutrophil", (220, 170, 190))]:
        for i in range(36):
            write_png(tmp_path / "img" / cls / f"{i}.png",
                      np.clip(rng.normal(colour, 12, size=(40, 40, 3)), 0, 255).astype(np.uint8))
    split = data.image_folder(tmp_path / "img", lab="toy")
    split["split"] = (["train"] * 24 + ["val"] * 6 + ["test"] * 6) * 2
    result = train.train_run(_config(epochs=6), split, tmp_path / "img", tmp_path / "r", CLASSES, n_boot=0)
    history = pd.read_csv(tmp_path / "r" / "history.csv")
    assert history.loss.iloc[-1] < history.loss.iloc[0]
    assert result["best_val_macro_f1"]["macro_f1"] >= 0.75


def test_interrupted_run_resumes_from_its_checkpoint(split, synthetic_root, tmp_path, monkeypatch):
    run = tmp_path / "run"
    original = train.Method.set_epoch

    def interrupt_in_epoch_two(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        original(self, epoch)

    monkeypatch.setattr(train.Method, "set_epoch", interrupt_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train.train_run(_config(), split, synthetic_root, run, CLASSES, n_boot=0)
    assert not (run / "metrics.json").exists()
    first_epoch = pd.read_csv(run / "history.csv")
    assert len(first_epoch) == 1
    monkeypatch.setattr(train.Method, "set_epoch", original)
    train.train_run(_config(), split, synthetic_root, run, CLASSES, n_boot=0)
    history = pd.read_csv(run / "history.csv")
    assert history.epoch.tolist() == [0, 1, 2]
    assert history.loss.iloc[0] == first_epoch.loss.iloc[0]


def test_other_config_in_the_same_folder_is_refused(split, synthetic_root, tmp_path):
    run = tmp_path / "run"
    train.train_run(_config(epochs=1), split, synthetic_root, run, CLASSES, n_boot=0)
    with pytest.raises(train.RunMismatch, match="another identity.*config.epochs"):
        train.train_run(_config(epochs=2), split, synthetic_root, run, CLASSES)
