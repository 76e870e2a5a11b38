"""The ProtoPNet objective (paper §2.2): cross-entropy, cluster cost, separation cost, L1 on h.

All functions are pure tensor functions. ``min_distances`` is (N, m) float: for each image the smallest
squared L2 distance from each prototype to any of its latent patches; ``class_identity`` is (m, K), one-hot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def cluster_cost(
    min_distances: torch.Tensor, labels: torch.Tensor, class_identity: torch.Tensor
) -> torch.Tensor:
    """Clst = mean over images of the smallest distance to a prototype of the image's own class. Scalar."""
    own = class_identity[:, labels].t().bool()  # (N, m)
    return min_distances.masked_fill(~own, float("inf")).amin(dim=1).mean()


def separation_cost(
    min_distances: torch.Tensor, labels: torch.Tensor, class_identity: torch.Tensor
) -> torch.Tensor:
    """Mean over images of the smallest distance to a prototype of another class. Scalar.

    This is the original code's ``separation_cost`` (a positive distance); the paper's Sep is its negative,
    which is why its recipe coefficient is −0.08.
    """
    own = class_identity[:, labels].t().bool()
    return min_distances.masked_fill(own, float("inf")).amin(dim=1).mean()


def off_class_l1(last_layer_weight: torch.Tensor, class_identity: torch.Tensor) -> torch.Tensor:
    """Σ |w_h(k, j)| over the connections between prototype j and a class k it does not belong to. Scalar."""
    return (last_layer_weight * (1 - class_identity.t())).abs().sum()


@dataclass(frozen=True)
class LossTerms:
    total: torch.Tensor
    cross_entropy: torch.Tensor
    cluster: torch.Tensor
    separation: torch.Tensor
    l1: torch.Tensor


def protopnet_loss(
    logits: torch.Tensor,
    min_distances: torch.Tensor,
    labels: torch.Tensor,
    class_identity: torch.Tensor,
    last_layer_weight: torch.Tensor,
    coefs: dict[str, float],
) -> LossTerms:
    """``coefs`` has keys cross_entropy, cluster, separation, l1 (defaults 1, 0.8, −0.08, 1e-4)."""
    ce = F.cross_entropy(logits, labels)
    clst = cluster_cost(min_distances, labels, class_identity)
    sep = separation_cost(min_distances, labels, class_identity)
    l1 = off_class_l1(last_layer_weight, class_identity)
    total = (
        coefs["cross_entropy"] * ce + coefs["cluster"] * clst + coefs["separation"] * sep + coefs["l1"] * l1
    )
    return LossTerms(total, ce, clst, sep, l1)
