"""Uncertainty, calibration, per-class scores and compactness against cases whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from protoaudit.core.stats import (
    bootstrap_interval,
    bootstrap_means,
    compactness,
    confusion,
    ensemble_compactness,
    expected_calibration_error,
    local_sizes,
    mcnemar_exact,
    paired_bootstrap_difference,
    per_class_scores,
    prediction_changes,
    softmax,
)


def test_bootstrap_interval_covers_the_true_accuracy_at_the_stated_rate() -> None:
    """A synthetic classifier right with probability 0.8 on each of 200 test images: over 400 independent
    test sets, the 95 % interval contains 0.8 in about 95 % of them."""
    rng = np.random.default_rng(123)
    true_top1, n, draws = 0.8, 200, 400
    covered = 0
    for d in range(draws):
        correct = rng.random(n) < true_top1
        iv = bootstrap_interval(correct, level=0.95, n_resamples=400, seed=d)
        assert iv.low <= iv.estimate <= iv.high
        covered += iv.low <= true_top1 <= iv.high
    rate = covered / draws
    # binomial s.d. of the rate over 400 draws ≈ 0.011; the percentile interval runs slightly short at n = 200
    assert 0.91 <= rate <= 0.985, rate


def test_a_narrower_level_gives_a_narrower_interval_and_the_seed_fixes_the_resamples() -> None:
    correct = np.random.default_rng(0).random(300) < 0.7
    wide, narrow = bootstrap_interval(correct, 0.95), bootstrap_interval(correct, 0.5)
    assert wide.low < narrow.low < narrow.high < wide.high
    assert bootstrap_interval(correct, seed=5) == bootstrap_interval(correct, seed=5)
    # resamples are the same images for two models with the same seed: bootstrap_means of both columns at
    # once equals each alone
    other = np.random.default_rng(1).random(300) < 0.6
    both = bootstrap_means(np.stack([correct, other], 1), 300, seed=2)
    np.testing.assert_allclose(both[:, 1], bootstrap_means(other, 300, seed=2))


def test_paired_difference_of_identical_models_is_exactly_zero_and_of_a_better_one_excludes_zero() -> None:
    rng = np.random.default_rng(4)
    a = rng.random(500) < 0.7
    same = paired_bootstrap_difference(a, a.copy())
    assert same.estimate == same.low == same.high == 0.0
    better = a | (rng.random(500) < 0.5)  # right wherever a is, and on about half of the rest
    diff = paired_bootstrap_difference(better, a)
    assert diff.low > 0
    assert diff.estimate == pytest.approx(better.mean() - a.mean())


def test_mcnemar_exact_p_value_equals_a_hand_computation() -> None:
    # 10 images only model a gets right, 3 only model b gets right, 37 both or neither
    a = np.array([True] * 10 + [False] * 3 + [True] * 20 + [False] * 17)
    b = np.array([False] * 10 + [True] * 3 + [True] * 20 + [False] * 17)
    res = mcnemar_exact(a, b)
    assert (res["a_only"], res["b_only"], res["n"]) == (10, 3, 50)
    # two-sided exact: 2 · P[Bin(13, 1/2) ≤ 3] = 2 · (1 + 13 + 78 + 286) / 8192 = 756 / 8192
    assert res["p_value"] == pytest.approx(756 / 8192, rel=1e-12)
    assert mcnemar_exact(b, a)["p_value"] == pytest.approx(756 / 8192, rel=1e-12)
    # balanced discordance caps at 1; no discordant image gives 1
    assert mcnemar_exact(a[:26], np.r_[b[:13], a[13:26]])["p_value"] <= 1.0
    assert mcnemar_exact(a, a)["p_value"] == 1.0
    tie = mcnemar_exact(np.array([True, False]), np.array([False, True]))
    assert tie["p_value"] == 1.0  # 2 · P[Bin(2, 1/2) ≤ 1] = 1.5, capped
    assert math.comb(13, 3) == 286


def _probabilities(confidence: np.ndarray, predicted: np.ndarray, k: int) -> np.ndarray:
    """Rows with ``confidence`` on ``predicted`` and the rest spread evenly over the other classes."""
    p = np.repeat(((1 - confidence) / (k - 1))[:, None], k, axis=1)
    p[np.arange(len(p)), predicted] = confidence
    return p


def test_ece_of_a_perfectly_calibrated_predictor_is_zero() -> None:
    """Exactly calibrated by construction: in every bin, the share of right predictions equals the mean
    confidence of the bin (all confidences of a bin equal, k of n images right with k / n = confidence)."""
    k, confidences = 4, [0.3, 0.5, 0.6, 0.75, 0.9, 1.0]
    conf, pred, labels = [], [], []
    for c in confidences:
        n_right = round(c * 20)
        conf += [c] * 20
        pred += [0] * 20
        labels += [0] * n_right + [1] * (20 - n_right)
    res = expected_calibration_error(_probabilities(np.array(conf), np.array(pred), k), np.array(labels))
    assert res["ece"] == pytest.approx(0.0, abs=1e-12)
    assert sum(res["count"]) == len(labels)
    assert len(res["edges"]) == 16


def test_ece_of_a_sampled_calibrated_predictor_is_near_zero_and_an_overconfident_one_is_its_gap() -> None:
    rng = np.random.default_rng(7)
    n, k = 50_000, 3
    conf = rng.uniform(1 / k, 1.0, n)
    pred = rng.integers(0, k, n)
    right = rng.random(n) < conf  # right with probability equal to the stated confidence
    labels = np.where(right, pred, (pred + 1) % k)
    assert expected_calibration_error(_probabilities(conf, pred, k), labels)["ece"] < 0.01
    # always 90 % sure, right on 60 % of the images: ECE = |0.6 − 0.9| = 0.3, all in the bin (0.867, 0.933]
    n2 = 1000
    labels2 = np.where(np.arange(n2) < 600, 0, 1)
    res = expected_calibration_error(_probabilities(np.full(n2, 0.9), np.zeros(n2, int), k), labels2)
    assert res["ece"] == pytest.approx(0.3, abs=1e-12)
    assert res["count"][13] == n2
    assert res["accuracy"][13] == pytest.approx(0.6)
    assert res["accuracy"][0] is None
    assert res["confidence"][0] is None


def test_ece_when_every_prediction_is_right() -> None:
    p = _probabilities(np.array([0.8, 0.8, 0.95]), np.array([1, 1, 2]), 3)
    res = expected_calibration_error(p, np.array([1, 1, 2]))
    assert res["ece"] == pytest.approx((2 * 0.2 + 0.05) / 3)


def test_softmax_rows_sum_to_one() -> None:
    p = softmax(np.array([[1000.0, 0.0], [0.0, 0.0]]))
    np.testing.assert_allclose(p, [[1.0, 0.0], [0.5, 0.5]])


def test_per_class_scores_and_confusion_on_a_known_case() -> None:
    labels = np.array([0, 0, 0, 1, 1, 2])
    preds = np.array([0, 0, 1, 1, 0, 1])
    cm = confusion(labels, preds, 3)
    np.testing.assert_array_equal(cm, [[2, 1, 0], [1, 1, 0], [0, 1, 0]])
    s = per_class_scores(labels, preds, 3)
    assert s["precision"] == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert s["recall"] == pytest.approx([2 / 3, 1 / 2, 0.0])
    assert s["f1"][1] == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    assert s["support"] == [3, 2, 1]
    assert "sensitivity" not in s


def test_confusion_equals_sklearns_and_refuses_labels_out_of_range() -> None:
    from sklearn.metrics import confusion_matrix

    rng = np.random.default_rng(0)
    labels, preds = rng.integers(0, 7, 500), rng.integers(0, 7, 500)
    preds[labels == 6] = 2  # class 6 never predicted: a zero column
    expected = confusion_matrix(labels, preds, labels=list(range(9)))  # two classes absent: zero rows
    np.testing.assert_array_equal(confusion(labels, preds, 9), expected)
    assert confusion(labels, preds, 9).dtype == np.int64
    assert confusion(np.zeros(0, int), np.zeros(0, int), 3).tolist() == [[0] * 3] * 3
    with pytest.raises(ValueError, match="lie in"):
        confusion(labels, preds, 6)


def test_two_classes_give_sensitivity_and_specificity() -> None:
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0])
    preds = np.array([1, 1, 1, 0, 0, 0, 0, 1, 1])
    s = per_class_scores(labels, preds, 2)
    assert s["sensitivity"] == pytest.approx(3 / 4)  # true positives / positives
    assert s["specificity"] == pytest.approx(3 / 5)  # true negatives / negatives


def test_compactness_counts_weights_and_contributions_above_the_tolerance() -> None:
    # 2 classes, 4 prototypes (0, 1 of class 0; 2, 3 of class 1)
    off = np.array([[False, False, True, True], [True, True, False, False]])
    w = np.array([[1.0, 0.5, 0.0, 0.0005], [0.0, -0.2, 2.0, 0.0]])
    s = np.array([[1.0, 1.0, 1.0, 1.0], [0.001, 2.0, 0.1, 3.0]])
    pred = np.array([0, 1])
    c = compactness(w, s, pred, off)
    assert c["sparsity"] == pytest.approx(4 / 8)  # 0, 0.0005, 0, 0 are zero at 1e-3
    assert c["off_class_sparsity"] == pytest.approx(3 / 4)  # only −0.2 survives off-class
    assert c["global_size"] == 3  # prototype 3's weights are all ≤ 1e-3
    # image 0 → class 0: contributions 1, 0.5 (prototypes 0, 1); image 1 → class 1: −0.4, 0.2 (1, 2)
    np.testing.assert_array_equal(local_sizes(w, s, pred), [2, 2])
    assert c["local_size"] == 2.0
    # any class: image 0 uses 0, 1, 2; image 1: 1 (0.5·2), 2 (2·0.1) — prototype 0's 0.001 is at the
    # tolerance, and prototype 3's 3·0.0005 does not count: its weight is zero
    assert c["local_size_all_classes"] == pytest.approx(2.5)


def test_ensemble_compactness_is_the_members_side_by_side() -> None:
    rng = np.random.default_rng(0)
    w1, w2 = rng.normal(size=(3, 6)), rng.normal(size=(3, 9))
    w1[np.abs(w1) < 0.8] = 0
    s1, s2 = rng.random((20, 6)), rng.random((20, 9))
    pred = (s1 @ w1.T + s2 @ w2.T).argmax(1)
    e = ensemble_compactness([w1, w2], [s1, s2], pred)
    assert (
        e["global_size"]
        == compactness(w1, s1, pred)["global_size"] + compactness(w2, s2, pred)["global_size"]
    )
    total = local_sizes(w1, s1, pred) + local_sizes(w2, s2, pred)
    assert e["local_size"] == pytest.approx(total.mean())
    assert e["n_weights"] == 3 * 15


def test_prediction_changes_counts_flips_both_ways() -> None:
    labels = np.array([0, 1, 2, 0])
    eye = np.eye(3)
    before = eye[[0, 1, 0, 1]]  # right, right, wrong, wrong
    after = eye[[0, 2, 2, 1]]  # right, wrong, right, wrong (unchanged)
    c = prediction_changes(before, after, labels)
    assert c["changed"] == pytest.approx(2 / 4)
    assert c["correct_to_wrong"] == pytest.approx(1 / 2)
    assert c["wrong_to_correct"] == pytest.approx(1 / 2)
    assert (c["top1_before"], c["top1_after"]) == (0.5, 0.5)
    assert prediction_changes(eye[[0]], eye[[0]], np.array([0]))["wrong_to_correct"] is None


def test_confusion_rows_are_true_classes_columns_predictions() -> None:
    labels = np.array([0, 0, 1, 2, 2, 2])
    preds = np.array([0, 1, 1, 2, 0, 2])
    expected = np.array([[1, 1, 0], [0, 1, 0], [1, 0, 2]])
    np.testing.assert_array_equal(confusion(labels, preds, 3), expected)
    assert confusion(labels, preds, 4).shape == (4, 4)  # a class never seen still has its row and column
