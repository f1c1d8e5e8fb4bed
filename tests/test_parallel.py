"""Jobs over forked processes (``wbclib._parallel``): same digits as in-process, in order, errors surface."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from wbclib import _parallel
from wbclib.heads import fit_linear_head

needs_fork = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers are forked on Linux only")


def _fit(seed: int, features: np.ndarray, labels: np.ndarray):
    head = fit_linear_head(features, labels, 3, loss="focal", sampler="class_balanced", epochs=3, seed=seed)
    with torch.no_grad():
        return seed, torch.get_num_threads(), head(torch.as_tensor(features)).numpy()


@needs_fork
def test_forked_jobs_give_the_digits_of_the_calling_process():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(90, 16)).astype(np.float32)
    labels = np.repeat([0, 1, 2], [60, 20, 10])
    jobs = [(seed, features, labels) for seed in range(5)]
    alone = _parallel.map_in_processes(_fit, jobs, processes=1)
    forked = _parallel.map_in_processes(_fit, jobs, processes=2)
    assert [s for s, *_ in forked] == list(range(5))  # in the order of the jobs
    assert all(threads == 1 for _, threads, _ in alone + forked)  # one torch thread per job, wherever it runs
    for (_, _, a), (_, _, b) in zip(alone, forked):
        assert np.array_equal(a, b)
    assert not np.array_equal(alone[0][2], alone[1][2])  # the seeds matter, so equality above means something


def _fails_on_three(i):
    if i == 3:
        raise ValueError(f"job {i} failed")
    return i


@needs_fork
def test_a_failing_job_raises_in_the_caller():
    with pytest.raises(ValueError, match="job 3 failed"):
        _parallel.map_in_processes(_fails_on_three, [(i,) for i in range(6)], processes=2)


def test_calling_process_keeps_its_thread_count():
    torch.set_num_threads(2)
    try:
        assert _parallel.map_in_processes(_fails_on_three, [(0,), (1,)], processes=1) == [0, 1]
        assert torch.get_num_threads() == 2  # jobs ran on one thread, the caller gets its two back
        with pytest.raises(ValueError):
            _parallel.map_in_processes(_fails_on_three, [(3,)], processes=1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


def _dies(i):
    import os

    if i == 1:
        os._exit(3)  # a worker killed (out of memory, a signal): no exception to send back
    return i


@needs_fork
def test_a_dead_worker_raises_instead_of_hanging():
    from concurrent.futures.process import BrokenProcessPool

    with pytest.raises(BrokenProcessPool):
        _parallel.map_in_processes(_dies, [(i,) for i in range(4)], processes=2)


def test_no_loader_workers_means_one_process(monkeypatch):
    monkeypatch.setenv("WBC_WORKERS", "0")
    assert _parallel.job_processes() == 1
    monkeypatch.setenv("WBC_WORKERS", "7")
    assert 1 <= _parallel.job_processes() <= 8


class _Niceness(torch.utils.data.Dataset):
    """Item i: (i, the niceness of the process that loads it)."""

    def __len__(self):
        return 6

    def __getitem__(self, i):
        import os

        return i, os.nice(0)


@needs_fork
def test_cpu_loader_workers_yield_the_cores_to_the_model(monkeypatch):
    import os

    monkeypatch.delenv("WBC_WORKERS", raising=False)
    own = os.nice(0)
    assert _parallel.loader_workers("cpu") == min(8, len(os.sched_getaffinity(0)))
    items, niceness = next(iter(_parallel.image_loader(_Niceness(), 6, "cpu", num_workers=2)))
    assert items.tolist() == list(range(6))
    assert niceness.tolist() == [min(19, own + 19)] * 6  # workers at the lowest priority, the caller unchanged
    assert os.nice(0) == own
    # A model on a GPU leaves the cores to the loader: workers as before, at the caller's priority.
    _, niceness = next(iter(_parallel.image_loader(_Niceness(), 6, "cuda", num_workers=2)))
    assert niceness.tolist() == [own] * 6
    assert _parallel.loader_workers("cuda") == _parallel.default_workers()
    monkeypatch.setenv("WBC_WORKERS", "0")  # the user's count wins everywhere
    assert _parallel.loader_workers("cpu") == 0


class _CountedLoader(torch.utils.data.DataLoader):
    iterators = 0

    def __iter__(self):
        type(self).iterators += 1
        return super().__iter__()


def test_a_progress_bar_over_a_loader_starts_one_set_of_workers():
    # tqdm.auto's bar calls iter() when it is built and again when the loop starts: around the
    # DataLoader itself that is a second set of workers, which prefetch and then idle.
    from tqdm.auto import tqdm

    loader = _CountedLoader(list(range(10)), batch_size=4)
    assert [b.tolist() for b in _parallel.batches(loader, desc="test")] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert _CountedLoader.iterators == 1
    list(tqdm(loader))  # what the loops did before: two iterators
    assert _CountedLoader.iterators == 3
