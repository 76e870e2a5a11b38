"""Prototype audit metrics: pure functions over arrays, no files.

Each function cites the paper its definition comes from. Shapes: m prototypes, k neighbours, n images,
P ground-truth parts.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def knn_class_purity(neighbor_labels: np.ndarray, prototype_class: np.ndarray) -> np.ndarray:
    """How many of each prototype's k nearest training images belong to the prototype's class.

    neighbor_labels: (m, k) int labels of the k nearest *images* (one patch per image: each image counts once,
    through its closest patch), padded with -1 where fewer than k exist; prototype_class: (m,) int → (m,) int64.

    References: Chen et al., "This Looks Like That", NeurIPS 2019, §2.6 and supplement S8 (prototype pruning:
    k = 6 nearest training images; a prototype is pruned when fewer than τ = 3 of them are of its class).
    """
    return (np.asarray(neighbor_labels) == np.asarray(prototype_class)[:, None]).sum(axis=1).astype(np.int64)


def prune_decision(purity: np.ndarray, threshold: int) -> np.ndarray:
    """(m,) bool: True where the prototype is pruned (purity < τ)."""
    return np.asarray(purity) < threshold


def precision_recall(predicted: np.ndarray, actual: np.ndarray) -> tuple[float | None, float | None]:
    """Precision and recall of a boolean decision against ground truth (None where undefined: 0/0)."""
    predicted = np.asarray(predicted, dtype=bool)
    actual = np.asarray(actual, dtype=bool)
    hit = int((predicted & actual).sum())
    precision = hit / int(predicted.sum()) if predicted.any() else None
    recall = hit / int(actual.sum()) if actual.any() else None
    return precision, recall


def part_purity(top_parts: np.ndarray) -> np.ndarray:
    """Fraction of a prototype's top patches that carry its most frequent object part.

    top_parts: (m, t) int part id of each of the t nearest training patches (one per image); 0 = background,
    -1 = unknown or missing. Background and unknown never count as the shared part, so a prototype whose nearest
    patches are all background has part purity 0. → (m,) float64 in [0, 1].

    Reference: Nauta et al., "PIP-Net: Patch-Based Intuitive Prototypes for Interpretable Image Classification",
    CVPR 2023 (purity of a prototype's top-10 image patches with respect to annotated object parts).
    """
    top_parts = np.asarray(top_parts)
    out = np.zeros(len(top_parts))
    for j, row in enumerate(top_parts):
        parts = row[row > 0]
        if len(parts) and len(row):
            out[j] = np.bincount(parts).max() / len(row)
    return out


def activated_parts(
    maps: torch.Tensor, keypoints: list[np.ndarray], image_size: int, half_size: int, n_parts: int
) -> np.ndarray:
    """Which ground-truth parts fall inside the region a prototype activates on, per image.

    maps: (n, H, W) similarity maps of one prototype on n images; keypoints: per image a (q, 3) int array of
    (part id in 1..n_parts, y, x) in input pixels; the region is the square of half-width ``half_size`` around the
    maximum of the bicubically upsampled map. → (n, n_parts) uint8, column p-1 for part p.

    Reference: Huang et al., "Evaluation and Improvement of Interpretability for Self-Explainable Part-Prototype
    Networks", ICCV 2023 (EvalProtoPNet; their half size is 36 px at 224 px).
    """
    up = F.interpolate(
        maps[:, None].float(), size=(image_size, image_size), mode="bicubic", align_corners=False
    )[:, 0]
    arg = up.flatten(1).argmax(dim=1)
    cy, cx = (arg // image_size).numpy(), (arg % image_size).numpy()
    out = np.zeros((len(maps), n_parts), dtype=np.uint8)
    for i, points in enumerate(keypoints):
        if len(points) == 0:
            continue
        y0, y1 = max(0, cy[i] - half_size), min(image_size, cy[i] + half_size)
        x0, x1 = max(0, cx[i] - half_size), min(image_size, cx[i] + half_size)
        inside = (points[:, 1] >= y0) & (points[:, 1] < y1) & (points[:, 2] >= x0) & (points[:, 2] < x1)
        out[i, points[inside, 0] - 1] = 1
    return out


def consistency(proto_to_part: np.ndarray, part_visible: np.ndarray, threshold: float = 0.8) -> bool:
    """A prototype is consistent when one part is inside its activated region on at least ``threshold`` of the
    images (of its class) where that part is visible.

    proto_to_part: (n, P) uint8 from :func:`activated_parts`; part_visible: (n, P) uint8.
    Reference: Huang et al., ICCV 2023 (consistency score = share of consistent prototypes, μ = 0.8).
    """
    visible = part_visible.sum(axis=0)
    frequency = proto_to_part.sum(axis=0) / np.maximum(visible, 1)
    return bool((frequency >= threshold).any())


def stability(proto_to_part: np.ndarray, proto_to_part_noisy: np.ndarray) -> float:
    """Share of images on which the prototype's activated parts are unchanged under small input noise.

    Both (n, P). Reference: Huang et al., ICCV 2023 (stability score; noise N(0, 0.2) clipped to ±0.25 in the
    normalised input space).
    """
    if len(proto_to_part) == 0:
        return float("nan")
    same = np.abs(proto_to_part.astype(int) - proto_to_part_noisy.astype(int)).sum(axis=1) == 0
    return float(same.mean())


def perturb(
    images: torch.Tensor, std: torch.Tensor, generator: torch.Generator, sigma: float = 0.2, eps: float = 0.25
) -> torch.Tensor:
    """Huang et al.'s perturbation in the normalised space, expressed on [0, 1] images: x + clip(N(0, σ), ±ε)·std.

    images: (n, 3, S, S) float in [0, 1]; std: (1, 3, 1, 1) the member's normalisation std.
    """
    noise = torch.randn(images.shape, generator=generator).mul_(sigma).clamp_(-eps, eps)
    return images + noise * std


def duplicate_pairs(
    vectors: np.ndarray, sources: np.ndarray, tolerance: float
) -> list[tuple[int, int, str, float]]:
    """Pairs of prototypes of one member that share a source patch or lie within ``tolerance`` (squared L2).

    vectors: (m, D) float; sources: (m, 3) int (source image index, h, w). → [(i, j, reason, distance)], i < j.
    """
    v = torch.as_tensor(np.asarray(vectors), dtype=torch.float64)
    d = torch.cdist(v, v).pow(2).numpy()
    src = np.asarray(sources)
    same = (src[:, None, :] == src[None, :, :]).all(axis=-1)
    rows, cols = np.triu(same | (d <= tolerance), k=1).nonzero()
    return [
        (int(i), int(j), "same source patch" if same[i, j] else "within tolerance", float(d[i, j]))
        for i, j in zip(rows, cols, strict=True)
    ]
