"""Causal prototype labels by intervention, and every detector of bad prototypes run on a member.

For each prototype of a member, its source image (push split) is drawn again with each of its elements removed
in turn (``split.interventions.render``); one forward pass over all those images gives every prototype's
similarity on each, and :func:`protoaudit.core.causal.causal_concepts` names the element whose removal drops it
most (or the background). Images are shared between prototypes of one source image, so a member costs at most
m · (1 + E) images in one batched pass.

The detectors of :mod:`protoaudit.core.detectors` take the member's similarities on the push split (from the
patch index, without a pass), on ``test`` and on ``test_shifted`` (one pass each) and the paper's k-NN purity
table; their flags are scored against the causal labels, or against the location-based part where only that
is known.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from protoaudit.core import detectors as det
from protoaudit.core.causal import MIN_DROP, causal_concepts
from protoaudit.core.model import ProtoPNet, similarity


@dataclass
class MemberDetection:
    """Every detector's flags and scores for one member's prototypes."""

    flags: dict[str, np.ndarray]  # detector name → (m,) bool
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # statistic name → (m,) float
    inputs: dict[str, str] = field(default_factory=dict)  # detector name → the data it looked at
    skipped: dict[str, str] = field(default_factory=dict)  # detector name → why it could not run


@torch.no_grad()
def min_distances(
    model: ProtoPNet, images: torch.Tensor | Any, batch_size: int, device: torch.device
) -> torch.Tensor:
    """(n, m) float32 smallest squared distance of each prototype to any patch of each image.

    images: an (n, 3, S, S) float tensor in [0, 1], or a split (``len`` and ``batch(indices)``)."""
    model = model.to(device).eval()
    n = len(images)
    out = []
    for start in range(0, n, batch_size):
        idx = list(range(start, min(start + batch_size, n)))
        x = images[start : start + batch_size] if isinstance(images, torch.Tensor) else images.batch(idx)
        out.append(model.distances(model.latent(x.to(device))).flatten(2).amin(dim=2).float().cpu())
    if not out:
        return torch.zeros(0, model.n_prototypes)
    return torch.cat(out)


def causal_labels(
    model: ProtoPNet,
    split: Any,
    source_index: np.ndarray,
    batch_size: int,
    device: torch.device,
    min_drop: float = MIN_DROP,
) -> dict[str, Any] | None:
    """Causal labels of a member's prototypes from element removal on their source images, or None when the
    split has no interventions (a dataset whose images cannot be drawn again).

    source_index: (m,) int, each prototype's source image in ``split`` (the push split). Returns the dict of
    :func:`causal_concepts` plus ``names`` (m, E) and ``base`` (m,) and ``removed`` (m, E) similarities.
    """
    interventions = getattr(split, "interventions", None)
    if interventions is None:
        return None
    sources = np.asarray(source_index, dtype=np.int64)
    images = sorted({int(i) for i in sources})
    renders: list[torch.Tensor] = []
    offset: dict[int, int] = {}
    elements: dict[int, list[tuple[str, str]]] = {}
    for i in images:
        offset[i] = len(renders)
        elements[i] = list(interventions.elements(i))
        renders.append(interventions.render(i, None))
        renders.extend(interventions.render(i, name) for name, _ in elements[i])
    sims = similarity(min_distances(model, torch.stack(renders), batch_size, device)).double().numpy()
    m = len(sources)
    width = max((len(v) for v in elements.values()), default=0)
    base = np.empty(m)
    removed = np.full((m, width), np.nan)
    names: list[list[str]] = []
    kinds: list[list[str]] = []
    for j, i in enumerate(sources):
        row = offset[int(i)]
        els = elements[int(i)]
        base[j] = sims[row, j]
        removed[j, : len(els)] = sims[row + 1 : row + 1 + len(els), j]
        names.append([n for n, _ in els])
        kinds.append([k for _, k in els])
    out = causal_concepts(base, removed, names, kinds, min_drop)
    out["base"] = base
    out["removed"] = removed
    out["names"] = names
    return out


def drops_text(names: list[str], drops: np.ndarray) -> str:
    """``name=drop`` pairs joined by ``;`` (purity.csv's ``causal_drops``), drops to 4 decimals."""
    return ";".join(f"{n}={d:.4f}" for n, d in zip(names, drops, strict=False) if np.isfinite(d))


def run_detectors(
    model: ProtoPNet,
    paper_flags: np.ndarray,
    push_min_distances: torch.Tensor,
    push_labels: np.ndarray,
    test: Any | None,
    test_shifted: Any | None,
    batch_size: int,
    device: torch.device,
) -> MemberDetection:
    """Every detector of :mod:`protoaudit.core.detectors` on one member.

    paper_flags: (m,) bool, the paper's k-NN purity rule (already computed from the patch index);
    push_min_distances: (n_push, m) the member's min distances on the push (training) images;
    test, test_shifted: splits (``test_shifted`` None where the dataset has none).
    """
    cls = np.asarray(model.config.prototype_class)
    push_sim = similarity(push_min_distances).double().numpy()
    info = det.class_information(push_sim, push_labels)
    result = MemberDetection(
        flags={
            "knn_purity": np.asarray(paper_flags, dtype=bool),
            "class_information": np.nan_to_num(info, nan=np.inf) < det.CLASS_INFORMATION_MIN,
        },
        scores={"class_information": info},
        inputs={
            "knn_purity": "push (training) split, patch index",
            "class_information": "push (training) split, class labels",
        },
    )
    if test is not None and test_shifted is not None and len(test) and len(test_shifted):
        ref = similarity(min_distances(model, test, batch_size, device)).double().numpy()
        sh = similarity(min_distances(model, test_shifted, batch_size, device)).double().numpy()
        shift = det.shift_sensitivity(ref, np.asarray(test.labels), sh, np.asarray(test_shifted.labels), cls)
        result.scores["shift_auc"] = shift
        result.flags["shift_sensitivity"] = np.nan_to_num(shift, nan=-np.inf) >= det.SHIFT_AUC_MIN
        result.flags["class_information_or_shift"] = det.either_flags(
            result.flags["class_information"], result.flags["shift_sensitivity"]
        )
        result.inputs["shift_sensitivity"] = "test and test_shifted splits, class labels"
        result.inputs["class_information_or_shift"] = "push, test and test_shifted splits, class labels"
    else:
        why = "the dataset has no test_shifted split"
        result.skipped["shift_sensitivity"] = why
        result.skipped["class_information_or_shift"] = why
    return result
