"""Reasoning sheets (paper Fig. 3): why the ensemble decides what it decides for one image.

For each of the top classes (by ensemble logit) and each member, every prototype of that class contributes
*points* = similarity × weight, where the similarity log((d + 1)/(d + ε)) is taken at the image's patch most
activated by the prototype (the smallest distance) and the weight is the last layer's connection w_h(class,
prototype). A member's points for a class are its logit for that class: the sum over its own-class prototypes
shown on the sheet plus the (usually small, often negative) points of the other classes' prototypes, shown as
one line so that the totals add up. The ensemble's points are the sum over members (paper §2.5).

The box on the image is the paper's visualisation: the smallest rectangle around the pixels at or above the
95th percentile of the bicubically upsampled similarity map. It is *not* a faithful attribution (Xu-Darme et
al. 2023): it shows where the upsampled map is high, not which pixels caused the similarity. The sheet marks the
most activated latent patch's own cell as well (dashed).

``render_sheet_png`` writes the sheet as one PNG (matplotlib, Agg); ``render_sheet_html`` returns an escaped
HTML fragment with its images inlined as ``data:`` URIs, which the report embeds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from protoaudit.errors import InputError

if TYPE_CHECKING:
    from protoaudit.engine.data import DatasetBundle
    from protoaudit.engine.index.queries import QueryImage
    from protoaudit.engine.run import Run

Box = tuple[int, int, int, int]  # (y0, y1, x0, x1) in input pixels, end-exclusive
BOX_NOTE = (
    "box: 95th percentile of the upsampled similarity map (a pointer, not a faithful attribution); "
    "dashed: the most activated patch's cell"
)


@dataclass
class PrototypeEvidence:
    """One prototype's contribution to one class, for one image."""

    member: str
    prototype: int
    prototype_class: int
    distance: float  # smallest squared distance to the image's patches
    similarity: float  # log((d + 1)/(d + ε)) at that patch
    weight: float  # last-layer connection w_h(class, prototype)
    points: float  # similarity × weight
    h: int  # the most activated patch
    w: int
    box: Box  # the 95th-percentile box on the image
    cell: Box  # the most activated patch's cell of the image
    source_image: str
    source_index: int  # into the push split
    source_box: Box
    activation: np.ndarray = field(repr=False)  # (H, W) float32 similarity map over the image
    source_pixels: np.ndarray | None = field(default=None, repr=False)  # (S, S, 3) uint8 source image

    def to_dict(self) -> dict[str, Any]:
        return {
            "member": self.member,
            "prototype": self.prototype,
            "prototype_class": self.prototype_class,
            "distance": self.distance,
            "similarity": self.similarity,
            "weight": self.weight,
            "points": self.points,
            "h": self.h,
            "w": self.w,
            "box": list(self.box),
            "cell": list(self.cell),
            "source_image": self.source_image,
            "source_index": self.source_index,
            "source_box": list(self.source_box),
        }


@dataclass
class MemberEvidence:
    """One member's points for one class: its own-class prototypes (by points, descending) and the rest."""

    member: str
    points: float  # the member's logit for the class
    prototypes: list[PrototypeEvidence]
    other_points: float  # points from the prototypes of other classes

    def to_dict(self) -> dict[str, Any]:
        return {
            "member": self.member,
            "points": self.points,
            "other_points": self.other_points,
            "prototypes": [p.to_dict() for p in self.prototypes],
        }


@dataclass
class ClassEvidence:
    class_index: int
    class_name: str
    points: float  # the ensemble's logit: the sum of the members' points
    members: list[MemberEvidence]

    def to_dict(self) -> dict[str, Any]:
        return {
            "class": self.class_index,
            "class_name": self.class_name,
            "points": self.points,
            "members": [m.to_dict() for m in self.members],
        }


@dataclass
class ReasoningSheet:
    """The reasoning for one image: the top classes with every prototype's points, per member and in total."""

    run: str
    image_id: str
    label: int | None
    class_names: list[str]
    member_logits: dict[str, list[float]]  # member → (K,) logits
    classes: list[ClassEvidence]  # the top classes, by ensemble points
    image: np.ndarray = field(repr=False)  # (S, S, 3) uint8

    @property
    def ensemble_logits(self) -> list[float]:
        return [float(v) for v in np.sum([v for v in self.member_logits.values()], axis=0)]

    @property
    def predicted(self) -> int:
        return int(np.argmax(self.ensemble_logits))

    def to_dict(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "image_id": self.image_id,
            "label": self.label,
            "label_name": None if self.label is None else self.class_names[self.label],
            "predicted": self.predicted,
            "predicted_name": self.class_names[self.predicted],
            "ensemble_logits": self.ensemble_logits,
            "member_logits": self.member_logits,
            "classes": [c.to_dict() for c in self.classes],
            "box_note": BOX_NOTE,
        }


