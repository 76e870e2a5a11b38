"""Uncertainty, calibration, per-class scores and compactness of a classifier's test predictions.

Pure functions over arrays: ``correct`` (N,) bool (prediction == label per test image), ``probabilities``
(N, K) float (softmax of the logits), ``labels`` / ``predictions`` (N,) int64 in [0, K), ``weight`` (K, m) the
last layer h, ``similarities`` (N, m) the prototype similarities of the test images.

Every figure here is a number a reviewer can check: a top-1 with its 95 % interval, a paired test between two
models evaluated on the same images, the calibration error of the confidences, and how many prototypes a
decision actually uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

BOOTSTRAP_RESAMPLES = 2000
ZERO_WEIGHT = 1e-3  # |w| at or below this counts as 0 (PIP-Net's tolerance)


# --- uncertainty -----------------------------------------------------------------------------------------


def bootstrap_means(
    values: np.ndarray, n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0, chunk: int = 250
) -> np.ndarray:
    """Means of ``values`` over bootstrap resamples of its N rows (images drawn with replacement).

    Args:
        values: (N,) or (N, M) float or bool, one row per image (M models evaluated on the same images).
        n_resamples: B, the number of resamples.
        seed: the resamples depend only on (seed, N, B): two calls with the same seed and the same number of
            images draw the same images, so their results are paired.

    Returns:
        (B,) or (B, M) float64: the mean of each column on each resample.

    References:
        Efron & Tibshirani, "An Introduction to the Bootstrap", Chapman & Hall 1993, ch. 6 and 13.
    """
    arr = np.asarray(values, dtype=np.float64)
    n = len(arr)
    if n == 0:
        raise ValueError("bootstrap of an empty set of images")
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, n_resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_resamples - start), n))
        out.append(arr[idx].mean(axis=1))
    return np.concatenate(out)


@dataclass(frozen=True)
class Interval:
    """A point estimate with its percentile bootstrap interval at ``level``."""

    estimate: float
    low: float
    high: float
    level: float

    def as_dict(self) -> dict[str, float]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "level": self.level}


def bootstrap_interval(
    correct: np.ndarray, level: float = 0.95, n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> Interval:
    """Top-1 (share of ``correct``) with its percentile bootstrap interval.

    Args:
        correct: (N,) bool, whether the model's prediction on each test image is right.
        level: the interval's coverage (0.95: the 2.5th and 97.5th percentiles of the resampled top-1).

    References:
        Efron & Tibshirani, "An Introduction to the Bootstrap", Chapman & Hall 1993, §13.3 (percentile
        interval).
    """
    c = np.asarray(correct, dtype=np.float64)
    means = bootstrap_means(c, n_resamples, seed)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return Interval(float(c.mean()), float(low), float(high), level)


def paired_bootstrap_difference(
    correct_a: np.ndarray,
    correct_b: np.ndarray,
    level: float = 0.95,
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> Interval:
    """top-1(a) − top-1(b) on the same test images, with a percentile interval over paired resamples
    (each resample draws images, and both models are scored on the drawn images).

    Args:
        correct_a, correct_b: (N,) bool, the two models' correctness on the same N images in the same order.

    References:
        Efron & Tibshirani, "An Introduction to the Bootstrap", Chapman & Hall 1993, §13.3.
    """
    a = np.asarray(correct_a, dtype=np.float64)
    b = np.asarray(correct_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired difference needs the same images: {a.shape} vs {b.shape}")
    diffs = bootstrap_means(a - b, n_resamples, seed)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(diffs, [alpha, 1.0 - alpha])
    return Interval(float(a.mean() - b.mean()), float(low), float(high), level)


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> dict[str, float | int]:
    """Exact two-sided McNemar test of two classifiers on the same test images.

    Only the discordant images count: b = a right and b wrong, c = a wrong and b right. Under the null
    hypothesis (both models equally accurate) each discordant image is a fair coin, so
    p = min(1, 2 · P[Binomial(b + c, 1/2) ≤ min(b, c)]); p = 1 when there is no discordant image.

    Args:
        correct_a, correct_b: (N,) bool on the same images in the same order.

    Returns:
        ``{"a_only": b, "b_only": c, "n": N, "p_value": p}``.

    References:
        McNemar, "Note on the sampling error of the difference between correlated proportions or
        percentages", Psychometrika 1947.
        Dietterich, "Approximate Statistical Tests for Comparing Supervised Classification Learning
        Algorithms", Neural Computation 1998.
    """
    from scipy.stats import binom  # imported here: scipy and sklearn take seconds to load

    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"McNemar needs the same images: {a.shape} vs {b.shape}")
    a_only = int((a & ~b).sum())
    b_only = int((~a & b).sum())
    n = a_only + b_only
    p = 1.0 if n == 0 else min(1.0, 2.0 * float(binom.cdf(min(a_only, b_only), n, 0.5)))
    return {"a_only": a_only, "b_only": b_only, "n": len(a), "p_value": p}


# --- calibration and per-class scores ----------------------------------------------------------------------


def softmax(logits: np.ndarray) -> np.ndarray:
    """(N, K) float logits → (N, K) float64 probabilities (rows sum to 1)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def expected_calibration_error(
    probabilities: np.ndarray, labels: np.ndarray, n_bins: int = 15
) -> dict[str, Any]:
    """Expected calibration error of the top-label confidence, and the reliability diagram's bins.

    The confidence of an image is its largest probability and its prediction that class. Confidences fall in
    ``n_bins`` equal-width bins of (0, 1] (bin b holds (b/n, (b+1)/n], the first also 0);
    ECE = Σ_b (|B_b| / N) · |accuracy(B_b) − mean confidence(B_b)|. Per-bin accuracy and confidence are
    sklearn's ``calibration_curve`` (uniform strategy) on (correct, confidence), which bins the same way.

    Args:
        probabilities: (N, K) float, rows summing to 1.
        labels: (N,) int64 in [0, K).

    Returns:
        ``{"ece", "n_bins", "edges" (n_bins + 1,), "count" (n_bins,), "accuracy" (n_bins,),
        "confidence" (n_bins,)}`` as lists; empty bins have accuracy and confidence None.

    References:
        Guo, Pleiss, Sun & Weinberger, "On Calibration of Modern Neural Networks", ICML 2017, §2 (ECE,
        reliability diagrams, M = 15 bins).
        Naeini, Cooper & Hauskrecht, "Obtaining Well Calibrated Probabilities Using Bayesian Binning", AAAI 2015.
    """
    from sklearn.calibration import calibration_curve

    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels)
    if p.ndim != 2 or len(p) != len(y):
        raise ValueError(f"probabilities must be (N, K) and labels (N,), got {p.shape} and {y.shape}")
    if len(y) == 0:
        raise ValueError("calibration of an empty set of images")
    confidence = np.clip(p.max(axis=1), 0.0, 1.0)
    correct = (p.argmax(axis=1) == y).astype(np.int64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bin_of = np.searchsorted(edges[1:-1], confidence)  # calibration_curve's binning: (lo, hi]
    count = np.bincount(bin_of, minlength=n_bins)
    acc_bins = np.full(n_bins, np.nan)
    conf_bins = np.full(n_bins, np.nan)
    filled = count > 0
    if correct.min() == correct.max():
        # calibration_curve needs both outcomes present; with one, the per-bin accuracy is that outcome
        acc_bins[filled] = float(correct[0])
        conf_bins[filled] = np.bincount(bin_of, confidence, n_bins)[filled] / count[filled]
    else:
        prob_true, prob_pred = calibration_curve(correct, confidence, n_bins=n_bins, strategy="uniform")
        acc_bins[filled] = prob_true
        conf_bins[filled] = prob_pred
    gaps = np.abs(acc_bins[filled] - conf_bins[filled])
    ece = float((count[filled] / len(y) * gaps).sum())
    return {
        "ece": ece,
        "n_bins": n_bins,
        "edges": edges.tolist(),
        "count": count.astype(int).tolist(),
        "accuracy": [None if np.isnan(v) else float(v) for v in acc_bins],
        "confidence": [None if np.isnan(v) else float(v) for v in conf_bins],
    }


def confusion(labels: np.ndarray, predictions: np.ndarray, n_classes: int) -> np.ndarray:
    """(K, K) int64 confusion matrix: row = true class, column = predicted class; entry (i, j) counts the
    images of class i predicted j (sklearn's ``confusion_matrix`` with ``labels=range(K)``, which the tests
    check it against). One ``bincount`` of i·K + j: the report needs it and loading sklearn takes seconds."""
    y, p = np.asarray(labels, dtype=np.int64), np.asarray(predictions, dtype=np.int64)
    if y.shape != p.shape or y.ndim != 1:
        raise ValueError(f"labels and predictions must be (N,) alike, got {y.shape} and {p.shape}")
    if len(y) and (min(y.min(), p.min()) < 0 or max(y.max(), p.max()) >= n_classes):
        raise ValueError(f"labels and predictions must lie in [0, {n_classes})")
    return np.bincount(y * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def per_class_scores(
    labels: np.ndarray, predictions: np.ndarray, n_classes: int, positive: int = 1
) -> dict[str, Any]:
    """Per-class precision, recall and F1 (sklearn's ``precision_recall_fscore_support``; 0 where a class is
    never predicted or never present), their support, and the macro averages. With two classes, also the
    sensitivity (recall of class ``positive``) and specificity (recall of the other class).

    Args:
        labels, predictions: (N,) int64 in [0, K).

    Returns:
        ``{"precision", "recall", "f1", "support"}`` lists of K, ``"macro_precision"``, ``"macro_recall"``,
        ``"macro_f1"``, and for K = 2 ``"sensitivity"``, ``"specificity"``, ``"positive"``.

    References:
        Sokolova & Lapalme, "A systematic analysis of performance measures for classification tasks",
        Information Processing & Management 2009.
    """
    from sklearn.metrics import precision_recall_fscore_support

    classes = list(range(n_classes))
    precision, recall, f1, support = precision_recall_fscore_support(
        np.asarray(labels), np.asarray(predictions), labels=classes, zero_division=0.0
    )
    out: dict[str, Any] = {
        "precision": [float(v) for v in precision],
        "recall": [float(v) for v in recall],
        "f1": [float(v) for v in f1],
        "support": [int(v) for v in support],
        "macro_precision": float(np.mean(precision)),
        "macro_recall": float(np.mean(recall)),
        "macro_f1": float(np.mean(f1)),
    }
    if n_classes == 2:
        out["positive"] = positive
        out["sensitivity"] = float(recall[positive])
        out["specificity"] = float(recall[1 - positive])
    return out


# --- compactness ---------------------------------------------------------------------------------------------


def compactness(
    weight: np.ndarray,
    similarities: np.ndarray,
    predictions: np.ndarray,
    off_class: np.ndarray | None = None,
    tol: float = ZERO_WEIGHT,
) -> dict[str, Any]:
    """How few prototypes the last layer and each decision use (PIP-Net's compactness).

    A weight counts as zero when |w| ≤ ``tol``; a contribution s_ij · w_kj counts as zero when its weight
    does or when its absolute value is ≤ ``tol`` (ProtoPNet's similarities are always > 0, its weights of
    either sign). PIP-Net applies the same 1e-3 to its (non-negative) weights.

    - ``sparsity``: share of the K·m entries of h that are zero (PIP-Net's sparsity ratio);
    - ``off_class_sparsity``: the same over the off-class entries only (what the paper's L1 aims at);
    - ``global_size``: prototypes with at least one non-zero weight (the others take part in no decision);
    - ``local_size``: mean over images of the prototypes whose contribution to the predicted class's logit is
      non-zero (the prototypes a reasoning sheet of the decision has to show);
    - ``local_size_all_classes``: the same counting a contribution to any class (PIP-Net's local size).

    Args:
        weight: (K, m) float, the last layer h.
        similarities: (N, m) float, the test images' similarities.
        predictions: (N,) int64, the predicted class of each image (of this model, or of the ensemble
            whose decision this member contributes to).
        off_class: (K, m) bool, True where prototype j does not belong to class k; None skips
            ``off_class_sparsity``.

    References:
        Nauta, Schlötterer, van Keulen & Seifert, "PIP-Net: Patch-Based Intuitive Prototypes for
        Interpretable Image Classification", CVPR 2023, §4 (sparsity ratio, global and local explanation size).
    """
    w = np.abs(np.asarray(weight, dtype=np.float64))
    s = np.asarray(similarities, dtype=np.float64)
    pred = np.asarray(predictions, dtype=np.int64)
    nonzero = w > tol
    counts = local_sizes(weight, similarities, predictions, tol)
    w_kept = np.where(nonzero, w, 0.0)  # a weight that counts as zero contributes nothing
    largest = w_kept.max(axis=0, initial=0.0)  # (m,) the largest |w| of any class
    contrib_any = (np.abs(s) * largest > tol).sum(axis=1)
    out: dict[str, Any] = {
        "tolerance": tol,
        "n_prototypes": int(w.shape[1]),
        "n_weights": int(w.size),
        "sparsity": float(1.0 - nonzero.mean()) if w.size else float("nan"),
        "global_size": int(nonzero.any(axis=0).sum()),
        "local_size": float(counts.mean()) if len(pred) else float("nan"),
        "local_size_all_classes": float(contrib_any.mean()) if len(pred) else float("nan"),
    }
    if off_class is not None:
        off = np.asarray(off_class, dtype=bool)
        out["off_class_sparsity"] = float(1.0 - nonzero[off].mean()) if off.any() else float("nan")
    return out


def local_sizes(
    weight: np.ndarray, similarities: np.ndarray, predictions: np.ndarray, tol: float = ZERO_WEIGHT
) -> np.ndarray:
    """(N,) int64: per image, the prototypes whose contribution s_ij · w_{ŷ_i j} to the predicted class ŷ_i
    has absolute value above ``tol`` (and whose weight |w_{ŷ_i j}| is above ``tol``). Summed over members with the ensemble's prediction, it is the
    ensemble's local size.

    References:
        Nauta et al., "PIP-Net", CVPR 2023, §4 (local explanation size).
    """
    w = np.abs(np.asarray(weight, dtype=np.float64))
    w = np.where(w > tol, w, 0.0)  # a weight that counts as zero contributes nothing
    s = np.abs(np.asarray(similarities, dtype=np.float64))
    pred = np.asarray(predictions, dtype=np.int64)
    return (s * w[pred] > tol).sum(axis=1).astype(np.int64)


def ensemble_compactness(
    weights: list[np.ndarray],
    similarities: list[np.ndarray],
    predictions: np.ndarray,
    off_classes: list[np.ndarray] | None = None,
    tol: float = ZERO_WEIGHT,
) -> dict[str, Any]:
    """Compactness of a logit-summed ensemble: its last layer is the members' layers side by side, so
    sparsity counts all their entries, the global size adds the members' global sizes, and the local size is
    the mean over images of the members' prototypes with a non-zero contribution to the *ensemble's*
    predicted class.

    Args:
        weights: per member (K, m_i) float.
        similarities: per member (N, m_i) float, on the same N test images.
        predictions: (N,) int64, the ensemble's predicted classes.
        off_classes: per member (K, m_i) bool, or None.

    References:
        Nauta et al., "PIP-Net", CVPR 2023, §4.
    """
    if not weights:
        raise ValueError("an ensemble needs at least one member")
    w = np.concatenate([np.asarray(x, dtype=np.float64) for x in weights], axis=1)
    s = np.concatenate([np.asarray(x, dtype=np.float64) for x in similarities], axis=1)
    off = None if off_classes is None else np.concatenate([np.asarray(x, bool) for x in off_classes], axis=1)
    return compactness(w, s, predictions, off, tol)


# --- push's effect on predictions ----------------------------------------------------------------------------


def prediction_changes(before: np.ndarray, after: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """How a step that changes the model (push, the last-layer stage) changed its predictions.

    Args:
        before, after: (N, K) float logits of the same N images before and after the step.
        labels: (N,) int64.

    Returns:
        ``{"n", "changed" (share of images whose predicted class changed), "correct_to_wrong" (share, among
        images right before, that are wrong after), "wrong_to_correct" (share, among images wrong before,
        that are right after), "top1_before", "top1_after"}``; shares are None when their set is empty.

    References:
        Chen et al., "This Looks Like That", NeurIPS 2019, Theorem 2.1 (push does not change the prediction
        of a correctly classified image whose top-2 logits are apart by at least 2·Δmax, under (A1)-(A4)).
    """
    b = np.asarray(before).argmax(axis=1)
    a = np.asarray(after).argmax(axis=1)
    y = np.asarray(labels)
    right_before, right_after = b == y, a == y
    n = len(y)

    def share(mask: np.ndarray, within: np.ndarray) -> float | None:
        return float(mask[within].mean()) if within.any() else None

    return {
        "n": int(n),
        "changed": float((a != b).mean()) if n else None,
        "correct_to_wrong": share(~right_after, right_before),
        "wrong_to_correct": share(right_after, ~right_before),
        "top1_before": float(right_before.mean()) if n else None,
        "top1_after": float(right_after.mean()) if n else None,
    }


def top1_interval(
    logits: torch.Tensor | np.ndarray, labels: np.ndarray, level: float = 0.95, seed: int = 0
) -> dict[str, float]:
    """``{"top1_low", "top1_high"}``: the percentile bootstrap interval of the top-1 of (N, K) ``logits``
    (a tensor or an array) against ``labels`` (N,), with the default resamples and seed, so the intervals of
    models scored on the same test images are paired; NaN for an empty split.

    References:
        Efron & Tibshirani, "An Introduction to the Bootstrap", Chapman & Hall 1993, §13.3.
    """
    y = np.asarray(labels)
    if len(y) == 0:
        return {"top1_low": float("nan"), "top1_high": float("nan")}
    z = logits.detach().cpu().numpy() if hasattr(logits, "detach") else np.asarray(logits)
    iv = bootstrap_interval(z.argmax(axis=1) == y, level=level, seed=seed)
    return {"top1_low": iv.low, "top1_high": iv.high}
