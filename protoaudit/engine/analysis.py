"""Global analysis (paper Fig. 5b; the original ``global_analysis.py``): the nearest patches of the whole
training and test sets to every prototype.

For each prototype the k nearest *images* of a split, each by its closest patch (one patch per image, as the
original does), found with the patch index — no pass over the images. Written per member::

    members/<m>/nearest_train.csv   prototype, rank, image_index, image_id, label, h, w, distance
    members/<m>/nearest_train.json  the k searched and the patch index the table came from
    members/<m>/nearest_test.csv, nearest_test.json
    members/<m>/nearest/train/<j>.png  one strip per prototype: its patch, then its k nearest images
    members/<m>/nearest/test/<j>.png

On each image of a strip the box is the paper's 95th-percentile box of the prototype's upsampled similarity
map over that image (a pointer, not a faithful attribution), the dashed square the nearest patch's own cell.
The maps come from the latents stored in the index. A table that prune's search already wrote for the index as
it is now, with at least k ranks, is read back instead of searching again.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from protoaudit.errors import InputError

if TYPE_CHECKING:
    from protoaudit.engine.progress import Reporter
    from protoaudit.engine.run import Run

NEAREST_COLUMNS = ["prototype", "rank", "image_index", "image_id", "label", "h", "w", "distance"]


def nearest_csv_path(run_dir: str | os.PathLike[str], member: str, split: str) -> Path:
    from protoaudit.engine.run import member_path

    return member_path(run_dir, member) / f"nearest_{split}.csv"


# what identifies the search behind a nearest table: the index's weights, kind and size
INDEX_IDENTITY = (
    "checkpoint_sha256",
    "kind",
    "dim",
    "n_patches",
    "n_images",
    "faiss_bytes",
    "nlist",
    "nprobe",
)


def nearest_record_path(run_dir: str | os.PathLike[str], member: str, split: str) -> Path:
    return nearest_csv_path(run_dir, member, split).with_suffix(".json")


def _identity(info: dict[str, Any]) -> dict[str, Any]:
    return {key: info.get(key) for key in INDEX_IDENTITY}


def write_nearest(
    run_dir: str | os.PathLike[str],
    member: str,
    split: str,
    table: pd.DataFrame,
    k: int,
    index_info: dict[str, Any],
    source: str = "index search",
) -> Path:
    """Write ``nearest_<split>.csv`` (``table``, the columns of :data:`NEAREST_COLUMNS`) and its record: the
    ``k`` searched, the index (``index_info``, its recorded information) whose patches the table's rows name,
    and its ``source``: "index search", or "test pass" where the distances are those the member's test pass
    computed (the forward's own, equal to the search's up to float rounding)."""
    from protoaudit.engine.io import write_json
    from protoaudit.engine.run import write_csv

    path = nearest_csv_path(run_dir, member, split)
    nearest_record_path(run_dir, member, split).unlink(
        missing_ok=True
    )  # no record beside a half-replaced table
    write_csv(path, table[NEAREST_COLUMNS])
    write_json(
        nearest_record_path(run_dir, member, split),
        {"split": split, "k": k, "index": _identity(index_info), "source": source},
        strict=True,
    )
    return path


def saved_nearest(run: Run, member: str, split: str, k: int) -> pd.DataFrame | None:
    """The first ``k`` ranks of ``nearest_<split>.csv`` when its record says it was searched with at least
    ``k`` in the member's patch index as it is now (fresh: built from the current weights); else None."""
    from protoaudit.engine.index.files import index_paths
    from protoaudit.engine.index.search import index_status, read_index_info
    from protoaudit.engine.io import read_json
    from protoaudit.engine.run import member_path
    from protoaudit.errors import CheckpointError

    path, record_path = (
        nearest_csv_path(run.path, member, split),
        nearest_record_path(run.path, member, split),
    )
    if not path.is_file() or not record_path.is_file() or index_status(run, member, split) != "fresh":
        return None
    try:
        record = read_json(record_path)
        info = read_index_info(index_paths(member_path(run.path, member), split)[1])
    except CheckpointError:
        return None
    searched = record.get("k") if isinstance(record, dict) else None
    if not isinstance(searched, int) or searched < k or record.get("index") != _identity(info):
        return None
    table = pd.read_csv(path, converters={"image_id": str})
    if list(table.columns) != NEAREST_COLUMNS:
        return None
    table = table[table["rank"] <= k].reset_index(drop=True)
    if len(table) != run.member(member).n_prototypes * min(k, int(info.get("n_images") or 0)):
        return None  # ranks missing: not the table of a complete search
    return table


def nearest_to_prototypes(run: Run, member: str, split: str = "train", k: int = 5) -> pd.DataFrame:
    """The k nearest images of ``split`` to every prototype of ``member`` (each image by its closest patch):
    one row per prototype and rank, the columns of :data:`NEAREST_COLUMNS`. Missing ranks (k larger than the
    split) are left out."""
    from protoaudit.engine.index.search import load_index, nearest_images

    if k < 1:
        raise InputError(f"k must be >= 1, got {k}")
    index = load_index(run, member, split)
    return nearest_images(index, run.member(member).prototype_vectors, k).table()[NEAREST_COLUMNS]


def global_analysis(
    run: Run,
    k: int = 5,
    members: list[str] | None = None,
    splits: tuple[str, ...] = ("train", "test"),
    reporter: Reporter | None = None,
    on_table: Callable[[str, str, pd.DataFrame], object] | None = None,
) -> pd.DataFrame:
    """Write ``nearest_<split>.csv`` with its record (and the strips) for every member and split; returns a summary with one
    row per member and split: member, split, prototypes, k, own_class (the fraction of the listed nearest
    images that are of the prototype's class), csv."""
    from protoaudit.engine.index.files import index_paths
    from protoaudit.engine.index.search import read_index_info
    from protoaudit.engine.run import member_path

    if k < 1:
        raise InputError(f"k must be >= 1, got {k}")
    rows = []
    for member in members or run.member_names:
        classes = np.asarray(run.member(member).config.prototype_class)
        for split in splits:
            saved = saved_nearest(run, member, split, k)  # prune's one search, where it still holds
            if saved is None:
                table = nearest_to_prototypes(run, member, split, k)
                info = read_index_info(index_paths(member_path(run.path, member), split)[1])
                path = write_nearest(run.path, member, split, table, k, info)
            else:  # the saved file stays as it is: it may hold more ranks than asked for (the report reads them)
                table, path = saved, nearest_csv_path(run.path, member, split)
            if on_table is not None:  # e.g. the strips of protoaudit.report.strips
                on_table(member, split, table)
            own = float((table["label"].to_numpy() == classes[table["prototype"].to_numpy()]).mean())
            rows.append(
                {
                    "member": member,
                    "split": split,
                    "prototypes": len(classes),
                    "k": k,
                    "own_class": own,
                    "csv": str(path),
                }
            )
            if reporter is not None:
                reporter.log(
                    f"[bold]{member}[/bold] {split}: {own:.1%} of the {k} nearest images per prototype are of its class"
                )
    return pd.DataFrame(rows, columns=["member", "split", "prototypes", "k", "own_class", "csv"])
