"""Augmentation draws come from the member's own generator, one seed per image: the same for any number of
DataLoader workers, untouched by torch's global generator, and different from one epoch to the next."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from protoaudit.engine.data import TensorSplit, iter_batches
from protoaudit.engine.data.augment import AUGMENT_KINDS, image_augment
from protoaudit.engine.data.files import FileSplit


def _file_split(tmp_path: Path, kind: str, n: int = 12) -> FileSplit:
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return FileSplit(
        paths, np.zeros(n, dtype=np.int64), [str(p) for p in paths], 24, augment=image_augment(kind)
    )


def _epoch(split: object, workers: int, seed: int = 7) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    return torch.cat([x for _, x in iter_batches(split, order, 5, workers, False, generator)])  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["flip", "paper"])
def test_draws_do_not_depend_on_workers_or_the_global_generator(tmp_path: Path, kind: str) -> None:
    split = _file_split(tmp_path, kind)
    torch.manual_seed(0)
    plain = _epoch(split, 0)
    torch.manual_seed(12345)  # another global state: it must not matter
    assert torch.equal(_epoch(split, 2), plain)
    assert torch.equal(_epoch(split, 0), plain)
    assert not torch.equal(_epoch(split, 0, seed=8), plain)  # another stream draws otherwise
    unaugmented = torch.cat(
        [x for _, x in iter_batches(split, torch.randperm(12, generator=torch.Generator().manual_seed(1)), 5)]
    )
    assert not torch.equal(unaugmented, plain)  # the draws did augment


def test_a_resumed_generator_continues_the_same_stream() -> None:
    images = np.random.default_rng(1).integers(0, 256, (10, 16, 16, 3), dtype=np.uint8)
    split = TensorSplit(
        images, np.zeros(10, dtype=np.int64), [str(i) for i in range(10)], augment=image_augment("flip")
    )
    order = torch.arange(10)
    generator = torch.Generator().manual_seed(3)
    first = torch.cat([x for _, x in iter_batches(split, order, 4, augment_generator=generator)])
    state = generator.get_state()  # what a checkpoint stores
    second = torch.cat([x for _, x in iter_batches(split, order, 4, augment_generator=generator)])
    resumed = torch.Generator()
    resumed.set_state(state)
    assert torch.equal(
        torch.cat([x for _, x in iter_batches(split, order, 4, augment_generator=resumed)]), second
    )
    assert not torch.equal(first, second)  # each epoch draws afresh


def test_every_kind_keeps_shape_and_range() -> None:
    image = torch.rand(3, 20, 20)
    for kind in AUGMENT_KINDS:
        augment = image_augment(kind)
        if augment is None:
            continue
        out = augment(image, torch.Generator().manual_seed(0))
        assert out.shape == image.shape
        assert float(out.min()) >= 0.0
        assert float(out.max()) <= 1.0
