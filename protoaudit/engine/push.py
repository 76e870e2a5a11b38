"""Prototype projection ("push", paper §2.2) and the paper's 95th-percentile visualisation box (§2.3).

Push is class-specific: prototype j of class k moves to the nearest latent patch among training images of
class k. It is one pass of the trunk over the un-augmented push set; an image is compared with its own class's
prototypes only (the others cannot move onto it), in one batched product per batch (no Python loop over
prototypes). The pass can hand every batch's latent patches to a consumer (the patch index keeps them, and
the last-layer stage reuses them instead of another pass).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from protoaudit.core.geometry import percentile_boxes
from protoaudit.core.model import ProtoPNet, similarity
from protoaudit.engine.data import ImageSplit, iter_batches
from protoaudit.engine.distributed import SINGLE, DistInfo, all_gather_rows, shard

BatchConsumer = Callable[[torch.Tensor, torch.Tensor], None]


@dataclass
class PushResult:
    """Where each prototype came from. m = number of prototypes; H × W the latent grid."""

    image_index: torch.Tensor  # (m,) int64 index into the push split
    h: torch.Tensor  # (m,) int64
    w: torch.Tensor  # (m,) int64
    distance: torch.Tensor  # (m,) float32 distance before projection (how far the prototype moved, squared)
    # (m, H, W) float32 similarity map over the source image, of the prototype as it was when found nearest
    # (as the original code draws it)
    activation_maps: torch.Tensor
    boxes: torch.Tensor  # (m, 4) int64 (y0, y1, x0, x1), end-exclusive, in input pixels

    def rows(
        self, split: ImageSplit, prototype_class: list[int], class_names: list[str]
    ) -> list[dict[str, object]]:
        """One row per prototype for ``prototypes.csv``."""
        out = []
        for j in range(len(self.image_index)):
            i = int(self.image_index[j])
            k = prototype_class[j]
            y0, y1, x0, x1 = (int(v) for v in self.boxes[j])
            out.append(
                {
                    "prototype": j,
                    "class": k,
                    "class_name": class_names[k],
                    "source_image": split.image_ids[i],
                    "source_index": i,
                    "label": int(split.labels[i]),
                    "h": int(self.h[j]),
                    "w": int(self.w[j]),
                    "distance": float(self.distance[j]),
                    "box_y0": y0,
                    "box_y1": y1,
                    "box_x0": x0,
                    "box_x1": x1,
                }
            )
        return out


def class_members(prototype_class: torch.Tensor, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, P) int64 prototypes of each class in index order (-1 pads classes with fewer than P), and (m,) each
    prototype's place in its class's row."""
    m = len(prototype_class)
    counts = torch.bincount(prototype_class, minlength=n_classes)
    order = torch.argsort(prototype_class, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty(m, dtype=torch.long, device=prototype_class.device)
    slot[order] = torch.arange(m, device=prototype_class.device) - starts[prototype_class[order]]
    width = max(int(counts.max()) if m else 0, 1)
    members = torch.full((n_classes, width), -1, dtype=torch.long, device=prototype_class.device)
    members[prototype_class, slot] = torch.arange(m, device=prototype_class.device)
    return members, slot


def own_class_distances(
    z: torch.Tensor, prototypes: torch.Tensor, p2: torch.Tensor, own: torch.Tensor, padded: torch.Tensor
) -> torch.Tensor:
    """(B, D, H, W) latents, each image's own-class prototypes ``own`` (B, P) → (B, P, H·W) squared distances
    ‖z‖² − 2 z·p + ‖p‖², clamped ≥ 0, as :func:`protoaudit.core.model.squared_distances` computes them;
    ``inf`` in the ``padded`` (B, P) places."""
    b, dim = z.shape[:2]
    dtype = torch.promote_types(prototypes.dtype, torch.float32)  # float64 stays float64
    flat = z.reshape(b, dim, -1).to(dtype)
    z2 = (flat * flat).sum(1, keepdim=True)  # (B, 1, H·W)
    d = torch.bmm(prototypes[own].to(dtype), flat).mul_(-2).add_(z2).add_(p2[own][:, :, None]).clamp_(min=0.0)
    return d.masked_fill_(padded[:, :, None], float("inf"))


@torch.no_grad()
def push_prototypes(
    model: ProtoPNet,
    split: ImageSplit,
    batch_size: int,
    device: torch.device,
    image_size: int,
    consumer: BatchConsumer | None = None,
    advance: Callable[[int], None] | None = None,
    workers: int = 0,
    dist: DistInfo = SINGLE,
) -> PushResult:
    """Project every prototype onto its nearest same-class latent training patch, in place.

    ``consumer(z, indices)`` receives each batch's latents (B, D, H, W) and split indices (B,).
    """
    model.eval()
    labels = torch.as_tensor(np.asarray(split.labels), dtype=torch.long)
    protos = model.prototype_vectors.detach()
    m = protos.shape[0]
    proto_class = model.prototype_class.to(device)
    members, slot = class_members(
        proto_class, max(model.n_classes, int(labels.max()) + 1 if len(labels) else 0)
    )
    members_safe = members.clamp(min=0)
    target = torch.where(members < 0, m, members)  # padding lands in a spare column, dropped
    best = torch.full((m,), float("inf"), device=device)
    best_vec = protos.clone()
    best_img = torch.full((m,), -1, dtype=torch.long, device=device)
    best_h = torch.zeros(m, dtype=torch.long, device=device)
    best_w = torch.zeros(m, dtype=torch.long, device=device)
    best_map: torch.Tensor | None = None  # (m, H, W): distances over the source image, for the box
    p2 = (protos * protos).sum(1).to(torch.promote_types(protos.dtype, torch.float32))
    order = shard(torch.arange(len(split)), dist)  # under torchrun each rank pushes over its share
    for indices, images in iter_batches(split, order, batch_size, workers, device.type == "cuda"):
        x = images.to(device, non_blocking=True)
        y = labels[indices].to(device)
        z = model.latent(x)
        if consumer is not None:
            consumer(z, indices)
        b, _, hh, ww = z.shape
        if best_map is None:
            best_map = torch.zeros(m, hh, ww, device=device)
        own = members[y]  # (B, P): each image's own-class prototypes, -1 where its class has fewer
        d = own_class_distances(z, protos, p2, members_safe[y], own < 0)  # (B, P, H·W)
        # each image's closest patch to each own-class prototype, then the closest image of each prototype
        per_image = torch.full((b, m + 1), float("inf"), dtype=d.dtype, device=device)
        per_image.scatter_(1, target[y], d.amin(dim=2))
        value, bi = per_image[:, :m].min(dim=0)  # (m,): the first (lowest) image among equals
        better = value < best
        if bool(better.any()):
            sel = better.nonzero().flatten()
            b_sel = bi[sel]
            maps = d[b_sel, slot[sel]]  # (n, H·W): the winning images' maps, where to find the patch
            hw = maps.argmin(dim=1)
            hi, wi = hw // ww, hw % ww
            best[sel] = value[sel]
            best_vec[sel] = z[b_sel, :, hi, wi]
            best_img[sel] = indices.to(device)[b_sel]
            best_h[sel], best_w[sel] = hi, wi
            best_map[sel] = maps.view(-1, hh, ww)
        if advance is not None:
            advance(len(indices))
    if dist.enabled:
        best, best_vec, best_img, best_h, best_w, best_map = _gather_best(
            dist, best, best_vec, best_img, best_h, best_w, best_map, device
        )
    missing = (best_img < 0).nonzero().flatten().tolist()
    if missing:
        classes = sorted({int(proto_class[j]) for j in missing})
        raise ValueError(
            f"push: no training image of class(es) {classes} to project prototypes {missing[:5]} onto"
        )
    assert best_map is not None
    model.prototype_vectors.data.copy_(best_vec)
    # as the original code: the map of the prototype as it was found nearest, over its source image
    maps = similarity(best_map)
    return PushResult(
        image_index=best_img.cpu(),
        h=best_h.cpu(),
        w=best_w.cpu(),
        distance=best.cpu(),
        activation_maps=maps.cpu(),
        boxes=percentile_boxes(maps.cpu(), image_size),
    )


def _gather_best(
    dist: DistInfo,
    best: torch.Tensor,
    vec: torch.Tensor,
    img: torch.Tensor,
    h: torch.Tensor,
    w: torch.Tensor,
    maps: torch.Tensor | None,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Each prototype's nearest same-class patch over all ranks: the ranks' winners compared, ties going to
    the lower image index (as a single process scanning images in order would choose)."""
    if maps is None:
        raise ValueError("push: a rank received no images (fewer push images than processes)")
    m = len(best)
    gathered = [torch.stack(all_gather_rows(t.cpu(), dist)) for t in (best, vec, img, h, w, maps)]
    dists, _, imgs, *_ = gathered  # each (world, m, ...)
    key = torch.where(imgs >= 0, dists.double(), torch.inf)
    order = torch.argsort(imgs, dim=0, stable=True)  # lower image index first among equal distances
    choice = order.gather(0, torch.argmin(key.gather(0, order), dim=0, keepdim=True))[0]
    rows = torch.arange(m)
    return tuple(t[choice, rows].to(device) for t in gathered)  # type: ignore[return-value]
