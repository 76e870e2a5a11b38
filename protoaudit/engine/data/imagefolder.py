"""Any ImageFolder tree: one folder per class, images anywhere below it.

Two ways to split:

- **folders**: ``root/<train_folder>/<class>/…`` and ``root/<test_folder>/<class>/…``; the classes are the
  union of the class folders of both (a class folder missing on one side counts as empty there);
- **fraction**: ``root/<class>/…``; ``test_fraction`` of each class's images (at least one when the class
  has two or more) go to the test split, chosen by the seed.

Files with an image extension (jpg, jpeg, png, bmp, gif, webp, tif, tiff, ppm, pgm) are images; hidden files
and folders are skipped. Class names are folder names, in sorted order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from protoaudit.engine.data.files import ImageListing, list_image_files
from protoaudit.errors import DatasetError


def _class_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def list_imagefolder(
    root: str | Path,
    train_folder: str | None = None,
    test_folder: str | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> ImageListing:
    """Read a class-per-folder tree into an :class:`ImageListing`."""
    base = Path(root).expanduser()
    if not base.is_dir():
        what = "is a file, not a folder" if base.exists() else "does not exist"
        raise DatasetError(f"image folder {base} {what}; set data.root to a folder of class folders")
    paths: list[Path] = []
    labels: list[int] = []
    is_train: list[bool] = []
    if train_folder is not None and test_folder is not None:
        sides = [(base / train_folder, True), (base / test_folder, False)]
        for folder, _ in sides:
            if not folder.is_dir():
                raise DatasetError(
                    f"split folder {folder} does not exist (data.train_folder / data.test_folder)"
                )
        class_names = sorted(set(_class_folders(sides[0][0])) | set(_class_folders(sides[1][0])))
        for folder, train in sides:
            for c, name in enumerate(class_names):
                files = list_image_files(folder / name) if (folder / name).is_dir() else []
                paths += files
                labels += [c] * len(files)
                is_train += [train] * len(files)
    else:
        class_names = _class_folders(base)
        rng = np.random.default_rng(seed)
        for c, name in enumerate(class_names):
            files = list_image_files(base / name)
            n_test = min(round(test_fraction * len(files)), len(files) - 1) if len(files) > 1 else 0
            if test_fraction > 0 and len(files) > 1:
                n_test = max(n_test, 1)
            test = set(rng.permutation(len(files))[:n_test].tolist())
            paths += files
            labels += [c] * len(files)
            is_train += [i not in test for i in range(len(files))]
    if not class_names:
        raise DatasetError(f"{base} holds no class folders (expected ROOT/<class>/<image>)")
    listing = ImageListing(
        root=base,
        class_names=class_names,
        paths=paths,
        image_ids=[p.relative_to(base).as_posix() for p in paths],
        labels=np.asarray(labels, dtype=np.int64),
        is_train=np.asarray(is_train, dtype=bool),
    )
    listing.problems += listing.empty_class_problems()
    return listing
