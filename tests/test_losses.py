"""Cluster and separation costs and the off-class L1 term against brute force (paper §2.2)."""

from __future__ import annotations

import torch

from protoaudit.core.losses import cluster_cost, off_class_l1, protopnet_loss, separation_cost


def _case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    prototype_class = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    identity = torch.nn.functional.one_hot(prototype_class, 3).float()  # (m, K)
    min_distances = torch.rand(5, 7, generator=gen) * 4
    labels = torch.tensor([0, 2, 1, 1, 0])
    return min_distances, labels, identity


def test_cluster_cost_equals_brute_force() -> None:
    d, y, identity = _case()
    own = identity.argmax(1)
    expected = sum(min(float(d[i, j]) for j in range(7) if own[j] == y[i]) for i in range(5)) / 5
    assert float(cluster_cost(d, y, identity)) == torch.tensor(expected).item()


def test_separation_cost_equals_brute_force() -> None:
    d, y, identity = _case()
    own = identity.argmax(1)
    expected = sum(min(float(d[i, j]) for j in range(7) if own[j] != y[i]) for i in range(5)) / 5
    assert abs(float(separation_cost(d, y, identity)) - expected) < 1e-6


def test_off_class_l1_ignores_own_class_weights() -> None:
    _, _, identity = _case()
    weight = torch.full((3, 7), -2.0)
    weight[identity.t().bool()] = 100.0  # own-class connections do not count
    assert float(off_class_l1(weight, identity)) == 2.0 * (3 * 7 - 7)


def test_total_uses_the_coefficients() -> None:
    d, y, identity = _case()
    logits = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    weight = torch.randn(3, 7, generator=torch.Generator().manual_seed(1))
    coefs = {"cross_entropy": 1.0, "cluster": 0.8, "separation": -0.08, "l1": 1e-4}
    terms = protopnet_loss(logits, d, y, identity, weight, coefs)
    expected = terms.cross_entropy + 0.8 * terms.cluster - 0.08 * terms.separation + 1e-4 * terms.l1
    torch.testing.assert_close(terms.total, expected)
    assert float(terms.cross_entropy) == float(torch.nn.functional.cross_entropy(logits, y))
