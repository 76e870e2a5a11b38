"""Online augmentation of training images (torchvision.transforms.v2).

The original code augmented offline with Augmentor: every training image was written out many times,
rotated (±15°), skewed (magnitude 0.2) or sheared (±10°), each followed by a random left-right flip, and the
network trained on those copies. Here the same operations run online, a fresh draw for every image in every
epoch:

``"paper"``  one of rotate ±15°, perspective skew 0.2, shear ±10° (chosen uniformly), then a flip with p = 0.5
``"flip"``   a left-right flip with p = 0.5
``"none"``   no augmentation

The push split and the test split are never augmented. Augmentation acts on images in [0, 1] before the
member normalises them with its trunk's mean and std. Random draws come from torch's global generator,
which training seeds; DataLoader workers get their own seeds from it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

AugmentKind = Literal["none", "flip", "paper"]
AUGMENT_KINDS: tuple[str, ...] = ("none", "flip", "paper")

ROTATE_DEGREES = 15.0
SKEW_MAGNITUDE = 0.2
SHEAR_DEGREES = 10.0


def image_augment(kind: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Per-image transform: (3, S, S) float32 in [0, 1] → (3, S, S) float32 in [0, 1]; None for "none"."""
    from torchvision.transforms import v2

    if kind == "none":
        return None
    flip = v2.RandomHorizontalFlip(p=0.5)
    if kind == "flip":
        return flip
    if kind == "paper":
        geometric = v2.RandomChoice(
            [
                v2.RandomRotation(ROTATE_DEGREES, interpolation=v2.InterpolationMode.BILINEAR),
                v2.RandomPerspective(
                    distortion_scale=SKEW_MAGNITUDE, p=1.0, interpolation=v2.InterpolationMode.BILINEAR
                ),
                v2.RandomAffine(
                    degrees=0.0,
                    shear=(-SHEAR_DEGREES, SHEAR_DEGREES, -SHEAR_DEGREES, SHEAR_DEGREES),
                    interpolation=v2.InterpolationMode.BILINEAR,
                ),
            ]
        )
        return v2.Compose([geometric, flip])
    raise ValueError(f"augment must be one of {', '.join(AUGMENT_KINDS)}, got {kind!r}")


def batch_augment(kind: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Batch transform for in-memory splits: (B, 3, S, S) → (B, 3, S, S), a fresh draw for each image
    (a v2 transform applied to a whole batch would draw once for all of it)."""
    per_image = image_augment(kind)
    if per_image is None:
        return None

    def augment(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([per_image(img) for img in x]) if len(x) else x

    return augment
