"""Fashion-MNIST from IDX files (.gz or raw): tiny files written here in the real format."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX: magic 0x00 0x00 0x08 (unsigned byte) ndim, then each dimension as a big-endian uint32."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def make_fashion_mnist(
    root: Path, train_per_class: int = 4, test_per_class: int = 2, gz: bool = True
) -> Path:
    """Images of class k: a bright square whose position depends on k (so they are learnable)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for stem, per_class in (("train", train_per_class), ("t10k", test_per_class)):
        labels = np.repeat(np.arange(10), per_class).astype(np.uint8)
        rng.shuffle(labels)
        images = rng.integers(0, 40, size=(len(labels), 28, 28)).astype(np.uint8)
        for i, k in enumerate(labels):
            y, x = 2 + 8 * (int(k) // 4), 2 + 6 * (int(k) % 4)
            images[i, y : y + 6, x : x + 6] = 250
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            data = idx_bytes(array)
            name = f"{stem}-{kind}-ubyte"
            if gz:
                (root / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (root / name).write_bytes(data)
    return root


@pytest.mark.parametrize("gz", [True, False])
def test_reads_idx_files(tmp_path: Path, gz: bool) -> None:
    from protoaudit.engine.data.fashion_mnist import load_fashion_mnist

    make_fashion_mnist(tmp_path, gz=gz)
    data = load_fashion_mnist(tmp_path)
    assert data.images.shape == (60, 28, 28)
    assert data.images.dtype == np.uint8
    assert data.is_train.sum() == 40
    assert np.bincount(data.labels[data.is_train]).tolist() == [4] * 10
    k = int(data.labels[0])
    y, x = 2 + 8 * (k // 4), 2 + 6 * (k % 4)
    assert (data.images[0, y : y + 6, x : x + 6] == 250).all()


def test_splits_resize_and_grey_to_rgb(tmp_path: Path) -> None:
    import torch

    from protoaudit.engine.data.augment import image_augment
    from protoaudit.engine.data.fashion_mnist import CLASS_NAMES, build_fashion_mnist

    make_fashion_mnist(tmp_path, train_per_class=8)
    bundle = build_fashion_mnist(tmp_path, 32, 0.25, image_augment("flip"), seed=0, max_train_per_class=6)
    assert bundle.class_names == CLASS_NAMES
    assert len(bundle.train) == 10 * 4
    assert len(bundle.val) == 10 * 2
    assert len(bundle.test) == 20
    assert bundle.test.image_ids[0] == "test/00000"
    x = bundle.push.batch([0, 1])
    assert x.shape == (2, 3, 32, 32)
    assert torch.equal(x[:, 0], x[:, 1])
    assert torch.equal(x[:, 0], x[:, 2])
    assert 0.9 < float(x.max()) <= 1.0
    assert torch.equal(bundle.train.batch([0])[0], bundle.train.batch([0])[0])  # no seeds: not augmented
    augmented = torch.stack([bundle.train.batch([0], torch.tensor([s]))[0] for s in range(8)])
    plain = bundle.push.batch([bundle.push.image_ids.index(bundle.train.image_ids[0])])[0]
    flipped = [torch.equal(a, plain.flip(-1)) for a in augmented]
    kept = [torch.equal(a, plain) for a in augmented]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert any(flipped)
    assert any(kept)


def test_corrupt_idx_file_is_named(tmp_path: Path) -> None:
    from protoaudit.engine.data.fashion_mnist import load_fashion_mnist
    from protoaudit.errors import DatasetError

    make_fashion_mnist(tmp_path, gz=False)
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-3])
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte: .* \(truncated or corrupt\)"):
        load_fashion_mnist(tmp_path)
    labels.write_bytes(b"\x00\x00\x0d\x01" + bytes(8))
    with pytest.raises(DatasetError, match="bad magic number"):
        load_fashion_mnist(tmp_path)
    labels.unlink()
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte\[.gz\] is missing"):
        load_fashion_mnist(tmp_path)


def test_short_run_from_the_fashion_mnist_recipe(tmp_path: Path) -> None:
    from protoaudit.engine.data.check import check_data
    from protoaudit.engine.ensemble import train_ensemble
    from protoaudit.engine.recipe import load_recipe

    make_fashion_mnist(tmp_path / "fm", train_per_class=6)
    recipe = load_recipe(
        ROOT / "recipes" / "fashion_mnist.toml",
        overrides=[
            f"data.root={tmp_path / 'fm'}",
            "data.image_size=16",
            "schedule.epochs=2",
            "schedule.warm_epochs=1",
            "schedule.push_start=2",
            "schedule.last_layer_epochs=1",
            "schedule.batch_size=16",
        ],
        out=str(tmp_path / "runs"),
        device="cpu",
        threads=1,
    )
    check = check_data(recipe.data, recipe.seed)
    assert check.ok
    assert check.counts["test"] == [2] * 10
    assert sum(check.counts["train"]) + sum(check.counts["val"]) == 60
    result = train_ensemble(recipe)
    accuracy = pd.read_csv(result.run_dir / "accuracy.csv")
    assert accuracy["kind"].tolist().count("baseline") == 1
    assert accuracy["kind"].tolist().count("ensemble") == 1
    assert (accuracy["n_test"] == 20).all()
