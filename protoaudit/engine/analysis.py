"""Global analysis (paper Fig. 5b; the original ``global_analysis.py``): the nearest patches of the whole
training and test sets to every prototype.

For each prototype the k nearest *images* of a split, each by its closest patch (one patch per image, as the
original does), found with the patch index — no pass over the images. Written per member::

    members/<m>/nearest_train.csv   prototype, rank, image_index, image_id, label, h, w, distance
    members/<m>/nearest_test.csv
    members/<m>/nearest/train/<j>.png  one strip per prototype: its patch, then its k nearest images
    members/<m>/nearest/test/<j>.png

On each image of a strip the box is the paper's 95th-percentile box of the prototype's upsampled similarity
map over that image (a pointer, not a faithful attribution), the dashed square the nearest patch's own cell.
The maps come from the latents stored in the index.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

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
    """Write ``nearest_<split>.csv`` (and the strips) for every member and split; returns a summary with one
    row per member and split: member, split, prototypes, k, own_class (the fraction of the listed nearest
    images that are of the prototype's class), csv."""
    from protoaudit.engine.run import write_csv

    rows = []
    for member in members or run.member_names:
        classes = np.asarray(run.member(member).config.prototype_class)
        for split in splits:
            table = nearest_to_prototypes(run, member, split, k)
            path = nearest_csv_path(run.path, member, split)
            write_csv(path, table)
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
