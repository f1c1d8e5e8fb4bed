"""Independent CPU jobs over forked processes, each on one torch thread.

Small models (linear heads on cached embeddings) run on one torch thread:
more threads only add contention (:func:`heads.single_torch_thread`). A
two-core machine then leaves a core idle while a chapter fits hundreds of
heads; :func:`map_in_processes` runs such jobs side by side instead.

Numbers do not depend on the number of processes: every job seeds its own
generators and runs on one thread wherever it runs, so a job computes the
same digits in a worker as in the calling process (``WBC_WORKERS=0`` runs
everything in the calling process; ``tests/test_parallel.py`` compares the
two).

Workers are forked, so they see the caller's memory as it was when the pool
started (cached embeddings, open tables): nothing is pickled but the job's
index and its result. Fork is not available on Windows and is unsafe on
macOS; there the jobs run in the calling process.

The image loaders of every pass whose model runs in this process come from
:func:`image_loader`: on a CPU its workers yield the cores to the model.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .heads import single_torch_thread

#: The job function and its argument tuples, set before the workers fork.
_JOBS: list = []
#: True in a pool worker: a job that maps again runs its jobs in that worker
#: (a pool inside a pool would oversubscribe the cores).
_IN_WORKER = False


def default_workers() -> int:
    """Worker processes beside a busy main process: ``$WBC_WORKERS`` when set,
    else the cores but one (at most 8). Loaders feeding a GPU use it
    (:func:`loader_workers`), and :func:`job_processes` adds the calling
    process to it. Numbers never depend on it (per-draw seeds)."""
    if os.environ.get("WBC_WORKERS", "").strip():
        return max(0, int(os.environ["WBC_WORKERS"]))
    return min(8, max(0, (os.cpu_count() or 1) - 1))


def _cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _on_cpu(device) -> bool:
    return device is None or torch.device(device).type == "cpu"


def loader_workers(device=None) -> int:
    """Loader worker processes for a model computing on ``device``:
    ``$WBC_WORKERS`` when set; else, when the model computes on the CPU, one
    per core (at most 8), each at the lowest priority (:func:`image_loader`);
    else :func:`default_workers`."""
    if os.environ.get("WBC_WORKERS", "").strip() or not _on_cpu(device):
        return default_workers()
    return min(8, _cores())


def _lowest_priority(worker_id: int) -> None:
    # The model's threads in the main process keep the cores; this worker decodes and
    # augments whenever they leave one idle (waiting for the next batch, between steps).
    try:
        os.nice(19)
    except (AttributeError, OSError):  # no nice() (Windows), or not permitted
        pass


def image_loader(dataset: Dataset, batch_size: int, device=None, num_workers: Optional[int] = None,
                 **kwargs) -> DataLoader:
    """The ``DataLoader`` of every image pass whose model runs in this process.

    Where the model computes on the CPU, its threads and the loader workers
    share the cores; a worker that competes with them at equal priority
    stalls every step (two cores, Lite0 training at 128 px: 21.3 images/s
    with one worker, 22.4 with two). Here the workers (``num_workers``,
    default :func:`loader_workers`) run at the lowest priority instead, one
    per core: 25.1 images/s on the same loop (``bench/loader_priority.py``). On a GPU
    nothing changes. Numbers never depend on the workers: datasets seed
    their draws (:class:`samplers.SeededDraws`). ``kwargs`` go to ``DataLoader``.
    """
    workers = loader_workers(device) if num_workers is None else int(num_workers)
    init = _lowest_priority if workers and _on_cpu(device) else None
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, worker_init_fn=init, **kwargs)


def batches(loader: DataLoader, **progress) -> tqdm:
    """The batches of ``loader`` under a progress bar (``progress``: tqdm's
    keyword arguments, e.g. ``desc``, ``leave``).

    ``tqdm.auto``'s bar calls ``iter()`` on what it wraps as soon as it is
    built, and again when the loop starts: around a ``DataLoader`` that is two
    iterators, and the first one's workers load their prefetched batches and
    then idle, alive as long as the bar (in a notebook, for the rest of the
    chapter). Here the bar wraps one iterator."""
    return tqdm(iter(loader), total=len(loader), **progress)


def job_processes() -> int:
    """How many processes :func:`map_in_processes` uses: the loader workers
    (``$WBC_WORKERS``, :func:`default_workers`) plus the calling
    process, at most the cores this process may run on; 1 where fork is not
    the platform's safe default (Windows, macOS), and in a pool worker."""
    if _IN_WORKER or not sys.platform.startswith("linux"):
        return 1
    return max(1, min(_cores(), default_workers() + 1))


def chunks(items: Sequence, size: int) -> List[list]:
    """``items`` in consecutive pieces of ``size`` (the last one shorter): the
    unit of work when per-image jobs run side by side."""
    items = list(items)
    return [items[i:i + size] for i in range(0, len(items), size)]


def _start_worker() -> None:
    global _IN_WORKER
    _IN_WORKER = True
    torch.set_num_threads(1)


def _run(index: int):
    function, arguments = _JOBS[0], _JOBS[1]
    return function(*arguments[index])


def map_in_processes(function: Callable, arguments: Sequence[Tuple], processes: Optional[int] = None,
                     desc: Optional[str] = None) -> List:
    """``[function(*args) for args in arguments]``, in order.

    With ``processes`` > 1 (default :func:`job_processes`) and more than one
    job, the jobs run in that many forked workers, each on one torch
    thread; otherwise in this process, on one torch thread too
    (:func:`heads.single_torch_thread`). ``desc`` names a progress bar over
    the jobs. An exception in a job is raised here, and a worker that dies
    (killed, out of memory) raises
    :class:`concurrent.futures.process.BrokenProcessPool` instead of leaving
    the caller waiting.
    """
    arguments = list(arguments)
    processes = job_processes() if processes is None else max(1, int(processes))
    processes = min(processes, len(arguments))
    results = []
    with tqdm(total=len(arguments), desc=desc, leave=False, disable=None if desc else True) as bar:
        if processes <= 1:
            with single_torch_thread():
                for args in arguments:
                    results.append(function(*args))
                    bar.update(1)
            return results
        _JOBS[:] = [function, arguments]
        try:
            # Workers fork on the first submissions, after _JOBS is set; map keeps the jobs' order.
            with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork"),
                                     initializer=_start_worker) as pool:
                for result in pool.map(_run, range(len(arguments))):
                    results.append(result)
                    bar.update(1)
        finally:
            _JOBS[:] = []
    return results
