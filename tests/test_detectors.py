"""Detectors of bad prototypes on constructed cases whose answer is known, and their scores."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import kruskal
from sklearn.metrics import roc_auc_score

from protoaudit.core.detectors import (
    CLASS_INFORMATION_MIN,
    auc,
    class_information,
    class_information_flags,
    detection_scores,
    either_flags,
    knn_purity_flags,
    shift_sensitivity,
    shift_sensitivity_flags,
)

K = 4
PER_CLASS = 30


def _labels(per_class: int = PER_CLASS) -> np.ndarray:
    return np.repeat(np.arange(K), per_class)


def _similarities(labels: np.ndarray, rng: np.random.Generator, marker_on: np.ndarray) -> np.ndarray:
    """(n, 4) similarities of four prototypes of class 0 on images with the given labels:
    0 on a part that classes 0 and 1 have (present in 80 % of their images), 1 on the background (class-blind),
    2 on a distractor in every image (constant up to noise), 3 on a marker present where ``marker_on``."""
    n = len(labels)
    part = np.isin(labels, [0, 1]) & (rng.random(n) < 0.8)
    s = np.empty((n, 4))
    s[:, 0] = np.where(part, 3.0, 0.5) + rng.normal(0, 0.2, n)
    s[:, 1] = 1.0 + rng.normal(0, 0.3, n)
    s[:, 2] = 2.0 + rng.normal(0, 0.01, n)
    s[:, 3] = np.where(marker_on, 3.0, 0.4) + rng.normal(0, 0.2, n)
    return s


def test_knn_purity_flags_equal_a_brute_force_count_of_the_nearest_images() -> None:
    """Latent patches of 40 images, 6 prototypes: the 6 nearest images, each through its closest patch, counted
    by hand in loops, against the rule applied to neighbour labels found by sorting."""
    rng = np.random.default_rng(0)
    n_images, patches, dim, m = 40, 9, 5, 6
    latents = rng.random((n_images, patches, dim))
    labels = rng.integers(0, 3, n_images)
    prototypes = rng.random((m, dim))
    prototype_class = np.array([0, 0, 1, 1, 2, 2])
    d = ((latents[:, :, None, :] - prototypes[None, None]) ** 2).sum(-1).min(axis=1)  # (n_images, m)
    order = np.argsort(d, axis=0, kind="stable")[:6].T  # (m, 6)
    flags = knn_purity_flags(labels[order], prototype_class, threshold=3)
    for j in range(m):
        remaining = list(range(n_images))
        own = 0
        for _ in range(6):
            best = min(
                remaining,
                key=lambda i: min(
                    sum((a - b) ** 2 for a, b in zip(p, prototypes[j], strict=True)) for p in latents[i]
                ),
            )
            remaining.remove(best)
            own += int(labels[best] == prototype_class[j])
        assert flags[j] == (own < 3), j
    assert knn_purity_flags(
        np.array([[0, 0, 0, 1, 1, 1], [1, 1, 0, 0, 1, -1]]), np.array([0, 0])
    ).tolist() == [
        False,
        True,
    ]


def test_class_information_equals_kruskal_wallis_effect_size() -> None:
    rng = np.random.default_rng(1)
    labels = _labels()
    s = _similarities(labels, rng, marker_on=np.zeros(len(labels), bool))
    s[:5, 1] = s[5, 1]  # ties
    info = class_information(s, labels)
    n, g = len(labels), K
    for j in range(2):
        h = kruskal(*(s[labels == c, j] for c in range(K))).statistic
        assert info[j] == pytest.approx((h - g + 1) / (n - g))
    assert info[2] < 0.05
    const = np.ones((n, 1))
    assert class_information(const, labels).tolist() == [0.0]
    assert np.isnan(class_information(s[:3], np.zeros(3, int))).all()


def test_class_information_keeps_a_shared_pool_part_and_flags_background_and_distractors() -> None:
    rng = np.random.default_rng(2)
    labels = _labels()
    marker = labels == 0  # the marker goes with class 0 in the training distribution
    s = _similarities(labels, rng, marker)
    info = class_information(s, labels)
    flags = class_information_flags(s, labels)
    # the part (two classes of four) and the marker carry class information
    assert min(info[0], info[3]) > 0.3
    assert max(info[1], info[2]) < CLASS_INFORMATION_MIN
    assert flags.tolist() == [False, True, True, False]


def test_shift_sensitivity_flags_the_shortcut_and_keeps_parts_and_background() -> None:
    rng = np.random.default_rng(3)
    labels = _labels()
    reference = _similarities(labels, rng, marker_on=labels == 0)
    # shifted split: the marker leaves class 0 and appears on half of the other classes' images
    shifted = _similarities(labels, rng, marker_on=(labels != 0) & (rng.random(len(labels)) < 0.5))
    cls = np.zeros(4, dtype=int)
    score = shift_sensitivity(reference, labels, shifted, labels, cls)
    assert score[3] > 0.95
    assert all(abs(score[j] - 0.5) < 0.25 for j in range(3))
    assert shift_sensitivity_flags(reference, labels, shifted, labels, cls).tolist() == [
        False,
        False,
        False,
        True,
    ]
    # a class absent from the shifted split: undefined, never flagged
    absent = shift_sensitivity_flags(reference, labels, shifted[labels != 0], labels[labels != 0], cls)
    assert absent.tolist() == [False] * 4
    # the union with class information flags every bad prototype and keeps the part
    info_flags = class_information_flags(reference, labels)
    union = either_flags(info_flags, shift_sensitivity_flags(reference, labels, shifted, labels, cls))
    assert union.tolist() == [False, True, True, True]


def test_auc_equals_sklearn() -> None:
    rng = np.random.default_rng(4)
    a, b = rng.normal(1, 1, 17).round(1), rng.normal(0, 1, 23).round(1)  # rounding makes ties
    expected = roc_auc_score(np.r_[np.ones(17), np.zeros(23)], np.r_[a, b])
    assert auc(a, b) == pytest.approx(expected)
    assert np.isnan(auc(a, np.array([])))


def test_detection_scores_count_by_hand_and_leave_unknown_kinds_out() -> None:
    flags = np.array([True, True, False, True, False, True, False])
    kinds = [
        "background",
        "discriminative",
        "shared",
        "shortcut",
        "discriminative",
        None,
        "no part annotated",
    ]
    out = detection_scores(flags, kinds)
    # labelled: 0..4; positives 0, 2, 3; flagged among labelled 0, 1, 3 → hits 0, 3
    assert out == {
        "precision": 2 / 3,
        "recall": 2 / 3,
        "f1": pytest.approx(2 / 3),
        "n_positive": 3,
        "n_flagged": 3,
        "n_labelled": 5,
        "n_unknown": 2,
    }
    only_background = detection_scores(flags, kinds, positive=("background",))
    assert (only_background["precision"], only_background["recall"]) == (1 / 3, 1.0)
    none = detection_scores(np.zeros(2, bool), ["discriminative", "unknown"])
    assert (none["precision"], none["recall"], none["f1"]) == (None, None, None)
    missed = detection_scores(np.array([True, False]), ["discriminative", "shared"])
    assert (missed["precision"], missed["recall"], missed["f1"]) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="one entry per prototype"):
        detection_scores(np.zeros(3, bool), ["shared"])
    with pytest.raises(ValueError, match="not among"):
        detection_scores(np.zeros(1, bool), ["shared"], positive=("clutter",))
