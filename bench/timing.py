"""Interleaved timing shared by the benchmark scripts.

After one warm-up call each (first-call allocations, kernel selection), the
timed calls alternate between the callables, so a change in machine load hits
all of them alike: ratios measured in one run stay meaningful on a busy machine.
"""
from __future__ import annotations

import time
from typing import Callable, Dict


def interleaved_seconds(runs: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, float]:
    """Total seconds of ``repeats`` calls of each named callable, timed alternately."""
    for run in runs.values():
        run()
    seconds = dict.fromkeys(runs, 0.0)
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[name] += time.perf_counter() - start
    return seconds


def images_per_second(runs: Dict[str, Callable[[], object]], n_images: int, repeats: int) -> Dict[str, float]:
    """Images/s of each named callable (each call handles ``n_images``)."""
    return {name: repeats * n_images / s for name, s in interleaved_seconds(runs, repeats).items()}


def seconds_per_pass(runs: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, float]:
    """Mean seconds of one call of each named callable."""
    return {name: s / repeats for name, s in interleaved_seconds(runs, repeats).items()}
