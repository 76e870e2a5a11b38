"""Fashion-MNIST from its IDX files (``.gz`` or raw), held in memory.

Default folder: ``/usr/share/datasets/fashion-mnist`` (Debian's package ``dataset-fashion-mnist``)::

    train-images-idx3-ubyte(.gz)   60000 × 28 × 28 uint8
    train-labels-idx1-ubyte(.gz)   60000 uint8 in 0..9
    t10k-images-idx3-ubyte(.gz)    10000 × 28 × 28 uint8
    t10k-labels-idx1-ubyte(.gz)    10000 uint8 in 0..9

The 28 × 28 grey images are resized once (bilinear, antialiased) to S × S and repeated over three channels
when a batch is drawn, so the RGB trunks take them unchanged.
"""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from protoaudit.engine.data import DatasetBundle, stratified_holdout
from protoaudit.engine.data.augment import Augment
from protoaudit.errors import DatasetError

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_UBYTE = 0x08


def find_idx(root: Path, stem: str) -> Path:
    """``root/stem.gz`` or ``root/stem`` (also the ``stem.idx3-ubyte`` spelling some mirrors use)."""
    for name in (f"{stem}.gz", stem, stem.replace("-idx", ".idx") + ".gz", stem.replace("-idx", ".idx")):
        if (root / name).is_file():
            return root / name
    hint = " (apt-get install dataset-fashion-mnist)" if str(root) == DEFAULT_ROOT else ""
    raise DatasetError(f"Fashion-MNIST file {stem}[.gz] is missing in {root}{hint}")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes: (N,) labels or (N, H, W) images, uint8."""
    try:
        opener: Any = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as exc:
        raise DatasetError(f"{path} is not readable: {exc}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != _IDX_UBYTE or not 1 <= data[3] <= 3:
        raise DatasetError(f"{path} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        raise DatasetError(
            f"{path}: {len(data)} bytes but the header announces {expected} (truncated or corrupt)"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


@dataclass
class FashionMnistData:
    images: np.ndarray  # (N, 28, 28) uint8
    labels: np.ndarray  # (N,) int64
    is_train: np.ndarray  # (N,) bool
    paths: dict[str, Path]

    def fingerprint(self, image_size: int) -> str:
        h = hashlib.sha256(f"fashion_mnist/{image_size}".encode())
        h.update(self.images.tobytes())
        h.update(self.labels.tobytes())
        h.update(self.is_train.tobytes())
        return h.hexdigest()


def load_fashion_mnist(root: str | Path = DEFAULT_ROOT) -> FashionMnistData:
    """Read and validate the four IDX files (raises DatasetError naming the bad file)."""
    base = Path(root).expanduser()
    if not base.is_dir():
        hint = " (apt-get install dataset-fashion-mnist)" if str(base) == DEFAULT_ROOT else ""
        raise DatasetError(
            f"Fashion-MNIST folder {base} does not exist{hint}; set data.root to the IDX files"
        )
    paths = {key: find_idx(base, stem) for key, stem in FILES.items()}
    arrays = {key: read_idx(path) for key, path in paths.items()}
    for side in ("train", "test"):
        images, labels = arrays[f"{side}_images"], arrays[f"{side}_labels"]
        if images.ndim != 3 or labels.ndim != 1:
            raise DatasetError(f"{paths[side + '_images']}: expected N × H × W images and N labels")
        if len(images) != len(labels):
            raise DatasetError(
                f"{paths[side + '_labels']}: {len(labels)} labels for {len(images)} images in {paths[side + '_images'].name}"
            )
        if len(labels) and int(labels.max()) >= len(CLASS_NAMES):
            raise DatasetError(f"{paths[side + '_labels']}: label {int(labels.max())} outside 0..9")
    if arrays["train_images"].shape[1:] != arrays["test_images"].shape[1:]:
        raise DatasetError(f"{base}: train and test images differ in size")
    return FashionMnistData(
        images=np.concatenate([arrays["train_images"], arrays["test_images"]]),
        labels=np.concatenate([arrays["train_labels"], arrays["test_labels"]]).astype(np.int64),
        is_train=np.concatenate(
            [np.ones(len(arrays["train_labels"]), bool), np.zeros(len(arrays["test_labels"]), bool)]
        ),
        paths=paths,
    )


def resize_grey(images: np.ndarray, image_size: int, chunk: int = 4096) -> np.ndarray:
    """(N, h, w) uint8 → (N, S, S) uint8, bilinear with antialiasing (unchanged when already S × S)."""
    if images.shape[1:] == (image_size, image_size):
        return np.ascontiguousarray(images)
    out = np.empty((len(images), image_size, image_size), dtype=np.uint8)
    for start in range(0, len(images), chunk):
        x = torch.from_numpy(np.ascontiguousarray(images[start : start + chunk])).float()[:, None]
        y = torch.nn.functional.interpolate(
            x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True
        )
        out[start : start + chunk] = y[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()
    return out


@dataclass
class GreySplit:
    """An in-memory split of grey images (N, S, S) uint8, served as (B, 3, S, S) float32 in [0, 1]."""

    images: np.ndarray
    labels: np.ndarray
    image_ids: list[str]
    augment: Augment | None = None
    _tensor: torch.Tensor | None = field(default=None, repr=False)
    interventions: None = field(default=None, repr=False)  # no elements to remove in real images

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: Sequence[int], seeds: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, S, S) float32; augmented per image (seeds[i]) when seeds are given and the split augments."""
        if self._tensor is None:
            self._tensor = torch.from_numpy(self.images)
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        x = self._tensor[idx].float().div_(255.0)[:, None].expand(-1, 3, -1, -1).contiguous()
        if self.augment is None or seeds is None:
            return x
        from protoaudit.engine.data.augment import augment_batch

        return augment_batch(x, self.augment, seeds)

    def part_mask(self, index: int) -> np.ndarray | None:  # noqa: ARG002 (the ImageSplit protocol)
        return None

    def image(self, index: int) -> np.ndarray:
        """(S, S, 3) uint8 for display."""
        return np.repeat(self.images[index][:, :, None], 3, axis=2)


