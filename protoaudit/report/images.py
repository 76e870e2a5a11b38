"""The report's pictures: PNG encoding and ``data:`` URIs, thumbnails of a split's images with the box or
patch drawn on them, and the enlarged images, crops and activation overlays of a reasoning sheet
(:mod:`protoaudit.report.sheet`, :mod:`protoaudit.report.strips`).

Every thumbnail is encoded once per (split, index, box) and shared by every place that shows it.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from protoaudit.core.geometry import cell_footprint

if TYPE_CHECKING:
    from protoaudit.engine.explain import Box

BOX_COLOUR = (255, 230, 0)
MAX_SIDE = 128  # larger images are shrunk before encoding; the report shows thumbnails, not originals


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)  # optimize=True costs ~0.3 s a strip for ~10 %
    return buffer.getvalue()


def png_bytes(image: np.ndarray) -> bytes:
    """PNG of an (H, W, 3) uint8 image."""
    return encode_png(Image.fromarray(image))


def data_uri(image: np.ndarray) -> str:
    """``data:image/png;base64,…`` of an (H, W, 3) uint8 image."""
    return png_data_uri(png_bytes(image))


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


# -- the reasoning sheet's pictures ------------------------------------------------------------------


def _scale(size: int, target: int = 160) -> int:
    return max(1, target // size)


def overlay(image: np.ndarray, activation: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """(S, S, 3) uint8 image with the (H, W) activation map upsampled (bicubic), min-max scaled and drawn
    in the jet colour map over it → (S, S, 3) uint8."""
    from matplotlib import colormaps

    size = image.shape[0]
    up = F.interpolate(
        torch.from_numpy(np.ascontiguousarray(activation, dtype=np.float32))[None, None],
        size=(size, image.shape[1]),
        mode="bicubic",
        align_corners=False,
    )[0, 0].numpy()
    span = float(up.max() - up.min())
    scaled = (up - up.min()) / span if span > 0 else np.zeros_like(up)
    heat = colormaps["jet"](scaled)[..., :3] * 255
    return (image * (1 - alpha) + heat * alpha).clip(0, 255).astype(np.uint8)


def draw_boxes(
    image: np.ndarray,
    box: Box | None = None,
    cell: Box | None = None,
    scale: int | None = None,
    color: tuple[int, int, int] = (255, 230, 0),
) -> np.ndarray:
    """The image enlarged ``scale`` times (nearest) with ``box`` drawn solid and ``cell`` dashed."""
    scale = scale or _scale(image.shape[0])
    big = Image.fromarray(image).resize(
        (image.shape[1] * scale, image.shape[0] * scale), Image.Resampling.NEAREST
    )
    draw = ImageDraw.Draw(big)
    width = max(1, scale // 2 + 1)
    if box is not None:
        y0, y1, x0, x1 = box
        draw.rectangle([x0 * scale, y0 * scale, x1 * scale - 1, y1 * scale - 1], outline=color, width=width)
    if cell is not None:
        y0, y1, x0, x1 = (v * scale for v in cell)
        dash = max(2, 2 * scale)
        for x in range(x0, x1, 2 * dash):
            draw.line([x, y0, min(x + dash, x1 - 1), y0], fill=(0, 255, 255), width=width)
            draw.line([x, y1 - 1, min(x + dash, x1 - 1), y1 - 1], fill=(0, 255, 255), width=width)
        for y in range(y0, y1, 2 * dash):
            draw.line([x0, y, x0, min(y + dash, y1 - 1)], fill=(0, 255, 255), width=width)
            draw.line([x1 - 1, y, x1 - 1, min(y + dash, y1 - 1)], fill=(0, 255, 255), width=width)
    return np.asarray(big)


def crop(image: np.ndarray, box: Box, scale: int | None = None) -> np.ndarray:
    """The ``box`` of the image (the prototype's patch), enlarged to about the thumbnails' size."""
    y0, y1, x0, x1 = box
    patch = image[y0:y1, x0:x1]
    if patch.size == 0:
        patch = image
    scale = scale or _scale(image.shape[0])
    target = image.shape[0] * scale
    factor = max(1, target // max(patch.shape[:2]))
    return np.asarray(
        Image.fromarray(patch).resize(
            (patch.shape[1] * factor, patch.shape[0] * factor), Image.Resampling.NEAREST
        )
    )
