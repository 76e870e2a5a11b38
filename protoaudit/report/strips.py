"""Strips of a prototype's nearest images (paper Fig. 5b): its source patch, then each neighbour with its box."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

if TYPE_CHECKING:
    from protoaudit.engine.data import DatasetBundle, ImageSplit
    from protoaudit.engine.run import Run


STRIP_GAP = 4


def strip_path(run_dir: str | os.PathLike[str], member: str, split: str, prototype: int) -> Path:
    """The PNG strip of one prototype: its patch, then its k nearest images of ``split`` with boxes."""
    return Path(run_dir) / "members" / member / "nearest" / split / f"{prototype}.png"


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
    from protoaudit.core.geometry import percentile_boxes
    from protoaudit.core.model import similarity
    from protoaudit.engine.index.search import load_index
    from protoaudit.engine.io import write_bytes
    from protoaudit.report.images import crop, draw_boxes, png_bytes

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


def _load_pixels(split: ImageSplit, indices: list[int], batch: int = 256) -> dict[int, np.ndarray]:
    from protoaudit.engine.explain import _to_uint8

    out: dict[int, np.ndarray] = {}
    for start in range(0, len(indices), batch):
        chunk = indices[start : start + batch]
        for i, x in zip(chunk, split.batch(chunk), strict=True):
            out[i] = _to_uint8(x)
    return out
