"""A faithfulness check of the paper's visualisation: deletion curves of a prototype's similarity.

The paper's box (§2.3) shows where the bicubically upsampled similarity map is high. Whether those pixels cause
the similarity is a separate question (Xu-Darme et al. 2023). The deletion check (Petsiuk et al. 2018, applied
to a prototype's score) answers it on a sample: occlude the image's pixels in the order of the upsampled map,
most activated first, and watch the prototype's score fall; compare with random pixel orders.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from protoaudit.core.model import ProtoPNet, similarity


@dataclass
class DeletionCurves:
    """n images (each with the prototype to score), T + 1 steps, R random orders."""

    fractions: np.ndarray  # (T + 1,) float64, deleted fraction of pixels, 0 … 1
    activation: np.ndarray  # (n, T + 1) float64 similarity, pixels deleted most-activated first
    random: np.ndarray  # (n, R, T + 1) float64 similarity, pixels deleted in random orders

    def normalised(self) -> tuple[np.ndarray, np.ndarray]:
        """Curves divided by the intact image's score: ((n, T + 1), (n, T + 1) mean over random orders)."""
        base = self.activation[:, :1]
        base = np.where(np.abs(base) > 0, base, 1.0)
        return self.activation / base, self.random.mean(axis=1) / base


def trapezoid_auc(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Area under y (…, T + 1) over x (T + 1,) by the trapezoid rule → (…,)."""
    return ((y[..., 1:] + y[..., :-1]) * 0.5 * np.diff(x)).sum(axis=-1)


def upsampled_maps(model: ProtoPNet, images: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Similarity map of prototype ``prototypes[i]`` on image i, upsampled to the image as push does.

    images: (n, 3, S, S) float32 in [0, 1]; prototypes: (n,) int64 → (n, S, S) float32."""
    vectors = model.prototype_vectors[prototypes]  # (n, D)
    z = model.latent(images)  # (n, D, H, W)
    maps = similarity(((z - vectors[:, :, None, None]) ** 2).sum(dim=1))  # (n, H, W)
    size = images.shape[-1]
    return F.interpolate(maps[:, None], size=(size, size), mode="bicubic", align_corners=False)[:, 0]


@torch.no_grad()
def deletion_curves(
    model: ProtoPNet,
    images: torch.Tensor,
    prototypes: torch.Tensor,
    steps: int = 20,
    random_orders: int = 3,
    seed: int = 0,
    batch_size: int = 128,
) -> DeletionCurves:
    """Deletion curves of each prototype's score on its image, in activation order and in random orders.

    images: (n, 3, S, S) float32 in [0, 1]; prototypes: (n,) int64. Occluded pixels take the image's
    per-channel mean. The score is the prototype's largest similarity over all patches of the occluded image.
    The model and images may sit on any device; the pixel orders are drawn on the CPU, so the curves do not
    depend on it.
    """
    model.eval()
    n, _, size, _ = images.shape
    pixels = size * size
    fractions = np.linspace(0.0, 1.0, steps + 1)
    counts = torch.as_tensor(np.rint(fractions * pixels), dtype=torch.long)  # (T + 1,)
    up = upsampled_maps(model, images, prototypes).flatten(1).cpu()  # (n, S·S)
    generator = torch.Generator().manual_seed(seed)
    # rank of each pixel in each order: 0 = deleted first; order 0 is the activation order
    orders = [torch.argsort(-up, dim=1, stable=True)]
    orders += [torch.argsort(torch.rand(n, pixels, generator=generator), dim=1) for _ in range(random_orders)]
    ranks = torch.empty(n, 1 + random_orders, pixels, dtype=torch.long)
    positions = torch.arange(pixels).expand(n, pixels)
    for r, order in enumerate(orders):
        ranks[:, r].scatter_(1, order, positions)
    deleted = ranks[:, :, None, :] < counts[None, None, :, None]  # (n, 1 + R, T + 1, S·S) bool
    fill = images.mean(dim=(2, 3))  # (n, 3)
    vectors = model.prototype_vectors[prototypes.to(images.device)]  # (n, D)
    total = n * (1 + random_orders) * (steps + 1)
    flat_deleted = deleted.reshape(total, size, size)
    owner = torch.arange(n).repeat_interleave((1 + random_orders) * (steps + 1))  # (total,)
    scores = torch.empty(total)
    for start in range(0, total, batch_size):
        idx = owner[start : start + batch_size]
        mask = flat_deleted[start : start + batch_size, None].to(images.device, images.dtype)  # (B, 1, S, S)
        x = images[idx] * (1 - mask) + fill[idx][:, :, None, None] * mask
        z = model.latent(x)
        d = ((z - vectors[idx][:, :, None, None]) ** 2).sum(dim=1).flatten(1).amin(dim=1)
        scores[start : start + batch_size] = similarity(d).cpu()
    scores_np = scores.reshape(n, 1 + random_orders, steps + 1).double().numpy()
    return DeletionCurves(fractions, scores_np[:, 0], scores_np[:, 1:])
