"""The report's faithfulness check of the paper's box: deletion curves of a sample of each member's prototypes.

The curves are read from ``members/<m>/faithfulness.json``, which training writes while the member is in
memory (:mod:`protoaudit.engine.faithfulness`). Where that file is absent (runs before it, imported members),
was made by other weights or with other settings than the report asks for, the report computes the curves
itself, as before, and says which source each member's curves came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from protoaudit.core.faithfulness import DeletionCurves, deletion_curves, trapezoid_auc
from protoaudit.engine.faithfulness import OCCLUSION, sample_prototypes
from protoaudit.engine.run import load_faithfulness
from protoaudit.report.context import ReportContext

RECORDED = "faithfulness.json"
COMPUTED = "computed by the report"


def faithfulness_section(ctx: ReportContext, members: list[dict[str, Any]]) -> dict[str, Any]:
    """Deletion curves for the members' sections ``members`` (each sampled prototype's row also gets its
    ``deletion`` AUCs); ``sources`` says per member whether they were read or computed."""
    options = ctx.options
    base = {
        "method": "deletion",
        "steps": options.deletion_steps,
        "random_orders": options.random_orders,
        "occlusion": OCCLUSION,
    }
    if ctx.bundle is None or options.faithfulness_per_member <= 0:
        why = "the dataset could not be rebuilt" if ctx.bundle is None else "not asked for (--deletion 0)"
        return {**base, "available": False, "note": f"deletion curves: {why}", "prototypes": []}
    ctx.reporter.log("report: deletion curves")
    results = []
    fractions: list[float] = []
    sources: dict[str, str] = {}
    for member in members:
        rows = member["prototypes"]
        by_number = {int(r["prototype"]): r for r in rows}
        found = _recorded(ctx, member["name"], set(by_number))
        if found is not None:
            chosen, curves = [by_number[j] for j in found[0]], found[1]
            sources[member["name"]] = RECORDED
        else:
            # the same draw training records (its own generator per member, so a member read from its file
            # leaves the other members' samples as they are)
            pick = np.sort(sample_prototypes(len(rows), options.faithfulness_per_member, options.seed))
            if not len(pick):
                continue
            chosen = [rows[int(p)] for p in pick]
            curves = _compute(ctx, member["name"], chosen)
            sources[member["name"]] = COMPUTED
        fractions = curves.fractions.tolist()
        results += _member_results(member["name"], chosen, curves)
    n_lower = sum(1 for r in results if r["auc_activation"] < r["auc_random"])
    return {
        **base,
        "available": True,
        "note": None,
        "sources": sources,
        "fractions": fractions,
        "prototypes": results,
        "summary": {
            "n": len(results),
            "n_activation_below_random": n_lower,
            "mean_auc_activation": float(np.mean([r["auc_activation"] for r in results]))
            if results
            else None,
            "mean_auc_random": float(np.mean([r["auc_random"] for r in results])) if results else None,
        },
    }


def _recorded(ctx: ReportContext, name: str, numbers: set[int]) -> tuple[list[int], DeletionCurves] | None:
    """The prototypes and curves faithfulness.json holds for member ``name`` when they answer what the
    report asks for (same weights, steps, random orders and seed, enough prototypes); else None."""
    options = ctx.options
    document = load_faithfulness(ctx.run.path, name)
    if document is None:
        return None
    wanted = {"steps": options.deletion_steps, "random_orders": options.random_orders, "seed": options.seed}
    if any(document.get(k) != v for k, v in wanted.items()):
        return None
    if document.get("weights_sha256") != ctx.run.member_meta(name).get("weights_sha256"):
        ctx.notes.append(
            f"members/{name}/faithfulness.json was made by other weights: its curves are recomputed"
        )
        return None
    entries = document.get("prototypes") or []
    n = min(options.faithfulness_per_member, len(numbers))
    if len(entries) < n:
        return None
    try:
        kept = sorted(entries[:n], key=lambda e: int(e["prototype"]))
        if any(int(e["prototype"]) not in numbers for e in kept):
            return None
        curves = DeletionCurves(
            np.asarray(document["fractions"], dtype=np.float64),
            np.asarray([e["activation"] for e in kept], dtype=np.float64).reshape(len(kept), -1),
            np.asarray([e["random"] for e in kept], dtype=np.float64).reshape(
                len(kept), options.random_orders, -1
            ),
        )
    except (KeyError, TypeError, ValueError) as exc:  # a damaged file: computed instead, and said
        ctx.notes.append(
            f"members/{name}/faithfulness.json could not be read ({exc!r}): its curves are recomputed"
        )
        return None
    return [int(e["prototype"]) for e in kept], curves


def _compute(ctx: ReportContext, name: str, chosen: list[dict[str, Any]]) -> DeletionCurves:
    """Run member ``name`` over the occluded source images of the ``chosen`` prototype rows."""
    options = ctx.options
    model = ctx.run.member(name)
    images = ctx.bundle.push.batch([r["source_index"] for r in chosen])
    return deletion_curves(
        model,
        images,
        torch.as_tensor([r["prototype"] for r in chosen]),
        steps=options.deletion_steps,
        random_orders=options.random_orders,
        seed=options.seed,
    )


def _member_results(name: str, chosen: list[dict[str, Any]], curves: DeletionCurves) -> list[dict[str, Any]]:
    """One result per chosen prototype row; each row's ``deletion`` gets its two AUCs."""
    act, rnd = curves.normalised()
    auc_act = trapezoid_auc(curves.fractions, act)
    auc_rnd = trapezoid_auc(curves.fractions, rnd)
    out = []
    for n, r in enumerate(chosen):
        result = {
            "member": name,
            "prototype": r["prototype"],
            "class_name": r["class_name"],
            "source_image": r["source_image"],
            "score_intact": float(curves.activation[n, 0]),
            "activation": act[n].tolist(),
            "random": rnd[n].tolist(),
            "auc_activation": float(auc_act[n]),
            "auc_random": float(auc_rnd[n]),
            "half_activation": _half_point(curves.fractions, act[n]),
            "half_random": _half_point(curves.fractions, rnd[n]),
            "thumb": r["thumb"],
        }
        out.append(result)
        r["deletion"] = {"auc_activation": result["auc_activation"], "auc_random": result["auc_random"]}
    return out


def _half_point(fractions: Sequence[float] | np.ndarray, curve: Sequence[float] | np.ndarray) -> float | None:
    """The deleted fraction at which a normalised deletion curve first falls to one half (None if never)."""
    below = np.flatnonzero(np.asarray(curve) <= 0.5)
    return float(np.asarray(fractions)[below[0]]) if len(below) else None
