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
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from protoaudit.core import detectors as det
from protoaudit.core.causal import BACKGROUND, MIN_DROP, causal_concepts
from protoaudit.core.model import ProtoPNet, similarity

if TYPE_CHECKING:
    import pandas as pd

    from protoaudit.engine.data import DatasetBundle, ImageSplit


@dataclass
class MemberDetection:
    """Every detector's flags and scores for one member's prototypes."""

    flags: dict[str, np.ndarray]  # detector name → (m,) bool
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # statistic name → (m,) float
    inputs: dict[str, str] = field(default_factory=dict)  # detector name → the data it looked at
    skipped: dict[str, str] = field(default_factory=dict)  # detector name → why it could not run


@torch.no_grad()
def min_distances(
    model: ProtoPNet, images: torch.Tensor | ImageSplit, batch_size: int, device: torch.device
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
    split: ImageSplit,
    source_index: np.ndarray,
    batch_size: int,
    device: torch.device,
    min_drop: float = MIN_DROP,
) -> dict[str, Any] | None:
    """Causal labels of a member's prototypes from element removal on their source images, or None when the
    split has no interventions (a dataset whose images cannot be drawn again).

    source_index: (m,) int, each prototype's source image in ``split`` (the push split). Returns the dict of
    :func:`causal_concepts` plus ``names`` (m, E) and ``base`` (m,) and ``removed`` (m, E) similarities, and
    ``drop_all`` (m,): the relative drop when every element is removed at once (the image's background alone),
    which tests the label "background" — a prototype labelled so whose ``drop_all`` exceeds ``min_drop``
    responds to the elements, carried by two or more of them so that no single removal silences it.
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
        # every element removed at once: the background alone, the check of the label "background"
        renders.append(interventions.render(i, [name for name, _ in elements[i]]))
    sims = similarity(min_distances(model, torch.stack(renders), batch_size, device)).double().numpy()
    m = len(sources)
    width = max((len(v) for v in elements.values()), default=0)
    base = np.empty(m)
    removed = np.full((m, width), np.nan)
    removed_all = np.empty(m)
    names: list[list[str]] = []
    kinds: list[list[str]] = []
    for j, i in enumerate(sources):
        row = offset[int(i)]
        els = elements[int(i)]
        base[j] = sims[row, j]
        removed[j, : len(els)] = sims[row + 1 : row + 1 + len(els), j]
        removed_all[j] = sims[row + 1 + len(els), j]
        names.append([n for n, _ in els])
        kinds.append([k for _, k in els])
    out: dict[str, Any] = dict(causal_concepts(base, removed, names, kinds, min_drop))
    out.update(
        base=base,
        removed=removed,
        names=names,
        drop_all=(base - removed_all) / base,
        min_drop=min_drop,
    )
    return out


def drops_text(names: list[str], drops: np.ndarray) -> str:
    """``name=drop`` pairs joined by ``;`` (purity.csv's ``causal_drops``), drops to 4 decimals."""
    return ";".join(f"{n}={d:.4f}" for n, d in zip(names, drops, strict=False) if np.isfinite(d))


def run_detectors(
    model: ProtoPNet,
    paper_flags: np.ndarray,
    push_min_distances: torch.Tensor,
    push_labels: np.ndarray,
    test_min_distances: torch.Tensor | None,
    test_labels: np.ndarray | None,
    shifted_min_distances: torch.Tensor | None,
    shifted_labels: np.ndarray | None,
) -> MemberDetection:
    """Every detector of :mod:`protoaudit.core.detectors` on one member.

    paper_flags: (m,) bool, the paper's k-NN purity rule (already computed from the patch index);
    *_min_distances: (n, m) the member's min distances on the push (training), test and test_shifted images
    (the last two None where the dataset has no test_shifted split); *_labels: (n,) int.
    """
    cls = np.asarray(model.config.prototype_class)
    push_sim = similarity(push_min_distances).double().numpy()
    info = det.class_information(push_sim, np.asarray(push_labels))
    result = MemberDetection(
        flags={
            "knn_purity": np.asarray(paper_flags, dtype=bool),
            "class_information": np.nan_to_num(info, nan=np.inf) < det.CLASS_INFORMATION_MIN,
        },
        scores={"class_information": info},
        inputs={
            "knn_purity": "push (training) split: the k nearest images in the patch index",
            "class_information": "push (training) split: similarities and class labels",
        },
    )
    if (
        test_min_distances is not None
        and shifted_min_distances is not None
        and len(test_min_distances)
        and len(shifted_min_distances)
    ):
        ref = similarity(test_min_distances).double().numpy()
        sh = similarity(shifted_min_distances).double().numpy()
        shift = det.shift_sensitivity(ref, np.asarray(test_labels), sh, np.asarray(shifted_labels), cls)
        result.scores["shift_auc"] = shift
        result.flags["shift_sensitivity"] = np.nan_to_num(shift, nan=-np.inf) >= det.SHIFT_AUC_MIN
        result.flags["class_information_or_shift"] = det.either_flags(
            result.flags["class_information"], result.flags["shift_sensitivity"]
        )
        result.inputs["shift_sensitivity"] = "test and test_shifted splits: similarities and class labels"
        result.inputs["class_information_or_shift"] = "push, test and test_shifted splits"
    else:
        why = "the dataset has no test_shifted split"
        result.skipped["shift_sensitivity"] = why
        result.skipped["class_information_or_shift"] = why
    return result


@dataclass
class MemberAudit:
    """What the causal audit and the detectors found on one member, and the distances they were computed from
    (reused to evaluate the member with any set of prototypes removed)."""

    causal: dict[str, Any] | None
    detection: MemberDetection
    push_min_distances: torch.Tensor  # (n_push, m)
    test_min_distances: torch.Tensor  # (n_test, m)
    shifted_min_distances: torch.Tensor | None  # (n_shifted, m)


def audit_member(
    model: ProtoPNet,
    push_d: torch.Tensor,
    bundle: DatasetBundle,
    source_index: np.ndarray,
    paper_flags: np.ndarray,
    batch_size: int,
    device: torch.device,
    test_d: torch.Tensor | None = None,
) -> MemberAudit:
    """Causal labels and every detector for one member: the push distances ``push_d`` (n_push, m) as its
    patch index's search kept them (no pass), the test distances from the test split's index where given
    (``test_d``; else one pass), one pass over test_shifted and one over the re-rendered source images."""
    if test_d is None:
        test_d = min_distances(model, bundle.test, batch_size, device)
    shifted = getattr(bundle, "test_shifted", None)
    shifted_d = None if shifted is None else min_distances(model, shifted, batch_size, device)
    causal = causal_labels(model, bundle.push, source_index, batch_size, device)
    detection = run_detectors(
        model,
        paper_flags,
        push_d,
        np.asarray(bundle.push.labels),
        test_d,
        np.asarray(bundle.test.labels),
        shifted_d,
        None if shifted is None else np.asarray(shifted.labels),
    )
    model.cpu()
    return MemberAudit(causal, detection, push_d, test_d, shifted_d)


def table_columns(member_audit: MemberAudit) -> dict[str, Any]:
    """purity.csv columns: ``concept``, ``concept_kind``, ``causal_drop``, ``causal_drops`` (where the dataset
    has interventions), each detector's statistic and ``flag_<detector>``."""
    out: dict[str, Any] = {}
    causal = member_audit.causal
    if causal is not None:
        out["concept"] = causal["concept"]
        out["concept_kind"] = causal["concept_kind"]
        out["causal_drop"] = causal["drop"]
        out["causal_drop_all"] = causal["drop_all"]
        out["causal_drops"] = [
            drops_text(names, row) for names, row in zip(causal["names"], causal["drops"], strict=True)
        ]
    for name, values in member_audit.detection.scores.items():
        out[name] = values
    for name, flags in member_audit.detection.flags.items():
        out[f"flag_{name}"] = flags
    return out


def causal_entry(member_audit: MemberAudit, prototype_class: list[int]) -> dict[str, Any] | None:
    """audit.json ``causal.members.<m>``: counts per concept kind and every prototype's concept and drops."""
    causal = member_audit.causal
    if causal is None:
        return None
    kinds = [str(k) for k in causal["concept_kind"]]
    joint = (np.asarray(kinds) == BACKGROUND) & (np.asarray(causal["drop_all"]) > causal["min_drop"])
    return {
        "counts": {
            kind: kinds.count(kind) for kind in ("discriminative", "shared", "shortcut", "background")
        },
        # labelled background, yet silenced when every element is removed at once: carried jointly by elements
        "background_carried_by_elements": int(joint.sum()),
        "prototypes": [
            {
                "prototype": j,
                "class": int(prototype_class[j]),
                "concept": str(causal["concept"][j]),
                "concept_kind": kinds[j],
                "drop": float(causal["drop"][j]),
                "drop_all": float(causal["drop_all"][j]),
                "base_similarity": float(causal["base"][j]),
                "drops": {
                    n: float(d)
                    for n, d in zip(causal["names"][j], causal["drops"][j], strict=False)
                    if np.isfinite(d)
                },
            }
            for j in range(len(kinds))
        ],
    }


SHIFT_LEAK_NOTE = (
    "shift_sensitivity chooses its prototypes from the test and test_shifted images of each prototype's class "
    "(class labels only), so the accuracies after removing its flags are measured on images it has seen."
)


def scoring_labels(table: pd.DataFrame) -> tuple[str, list[str]]:
    """The labels detectors are scored against: the causal ``concept_kind`` where interventions exist, else
    the location-based ``source_part_kind`` (a second, weaker view; unknown kinds are left out)."""
    if "concept_kind" in table:
        return "causal", list(table["concept_kind"])
    return "location", list(table["source_part_kind"])


def detectors_entry(
    tables: dict[str, pd.DataFrame], audits: dict[str, MemberAudit], selected: str
) -> dict[str, Any]:
    """audit.json ``detectors``: per member and pooled over members, every detector's precision, recall and F1
    against the labels of :func:`scoring_labels`, with the thresholds and the data each detector looked at."""
    members: dict[str, Any] = {}
    pooled_flags: dict[str, list[np.ndarray]] = {}
    pooled_kinds: dict[str, list[Any]] = {}
    label_source = "location"
    skipped: dict[str, str] = {}
    inputs: dict[str, str] = {}
    for name, table in tables.items():
        label_source, kinds = scoring_labels(table)
        detection = audits[name].detection
        skipped.update(detection.skipped)
        inputs.update(detection.inputs)
        members[name] = {}
        for det_name, flags in detection.flags.items():
            members[name][det_name] = det.detection_scores(flags, kinds)
            pooled_flags.setdefault(det_name, []).append(flags)
            pooled_kinds.setdefault(det_name, []).extend(kinds)
    pooled = {d: det.detection_scores(np.concatenate(pooled_flags[d]), pooled_kinds[d]) for d in pooled_flags}
    return {
        "selected": selected,
        "labels": label_source,
        "positive": list(det.BAD_KINDS),
        "names": [d for d in det.DETECTOR_NAMES if d in pooled],
        "thresholds": {
            "knn_purity": "fewer than τ of the k nearest training images of the prototype's class",
            "class_information": f"η²_H < {det.CLASS_INFORMATION_MIN}",
            "shift_sensitivity": f"AUC ≥ {det.SHIFT_AUC_MIN}",
            "class_information_or_shift": "either of the two",
        },
        "inputs": inputs,
        "skipped": skipped,
        "members": members,
        "pooled": pooled,
    }


def evaluate_without(model: ProtoPNet, keep: np.ndarray, min_distances_: torch.Tensor) -> torch.Tensor:
    """(n, K) logits of ``model`` (already reduced to the ``keep`` prototypes and retuned) from the full
    member's (n, m) min distances: removing prototypes leaves the trunk unchanged, so no pass is needed."""
    with torch.no_grad():
        return model.head(min_distances_[:, torch.as_tensor(np.asarray(keep, dtype=bool))]).cpu()
