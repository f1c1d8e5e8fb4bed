"""Training augmentation presets, created by name.

Each preset is a torchvision v2 transform acting on one uint8 (3, H, W)
tensor (in DataLoader workers, seeded through the loader's generator).
"""
from __future__ import annotations

import torch
from torchvision.transforms import v2

from .registry import Registry

AUGMENTATIONS = Registry("augmentation")


def make_augmentation(name: str, image_size: int):
    return AUGMENTATIONS.create(name, image_size)


class RandomRot90:
    """A uniformly chosen multiple of 90 degrees: exact, no interpolation, no
    corners to fill (cells have no preferred orientation)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.rot90(x, int(torch.randint(4, ())), dims=(-2, -1))


@AUGMENTATIONS.register("none")
def no_augmentation(image_size: int):
    return None


@AUGMENTATIONS.register("dihedral_jitter")
def dihedral_jitter(image_size: int):
    """The 8 flips/rotations of the square plus mild colour jitter (the default)."""
    return v2.Compose([
        v2.RandomHorizontalFlip(),
        RandomRot90(),
        v2.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.02),
    ])
