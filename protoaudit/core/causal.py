"""Causal prototype labels by intervention: which element of its source image a prototype responds to.

A prototype's similarity on an image is its largest similarity over the image's latent patches (the paper's
g_p, §2.1). The source image of a pushed prototype is re-rendered with each of its elements removed in turn
(each object part, each shared distractor, the marker); the element whose removal drops the similarity most is
the prototype's *concept*. When no removal drops it by more than a stated fraction, what the prototype responds to
is what no removal touched: the background (gradient, clutter, noise).

References:
    Hesse, Schaub-Meyer and Roth, "FunnyBirds: A Synthetic Vision Dataset for a Part-Based Analysis of
    Explainable AI Methods", ICCV 2023 (part removal as the intervention that establishes what a model uses).
    Chen et al., "This Looks Like That: Deep Learning for Interpretable Image Recognition", NeurIPS 2019, §2.1
    (the similarity g_p and the points similarity × weight it adds to a class logit).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

CONCEPT_KINDS = ("discriminative", "shared", "shortcut", "background")
BACKGROUND = "background"

MIN_DROP = 0.5
"""An element is a prototype's concept only when removing it takes away more than half of the prototype's
similarity on its source image.

Why one half, fixed before any detector was scored: the points a prototype adds to a class logit are its
similarity times a last-layer weight (paper Fig. 3), so a relative drop of similarity is the same relative drop
of the prototype's evidence. Above one half, the removed element carries the majority of that evidence: without
it the prototype is mostly silent. Below one half, the prototype still fires on what the removal left, and since
every element is removed in turn, what is always left is the background. The fraction is a property of the
definition, not of any model or data set, and stays the same for every run."""


def _as_table(values: Any, m: int, e: int, what: str) -> np.ndarray:
    """(m, E) object array of strings from an (m, E) array or a list of m lists of at most E entries."""
    out = np.full((m, e), "", dtype=object)
    if isinstance(values, np.ndarray) and values.ndim == 2:
        if values.shape != (m, e):
            raise ValueError(f"{what}: expected shape {(m, e)}, got {values.shape}")
        out[:] = values.astype(object)
        return out
    rows = list(values)
    if len(rows) != m:
        raise ValueError(f"{what}: expected {m} rows (one per prototype), got {len(rows)}")
    for j, row in enumerate(rows):
        row = list(row)
        if len(row) > e:
            raise ValueError(f"{what}: row {j} has {len(row)} entries, more than the {e} columns of removed")
        out[j, : len(row)] = row
    return out


def causal_concepts(
    base: np.ndarray,
    removed: np.ndarray,
    names: Sequence[Sequence[str]] | np.ndarray,
    kinds: Sequence[Sequence[str]] | np.ndarray,
    min_drop: float = MIN_DROP,
) -> dict[str, np.ndarray]:
    """Each prototype's concept: the element whose removal from its source image drops its similarity most.

    base: (m,) float, the prototype's similarity on its source image (max over patches; > 0);
    removed: (m, E) float, its similarity on the source image re-rendered without element e, NaN where the
    image has fewer than E elements; names, kinds: (m, E) str arrays, or m lists of at most E entries (one per
    non-NaN column, in order), the element's name and kind ("discriminative", "shared", "shortcut");
    min_drop: the fraction of ``base`` a removal must take away for its element to be the concept
    (:data:`MIN_DROP`, one half, unless a caller states another).

    Returns a dict of
        ``drops`` (m, E) float64: relative drop (base − removed) / base per element, NaN where absent (negative
        when the removal raised the similarity);
        ``drop`` (m,) float64: the largest drop (NaN for an image without elements);
        ``element`` (m,) int64: its column, −1 when the concept is the background;
        ``concept`` (m,) object str: that element's name, or "background" when no drop exceeds ``min_drop``;
        ``concept_kind`` (m,) object str in :data:`CONCEPT_KINDS`.
    Ties go to the lower column.

    References: Hesse et al., FunnyBirds, ICCV 2023 (part removal interventions); Chen et al., NeurIPS 2019,
    §2.1 (similarity g_p).
    """
    base = np.asarray(base, dtype=np.float64)
    removed = np.asarray(removed, dtype=np.float64)
    if base.ndim != 1:
        raise ValueError(f"base: expected shape (m,), got {base.shape}")
    m = len(base)
    if removed.ndim != 2 or removed.shape[0] != m:
        raise ValueError(f"removed: expected shape ({m}, E), got {removed.shape}")
    if not 0.0 < min_drop < 1.0:
        raise ValueError(f"min_drop must lie in (0, 1), got {min_drop}")
    if not (np.isfinite(base) & (base > 0)).all():
        raise ValueError("base: every similarity on a source image must be finite and > 0")
    e = removed.shape[1]
    name_table = _as_table(names, m, e, "names")
    kind_table = _as_table(kinds, m, e, "kinds")
    present = ~np.isnan(removed)
    bad_kind = present & ~np.isin(kind_table, CONCEPT_KINDS)
    if bad_kind.any():
        j, col = np.argwhere(bad_kind)[0]
        raise ValueError(f"kinds: {kind_table[j, col]!r} (prototype {j}) is not one of {CONCEPT_KINDS}")

    drops = (base[:, None] - removed) / base[:, None]
    any_present = present.any(axis=1)
    filled = np.where(present, drops, -np.inf)
    best = filled.argmax(axis=1)
    drop = np.where(any_present, filled[np.arange(m), best], np.nan)
    causal = any_present & (drop > min_drop)
    element = np.where(causal, best, -1).astype(np.int64)
    concept = np.full(m, BACKGROUND, dtype=object)
    concept_kind = np.full(m, BACKGROUND, dtype=object)
    rows = np.flatnonzero(causal)
    concept[rows] = name_table[rows, best[rows]]
    concept_kind[rows] = kind_table[rows, best[rows]]
    return {
        "drops": drops,
        "drop": drop,
        "element": element,
        "concept": concept,
        "concept_kind": concept_kind,
    }
