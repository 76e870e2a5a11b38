"""Detectors of bad prototypes — prototypes on the background, on a part every class shares, or on a shortcut —
and their precision and recall against labels.

Each detector is a pure function returning ``flags`` (m,) bool, True where the prototype is flagged as bad. Their
inputs are what any trained ProtoPNet offers without part annotations: the class labels of images and each
prototype's similarity on each image (the largest similarity over the image's latent patches, the paper's g_p).
The detectors that take similarities use only their ranks, so g_p itself, −min distance, or any other increasing
function of it gives the same flags.

* :func:`knn_purity_flags` — the paper's k-NN class purity (k = 6 nearest training images, τ = 3), unchanged.
* :func:`class_information_flags` — the class explains less than a large effect (η² < 0.14) of the ranks of the
  prototype's similarity over the training images. A patch of background or a distractor that every image of
  every class carries answers as strongly on any class's image as on its own; a part that some classes have and
  others lack does not, however many classes share it. Unlike the k-NN count, it looks at every image, not at
  the six nearest, so a background prototype whose six nearest images happen to be of its class is still seen
  to answer every class alike.
* :func:`shift_sensitivity_flags` — on a shifted split, where a feature that went with a class in training no
  longer does, the prototype's similarity on images of its own class falls: a shortcut (a marker, a watermark)
  is the one kind of prototype whose class evidence a shift of that feature takes away, while an object part or
  the background is unchanged by it. This is the only one of these detectors that can see a shortcut, since in
  the training distribution a shortcut is as class-pure and class-informative as a real part.
* :func:`either_flags` — the union of two detectors' flags.

:func:`detection_scores` scores flags against labels of kind background / shared / shortcut, ignoring
prototypes whose kind is unknown.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import rankdata

from protoaudit.core.purity import knn_class_purity, prune_decision

BAD_KINDS = ("background", "shared", "shortcut")
KNOWN_KINDS = ("discriminative", *BAD_KINDS)
CLASS_INFORMATION_MIN = 0.14
"""Cohen's (1988) benchmark of a *large* η² (0.01 small, 0.06 medium, 0.14 large). A response that is high where a
part is and low elsewhere, for a part present in a share p of the classes and in a share q of their images, has
η² = q(1 − p) / (1 − pq): 0.54 at p = 1/2, q = 0.7, and below 0.14 only for a part in more than 93 % of the classes
(84 % at q = 0.5) — which is what "shared by every class" means. An element present in every image gives η² ≈ 0,
whatever the data set."""
SHIFT_AUC_MIN = 0.75
"""Halfway between no effect of the shift (AUC 0.5) and a complete separation of the prototype's similarities
on its class's images before and after the shift (AUC 1)."""
DETECTOR_NAMES = ("knn_purity", "class_information", "shift_sensitivity", "class_information_or_shift")


def knn_purity_flags(
    neighbor_labels: np.ndarray, prototype_class: np.ndarray, threshold: int = 3
) -> np.ndarray:
    """The paper's pruning rule as a detector: flagged when fewer than τ of the k nearest training images are of
    the prototype's class.

    neighbor_labels: (m, k) int labels of the k nearest training images (one patch per image), −1 padding;
    prototype_class: (m,) int; threshold: τ → (m,) bool.

    References: Chen et al., "This Looks Like That", NeurIPS 2019, §2.6 and supplement S8 (k = 6, τ = 3).
    """
    return prune_decision(knn_class_purity(neighbor_labels, prototype_class), threshold)


