"""The patch index's files: their names per split, format version and the parquet metadata key."""

from __future__ import annotations

import os
from pathlib import Path

from protoaudit.errors import InputError

INDEX_FORMAT_VERSION = 1
SPLITS = ("train", "test")
FILES = {
    "train": ("patches.faiss", "patches.parquet"),
    "test": ("patches_test.faiss", "patches_test.parquet"),
}
META_KEY = b"protoaudit.index"
META_COLUMNS = ["image_index", "image_id", "image_path", "label", "h", "w", "part"]


def index_paths(member_dir: str | os.PathLike[str], split: str) -> tuple[Path, Path]:
    if split not in FILES:
        raise InputError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    faiss_name, meta_name = FILES[split]
    return Path(member_dir) / faiss_name, Path(member_dir) / meta_name
