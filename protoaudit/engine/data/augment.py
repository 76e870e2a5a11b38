"""Online augmentation of training images, every draw taken from a generator the caller hands in.

The original code augmented offline with Augmentor: every training image was written out many times,
rotated (±15°), skewed (magnitude 0.2) or sheared (±10°), each followed by a random left-right flip, and the
network trained on those copies. Here the same operations run online, a fresh draw for every image in every
epoch:

``"paper"``  one of rotate ±15°, perspective skew 0.2, shear ±10° (chosen uniformly), then a flip with p = 0.5
``"flip"``   a left-right flip with p = 0.5
``"none"``   no augmentation

The push split and the test split are never augmented. Augmentation acts on images in [0, 1] before the
member normalises them with its trunk's mean and std.

Randomness: an augmentation is a function ``(image, generator) → image`` that draws only from ``generator``
(never from torch's global generator, never from a DataLoader worker's). Training gives every image of every
batch its own seed, drawn in the main process from the member's augmentation generator (see
:func:`protoaudit.data.iter_batches`), so the draws depend on the member's seed and on nothing else: not on
the number of DataLoader workers, not on which worker decodes an image, not on what ran before in the
process. The augmentation generator is part of the member's checkpoint, so a resumed run draws the same.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

AugmentKind = Literal["none", "flip", "paper"]
AUGMENT_KINDS: tuple[str, ...] = ("none", "flip", "paper")
Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]  # (3, S, S) float32, generator → same

ROTATE_DEGREES = 15.0
SKEW_MAGNITUDE = 0.2
SHEAR_DEGREES = 10.0


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return float(torch.empty(1).uniform_(low, high, generator=generator))


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    return int(torch.randint(low, high, (1,), generator=generator))


def flip(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(3, S, S) → (3, S, S): mirrored left-right with probability 0.5."""
    return image.flip(-1) if float(torch.rand(1, generator=generator)) < 0.5 else image


def rotate(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Rotation by an angle drawn uniformly in ±ROTATE_DEGREES (bilinear, corners filled with 0)."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    angle = _uniform(generator, -ROTATE_DEGREES, ROTATE_DEGREES)
    return F.rotate(image, angle, interpolation=InterpolationMode.BILINEAR)


def skew(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Perspective skew: each corner moves inwards by up to SKEW_MAGNITUDE of the half size (as
    torchvision's RandomPerspective draws it)."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    height, width = image.shape[-2:]
    bound_h = int(SKEW_MAGNITUDE * (height // 2)) + 1
    bound_w = int(SKEW_MAGNITUDE * (width // 2)) + 1
    g = generator
    top_left = [_randint(g, 0, bound_w), _randint(g, 0, bound_h)]
    top_right = [_randint(g, width - bound_w, width), _randint(g, 0, bound_h)]
    bottom_right = [_randint(g, width - bound_w, width), _randint(g, height - bound_h, height)]
    bottom_left = [_randint(g, 0, bound_w), _randint(g, height - bound_h, height)]
    start = [[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]]
    end = [top_left, top_right, bottom_right, bottom_left]
    return F.perspective(image, start, end, interpolation=InterpolationMode.BILINEAR)


def shear(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shear by angles drawn uniformly in ±SHEAR_DEGREES along x and along y (bilinear)."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    sx = _uniform(generator, -SHEAR_DEGREES, SHEAR_DEGREES)
    sy = _uniform(generator, -SHEAR_DEGREES, SHEAR_DEGREES)
    return F.affine(
        image,
        angle=0.0,
        translate=[0, 0],
        scale=1.0,
        shear=[sx, sy],
        interpolation=InterpolationMode.BILINEAR,
    )


_GEOMETRIC = (rotate, skew, shear)


def paper(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One of rotate, skew, shear (uniformly), then a flip: the original's Augmentor pipeline, online."""
    choice = _GEOMETRIC[_randint(generator, 0, len(_GEOMETRIC))]
    return flip(choice(image, generator), generator)


def image_augment(kind: str) -> Augment | None:
    """Per-image augmentation ``(3, S, S) float32 in [0, 1], generator → same``; None for "none"."""
    if kind == "none":
        return None
    if kind == "flip":
        return flip
    if kind == "paper":
        return paper
    raise ValueError(f"augment must be one of {', '.join(AUGMENT_KINDS)}, got {kind!r}")


def augment_batch(images: torch.Tensor, augment: Augment, seeds: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) images and (B,) int64 seeds → (B, 3, S, S): image i augmented with a generator seeded
    with ``seeds[i]``."""
    if len(images) == 0:
        return images
    return torch.stack([augment(img, seeded(int(s))) for img, s in zip(images, seeds, strict=True)])


def seeded(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


def draw_seeds(generator: torch.Generator, n: int) -> torch.Tensor:
    """(n,) int64 seeds in [0, 2⁶³) drawn from ``generator``: one per image of a batch."""
    return torch.empty(n, dtype=torch.int64).random_(generator=generator)
