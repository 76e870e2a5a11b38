"""Geometry of the latent grid in pixels: the paper's visualisation box, cells, the part at a patch, overlaps."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _quantile_rows(values: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(values, q, dim=1)`` (linear interpolation), bit for bit, from a partial top-k instead
    of a full sort of each row.

    values: (c, n) float without NaN → (c,) same dtype. The rank q·(n − 1) is formed as torch forms it (q in
    the values' dtype, the product in float64), the two order statistics around it come from the largest
    n − ⌊rank⌋ values, and ``torch.lerp`` joins them with the same weight.
    """
    c, n = values.shape
    if c == 0 or n == 0 or bool(torch.isnan(values).any()):
        return torch.quantile(values, q, dim=1)
    rank = torch.tensor(q, dtype=values.dtype).double() * (n - 1)
    below, above = int(rank), int(torch.ceil(rank))
    top = values.topk(n - below, dim=1).values  # descending: ascending position i sits at n - 1 - i
    weight = (rank - below).to(values.dtype)
    return torch.lerp(top[:, n - 1 - below], top[:, n - 1 - above], weight)


def percentile_boxes(
    maps: torch.Tensor, image_size: int, percentile: float = 95.0, chunk: int = 256
) -> torch.Tensor:
    """The paper's visualisation box: upsample each (H, W) map to the image (bicubic), keep pixels at or
    above the map's 95th percentile, return the smallest enclosing rectangle (y0, y1, x0, x1), end-exclusive.

    maps: (m, H, W) float → (m, 4) int64. Not a faithful attribution (Xu-Darme et al. 2023): it shows where
    the upsampled map is high, not which pixels caused the similarity.
    """
    out = []
    for start in range(0, maps.shape[0], chunk):
        # the maps as the channels of one image: the same values as one map per image, and faster on a CPU
        up = F.interpolate(
            maps[None, start : start + chunk],
            size=(image_size, image_size),
            mode="bicubic",
            align_corners=False,
        )[0]
        threshold = _quantile_rows(up.flatten(1), percentile / 100.0)
        mask = up >= threshold[:, None, None]
        rows, cols = mask.any(dim=2), mask.any(dim=1)  # (c, S)
        y0 = rows.float().argmax(dim=1)
        y1 = image_size - rows.flip(1).float().argmax(dim=1)
        x0 = cols.float().argmax(dim=1)
        x1 = image_size - cols.flip(1).float().argmax(dim=1)
        out.append(torch.stack([y0, y1, x0, x1], dim=1).long())
    return torch.cat(out) if out else torch.zeros(0, 4, dtype=torch.long)


PART_MIN_FRACTION = 0.25


def _cell_edges(size: int, cells: int) -> np.ndarray:
    """(cells + 1,) int64 pixel edges splitting ``size`` pixels into ``cells`` nearly equal cells."""
    return (np.arange(cells + 1) * size) // cells


def _neighbourhood(edges: np.ndarray, i: int, size: int) -> tuple[int, int]:
    """Pixel range of cell i widened by half a cell on each side, clipped to the image."""
    half = (edges[i + 1] - edges[i]) // 2
    return max(0, int(edges[i] - half)), min(size, int(edges[i + 1] + half))


