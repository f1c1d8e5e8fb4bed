"""Training samplers, created by name.

Every factory takes the training labels (integer class per image), then
``num_samples`` (draws per epoch, default the number of images) and ``seed``,
and returns a ``torch.utils.data.Sampler`` of dataset indices.

Apart from ``instance`` (each image once per epoch), the samplers draw with
replacement, each image with a weight that depends only on the size ``n_c`` of
its class; a class is then drawn with probability proportional to
``n_c * weight(n_c)``. ``class_sampling_probabilities`` gives those per-class
probabilities by sampler name, for plots and tests.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import RandomSampler, Sampler, WeightedRandomSampler

from .registry import Registry

SAMPLERS = Registry("sampler")


def make_sampler(name: str, labels: Sequence[int], num_samples: Optional[int] = None, seed: int = 0) -> Sampler:
    """Create the sampler registered as ``name`` over ``labels``."""
    return SAMPLERS.create(name, np.asarray(labels), num_samples=num_samples, seed=seed)


def uniform_image_weight(counts: np.ndarray) -> np.ndarray:
    return np.ones(len(counts))


def inverse_frequency_image_weight(counts: np.ndarray) -> np.ndarray:
    return 1.0 / counts


def inverse_sqrt_frequency_image_weight(counts: np.ndarray) -> np.ndarray:
    return counts**-0.5


def inverse_log_frequency_image_weight(counts: np.ndarray) -> np.ndarray:
    # log(1 + n) rather than log(n): a class with a single image would otherwise get weight 1/0.
    return 1.0 / np.log1p(counts)


# Per-image weight as a function of the image's class size, by sampler name.
IMAGE_WEIGHT_RULES: Dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "instance": uniform_image_weight,
    "class_balanced": inverse_frequency_image_weight,
    "sqrt": inverse_sqrt_frequency_image_weight,
    "inverse_log": inverse_log_frequency_image_weight,
}


def class_sampling_probabilities(name: str, class_counts: Sequence[int]) -> np.ndarray:
    """Probability that one draw of sampler ``name`` comes from each class.

    Classes without images get probability 0.
    """
    if name not in IMAGE_WEIGHT_RULES:
        raise KeyError(f"unknown sampler {name!r}; registered: {', '.join(sorted(IMAGE_WEIGHT_RULES))}")
    counts = np.asarray(class_counts, dtype=float)
    mass = np.zeros_like(counts)
    present = counts > 0
    mass[present] = counts[present] * IMAGE_WEIGHT_RULES[name](counts[present])
    return mass / mass.sum()


def _class_weighted_sampler(labels: np.ndarray, name: str, num_samples: Optional[int], seed: int) -> Sampler:
    counts = np.bincount(labels).astype(float)
    # Only classes that occur are looked up, so empty classes never reach the weight rule.
    image_weight = IMAGE_WEIGHT_RULES[name](counts[labels])
    return WeightedRandomSampler(
        torch.as_tensor(image_weight, dtype=torch.double),
        num_samples=len(labels) if num_samples is None else num_samples,
        replacement=True,
        generator=torch.Generator().manual_seed(seed),
    )


@SAMPLERS.register("instance")
def instance_balanced(labels: np.ndarray, num_samples: Optional[int] = None, seed: int = 0) -> Sampler:
    """Every image once per epoch, in a seeded random order (Kang et al. 2020 instance-balanced)."""
    gen = torch.Generator().manual_seed(seed)
    return RandomSampler(range(len(labels)), num_samples=num_samples, generator=gen)


@SAMPLERS.register("class_balanced")
def class_balanced(labels: np.ndarray, num_samples: Optional[int] = None, seed: int = 0) -> Sampler:
    """Image weight ``1 / n_c``, with replacement: every class equally likely.

    The Stage-2 (cRT) sampler of the decoupled WBCBench paper (Le et al. 2026,
    Sec. 2.2.2: ``w_i = 1 / n_{y_i}``, sampled with replacement).
    """
    return _class_weighted_sampler(labels, "class_balanced", num_samples, seed)


@SAMPLERS.register("sqrt")
def square_root(labels: np.ndarray, num_samples: Optional[int] = None, seed: int = 0) -> Sampler:
    """Image weight ``n_c^{-1/2}``, with replacement: class probability proportional to ``sqrt(n_c)``.

    Square-root sampling of Kang et al. 2020 (q = 1/2), between instance- and class-balanced.
    """
    return _class_weighted_sampler(labels, "sqrt", num_samples, seed)


@SAMPLERS.register("inverse_log")
def inverse_log(labels: np.ndarray, num_samples: Optional[int] = None, seed: int = 0) -> Sampler:
    """Image weight ``1 / log(1 + n_c)``, with replacement.

    The "log-based WeightedRandomSampler" of the hybrid-rescue WBCBench paper
    (Nguyen et al. 2026, Sec. 2.3 and 3.1). The paper prints no formula for it;
    this is the inverse log-frequency rule it names, with ``log(1 + n)`` so a
    single-image class stays finite. It is a mild re-balancing: class
    probability ``n_c / log(1 + n_c)`` still grows almost linearly with ``n_c``.
    """
    return _class_weighted_sampler(labels, "inverse_log", num_samples, seed)


def draw_seed(seed: int, epoch: int, draw: int) -> int:
    """The seed of one draw (its augmentation): a function of (run seed, epoch, position) only."""
    import hashlib

    digest = hashlib.blake2b(f"{seed}|{epoch}|{draw}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


class SeededDraws(Sampler):
    """Yield ``(index, seed)`` for every index of ``sampler``, the seed from
    :func:`draw_seed` (run seed, epoch, draw position).

    A dataset that seeds its random transform with it (``models.ImageTable``)
    then gives every draw the same augmentation whether it is loaded in the
    main process or in any of any number of worker processes: results do not
    depend on ``num_workers``. Two draws of one image (sampling with
    replacement) get different augmentations.
    """

    def __init__(self, sampler: Sampler, seed: int, epoch: int):
        # Drawn once, here: a DataLoader with workers may call iter() more than once, and a
        # seeded sampler's generator would give another order each time.
        self.draws = [(int(index), draw_seed(seed, epoch, position)) for position, index in enumerate(sampler)]

    def __iter__(self):
        return iter(self.draws)

    def __len__(self) -> int:
        return len(self.draws)