def class_information(similarity: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """How much of the variation of each prototype's similarity over images the class explains.

    similarity: (n, m) float, prototype j's similarity on image i (only ranks matter); labels: (n,) int classes
    of the images → (m,) float64: Kruskal–Wallis H (average ranks, ties corrected) turned into the effect size
    η²_H = (H − G + 1) / (n − G) over the G classes present; 0 for a prototype with the same similarity on every
    image; NaN when n ≤ G or fewer than two classes are present. Values near 0 (or below) mean no class
    information; 1 means the classes are perfectly separated.

    References: Kruskal and Wallis, "Use of ranks in one-criterion variance analysis", JASA 1952 (H and its tie
    correction); Tomczak and Tomczak, "The need to report effect size estimates revisited", Trends in Sport
    Sciences 2014 (η²_H).
    """
    s = np.asarray(similarity, dtype=np.float64)
    y = np.asarray(labels)
    if s.ndim != 2 or y.shape != (s.shape[0],):
        raise ValueError(f"similarity (n, m) and labels (n,) expected, got {s.shape} and {y.shape}")
    n, m = s.shape
    classes, index = np.unique(y, return_inverse=True)
    g = len(classes)
    if g < 2 or n <= g:
        return np.full(m, np.nan)
    ranks = rankdata(s, axis=0)  # (n, m), average ranks for ties
    counts = np.bincount(index, minlength=g).astype(np.float64)  # (G,)
    sums = np.zeros((g, m))
    np.add.at(sums, index, ranks)
    mean_rank = sums / counts[:, None]
    h = 12.0 / (n * (n + 1)) * (counts[:, None] * (mean_rank - (n + 1) / 2) ** 2).sum(axis=0)
    ties = np.array([_tie_sum(s[:, j]) for j in range(m)])
    correction = 1.0 - ties / (n**3 - n)
    out = np.zeros(m)
    varying = correction > 0
    out[varying] = (h[varying] / correction[varying] - g + 1) / (n - g)
    return out


def _tie_sum(values: np.ndarray) -> float:
    _, t = np.unique(values, return_counts=True)
    return float((t.astype(np.float64) ** 3 - t).sum())


def class_information_flags(
    similarity: np.ndarray, labels: np.ndarray, min_information: float = CLASS_INFORMATION_MIN
) -> np.ndarray:
    """Flagged when the class explains less than a large effect of the prototype's similarity ranks.

    similarity: (n, m) float on training images; labels: (n,) int → (m,) bool (False where undefined).
    See :func:`class_information` and :data:`CLASS_INFORMATION_MIN`.

    References: Kruskal and Wallis, JASA 1952; Tomczak and Tomczak 2014 (η²_H); Cohen, "Statistical Power
    Analysis for the Behavioral Sciences", 1988 (η² 0.14, a large effect).
    """
    info = class_information(similarity, labels)
    return np.nan_to_num(info, nan=np.inf) < min_information


def auc(higher: np.ndarray, lower: np.ndarray) -> float:
    """Probability that a draw from ``higher`` exceeds one from ``lower`` (ties count one half): the area under
    the ROC curve, i.e. the Mann–Whitney U over the product of the sizes. (a,), (b,) float → float (NaN if empty).

    References: Mann and Whitney, Ann. Math. Statist. 1947; Hanley and McNeil, Radiology 1982 (AUC = U / ab).
    """
    a = np.asarray(higher, dtype=np.float64).ravel()
    b = np.asarray(lower, dtype=np.float64).ravel()
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    ranks = rankdata(np.concatenate([a, b]))
    u = ranks[: len(a)].sum() - len(a) * (len(a) + 1) / 2
    return float(u / (len(a) * len(b)))


def shift_sensitivity(
    reference: np.ndarray,
    reference_labels: np.ndarray,
    shifted: np.ndarray,
    shifted_labels: np.ndarray,
    prototype_class: np.ndarray,
) -> np.ndarray:
    """How far a shift lowers each prototype's similarity on images of its own class.

    reference: (n, m) float similarities on a split drawn like the training data; shifted: (n', m) on a split
    where a feature no longer goes with its class; *_labels: (n,), (n',) int; prototype_class: (m,) int →
    (m,) float64: :func:`auc` of the prototype's similarities on its class's reference images against those on
    its class's shifted images (0.5: the shift changes nothing; 1: every shifted image of its class scores
    below every reference one); NaN when its class is missing from either split. Only ranks matter.

    References: Mann and Whitney 1947 (the AUC as U / ab); Geirhos et al., "Shortcut learning in deep neural
    networks", Nature Machine Intelligence 2020 (a shortcut is what fails to transfer when the correlation
    that made it predictive is broken).
    """
    ref = np.asarray(reference, dtype=np.float64)
    sh = np.asarray(shifted, dtype=np.float64)
    ref_y = np.asarray(reference_labels)
    sh_y = np.asarray(shifted_labels)
    cls = np.asarray(prototype_class)
    if ref.ndim != 2 or sh.ndim != 2 or ref.shape[1] != sh.shape[1] or cls.shape != (ref.shape[1],):
        raise ValueError(
            f"reference (n, m), shifted (n', m) and prototype_class (m,) expected, got {ref.shape}, "
            f"{sh.shape}, {cls.shape}"
        )
    if ref_y.shape != (ref.shape[0],) or sh_y.shape != (sh.shape[0],):
        raise ValueError("one label per image of each split expected")
    return np.array([auc(ref[ref_y == k, j], sh[sh_y == k, j]) for j, k in enumerate(cls)])


def shift_sensitivity_flags(
    reference: np.ndarray,
    reference_labels: np.ndarray,
    shifted: np.ndarray,
    shifted_labels: np.ndarray,
    prototype_class: np.ndarray,
    min_auc: float = SHIFT_AUC_MIN,
) -> np.ndarray:
    """Flagged when the shift lowers the prototype's similarity on its own class with AUC ≥ ``min_auc``.

    Shapes as in :func:`shift_sensitivity` → (m,) bool (False where undefined). See :data:`SHIFT_AUC_MIN`.

    References: Geirhos et al., Nature Machine Intelligence 2020 (shortcut learning); Mann and Whitney 1947.
    """
    score = shift_sensitivity(reference, reference_labels, shifted, shifted_labels, prototype_class)
    return np.nan_to_num(score, nan=-np.inf) >= min_auc


def either_flags(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(m,) bool: flagged by either detector (the union of two detectors' flags)."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"flags of the same shape expected, got {a.shape} and {b.shape}")
    return a | b


def detection_scores(
    flags: np.ndarray,
    kinds: Sequence[Any] | np.ndarray,
    positive: Sequence[str] = BAD_KINDS,
) -> dict[str, Any]:
    """Precision, recall and F1 of ``flags`` against labels, over the prototypes whose kind is known.

    flags: (m,) bool; kinds: (m,) the label of each prototype ("discriminative", "shared", "shortcut",
    "background"; anything else — None, "unknown", "no part annotated" — is unknown and left out); positive:
    the kinds a detector should flag. → {precision, recall, f1 (None where 0/0), n_positive, n_flagged,
    n_labelled, n_unknown} (n_flagged counts labelled prototypes only).

    References: van Rijsbergen, "Information Retrieval", 1979 (F1, the harmonic mean of precision and recall).
    """
    f = np.asarray(flags, dtype=bool)
    k = np.asarray([str(x) if x is not None else "" for x in kinds], dtype=object)
    if f.shape != k.shape:
        raise ValueError(f"flags and kinds must have one entry per prototype, got {f.shape} and {k.shape}")
    unknown_positive = set(positive) - set(KNOWN_KINDS)
    if unknown_positive:
        raise ValueError(f"positive kinds {sorted(unknown_positive)} are not among {KNOWN_KINDS}")
    known = np.isin(k, KNOWN_KINDS)
    actual = known & np.isin(k, list(positive))
    flagged = known & f
    hit = int((flagged & actual).sum())
    precision = hit / int(flagged.sum()) if flagged.any() else None
    recall = hit / int(actual.sum()) if actual.any() else None
    if precision is None or recall is None:
        f1 = None
    else:
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "n_positive": int(actual.sum()),
        "n_flagged": int(flagged.sum()),
        "n_labelled": int(known.sum()),
        "n_unknown": int((~known).sum()),
    }
