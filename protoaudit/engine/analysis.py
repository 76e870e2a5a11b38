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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from protoaudit.errors import InputError

if TYPE_CHECKING:
    from protoaudit.engine.data import DatasetBundle
    from protoaudit.engine.progress import Reporter
    from protoaudit.engine.run import Run

NEAREST_COLUMNS = ["prototype", "rank", "image_index", "image_id", "label", "h", "w", "distance"]
STRIP_GAP = 4


def nearest_csv_path(run_dir: str | os.PathLike[str], member: str, split: str) -> Path:
    return Path(run_dir) / "members" / member / f"nearest_{split}.csv"


def strip_path(run_dir: str | os.PathLike[str], member: str, split: str, prototype: int) -> Path:
    """The PNG strip of one prototype: its patch, then its k nearest images of ``split`` with boxes."""
    return Path(run_dir) / "members" / member / "nearest" / split / f"{prototype}.png"


def nearest_to_prototypes(run: Run, member: str, split: str = "train", k: int = 5) -> pd.DataFrame:
    """The k nearest images of ``split`` to every prototype of ``member`` (each image by its closest patch):
    one row per prototype and rank, the columns of :data:`NEAREST_COLUMNS`. Missing ranks (k larger than the
    split) are left out."""
    from protoaudit.engine.index import load_index

    if k < 1:
        raise InputError(f"k must be >= 1, got {k}")
    index = load_index(run, member, split)
    prototypes = run.member(member).prototype_vectors.detach().float()
    distances, rows = index.search(prototypes, k, per_image=True)
    m = len(prototypes)
    proto = np.repeat(np.arange(m), k)
    rank = np.tile(np.arange(1, k + 1), m)
    flat_rows, flat_d = rows.ravel(), distances.ravel()
    ok = flat_rows >= 0
    meta = index.meta.iloc[flat_rows[ok]]
    return pd.DataFrame(
        {
            "prototype": proto[ok],
            "rank": rank[ok],
            "image_index": meta["image_index"].to_numpy(),
            "image_id": meta["image_id"].to_numpy(),
            "label": meta["label"].to_numpy(),
            "h": meta["h"].to_numpy(),
            "w": meta["w"].to_numpy(),
            "distance": flat_d[ok].astype(np.float64),
        },
        columns=NEAREST_COLUMNS,
    )


def _caption(image: np.ndarray, lines: list[str]) -> np.ndarray:
    """The image with a white caption band of ``lines`` below it."""
    from PIL import Image, ImageDraw

    band = 12 * len(lines) + 4
    canvas = Image.new("RGB", (image.shape[1], image.shape[0] + band), (255, 255, 255))
    canvas.paste(Image.fromarray(image), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((2, image.shape[0] + 2 + 12 * i), line, fill=(0, 0, 0))
    return np.asarray(canvas)


def _hstack(images: list[np.ndarray], separator_after: int = 1) -> np.ndarray:
    height = max(im.shape[0] for im in images)
    parts = []
    for i, im in enumerate(images):
        padded = np.full((height, im.shape[1], 3), 255, np.uint8)
        padded[: im.shape[0]] = im
        parts.append(padded)
        gap = 3 * STRIP_GAP if i + 1 == separator_after else STRIP_GAP
        parts.append(np.full((height, gap, 3), 255, np.uint8))
    return np.concatenate(parts[:-1], axis=1)


def write_strips(
    run: Run,
    member: str,
    split: str,
    table: pd.DataFrame,
    bundle: DatasetBundle,
) -> list[Path]:
    """One PNG strip per prototype of ``table`` (see :func:`strip_path`); returns the paths written."""
    from protoaudit.core.model import similarity
    from protoaudit.engine.explain import crop, draw_boxes, png_bytes
    from protoaudit.engine.index import load_index
    from protoaudit.engine.io import write_bytes
    from protoaudit.engine.push import percentile_boxes

    index = load_index(run, member, split, check=False)  # checked by nearest_to_prototypes
    model = run.member(member)
    class_names = list(model.config.class_names)
    prototypes = model.prototype_vectors.detach().float()
    images_split = bundle.push if split == "train" else bundle.test
    size = bundle.image_size
    hh, ww = index.grid
    scale = max(1, round(112 / size))  # thumbnails of about 112 px or more
    # the prototype's similarity map over every listed image, from the latents in the index
    latents = torch.stack([torch.from_numpy(index.image_latents(int(i))) for i in table["image_index"]])
    proto = prototypes[torch.from_numpy(table["prototype"].to_numpy(dtype=np.int64, copy=True))]
    diff = latents - proto[:, :, None, None]
    maps = similarity((diff * diff).sum(1)) if len(table) else torch.zeros(0, hh, ww)
    boxes = percentile_boxes(maps, size)
    needed = sorted(set(table["image_index"].tolist()))
    pixels = _load_pixels(images_split, needed)
    sources = run.prototypes(member)
    source_pixels = _load_pixels(bundle.push, sorted(set(sources["source_index"].tolist())))
    written = []
    for j, group in table.groupby("prototype", sort=True):
        src = sources.iloc[int(j)]
        source_box = (int(src["box_y0"]), int(src["box_y1"]), int(src["box_x0"]), int(src["box_x1"]))
        tiles = [
            _caption(
                crop(source_pixels[int(src["source_index"])], source_box, scale),
                [f"prototype {int(j)}", f"class {int(src['class'])}"],
            )
        ]
        for pos, row in zip(group.index, group.itertuples(index=False), strict=True):
            h, w = int(row.h), int(row.w)
            cell = (h * size // hh, (h + 1) * size // hh, w * size // ww, (w + 1) * size // ww)
            box = tuple(int(v) for v in boxes[table.index.get_loc(pos)])
            thumb = draw_boxes(pixels[int(row.image_index)], box, cell, scale)  # type: ignore[arg-type]
            label = int(row.label)
            tiles.append(
                _caption(thumb, [f"#{int(row.rank)} d={row.distance:.3f}", _short(class_names[label], label)])
            )
        path = strip_path(run.path, member, split, int(j))
        write_bytes(path, png_bytes(_hstack(tiles)))
        written.append(path)
    return written


def _short(name: str, label: int, width: int = 18) -> str:
    text = f"{label}: {name}"
    return text if len(text) <= width else text[: width - 1] + "…"


def _load_pixels(split: Any, indices: list[int], batch: int = 256) -> dict[int, np.ndarray]:
    from protoaudit.engine.explain import _to_uint8

    out: dict[int, np.ndarray] = {}
    for start in range(0, len(indices), batch):
        chunk = indices[start : start + batch]
        for i, x in zip(chunk, split.batch(chunk), strict=True):
            out[i] = _to_uint8(x)
    return out


def global_analysis(
    run: Run,
    k: int = 5,
    members: list[str] | None = None,
    splits: tuple[str, ...] = ("train", "test"),
    thumbnails: bool = True,
    reporter: Reporter | None = None,
) -> pd.DataFrame:
    """Write ``nearest_<split>.csv`` (and the strips) for every member and split; returns a summary with one
    row per member and split: member, split, prototypes, k, own_class (the fraction of the listed nearest
    images that are of the prototype's class), csv."""
    from protoaudit.engine.run import write_csv

    bundle = run.dataset() if thumbnails else None
    rows = []
    for member in members or run.member_names:
        classes = np.asarray(run.member(member).config.prototype_class)
        for split in splits:
            table = nearest_to_prototypes(run, member, split, k)
            path = nearest_csv_path(run.path, member, split)
            write_csv(path, table)
            if thumbnails and bundle is not None:
                write_strips(run, member, split, table, bundle)
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
