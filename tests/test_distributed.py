"""Data-parallel training (``wbclib.distributed``): two CPU processes with the
gloo backend train the same run as one process, and only rank 0 writes it.

The model is timm's ``test_efficientnet_gn`` (99k parameters, group norm, no
batch norm, no dropout) at 32 px: gloo on CPU has no ``SyncBatchNorm``, so
with batch norm each rank would normalise its own half batch and the runs
would differ by design, not by float summation order. ERM's cross-entropy is
a mean over images, so the mean of the two ranks' half-batch gradients is
the one-process batch gradient; what remains is the order of float sums.
The runs are in float32 (``WBC_PRECISION=fp32``): under bfloat16 autocast
(CPUs with AVX512-BF16) half and whole batches round differently at bf16's
three significant digits, and Adam's first, sign-like steps turn that into
weight differences of the order of the learning rate.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import write_png
from wbclib import _io, data, distributed, train
from wbclib.samplers import SeededDraws, make_sampler

CLASSES = ["lymphocyte", "neutrophil"]
#: Largest differences allowed between one process's and two processes' runs
#: (measured on a 2-core x86 CPU: weights 3.3e-6, probabilities and losses
#: about 1e-8). Weights get more room: Adam divides each gradient by its
#: running RMS, so float-order noise in near-zero gradient entries becomes
#: weight noise far above the gradients' own.
WEIGHT_ATOL = 5e-5
ATOL = 1e-5
RUN_FILES = {"config.json", "checkpoint.pt", "best.pt", "history.csv", "predictions_test.csv", "metrics.json", "done"}


def _config() -> train.TrainConfig:
    # 32 training images, batch 8: four steps per epoch, each rank stepping on 4 images.
    return train.TrainConfig(backbone="test_efficientnet_gn", pretrained=False, image_size=32, epochs=2,
                             batch_size=8, lr=3e-3, patience=10, num_workers=0)


@pytest.fixture(scope="module", autouse=True)
def float32():
    """Every run of this module in float32 (spawned ranks inherit the environment)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WBC_PRECISION", "fp32")
        yield


@pytest.fixture(scope="module")
def colour_split(tmp_path_factory):
    """Two classes told apart by colour: 16 train, 4 val, 4 test images each."""
    root = tmp_path_factory.mktemp("colour")
    rng = np.random.default_rng(0)
    for cls, colour in [("lymphocyte", (120, 60, 160)), ("neutrophil", (220, 170, 190))]:
        for i in range(24):
            write_png(root / cls / f"{cls}_{i:02d}.png",
                      np.clip(rng.normal(colour, 25, size=(40, 40, 3)), 0, 255).astype(np.uint8))
    split = data.image_folder(root, lab="toy")
    split["split"] = (["train"] * 16 + ["val"] * 4 + ["test"] * 4) * 2
    return split, root


