"""Check the dataset a recipe names without training: counts per class and split, missing or unreadable
images (by path), classes without images, and the class count against the recipe.

``protoaudit data check RECIPE`` prints the result; :func:`protoaudit.ensemble.train_ensemble` runs the same
checks before it writes anything, so a broken dataset fails fast.
"""

from __future__ import annotations

import concurrent.futures
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from protoaudit.engine.data.files import ImageListing, Problem
from protoaudit.errors import DatasetError, InputError

if TYPE_CHECKING:
    from protoaudit.engine.recipe import DataConfig

MAX_DECODE_THREADS = 8


def list_dataset(config: DataConfig, seed: int) -> ImageListing:
    """The :class:`ImageListing` of a file-backed data kind (cub, cars, imagefolder)."""
    if config.kind == "cub":
        from protoaudit.engine.data.cub import list_cub

        return list_cub(config.root, config.variant)
    if config.kind == "cars":
        from protoaudit.engine.data.cars import list_cars

        return list_cars(config.root, config.variant)
    if config.kind == "imagefolder":
        from protoaudit.engine.data.imagefolder import list_imagefolder

        return list_imagefolder(
            config.root,
            config.train_folder,
            config.test_folder,
            config.test_fraction,
            seed if config.seed is None else config.seed,
        )
    raise ValueError(f"data kind {config.kind!r} is not read from image files")


def raise_for_problems(problems: list[Problem]) -> None:
    """Raise one DatasetError naming the first error (and how many more there are); warnings pass."""
    errors = [p for p in problems if p.severity == "error"]
    if not errors:
        return
    more = (
        f" (and {len(errors) - 1} more problem(s); see: protoaudit data check RECIPE)"
        if len(errors) > 1
        else ""
    )
    raise DatasetError(f"{errors[0].message}{more}")


def verify_image(path: Path) -> str | None:
    """None when ``path`` decodes completely, else a short reason. JPEGs decode at reduced scale (fast, yet
    every byte of the file is read, so truncation is caught)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            if img.format == "JPEG":
                img.draft("RGB", (64, 64))
            img.load()
            if img.width < 1 or img.height < 1:
                return "the image is empty"
    except FileNotFoundError:
        return "the file is missing"
    except Exception as exc:  # PIL raises many types for bad data
        text = str(exc).strip().splitlines()
        return text[0] if text else type(exc).__name__
    return None


def verify_images(paths: list[Path], ids: list[str]) -> list[Problem]:
    """One ``corrupt_image`` error per file that does not decode (files already known missing skipped)."""
    present = [(p, i) for p, i in zip(paths, ids, strict=True) if p.is_file()]
    threads = max(1, min(MAX_DECODE_THREADS, os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        reasons = list(pool.map(verify_image, [p for p, _ in present]))
    return [
        Problem("error", "corrupt_image", f"image {image_id} cannot be decoded: {reason}", str(path))
        for (path, image_id), reason in zip(present, reasons, strict=True)
        if reason is not None
    ]


@dataclass
class DataCheck:
    """The result of checking a recipe's dataset. K classes."""

    kind: str
    root: str | None
    class_names: list[str]
    expected_classes: int | None
    counts: dict[
        str, list[int]
    ]  # split ("train", "val", "test", and "test_shifted" if any) → (K,) images per class
    problems: list[Problem] = field(default_factory=list)
    images_verified: int = 0

    @property
    def ok(self) -> bool:
        return not any(p.severity == "error" for p in self.problems)

    def raise_for_problems(self) -> None:
        raise_for_problems(self.problems)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "kind": self.kind,
            "root": self.root,
            "n_classes": len(self.class_names),
            "expected_classes": self.expected_classes,
            "images_verified": self.images_verified,
            "totals": {split: int(sum(c)) for split, c in self.counts.items()},
            "classes": [
                {"class": k, "name": name, **{split: int(c[k]) for split, c in self.counts.items()}}
                for k, name in enumerate(self.class_names)
            ],
            "problems": [p.to_dict() for p in self.problems],
        }


def _split_counts(
    labels: np.ndarray, is_train: np.ndarray, k: int, val_fraction: float, seed: int
) -> dict[str, list[int]]:
    from protoaudit.engine.data import stratified_holdout

    train_labels = labels[is_train]
    keep, val = stratified_holdout(train_labels, val_fraction, seed) if len(train_labels) else ([], [])
    return {
        "train": np.bincount(train_labels[keep], minlength=k).tolist(),
        "val": np.bincount(train_labels[val], minlength=k).tolist(),
        "test": np.bincount(labels[~is_train], minlength=k).tolist(),
    }


def check_data(config: DataConfig, seed: int, verify: bool = True) -> DataCheck:
    """Check the dataset ``config`` (a recipe's ``[data]`` table) names; ``verify`` decodes every image.

    Problems are collected, not raised (a dataset folder that cannot be read at all is one problem).
    """
    from protoaudit.engine.data import class_count_problems

    expected = getattr(config, "n_classes", None)
    root = getattr(config, "root", None)
    if config.kind in ("cub", "cars", "imagefolder"):
        try:
            listing = list_dataset(config, seed)
        except InputError as exc:
            return DataCheck(config.kind, root, [], expected, {}, [Problem("error", "dataset", str(exc))])
        problems = list(listing.problems)
        problems += class_count_problems(config, listing.class_names)
        verified = 0
        if verify:
            problems += verify_images(listing.paths, listing.image_ids)
            verified = sum(1 for p in listing.paths if p.is_file())
        counts = _split_counts(
            listing.labels, listing.is_train, len(listing.class_names), config.val_fraction, seed
        )
        return DataCheck(
            config.kind, str(listing.root), listing.class_names, expected, counts, problems, verified
        )
    if config.kind == "fashion_mnist":
        from protoaudit.engine.data.fashion_mnist import CLASS_NAMES, load_fashion_mnist

        try:
            data = load_fashion_mnist(config.root)
        except InputError as exc:
            return DataCheck(config.kind, root, [], expected, {}, [Problem("error", "dataset", str(exc))])
        labels, is_train = data.labels, data.is_train
        if config.max_train_per_class is not None:
            keep = np.ones(len(labels), bool)
            for k in range(len(CLASS_NAMES)):
                keep[np.flatnonzero(is_train & (labels == k))[config.max_train_per_class :]] = False
            labels, is_train = labels[keep], is_train[keep]
        listing = ImageListing(Path(config.root), list(CLASS_NAMES), [], [], labels, is_train)
        problems = listing.empty_class_problems() + class_count_problems(config, list(CLASS_NAMES))
        counts = _split_counts(labels, is_train, len(CLASS_NAMES), config.val_fraction, seed)
        return DataCheck(config.kind, root, list(CLASS_NAMES), expected, counts, problems, len(labels))
    if config.kind == "parts":
        from protoaudit.engine.data import build_dataset

        bundle = build_dataset(config, seed)
        k = bundle.n_classes
        splits = ("train", "val", "test") + (("test_shifted",) if bundle.test_shifted is not None else ())
        counts = {
            split: np.bincount(np.asarray(getattr(bundle, split).labels), minlength=k).tolist()
            for split in splits
        }
        n = sum(len(getattr(bundle, s)) for s in splits)
        return DataCheck(config.kind, None, list(bundle.class_names), None, counts, [], n)
    raise ValueError(f"unknown data kind {config.kind!r}")
