"""Datasets read from image files: a listing of what a dataset holds, and a split that decodes on demand.

A loader (CUB, Stanford Cars, ImageFolder) turns a dataset folder into an :class:`ImageListing`: one row per
image with its path, class, official split, an optional crop box and optional part locations, all in the
source image's pixel frame. :func:`bundle_from_listing` turns a listing into the four splits the engine
uses, each a :class:`FileSplit` that decodes, crops and resizes one image at a time (``item(i)``, used by
DataLoader workers) or a batch at a time (``batch(indices)``).

Coordinates are continuous pixel coordinates: (0, 0) is the top-left corner of the top-left pixel and
(W, H) the bottom-right corner of the image. A crop box ``(x0, y0, x1, y1)`` is resized to S × S, so a point
(x, y) lands at ``((x - x0) · S / (x1 - x0), (y - y0) · S / (y1 - y0))`` in the model's input frame.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from protoaudit.engine.data import DatasetBundle, four_splits
from protoaudit.engine.data.augment import Augment

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass
class Problem:
    """Something wrong with a dataset: ``error`` stops training, ``warning`` does not."""

    severity: str  # "error" | "warning"
    kind: str  # "missing_image" | "corrupt_image" | "empty_class" | "class_count" | "annotation" | …
    message: str  # one line naming the image, class or file
    path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"severity": self.severity, "kind": self.kind, "message": self.message, "path": self.path}


@dataclass
class ImageListing:
    """What a dataset folder holds, before any image is decoded. N images, K classes, P parts.

    paths: absolute file paths; image_ids: paths relative to the dataset root (stable ids);
    labels: (N,) int64 in [0, K); is_train: (N,) bool, the dataset's own train/test split;
    boxes: (N, 4) float64 crop boxes (x0, y0, x1, y1) in source pixels, or None for whole images;
    parts: (N, P, 3) float32 (x, y, visible) in source pixels, or None; part_names[p] names part id p + 1;
    object_boxes: (N, 4) float64 the object's bounding box (x0, y0, x1, y1) in source pixels where the dataset
    gives one (whether or not images are cropped to it), or None.
    problems: what listing found wrong (missing files, classes without images); decoding is checked later.
    """

    root: Path
    class_names: list[str]
    paths: list[Path]
    image_ids: list[str]
    labels: np.ndarray
    is_train: np.ndarray
    boxes: np.ndarray | None = None
    parts: np.ndarray | None = None
    part_names: list[str] | None = None
    problems: list[Problem] = field(default_factory=list)
    object_boxes: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def fingerprint(self, *extra: object) -> str:
        """sha256 over ids, labels, split, boxes and file sizes (not contents: reading them all is slow)."""
        h = hashlib.sha256()
        for item in extra:
            h.update(repr(item).encode())
        h.update("\n".join(self.class_names).encode())
        h.update("\n".join(self.image_ids).encode())
        h.update(np.ascontiguousarray(self.labels, dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(self.is_train, dtype=np.bool_).tobytes())
        if self.boxes is not None:
            h.update(np.ascontiguousarray(self.boxes, dtype=np.float64).tobytes())
        sizes = [p.stat().st_size if p.is_file() else -1 for p in self.paths]
        h.update(np.asarray(sizes, dtype=np.int64).tobytes())
        return h.hexdigest()

    def summary(self) -> dict[str, Any]:
        k = len(self.class_names)
        return {
            "root": str(self.root),
            "n_images": len(self),
            "n_train": int(self.is_train.sum()),
            "n_test": int((~self.is_train).sum()),
            "train_per_class": np.bincount(self.labels[self.is_train], minlength=k).tolist(),
            "test_per_class": np.bincount(self.labels[~self.is_train], minlength=k).tolist(),
        }

    def empty_class_problems(self) -> list[Problem]:
        """Errors for classes without any image or without training images; warnings without test images."""
        out: list[Problem] = []
        k = len(self.class_names)
        train = np.bincount(self.labels[self.is_train], minlength=k)
        test = np.bincount(self.labels[~self.is_train], minlength=k)
        for c, name in enumerate(self.class_names):
            if train[c] + test[c] == 0:
                out.append(Problem("error", "empty_class", f"class {name!r} has no images"))
            elif train[c] == 0:
                out.append(
                    Problem(
                        "error", "empty_class", f"class {name!r} has no training images (push needs some)"
                    )
                )
            elif test[c] == 0:
                out.append(Problem("warning", "empty_class", f"class {name!r} has no test images"))
        return out


def list_image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively, hidden entries skipped), sorted by relative path."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(dirpath) / name)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def transform_points(points: np.ndarray, box: np.ndarray, image_size: int) -> np.ndarray:
    """Map (P, 3) float (x, y, visible) from source pixels into the S × S frame of crop ``box``.

    box: (4,) float (x0, y0, x1, y1). A point outside the box is flagged invisible (visible = 0); the
    coordinates of invisible points are kept as transformed, for inspection only.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    out = np.array(points, dtype=np.float32, copy=True)
    out[:, 0] = (points[:, 0] - x0) * image_size / (x1 - x0)
    out[:, 1] = (points[:, 1] - y0) * image_size / (y1 - y0)
    inside = (out[:, 0] >= 0) & (out[:, 0] <= image_size) & (out[:, 1] >= 0) & (out[:, 1] <= image_size)
    out[:, 2] = np.where((points[:, 2] > 0) & inside, 1.0, 0.0)
    return out


