"""Audit metrics on hand-built cases (each expected value counted by hand)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from protoaudit.core.purity import (
    activated_parts,
    consistency,
    duplicate_pairs,
    knn_class_purity,
    part_purity,
    precision_recall,
    prune_decision,
    stability,
)


def test_knn_class_purity_counts_own_class_neighbours() -> None:
    neighbours = np.array([[0, 0, 1, 2, 0, 0], [1, 2, 2, 2, 0, -1], [2, 2, 2, 2, 2, 2]])
    classes = np.array([0, 1, 1])
    assert knn_class_purity(neighbours, classes).tolist() == [4, 1, 0]
    assert prune_decision(np.array([4, 1, 0, 3]), 3).tolist() == [False, True, True, False]


def test_precision_recall() -> None:
    pruned = np.array([True, True, False, False, True])
    bad = np.array([True, False, False, True, True])
    assert precision_recall(pruned, bad) == (2 / 3, 2 / 3)
    assert precision_recall(np.zeros(3, bool), np.ones(3, bool)) == (None, 0.0)


def test_part_purity_ignores_background_and_unknown() -> None:
    top = np.array([[3, 3, 3, 5, 0, 0, 3, 3, 3, 3], [0] * 10, [4, -1, 4, 4, 4, 4, 4, 4, 4, 4]])
    assert part_purity(top).tolist() == [0.7, 0.0, 0.9]


def test_activated_parts_uses_the_region_around_the_map_maximum() -> None:
    maps = torch.zeros(2, 4, 4)
    maps[0, 0, 0] = 1.0  # maximum in the top-left corner
    maps[1, 3, 3] = 1.0  # bottom-right
    points = [np.array([[1, 2, 2], [2, 30, 30]]), np.array([[1, 2, 2], [2, 30, 30]])]
    parts = activated_parts(maps, points, 32, 6, 3)
    assert parts.tolist() == [[1, 0, 0], [0, 1, 0]]


def test_consistency_and_stability() -> None:
    # part 1 inside the region on 4 of 5 images where it is visible: 0.8 ≥ μ → consistent
    a = np.array([[1, 0], [1, 0], [1, 1], [1, 0], [0, 1]], dtype=np.uint8)
    visible = np.ones((5, 2), dtype=np.uint8)
    assert consistency(a, visible, 0.8)
    assert not consistency(a, visible, 0.81)
    noisy = a.copy()
    noisy[2] = [1, 0]
    assert stability(a, noisy) == 0.8


def test_duplicate_pairs() -> None:
    vectors = np.array([[0.0, 0.0], [0.0, 0.001], [1.0, 1.0], [5.0, 5.0]])
    sources = np.array([[0, 1, 1], [1, 0, 0], [2, 2, 2], [2, 2, 2]])
    pairs = duplicate_pairs(vectors, sources, tolerance=1e-5)
    assert [(i, j, reason) for i, j, reason, _ in pairs] == [
        (0, 1, "within tolerance"),
        (2, 3, "same source patch"),
    ]
    assert pairs[0][3] == pytest.approx(1e-6)
