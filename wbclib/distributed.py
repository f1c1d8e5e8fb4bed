"""Data-parallel training over several processes (one GPU each), launched by torchrun.

The notebooks and protocols do not change: with ``WBC_NPROC=N`` (N > 1) in
the environment, every :func:`train.train_run` hands itself and its
arguments to ``torchrun --standalone --nproc_per_node N -m wbclib.distributed
run SPEC`` (:func:`launch`) and returns the finished run's metrics, so
``WBC_NPROC=4 wbc book execute --profile gpu`` fine-tunes every run on four
GPUs. Everything else a notebook does (embeddings, heads) stays in the
notebook's process.

Inside the process group (:func:`init_from_env`: torchrun's ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``; NCCL with one GPU per process, else gloo on
CPU) :func:`train.train_run`

* gives each rank a disjoint, deterministic shard of every epoch's
  :class:`samplers.SeededDraws`: within each batch of ``batch_size`` draws,
  rank r takes positions r, r + W, ... (W the world size), so the ranks'
  shards together are the one-process epoch, each draw keeps its seed (same
  augmentation), and each rank steps on ``batch_size / W`` images
  (:func:`shard_draws`);
* averages every parameter's gradient over the ranks as soon as backward has
  accumulated it (:func:`average_gradients`, a hook per parameter), so every
  optimiser of every method, and the loss scaler's overflow check, sees the
  gradient of the whole batch; the :class:`method_base.Method` interface is
  unchanged;
* starts every rank from rank 0's weights and, after every update, copies
  rank 0's buffers (batch-norm running statistics, counters) to the others
  (:func:`broadcast_state`, as ``DistributedDataParallel`` does), so all
  ranks hold the same model and take the same decisions;
* on CUDA converts batch norms to ``SyncBatchNorm`` (statistics over the
  whole batch, as one process computes them); gloo on CPU has no
  ``SyncBatchNorm``, so there each rank normalises its own shard;
* validates and writes run-folder files (config, checkpoints, history,
  predictions, metrics, ``done``) on rank 0 only; the others wait at a
  barrier and receive what rank 0 computed (:func:`broadcast_object`).

For a loss that is a mean over images and a model without cross-image
statistics (or with ``SyncBatchNorm``), W ranks reproduce one process's
gradients up to the order of float summation (``tests/test_distributed.py``
measures it). Methods whose numbers depend on the batch composition
(batch norm on CPU, CORAL's covariances, contrastive losses, BoDA's running
statistics, Mixup's pairing, dropout masks) see per-rank batches instead, so
the run identity records the world size (``world_size`` in ``config.json``)
and a multi-GPU run never shares a folder with a one-GPU run.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, List, Sequence

import torch
import torch.distributed as dist
from torch import nn

#: Processes per run (one per GPU); above 1 :func:`train.train_run` launches torchrun.
NPROC_ENV = "WBC_NPROC"


def is_initialized() -> bool:
    """Whether this process is one rank of an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """The number of processes training together (1 outside a process group)."""
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    """This process's index on its machine (torchrun's ``LOCAL_RANK``): its GPU."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Whether this process writes files (rank 0, or the only process)."""
    return rank() == 0


def init_from_env(backend: str = "") -> bool:
    """Join the process group torchrun describes in the environment (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).

    Uses NCCL with GPU ``LOCAL_RANK`` (made the current device, so
    ``torch.device("cuda")`` is this rank's GPU) when CUDA is available, else
    gloo; ``backend`` forces one. Returns whether a group of more than one
    process is in force; without those variables (or with ``WORLD_SIZE=1``)
    it does nothing and returns False.
    """
    if is_initialized():
        return world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if torch.cuda.is_available() and backend != "gloo":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))
    return True


def requested_processes() -> int:
    """``$WBC_NPROC`` (default 1): how many processes a run should train on."""
    value = os.environ.get(NPROC_ENV, "").strip()
    if not value:
        return 1
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"{NPROC_ENV} must be a whole number of processes, got {value!r}") from None
    if n < 1:
        raise ValueError(f"{NPROC_ENV} must be at least 1, got {n}")
    return n


def planned_world_size() -> int:
    """The world size a run started now trains with: the process group's
    inside one, else ``$WBC_NPROC`` (what :func:`launch` will start)."""
    return world_size() if is_initialized() else requested_processes()


def should_launch() -> bool:
    """Whether :func:`train.train_run` must hand the run to torchrun: more
    than one process requested and this process is not already a rank."""
    return not is_initialized() and requested_processes() > 1


def barrier() -> None:
    """Wait until every rank gets here (nothing outside a process group)."""
    if is_initialized():
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. creates a run folder); the others
    run it once rank 0 is done (e.g. read and check what it wrote)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (any picklable object) on every rank; ``obj`` itself outside a process group."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def mean_over_ranks(value: float) -> float:
    """The mean of a number over the ranks (e.g. each rank's batch loss)."""
    if not is_initialized():
        return float(value)
    # float64, so the mean of W identical numbers is that number exactly.
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item() / world_size())


def local_batch_size(batch_size: int) -> int:
    """Images per rank and step: ``batch_size / world_size`` (must divide)."""
    w = world_size()
    if batch_size % w:
        raise ValueError(f"batch size {batch_size} cannot be split over {w} processes; "
                         f"use a multiple of {w} or another {NPROC_ENV}")
    return batch_size // w