def open_rgb(path: Path) -> PILImage:
    """Decode an image file completely into an RGB PIL image (grey and palette images are converted)."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        return img.convert("RGB")


def crop_resize(img: PILImage, box: Sequence[float] | None, image_size: int) -> np.ndarray:
    """Crop ``box`` (x0, y0, x1, y1; whole image when None) and resize to S × S: (S, S, 3) uint8."""
    from PIL import Image

    w, h = img.size
    x0, y0, x1, y1 = (0.0, 0.0, w, h) if box is None else box
    region = (float(x0), float(y0), float(x1), float(y1))
    out = img.resize((image_size, image_size), Image.Resampling.BILINEAR, box=region)
    return np.array(out, dtype=np.uint8)  # a writable copy


def clamp_box(box: np.ndarray, width: int, height: int) -> np.ndarray:
    """(4,) float box clamped to the image; a box that vanishes falls back to the whole image."""
    x0, y0, x1, y1 = box
    x0, x1 = max(0.0, min(x0, width)), max(0.0, min(x1, width))
    y0, y1 = max(0.0, min(y0, height)), max(0.0, min(y1, height))
    if x1 - x0 < 1 or y1 - y0 < 1:
        return np.array([0.0, 0.0, float(width), float(height)])
    return np.array([x0, y0, x1, y1])


@dataclass
class FileSplit:
    """A split whose images are decoded from files on demand. N images, S × S pixels.

    ``item(i)`` returns (3, S, S) float32 in [0, 1] (augmented when the split augments), so a DataLoader can
    decode in worker processes; ``batch(indices)`` stacks items.
    """

    paths: list[Path]
    labels: np.ndarray  # (N,) int64
    image_ids: list[str]
    image_size: int
    boxes: np.ndarray | None = None  # (N, 4) float64 crop boxes in source pixels
    parts: np.ndarray | None = None  # (N, P, 3) float32 (x, y, visible) in source pixels
    augment: Augment | None = None
    object_boxes: np.ndarray | None = None  # (N, 4) float64 the object's box (x0, y0, x1, y1), source pixels
    _sizes: dict[int, tuple[int, int]] = field(default_factory=dict, repr=False)
    interventions: None = field(default=None, repr=False)  # no elements to remove in real images

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, index: int) -> np.ndarray:
        """(S, S, 3) uint8: the cropped, resized, never augmented image (for display)."""
        img = open_rgb(self.paths[index])
        self._sizes[index] = img.size
        return crop_resize(img, self._box(index, img.size).tolist(), self.image_size)

    def item(self, index: int, seed: int | None = None) -> torch.Tensor:
        """(3, S, S) float32 in [0, 1]; augmented with a generator seeded with ``seed`` when one is given
        and the split augments."""
        x = torch.from_numpy(self.image(index)).permute(2, 0, 1).float().div_(255.0)
        if self.augment is None or seed is None:
            return x
        from protoaudit.engine.data.augment import seeded

        return self.augment(x, seeded(seed))

    def batch(self, indices: Sequence[int], seeds: torch.Tensor | None = None) -> torch.Tensor:
        if len(indices) == 0:
            return torch.zeros(0, 3, self.image_size, self.image_size)
        return torch.stack(
            [self.item(int(i), None if seeds is None else int(seeds[j])) for j, i in enumerate(indices)]
        )

    def part_mask(self, index: int) -> np.ndarray | None:  # noqa: ARG002 (the ImageSplit protocol)
        return None

    def part_locations(self, index: int) -> np.ndarray | None:
        """(P, 3) float32 (x, y, visible) of part ids 1..P in the model's S × S input frame, or None.

        A part outside the crop is flagged invisible. Locations describe the un-augmented image.
        """
        if self.parts is None:
            return None
        box = self._box(index, self._source_size(index))
        return transform_points(self.parts[index], box, self.image_size)

    def part_keypoints(self, index: int) -> np.ndarray | None:
        """(q, 3) int64 (part id, y, x) of the q visible parts in the S × S input frame: the pixel that holds
        each part location (clipped to the image), or None when the dataset has no part locations."""
        locations = self.part_locations(index)
        if locations is None:
            return None
        visible = np.flatnonzero(locations[:, 2] > 0)
        rows = np.clip(np.floor(locations[visible, 1]), 0, self.image_size - 1)
        cols = np.clip(np.floor(locations[visible, 0]), 0, self.image_size - 1)
        return np.stack([visible + 1, rows, cols], axis=1).astype(np.int64).reshape(-1, 3)

    def object_box(self, index: int) -> np.ndarray | None:
        """(4,) float64 (y0, y1, x0, x1) of the object's bounding box in the model's S × S input frame (after
        the crop and resize), or None where the dataset gives no box."""
        if self.object_boxes is None:
            return None
        bx0, by0, bx1, by1 = self._box(index, self._source_size(index))
        ox0, oy0, ox1, oy1 = self.object_boxes[index]
        sx, sy = self.image_size / (bx1 - bx0), self.image_size / (by1 - by0)
        return np.array([(oy0 - by0) * sy, (oy1 - by0) * sy, (ox0 - bx0) * sx, (ox1 - bx0) * sx])

    def subset(self, indices: np.ndarray, augment: Augment | None = None) -> FileSplit:
        idx = [int(i) for i in indices]
        return FileSplit(
            [self.paths[i] for i in idx],
            self.labels[idx],
            [self.image_ids[i] for i in idx],
            self.image_size,
            None if self.boxes is None else self.boxes[idx],
            None if self.parts is None else self.parts[idx],
            augment,
            None if self.object_boxes is None else self.object_boxes[idx],
        )

    def _source_size(self, index: int) -> tuple[int, int]:
        if index not in self._sizes:
            from PIL import Image

            with Image.open(self.paths[index]) as img:
                self._sizes[index] = img.size
        return self._sizes[index]

    def _box(self, index: int, size: tuple[int, int]) -> np.ndarray:
        w, h = size
        if self.boxes is None:
            return np.array([0.0, 0.0, float(w), float(h)])
        return clamp_box(self.boxes[index], w, h)


def bundle_from_listing(
    listing: ImageListing,
    image_size: int,
    val_fraction: float,
    augment: Augment | None,
    seed: int,
    fingerprint_extra: tuple[object, ...] = (),
) -> DatasetBundle:
    """The four splits of a listing: train (augmented), push (same images, never augmented), val (carved
    from train by :func:`four_splits`) and test (never augmented)."""
    everything = FileSplit(
        listing.paths,
        listing.labels,
        listing.image_ids,
        image_size,
        listing.boxes,
        listing.parts,
        object_boxes=listing.object_boxes,
    )
    part_names = None if listing.part_names is None else ["background", *listing.part_names]
    return DatasetBundle(
        **four_splits(everything, listing.labels, listing.is_train, val_fraction, seed, augment),
        class_names=list(listing.class_names),
        image_size=image_size,
        fingerprint=listing.fingerprint(image_size, *fingerprint_extra),
        summary=listing.summary(),
        part_names=part_names,
    )
