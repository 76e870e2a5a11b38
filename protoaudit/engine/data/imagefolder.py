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


TRAIN_NAMES = ("train", "training")
TEST_NAMES = ("test", "testing", "val", "valid", "validation")


def _refuse_split_folders_as_classes(base: Path, class_names: list[str]) -> None:
    """A tree ``root/train/<class>/…`` + ``root/test/<class>/…`` read without split folders would become two
    classes named after the splits: stop with the keys that read it as meant."""
    lower = {name.lower(): name for name in class_names}
    train = next((lower[n] for n in TRAIN_NAMES if n in lower), None)
    test = next((lower[n] for n in TEST_NAMES if n in lower), None)
    if train is None or test is None:
        return
    if _class_folders(base / train) and _class_folders(base / test):
        raise DatasetError(
            f"{base} holds split folders {train}/ and {test}/ with class folders inside: read as classes they "
            f'would make classes named {train!r} and {test!r}; set data.train_folder = "{train}" and '
            f'data.test_folder = "{test}" (or point data.root at a folder of class folders)'
        )


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
        _refuse_split_folders_as_classes(base, class_names)
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