def shard_draws(draws: Sequence, batch_size: int, drop_last: bool) -> List:
    """This rank's share of one epoch's draws (``(index, seed)`` pairs).

    One process steps on ``draws`` in batches of ``batch_size`` (the last,
    incomplete one dropped when ``drop_last``). Here rank r of W takes the
    positions r, r + W, ... of those whole batches: batched by
    ``batch_size / W``, its k-th batch is its share of the one-process k-th
    batch, and the W shares together are that batch. Without ``drop_last``
    (an epoch of at most one batch) the draws must split evenly too, so that
    the mean of the ranks' mean gradients is the batch's mean gradient.
    """
    w, r = world_size(), rank()
    local_batch_size(batch_size)
    n = len(draws) // batch_size * batch_size if drop_last else len(draws)
    if n % w:
        raise ValueError(f"{n} training draws per epoch cannot be split evenly over {w} processes "
                         f"(batch size {batch_size}); use more training images, a batch size that "
                         f"{n} draws fill, or fewer processes")
    return [draws[p] for p in range(r, n, w)]


def average_gradients(module: nn.Module) -> list:
    """Average each trainable parameter's gradient over the ranks as soon as
    backward has accumulated it (``register_post_accumulate_grad_hook``).

    Every backward of every optimiser (a method's main step, DANN's
    discriminator) is covered without changing the method, and a loss scaler
    then unscales and checks the averaged gradient, so all ranks agree on
    skipping an overflowing step. Hooks fire in the same order on every rank
    because every rank runs the same graph. Returns the hook handles; outside
    a process group none are registered.
    """
    if world_size() <= 1:
        return []
    scale = 1.0 / world_size()

    def average(param: torch.Tensor) -> None:
        dist.all_reduce(param.grad)
        param.grad.mul_(scale)

    return [p.register_post_accumulate_grad_hook(average) for p in module.parameters() if p.requires_grad]


@torch.no_grad()
def broadcast_state(module: nn.Module, parameters: bool = True, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (and, with ``parameters``, weights) to every rank."""
    if world_size() <= 1:
        return
    tensors = list(module.buffers()) + (list(module.parameters()) if parameters else [])
    for t in tensors:
        dist.broadcast(t.data, src=src)


def sync_batch_norm(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` with its batch norms replaced by ``SyncBatchNorm`` on CUDA
    (statistics over the whole batch, as one process computes them); as it
    is elsewhere, since ``SyncBatchNorm`` runs on GPUs only. Same state-dict
    keys either way, so checkpoints load in both."""
    if world_size() <= 1 or torch.device(device).type != "cuda":
        return module
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)


# --------------------------------------------------------------------------
# The launcher: one call over several processes
# --------------------------------------------------------------------------


def torchrun_command(nproc: int, spec: Path) -> List[str]:
    """The command :func:`launch` runs: torchrun (as ``python -m
    torch.distributed.run``, the same program) on one machine with a free
    rendezvous port, ``nproc`` processes of ``python -m wbclib.distributed
    run SPEC``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "wbclib.distributed", "run", str(spec)]


def launch(function: Callable[..., Any], arguments: dict, nproc: int = 0) -> Any:
    """``function(**arguments)`` on ``nproc`` processes (default
    ``$WBC_NPROC``) under torchrun, each joined to the process group first;
    returns rank 0's result. :func:`train.train_run` launches itself so.

    The function (by its importable name) and its arguments (configuration,
    tables, paths) travel in a pickle in a temporary folder. Methods and
    backbones must be importable from ``wbclib`` (the ranks are fresh Python
    processes, which import the library as it is on disk: edit it while a
    run starts and the ranks' run identity no longer matches the folder's,
    :class:`runs.RunMismatch`). A rank's failure raises ``CalledProcessError``.
    """
    nproc = nproc or requested_processes()
    with tempfile.TemporaryDirectory(prefix="wbc-run-") as tmp:
        spec = Path(tmp) / "spec.pkl"
        with open(spec, "wb") as fh:
            pickle.dump(dict(function=function, arguments=arguments), fh)
        env = dict(os.environ)
        # The ranks are the processes; they must not launch again.
        env.pop(NPROC_ENV, None)
        subprocess.run(torchrun_command(nproc, spec), check=True, env=env)
        with open(Path(tmp) / "result.pkl", "rb") as fh:
            return pickle.load(fh)


def _run_spec(spec: Path) -> None:
    with open(spec, "rb") as fh:
        call = pickle.load(fh)
    init_from_env()
    try:
        result = call["function"](**call["arguments"])
        if is_main():
            with open(spec.parent / "result.pkl", "wb") as fh:
                pickle.dump(result, fh)
    finally:
        if is_initialized():
            dist.destroy_process_group()


def main(argv: Sequence[str] = ()) -> int:
    argv = list(argv) or sys.argv[1:]
    if len(argv) != 2 or argv[0] != "run":
        print("usage: torchrun --nproc_per_node N -m wbclib.distributed run SPEC.pkl\n"
              "  (SPEC: a pickled dict(function=..., arguments=...), as written by wbclib.distributed.launch; "
              f"train_run writes it itself when {NPROC_ENV} > 1)", file=sys.stderr)
        return 2
    _run_spec(Path(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
