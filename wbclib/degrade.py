"""Synthetic acquisition degradations (WBCBench "phase 2" style) and noise pairs.

Every function maps an RGB ``uint8`` image to a degraded ``uint8`` image of the
same shape and is deterministic given its ``rng``. Severities 1-4 map to
parameters in ``SEVERITY_PARAMS``; strengths are defined relative to the image
size so that a 120 px and a 360 px image of the same cell degrade alike.

Phase 2 (:data:`PHASE2_MIXES`, :func:`assign_phase2`): each image gets one
degradation kind and, per role (train, val, test, stress), a severity 0-4
drawn from that role's :class:`SeverityMix` (0: the pristine image).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
import cv2

KINDS = ("salt_pepper", "gaussian_blur", "illumination")
SEVERITIES = (1, 2, 3, 4)

#: kind -> severity -> parameter (density, blur sigma as a fraction of the
#: shorter side, or colour-cast strength).
SEVERITY_PARAMS: Dict[str, Dict[int, float]] = {
    "salt_pepper": {1: 0.01, 2: 0.03, 3: 0.06, 4: 0.10},
    "gaussian_blur": {1: 0.004, 2: 0.008, 3: 0.013, 4: 0.020},
    "illumination": {1: 0.15, 2: 0.30, 3: 0.45, 4: 0.60},
}


def _check(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}")
    return image


def salt_and_pepper(image: np.ndarray, density: float, rng: np.random.Generator) -> np.ndarray:
    """Set a ``density`` fraction of pixels to black or white (half each)."""
    out = _check(image).copy()
    hit = rng.random(image.shape[:2]) < density
    salt = rng.random(image.shape[:2]) < 0.5
    out[hit & salt] = 255
    out[hit & ~salt] = 0
    return out


def gaussian_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Additive white Gaussian noise of standard deviation ``sigma`` grey levels."""
    noisy = _check(image).astype(np.float32) + rng.normal(0.0, sigma, image.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def gaussian_blur(image: np.ndarray, sigma: float, rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """Isotropic Gaussian blur of ``sigma`` pixels (per channel).

    ``scipy.ndimage.gaussian_filter``'s kernel (radius ``int(4 sigma + 0.5)``,
    mirrored borders) computed with OpenCV, 4x faster at 360 px; the two agree
    to one grey level on 1e-5 of the pixels (rounding; tested)."""
    radius = int(4.0 * sigma + 0.5)
    if radius < 1:
        return _check(image).copy()
    blurred = cv2.GaussianBlur(_check(image).astype(np.float32), (2 * radius + 1, 2 * radius + 1), sigmaX=sigma,
                               sigmaY=sigma, borderType=cv2.BORDER_REFLECT)
    return np.clip(np.rint(blurred), 0, 255).astype(np.uint8)


def illumination_shift(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Uneven illumination and a colour cast.

    A random linear brightness ramp across the field (a mis-centred lamp), a
    per-channel gain (white-balance error) and a gamma change, each scaled by
    ``strength`` in [0, 1].
    """
    img = _check(image).astype(np.float32) / 255.0
    h, w = image.shape[:2]
    angle = rng.uniform(0, 2 * np.pi)
    # Float32 throughout (numpy scalars would promote the field to float64: 3x slower).
    xs = np.float32(np.cos(angle)) * (np.arange(w, dtype=np.float32) / max(w - 1, 1) - np.float32(0.5))
    ys = np.float32(np.sin(angle)) * (np.arange(h, dtype=np.float32) / max(h - 1, 1) - np.float32(0.5))
    light = np.float32(1.0) + np.float32(strength) * (ys[:, None] + xs[None, :])
    gains = (1.0 + strength * rng.uniform(-0.5, 0.5, size=3)).astype(np.float32)
    gamma = float(np.exp(strength * rng.uniform(-0.7, 0.7)))
    out = np.clip(img * light[..., None] * gains, 0, 1) ** np.float32(gamma)
    return np.clip(np.rint(out * np.float32(255)), 0, 255).astype(np.uint8)


def degrade(image: np.ndarray, kind: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Apply degradation ``kind`` at ``severity`` (1-4)."""
    if kind not in SEVERITY_PARAMS:
        raise ValueError(f"unknown degradation {kind!r}; known: {', '.join(KINDS)}")
    if severity == 0:
        return image
    param = SEVERITY_PARAMS[kind][int(severity)]
    if kind == "salt_pepper":
        return salt_and_pepper(image, param, rng)
    if kind == "gaussian_blur":
        return gaussian_blur(image, param * min(image.shape[:2]))
    return illumination_shift(image, param, rng)


def image_rng(key: str, seed: int) -> np.random.Generator:
    """A generator that depends only on an image key and a seed."""
    digest = hashlib.sha256(f"{seed}|{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def assign_degradations(keys, seed: int = 0):
    """Deterministic (kind, severity) per image key, balanced over kinds and levels.

    Returns two lists the length of ``keys``.
    """
    kinds, levels = [], []
    for key in keys:
        rng = image_rng(key, seed + 7919)
        kinds.append(KINDS[int(rng.integers(len(KINDS)))])
        levels.append(int(rng.integers(1, len(SEVERITIES) + 1)))
    return kinds, levels



@dataclass(frozen=True)
class SeverityMix:
    """How one role's images are degraded in phase 2: the share ``degraded`` of
    images that carry their degradation, and the probabilities of severities
    1-4 among those (``severities``, summing to 1)."""

    degraded: float
    severities: Tuple[float, float, float, float]

    def __post_init__(self):
        if not 0.0 <= self.degraded <= 1.0 or len(self.severities) != len(SEVERITIES) \
                or min(self.severities) < 0 or abs(sum(self.severities) - 1.0) > 1e-9:
            raise ValueError(f"a severity mix needs a share in [0, 1] and {len(SEVERITIES)} probabilities "
                             f"summing to 1, got {self}")

    def shares(self) -> Dict[int, float]:
        """Severity (0 = pristine, 1-4) -> expected share of the role's images."""
        return {0: 1.0 - self.degraded, **{s: self.degraded * p for s, p in zip(SEVERITIES, self.severities)}}

    def mean_severity(self) -> float:
        """Expected severity over all images (pristine counted as 0)."""
        return sum(s * share for s, share in self.shares().items())


#: Phase 2's declared severity mix per role. WBCBench's phase 2 gives train,
#: validation and test "split-specific severity distributions" (the challenge's
#: description); neither paper gives the shares, so these numbers are our
#: choice: training mildest and mostly pristine, validation in between, test
#: shifted to harder. ``stress`` is the original phase 2 kept as a named stress
#: test: every image degraded, severities uniform (drawn by
#: :func:`assign_degradations`, so it is the same draw as before).
PHASE2_MIXES: Dict[str, SeverityMix] = {
    "train": SeverityMix(degraded=0.3, severities=(0.50, 0.30, 0.15, 0.05)),
    "val": SeverityMix(degraded=0.5, severities=(0.30, 0.30, 0.25, 0.15)),
    "test": SeverityMix(degraded=0.6, severities=(0.15, 0.25, 0.30, 0.30)),
    "stress": SeverityMix(degraded=1.0, severities=(0.25, 0.25, 0.25, 0.25)),
}


def draw_severity(key: str, role: str, mix: SeverityMix, seed: int = 0) -> int:
    """One image's severity (0-4) in ``role``, deterministic from (seed, key, role)."""
    u = float(image_rng(f"{key}|phase2|{role}", seed + 7919).random())
    edges = np.cumsum([mix.shares()[s] for s in (0, *SEVERITIES)])
    return int(min(np.searchsorted(edges, u, side="right"), len(SEVERITIES)))


def assign_phase2(keys, seed: int = 0, mixes: Optional[Dict[str, SeverityMix]] = None) -> Dict[str, list]:
    """Per image key, a severity for every role of ``mixes`` (default
    :data:`PHASE2_MIXES`), each drawn independently from that role's mix and
    deterministic from (seed, key, role). Returns role -> list of severities."""
    mixes = PHASE2_MIXES if mixes is None else mixes
    keys = list(keys)
    return {role: [draw_severity(k, role, mix, seed) for k in keys] for role, mix in mixes.items()}