@pytest.fixture(scope="module")
def one_process(colour_split, tmp_path_factory):
    """The reference: the run trained in this (single) process."""
    split, root = colour_split
    run_dir = tmp_path_factory.mktemp("one") / "run"
    metrics = train.train_run(_config(), split, root, run_dir, CLASSES, n_boot=0)
    return run_dir, metrics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, split: pd.DataFrame, root: Path, run_dir: Path,
               log_dir: Path) -> None:
    """One rank (spawned by torch.multiprocessing): join the gloo group as
    torchrun would, log every file this rank writes, and train."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    assert distributed.init_from_env("gloo")
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (rank, world, rank == 0)
    written = []
    original = _io.atomic_path

    def logged(path):
        written.append(Path(path).name)
        return original(path)

    _io.atomic_path = logged  # every run-folder write goes through it
    try:
        metrics = train.train_run(_config(), split, root, run_dir, CLASSES, n_boot=0)
    finally:
        _io.atomic_path = original
        torch.distributed.destroy_process_group()
    (log_dir / f"rank{rank}.json").write_text(json.dumps(dict(written=written, metrics=metrics)))


def _assert_same_run(reference: Path, other: Path) -> dict:
    """The two run folders hold the same model (within WEIGHT_ATOL), predictions and losses (ATOL);
    returns the largest differences seen (the measured tolerance)."""
    ref_weights = _io.torch_load(reference / "best.pt")
    weights = _io.torch_load(other / "best.pt")
    assert ref_weights.keys() == weights.keys()
    weight_gap = max((ref_weights[k].double() - weights[k].double()).abs().max().item() for k in ref_weights
                     if ref_weights[k].is_floating_point())
    ref_pred, pred = pd.read_csv(reference / "predictions_test.csv"), pd.read_csv(other / "predictions_test.csv")
    prob_cols = [f"prob_{c}" for c in CLASSES]
    prob_gap = np.abs(ref_pred[prob_cols].to_numpy() - pred[prob_cols].to_numpy()).max()
    ref_hist, hist = pd.read_csv(reference / "history.csv"), pd.read_csv(other / "history.csv")
    loss_gap = np.abs(ref_hist["loss"].to_numpy() - hist["loss"].to_numpy()).max()
    assert weight_gap <= WEIGHT_ATOL and prob_gap <= ATOL and loss_gap <= ATOL, (weight_gap, prob_gap, loss_gap)
    assert ref_pred["pred"].tolist() == pred["pred"].tolist()
    # Training moved the weights well beyond the tolerance, so agreement is not trivial.
    initial = train.create_backbone("test_efficientnet_gn").model.state_dict()
    assert max((ref_weights[f"featurizer.model.{k}"] - v).abs().max().item() for k, v in initial.items()
               if v.is_floating_point()) > 100 * WEIGHT_ATOL
    return dict(weights=weight_gap, probabilities=prob_gap, loss=loss_gap)


def test_two_gloo_processes_match_one_process(colour_split, one_process, tmp_path):
    """Two ranks (gloo, CPU) reproduce one process's weights (within 5e-5;
    measured 3.3e-6), test probabilities and epoch losses (within 1e-5;
    measured 1.3e-8 and 5.6e-9) and predicted classes, and only rank 0
    writes the run folder, once per file and epoch."""
    split, root = colour_split
    reference, reference_metrics = one_process
    run_dir = tmp_path / "two"
    torch.multiprocessing.spawn(_rank_main, args=(2, _free_port(), split, root, run_dir, tmp_path), nprocs=2,
                                join=True)
    logs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert logs[1]["written"] == [], "rank 1 must write nothing"
    written = logs[0]["written"]
    assert set(written) == RUN_FILES
    # config, done, metrics and predictions once; checkpoint and history once per epoch.
    assert sorted(written) == sorted(["config.json", "predictions_test.csv", "metrics.json", "done"]
                                     + ["checkpoint.pt", "history.csv"] * 2 + ["best.pt"] * written.count("best.pt"))
    assert {p.name for p in run_dir.iterdir()} == RUN_FILES
    assert logs[0]["metrics"] == logs[1]["metrics"]  # every rank returns rank 0's metrics
    assert json.loads((run_dir / "config.json").read_text())["identity"]["config"]["world_size"] == 2
    gaps = _assert_same_run(reference, run_dir)
    print("two gloo ranks vs one process, max |difference|:", gaps)
    assert logs[0]["metrics"]["test"]["macro_f1"] == pytest.approx(reference_metrics["test"]["macro_f1"])


def test_wbc_nproc_launches_the_run_under_torchrun(colour_split, one_process, tmp_path, monkeypatch):
    """``WBC_NPROC=2``: train_run hands the run to ``torchrun --nproc_per_node=2
    -m wbclib.distributed run`` (the launcher the gpu profile uses) and
    returns its metrics; the run matches one process's."""
    split, root = colour_split
    reference, _ = one_process
    monkeypatch.setenv(distributed.NPROC_ENV, "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    commands = []
    original = distributed.torchrun_command
    monkeypatch.setattr(distributed, "torchrun_command", lambda *a: commands.append(original(*a)) or commands[-1])
    metrics = train.train_run(_config(), split, root, tmp_path / "run", CLASSES, n_boot=0)
    assert commands and commands[0][1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                             "-m"]
    assert metrics == json.loads((tmp_path / "run" / "metrics.json").read_text())
    _assert_same_run(reference, tmp_path / "run")
    # Finished: a second call is answered from the folder, with no processes launched.
    assert train.train_run(_config(), split, root, tmp_path / "run", CLASSES, n_boot=0) == metrics
    assert len(commands) == 1


def test_shards_partition_every_batch_and_keep_each_draws_seed(monkeypatch):
    draws = SeededDraws(make_sampler("class_balanced", np.arange(37) % 3, seed=5), seed=0, epoch=2).draws
    batch = 12
    shards = {}
    for r in range(3):
        monkeypatch.setattr(distributed, "world_size", lambda: 3)
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        shards[r] = distributed.shard_draws(draws, batch, drop_last=True)
        assert distributed.local_batch_size(batch) == 4
    whole = len(draws) // batch * batch  # 36: the incomplete last batch is dropped, as in one process
    for k in range(whole // batch):
        one_process_batch = draws[k * batch:(k + 1) * batch]
        rank_batches = [shards[r][k * 4:(k + 1) * 4] for r in range(3)]
        assert sorted(sum(rank_batches, [])) == sorted(one_process_batch)  # (index, seed) pairs: seeds kept
    assert sum(len(s) for s in shards.values()) == whole
    with pytest.raises(ValueError, match="cannot be split over 3"):
        distributed.local_batch_size(8)
    with pytest.raises(ValueError, match="split evenly"):
        distributed.shard_draws(draws[:7], batch, drop_last=False)


def test_one_process_changes_nothing(monkeypatch):
    monkeypatch.delenv(distributed.NPROC_ENV, raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.init_from_env()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert not distributed.should_launch() and distributed.planned_world_size() == 1
    draws = [(i, i * 7) for i in range(10)]
    assert distributed.shard_draws(draws, 4, drop_last=True) == draws[:8]
    assert distributed.broadcast_object({"a": 1}) == {"a": 1} and distributed.mean_over_ranks(2.5) == 2.5
    assert distributed.average_gradients(torch.nn.Linear(2, 2)) == []
    monkeypatch.setenv(distributed.NPROC_ENV, "4")
    assert distributed.should_launch() and distributed.planned_world_size() == 4
    monkeypatch.setenv(distributed.NPROC_ENV, "zero")
    with pytest.raises(ValueError, match="WBC_NPROC"):
        distributed.requested_processes()