# -- computing ------------------------------------------------------------------------------------------


def _cell(h: int, w: int, grid: tuple[int, int], size: int) -> Box:
    hh, ww = grid
    return (h * size // hh, (h + 1) * size // hh, w * size // ww, (w + 1) * size // ww)


def _to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(3, S, S) float in [0, 1] → (S, S, 3) uint8."""
    return (pixels.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


@torch.no_grad()
def explain_image(
    run: Run,
    image: str | os.PathLike[str] | QueryImage,
    top_classes: int = 3,
    members: list[str] | None = None,
    bundle: DatasetBundle | None = None,
) -> ReasoningSheet:
    """The reasoning sheet of the run's ensemble (or of ``members``) for one image: an image file or a dataset
    image id (see :func:`protoaudit.index.load_query_image`)."""
    from protoaudit.core.geometry import percentile_boxes
    from protoaudit.core.model import similarity
    from protoaudit.engine.index.queries import load_query_image

    if top_classes < 1:
        raise InputError(f"top_classes must be >= 1, got {top_classes}")
    names = members or run.member_names
    if bundle is None:
        bundle = run.dataset()
    query = image if not isinstance(image, str | os.PathLike) else load_query_image(run, image, bundle)
    size = int(query.pixels.shape[-1])
    per_member: dict[str, dict[str, Any]] = {}
    for name in names:
        model = run.member(name)
        model.eval()
        z = model.latent(query.pixels[None].to(model.prototype_vectors.device))
        d = model.distances(z)[0].cpu()  # (m, H, W)
        _, hh, ww = d.shape
        flat = d.flatten(1)
        min_d, arg = flat.min(dim=1)
        sims = similarity(min_d)
        maps = similarity(d)
        weights = model.last_layer.weight.detach().cpu()  # (K, m)
        logits = sims @ weights.T
        per_member[name] = {
            "min_d": min_d,
            "arg": arg,
            "sims": sims,
            "maps": maps,
            "boxes": percentile_boxes(maps, size),
            "weights": weights,
            "logits": logits,
            "grid": (hh, ww),
            "classes": list(model.config.prototype_class),
            "prototypes": run.prototypes(name),
        }
    member_logits = {n: [float(v) for v in per_member[n]["logits"]] for n in names}
    ensemble = np.sum([member_logits[n] for n in names], axis=0)
    order = [int(c) for c in np.argsort(-ensemble, kind="stable")[:top_classes]]
    sources: dict[int, np.ndarray] = {}

    def source_pixels(index: int) -> np.ndarray:
        if index not in sources:
            sources[index] = _to_uint8(bundle.push.batch([index])[0])
        return sources[index]

    classes = []
    for c in order:
        evidence = []
        for name in names:
            info = per_member[name]
            protos = info["prototypes"]
            own = [j for j, k in enumerate(info["classes"]) if k == c]
            rows = []
            for j in own:
                h, w = divmod(int(info["arg"][j]), info["grid"][1])
                src = protos.iloc[j]
                weight = float(info["weights"][c, j])
                sim = float(info["sims"][j])
                rows.append(
                    PrototypeEvidence(
                        member=name,
                        prototype=j,
                        prototype_class=c,
                        distance=float(info["min_d"][j]),
                        similarity=sim,
                        weight=weight,
                        points=sim * weight,
                        h=h,
                        w=w,
                        box=tuple(int(v) for v in info["boxes"][j]),  # type: ignore[arg-type]
                        cell=_cell(h, w, info["grid"], size),
                        source_image=str(src["source_image"]),
                        source_index=int(src["source_index"]),
                        source_box=(
                            int(src["box_y0"]),
                            int(src["box_y1"]),
                            int(src["box_x0"]),
                            int(src["box_x1"]),
                        ),
                        activation=info["maps"][j].numpy().astype(np.float32),
                        source_pixels=source_pixels(int(src["source_index"])),
                    )
                )
            rows.sort(key=lambda r: -r.points)
            total = float(info["logits"][c])
            evidence.append(MemberEvidence(name, total, rows, total - sum(r.points for r in rows)))
        classes.append(ClassEvidence(c, bundle.class_names[c], float(ensemble[c]), evidence))
    return ReasoningSheet(
        run=run.name,
        image_id=query.image_id,
        label=query.label,
        class_names=list(bundle.class_names),
        member_logits=member_logits,
        classes=classes,
        image=_to_uint8(query.pixels),
    )


# -- pictures -------------------------------------------------------------------------------------------
