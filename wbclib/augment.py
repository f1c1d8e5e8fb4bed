"""Training augmentation presets, created by name.

Each preset is a torchvision v2 transform acting on one uint8 (3, H, W)
tensor (in DataLoader workers, seeded through the loader's generator). The
loader has already resized the image to ``image_size``.

A preset that changes the field of view during training (``decoupled``'s
centre crop) has a deterministic evaluation counterpart,
:func:`eval_transform`, which the trainer and the embedding extractor apply to
every non-training image so training and test see the same geometry.
"""
from __future__ import annotations

import torch
from torchvision.transforms import v2

from .registry import Registry

AUGMENTATIONS = Registry("augmentation")

#: The decoupled paper's geometry (Le et al. 2026, Sec. 2.1): resize to 368, centre-crop 224.
DECOUPLED_RESIZE, DECOUPLED_CROP = 368, 224


def make_augmentation(name: str, image_size: int):
    return AUGMENTATIONS.create(name, image_size)


def zoom_crop_size(image_size: int) -> int:
    """The resize before the centre crop, scaled from 368 -> 224 to ``image_size``."""
    return int(round(image_size * DECOUPLED_RESIZE / DECOUPLED_CROP))


def _zoom_crop(image_size: int):
    return v2.Compose([v2.Resize(zoom_crop_size(image_size), antialias=True), v2.CenterCrop(image_size)])


def eval_transform(name: str, image_size: int):
    """The deterministic part of preset ``name`` for validation/test images (None: nothing to do)."""
    AUGMENTATIONS.get(name)  # unknown names fail here, not silently
    return _zoom_crop(image_size) if name == "decoupled" else None


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """View ``k`` (0-7) of the dihedral group of the square acting on the last
    two dimensions: a rotation by ``k % 4`` quarter turns, then for ``k >= 4``
    a horizontal flip. Exact (no interpolation); view 0 is the identity."""
    if not 0 <= k < 8:
        raise ValueError(f"dihedral view must be in 0..7, got {k}")
    out = torch.rot90(x, k % 4, dims=(-2, -1))
    return out.flip(-1) if k >= 4 else out


def dihedral_inverse(x: torch.Tensor, k: int) -> torch.Tensor:
    """Undo :func:`dihedral` view ``k``: ``dihedral_inverse(dihedral(x, k), k) == x``."""
    if not 0 <= k < 8:
        raise ValueError(f"dihedral view must be in 0..7, got {k}")
    out = x.flip(-1) if k >= 4 else x
    return torch.rot90(out, -(k % 4), dims=(-2, -1))


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


@AUGMENTATIONS.register("decoupled")
def decoupled(image_size: int):
    """Le et al. 2026: resize to 368 and centre-crop 224 (here scaled to
    ``image_size``: resize to ``round(image_size * 368 / 224)``), then
    RandAugment (Cubuk et al. 2020, torchvision defaults: 2 operations,
    magnitude 9). Evaluation applies the same resize and crop
    (:func:`eval_transform`)."""
    return v2.Compose([_zoom_crop(image_size), v2.RandAugment()])


@AUGMENTATIONS.register("hybrid")
def hybrid(image_size: int):
    """Nguyen et al. 2026, Sec. 3.1: random horizontal and vertical flips,
    rotations up to 90 degrees and colour jitter. The paper gives no jitter
    strengths; these are moderate (brightness/contrast/saturation 0.2, hue
    0.05). Rotation corners are filled with white, the colour of smear
    background, rather than black."""
    return v2.Compose([
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
        v2.RandomRotation(90, fill=255),
        v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05),
    ])
