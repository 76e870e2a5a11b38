"""Thumbnails for the report: images of a split as PNG ``data:`` URIs, with the box or patch drawn on them.

Every image is encoded once per (split, index, box) and shared by every place that shows it.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from protoaudit.core.geometry import cell_footprint

BOX_COLOUR = (255, 230, 0)
MAX_SIDE = 128  # larger images are shrunk before encoding; the report shows thumbnails, not originals


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(B, 3, S, S) float in [0, 1] → (B, S, S, 3) uint8."""
    return (
        np.clip(np.rint(np.asarray(images, dtype=np.float32) * 255.0), 0, 255)
        .astype(np.uint8)
        .transpose(0, 2, 3, 1)
    )


def _shrink(image: Image.Image) -> tuple[Image.Image, float]:
    side = max(image.size)
    if side <= MAX_SIDE:
        return image, 1.0
    scale = MAX_SIDE / side
    size = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
    return image.resize(size, Image.Resampling.BILINEAR), scale


def box_thumbnail(image: np.ndarray, box: Sequence[int] | None) -> bytes:
    """PNG of an (S, S, 3) uint8 image with an end-exclusive (y0, y1, x0, x1) box outlined (1 px)."""
    pil, scale = _shrink(Image.fromarray(image))
    if box is not None:
        y0, y1, x0, x1 = (float(v) * scale for v in box)
        draw = ImageDraw.Draw(pil)
        draw.rectangle(
            [round(x0), round(y0), max(round(x0), round(x1) - 1), max(round(y0), round(y1) - 1)],
            outline=BOX_COLOUR,
        )
    return encode_png(pil)


def patch_thumbnail(image: np.ndarray, h: int, w: int, grid: tuple[int, int]) -> bytes:
    """PNG of latent cell (h, w)'s footprint with one cell of context on each side, the cell outlined."""
    size = image.shape[0]
    y0, y1, x0, x1 = cell_footprint(h, w, grid, size)
    cy, cx = y1 - y0, x1 - x0
    top, bottom = max(0, y0 - cy), min(size, y1 + cy)
    left, right = max(0, x0 - cx), min(size, x1 + cx)
    crop = np.ascontiguousarray(image[top:bottom, left:right])
    return box_thumbnail(crop, (y0 - top, y1 - top, x0 - left, x1 - left))
