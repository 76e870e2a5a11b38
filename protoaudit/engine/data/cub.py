"""CUB-200-2011, read from its own directory layout (no conversion, no hand-run cropping).

::

    CUB_200_2011/images.txt               <image_id> <relative path under images/>
    CUB_200_2011/image_class_labels.txt   <image_id> <class_id>            (class ids 1..200)
    CUB_200_2011/train_test_split.txt     <image_id> <is_training_image>   (1 train, 0 test)
    CUB_200_2011/bounding_boxes.txt       <image_id> <x> <y> <width> <height>   (pixels)
    CUB_200_2011/classes.txt              <class_id> <class_name>
    CUB_200_2011/parts/parts.txt          <part_id> <part name>            (15 parts; names contain spaces)
    CUB_200_2011/parts/part_locs.txt      <image_id> <part_id> <x> <y> <visible>
    CUB_200_2011/images/<class folder>/<file>.jpg

Variant ``"bb"`` crops every image to its bounding box (x, y) – (x + width, y + height) before resizing to
S × S (the paper's setup); ``"full"`` resizes the whole image. Part locations go through the same crop and
resize into the model's input frame (``FileSplit.part_locations``); parts the annotators marked invisible,
and parts outside the box, are flagged invisible. The parts folder is optional.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from protoaudit.engine.data.files import ImageListing, Problem
from protoaudit.errors import DatasetError

REQUIRED_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")


def find_cub_root(root: Path) -> Path:
    """The folder holding images.txt: ``root`` itself or its ``CUB_200_2011`` child."""
    for candidate in (root, root / "CUB_200_2011"):
        if (candidate / "images.txt").is_file():
            return candidate
    if not root.exists():
        raise DatasetError(
            f"CUB-200-2011 folder {root} does not exist; set data.root to the folder holding images.txt"
        )
    raise DatasetError(
        f"{root} is not a CUB-200-2011 folder (no images.txt); set data.root to the extracted CUB_200_2011 folder"
    )


def _read_table(path: Path, columns: int, last_is_text: bool = False) -> list[list[str]]:
    """Whitespace-separated rows; with ``last_is_text`` the last column keeps its spaces."""
    rows: list[list[str]] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DatasetError(f"{path} is missing (CUB-200-2011 layout expected)") from None
    except UnicodeDecodeError:
        raise DatasetError(f"{path} is not UTF-8 text") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.split(maxsplit=columns - 1) if last_is_text else line.split()
        if len(fields) != columns:
            raise DatasetError(
                f"{path}:{number}: expected {columns} fields, got {len(fields)} ({line.strip()[:60]!r})"
            )
        rows.append([f.strip() for f in fields])
    return rows


def _ints(path: Path, rows: list[list[str]], columns: tuple[int, ...]) -> list[tuple[int, ...]]:
    try:
        return [tuple(int(r[c]) for c in columns) for r in rows]
    except ValueError as exc:
        raise DatasetError(f"{path}: {exc}") from None


def _floats(path: Path, rows: list[list[str]], columns: tuple[int, ...]) -> np.ndarray:
    try:
        return np.array([[float(r[c]) for c in columns] for r in rows], dtype=np.float64)
    except ValueError as exc:
        raise DatasetError(f"{path}: {exc}") from None


def list_cub(root: str | Path, variant: str = "bb") -> ImageListing:
    """Read the annotation files of a CUB-200-2011 folder into an :class:`ImageListing`."""
    base = find_cub_root(Path(root).expanduser())
    if variant not in ("bb", "full"):
        raise DatasetError(f'CUB variant must be "bb" or "full", got {variant!r}')
    classes = _read_table(base / "classes.txt", 2, last_is_text=True)
    class_ids = [int(c[0]) for c in classes]
    if class_ids != list(range(1, len(classes) + 1)):
        raise DatasetError(f"{base / 'classes.txt'}: class ids must be 1, 2, … in order")
    class_names = [c[1] for c in classes]

    images = _read_table(base / "images.txt", 2, last_is_text=True)
    ids = [int(r[0]) if r[0].isdigit() else -1 for r in images]
    if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
        raise DatasetError(f"{base / 'images.txt'}: image ids must be unique positive integers")
    position = {image_id: n for n, image_id in enumerate(ids)}

    def per_image(filename: str, values: list[Any], keys: list[int]) -> list[Any]:
        out: list[Any] = [None] * len(ids)
        for key, value in zip(keys, values, strict=True):
            if key not in position:
                raise DatasetError(f"{base / filename}: image id {key} is not in images.txt")
            out[position[key]] = value
        missing = [ids[n] for n, v in enumerate(out) if v is None]
        if missing:
            raise DatasetError(
                f"{base / filename}: no entry for image id {missing[0]} ({len(missing)} missing)"
            )
        return out

    label_rows = _ints(
        base / "image_class_labels.txt", _read_table(base / "image_class_labels.txt", 2), (0, 1)
    )
    labels = per_image("image_class_labels.txt", [r[1] for r in label_rows], [r[0] for r in label_rows])
    bad = [c for c in labels if not 1 <= c <= len(class_names)]
    if bad:
        raise DatasetError(
            f"{base / 'image_class_labels.txt'}: class id {bad[0]} is not in classes.txt (1..{len(class_names)})"
        )
    split_rows = _ints(base / "train_test_split.txt", _read_table(base / "train_test_split.txt", 2), (0, 1))
    is_train = per_image("train_test_split.txt", [r[1] == 1 for r in split_rows], [r[0] for r in split_rows])

    boxes: np.ndarray | None = None
    if variant == "bb" or (base / "bounding_boxes.txt").is_file():  # "full": the object's box, if given
        box_path = base / "bounding_boxes.txt"
        rows = _read_table(box_path, 5)
        keys = [k[0] for k in _ints(box_path, rows, (0,))]
        xywh = per_image("bounding_boxes.txt", list(_floats(box_path, rows, (1, 2, 3, 4))), keys)
        arr = np.array(xywh, dtype=np.float64).reshape(-1, 4)
        if (arr[:, 2:] <= 0).any():
            n = int(np.flatnonzero((arr[:, 2:] <= 0).any(axis=1))[0])
            raise DatasetError(f"{box_path}: image id {ids[n]} has an empty bounding box")
        boxes = np.concatenate([arr[:, :2], arr[:, :2] + arr[:, 2:]], axis=1)

    parts, part_names = _read_parts(base, position, len(ids))

    paths = [base / "images" / r[1] for r in images]
    problems = [
        Problem("error", "missing_image", f"image {r[1]} (id {r[0]}) listed in images.txt is missing", str(p))
        for r, p in zip(images, paths, strict=True)
        if not p.is_file()
    ]
    listing = ImageListing(
        root=base,
        class_names=class_names,
        paths=paths,
        image_ids=[r[1] for r in images],
        labels=np.array(labels, dtype=np.int64) - 1,
        is_train=np.array(is_train, dtype=bool),
        boxes=boxes if variant == "bb" else None,
        parts=parts,
        object_boxes=boxes,
        part_names=part_names,
        problems=problems,
    )
    listing.problems += listing.empty_class_problems()
    return listing


def _read_parts(
    base: Path, position: dict[int, int], n_images: int
) -> tuple[np.ndarray | None, list[str] | None]:
    names_path = base / "parts" / "parts.txt"
    locs_path = base / "parts" / "part_locs.txt"
    if not names_path.is_file() or not locs_path.is_file():
        return None, None
    names = _read_table(names_path, 2, last_is_text=True)
    if [int(r[0]) for r in names] != list(range(1, len(names) + 1)):
        raise DatasetError(f"{names_path}: part ids must be 1, 2, … in order")
    rows = _read_table(locs_path, 5)
    keys = _ints(locs_path, rows, (0, 1))
    values = _floats(locs_path, rows, (2, 3, 4))
    parts = np.zeros((n_images, len(names), 3), dtype=np.float32)  # unlisted parts stay invisible
    for (image_id, part_id), value in zip(keys, values, strict=True):
        if image_id not in position or not 1 <= part_id <= len(names):
            raise DatasetError(f"{locs_path}: unknown image id {image_id} or part id {part_id}")
        parts[position[image_id], part_id - 1] = value
    parts[:, :, 2] = (parts[:, :, 2] > 0).astype(np.float32)
    return parts, [r[1] for r in names]