def build_fashion_mnist(
    root: str | Path,
    image_size: int,
    val_fraction: float,
    augment: Augment | None,
    seed: int,
    max_train_per_class: int | None = None,
) -> DatasetBundle:
    """The four splits; ``max_train_per_class`` keeps the first n training images of each class."""
    data = load_fashion_mnist(root)
    images = resize_grey(data.images, image_size)
    ids = [
        f"{'train' if t else 'test'}/{i if t else i - int(data.is_train.sum()):05d}"
        for i, t in enumerate(data.is_train)
    ]
    train_idx = np.flatnonzero(data.is_train)
    if max_train_per_class is not None:
        train_idx = np.sort(
            np.concatenate(
                [
                    train_idx[data.labels[train_idx] == k][:max_train_per_class]
                    for k in range(len(CLASS_NAMES))
                ]
            )
        )
    test_idx = np.flatnonzero(~data.is_train)
    keep, val = stratified_holdout(data.labels[train_idx], val_fraction, seed)

    def split(indices: np.ndarray, aug: Augment | None = None) -> GreySplit:
        return GreySplit(images[indices], data.labels[indices], [ids[i] for i in indices], aug)

    k = len(CLASS_NAMES)
    return DatasetBundle(
        train=split(train_idx[keep], augment),
        push=split(train_idx[keep]),
        val=split(train_idx[val]),
        test=split(test_idx),
        class_names=list(CLASS_NAMES),
        image_size=image_size,
        fingerprint=data.fingerprint(image_size),
        summary={
            "root": str(Path(root).expanduser()),
            "n_train": len(train_idx),
            "n_test": len(test_idx),
            "train_per_class": np.bincount(data.labels[train_idx], minlength=k).tolist(),
            "test_per_class": np.bincount(data.labels[test_idx], minlength=k).tolist(),
        },
    )