def patch_parts(
    mask: np.ndarray | None, grid: int | tuple[int, int], min_fraction: float = PART_MIN_FRACTION
) -> np.ndarray:
    """The ground-truth part at every patch of an image, by :func:`patch_part`'s definition.

    mask: (S, S) uint8 part id per pixel (0 = background) or None → (H, W) int64 (all -1 when ``mask`` is None).
    """
    hh, ww = (grid, grid) if isinstance(grid, int) else grid
    if mask is None:
        return np.full((hh, ww), -1, dtype=np.int64)
    mask = np.asarray(mask)
    ys, xs = _cell_edges(mask.shape[0], hh), _cell_edges(mask.shape[1], ww)
    out = np.zeros((hh, ww), dtype=np.int64)
    n_ids = int(mask.max()) + 1
    for h in range(hh):
        y0, y1 = _neighbourhood(ys, h, mask.shape[0])
        for w in range(ww):
            x0, x1 = _neighbourhood(xs, w, mask.shape[1])
            counts = np.bincount(mask[y0:y1, x0:x1].ravel(), minlength=n_ids)
            counts[0] = 0  # background never wins against a part
            best = int(counts.argmax())
            cell_area = (ys[h + 1] - ys[h]) * (xs[w + 1] - xs[w])
            if counts[best] > 0 and counts[best] >= min_fraction * cell_area:
                out[h, w] = best
    return out


def patch_part(
    mask: np.ndarray | None,
    h: int,
    w: int,
    grid: int | tuple[int, int],
    min_fraction: float = PART_MIN_FRACTION,
) -> int:
    """The ground-truth part "at" latent patch (h, w) of an image, or -1 when the image has no part mask.

    The patch's *cell* is its share of the input image under the latent grid: rows ⌊h·S/H⌋ … ⌊(h+1)·S/H⌋ − 1
    and columns ⌊w·S/W⌋ … ⌊(w+1)·S/W⌋ − 1. A latent patch sees far more than its cell (its receptive field
    spans several cells) and a part rarely falls on cell boundaries, so the part is looked for in the cell's
    neighbourhood: the cell widened by half a cell on each side. The part at the patch is the most frequent
    non-background part id there (ties: the lower id) when it covers at least ``min_fraction`` (default 1/4) of
    a cell's area, else 0 (background).

    mask: (S, S) uint8 (0 = background) or None; grid: H (square) or (H, W).
    """
    hh, ww = (grid, grid) if isinstance(grid, int) else grid
    if not (0 <= h < hh and 0 <= w < ww):
        raise ValueError(f"patch ({h}, {w}) is outside the {hh}×{ww} latent grid")
    if mask is None:
        return -1
    return int(patch_parts(mask, (hh, ww), min_fraction)[h, w])


def patch_parts_from_keypoints(
    keypoints: np.ndarray, grid: int | tuple[int, int], image_size: int
) -> np.ndarray:
    """The part at every patch where parts are annotated as keypoints (CUB's part locations), not masks.

    keypoints: (q, 3) int64 (part id, y, x) in the S × S input frame → (H, W) int64: the lowest part id whose
    keypoint lies in the patch's cell (see :func:`patch_part`), else 0 — here 0 means "no part location in
    the cell", which is not necessarily background.
    """
    hh, ww = (grid, grid) if isinstance(grid, int) else grid
    out = np.zeros((hh, ww), dtype=np.int64)
    for part, y, x in sorted((int(p), int(y), int(x)) for p, y, x in np.asarray(keypoints).reshape(-1, 3)):
        h = min(hh - 1, max(0, y * hh // image_size))  # the cell rows ⌊h·S/H⌋ … hold y when h = ⌊y·H/S⌋
        w = min(ww - 1, max(0, x * ww // image_size))
        if out[h, w] == 0:
            out[h, w] = part
    return out


def cell_footprint(h: int, w: int, grid: tuple[int, int], image_size: int) -> tuple[int, int, int, int]:
    """The input pixels (y0, y1, x0, x1), end-exclusive, that latent cell (h, w) of an H × W grid tiles.

    This is the cell's share of the image, not its receptive field (which is much larger)."""
    gh, gw = grid
    return (
        h * image_size // gh,
        (h + 1) * image_size // gh,
        w * image_size // gw,
        (w + 1) * image_size // gw,
    )


def box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    inter = max(0, min(a[1], b[1]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[2], b[2]))
    area = (a[1] - a[0]) * (a[3] - a[2]) + (b[1] - b[0]) * (b[3] - b[2]) - inter
    return inter / area if area > 0 else 0.0
