"""Stanford Cars (196 car models), read from its distributed layout and devkit annotations.

Two layouts are recognised, both as distributed:

devkit layout::

    cars_train/00001.jpg …                   training images
    cars_test/00001.jpg …                    test images
    devkit/cars_meta.mat                      class_names (1 × 196 cell array)
    devkit/cars_train_annos.mat               annotations: bbox_x1, bbox_y1, bbox_x2, bbox_y2, class, fname
    cars_test_annos_withlabels.mat            the same for the test images (or in devkit/)

single-file layout::

    car_ims/000001.jpg …
    cars_annos.mat                            annotations: relative_im_path, bbox_*, class, test; class_names

Classes are numbered from 1 and boxes are MATLAB pixel indices (1-based, inclusive): the box of pixels
x1..x2 is the continuous region (x1 - 1, y1 - 1) – (x2, y2). Variant ``"bb"`` crops to it, ``"full"`` keeps
the whole image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from protoaudit.engine.data.files import ImageListing, Problem
from protoaudit.errors import DatasetError

TEST_LABEL_FILES = ("cars_test_annos_withlabels.mat", "devkit/cars_test_annos_withlabels.mat")


def _loadmat(path: Path) -> dict[str, Any]:
    import scipy.io

    try:
        return dict(scipy.io.loadmat(str(path), squeeze_me=True))
    except FileNotFoundError:
        raise DatasetError(f"{path} is missing (Stanford Cars devkit layout expected)") from None
    except Exception as exc:
        raise DatasetError(f"{path} is not a readable MATLAB file: {exc}") from None


def _records(mat: dict[str, Any], path: Path, fields: tuple[str, ...]) -> np.ndarray:
    annos = mat.get("annotations")
    if annos is None:
        raise DatasetError(f"{path}: no 'annotations' variable")
    annos = np.atleast_1d(annos)
    names = annos.dtype.names or ()
    missing = [f for f in fields if f not in names]
    if missing:
        raise DatasetError(f"{path}: annotations lack field(s) {', '.join(missing)}")
    return annos


def _class_names(mat: dict[str, Any], path: Path) -> list[str]:
    names = mat.get("class_names")
    if names is None:
        raise DatasetError(f"{path}: no 'class_names' variable")
    return [str(n).strip() for n in np.atleast_1d(names)]


def _boxes(annos: np.ndarray) -> np.ndarray:
    x1 = annos["bbox_x1"].astype(np.float64)
    y1 = annos["bbox_y1"].astype(np.float64)
    x2 = annos["bbox_x2"].astype(np.float64)
    y2 = annos["bbox_y2"].astype(np.float64)
    return np.stack([x1 - 1, y1 - 1, x2, y2], axis=1)


def list_cars(root: str | Path, variant: str = "bb") -> ImageListing:
    """Read the annotation files of a Stanford Cars folder into an :class:`ImageListing`."""
    base = Path(root).expanduser()
    if variant not in ("bb", "full"):
        raise DatasetError(f'Stanford Cars variant must be "bb" or "full", got {variant!r}')
    if not base.is_dir():
        raise DatasetError(f"Stanford Cars folder {base} does not exist; set data.root to it")
    if (base / "cars_annos.mat").is_file():
        paths, ids, labels, is_train, boxes, class_names = _single_file(base)
    elif (base / "devkit" / "cars_meta.mat").is_file():
        paths, ids, labels, is_train, boxes, class_names = _devkit(base)
    else:
        raise DatasetError(
            f"{base} is not a Stanford Cars folder: expected devkit/cars_meta.mat (devkit layout) or cars_annos.mat"
        )
    bad = [int(c) for c in labels if not 1 <= c <= len(class_names)]
    if bad:
        raise DatasetError(
            f"{base}: class {bad[0]} in the annotations is not in class_names (1..{len(class_names)})"
        )
    problems = [
        Problem("error", "missing_image", f"image {i} listed in the annotations is missing", str(p))
        for i, p in zip(ids, paths, strict=True)
        if not p.is_file()
    ]
    listing = ImageListing(
        root=base,
        class_names=class_names,
        paths=paths,
        image_ids=ids,
        labels=np.asarray(labels, dtype=np.int64) - 1,
        is_train=np.asarray(is_train, dtype=bool),
        boxes=boxes if variant == "bb" else None,
        problems=problems,
    )
    listing.problems += listing.empty_class_problems()
    return listing


def _devkit(base: Path) -> tuple[list[Path], list[str], np.ndarray, np.ndarray, np.ndarray, list[str]]:
    meta_path = base / "devkit" / "cars_meta.mat"
    class_names = _class_names(_loadmat(meta_path), meta_path)
    fields = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")
    train_path = base / "devkit" / "cars_train_annos.mat"
    train = _records(_loadmat(train_path), train_path, fields)
    test_path = next((base / f for f in TEST_LABEL_FILES if (base / f).is_file()), None)
    if test_path is None:
        raise DatasetError(
            f"{base}: test labels missing; put cars_test_annos_withlabels.mat (distributed separately) in {base}"
        )
    test = _records(_loadmat(test_path), test_path, fields)
    ids = [f"cars_train/{f}" for f in train["fname"]] + [f"cars_test/{f}" for f in test["fname"]]
    labels = np.concatenate([train["class"].astype(np.int64), test["class"].astype(np.int64)])
    is_train = np.concatenate([np.ones(len(train), bool), np.zeros(len(test), bool)])
    boxes = np.concatenate([_boxes(train), _boxes(test)])
    return [base / i for i in ids], ids, labels, is_train, boxes, class_names


def _single_file(base: Path) -> tuple[list[Path], list[str], np.ndarray, np.ndarray, np.ndarray, list[str]]:
    path = base / "cars_annos.mat"
    mat = _loadmat(path)
    fields = ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test")
    annos = _records(mat, path, fields)
    ids = [str(p) for p in annos["relative_im_path"]]
    labels = annos["class"].astype(np.int64)
    is_train = annos["test"].astype(np.int64) == 0
    return [base / i for i in ids], ids, labels, is_train, _boxes(annos), _class_names(mat, path)
