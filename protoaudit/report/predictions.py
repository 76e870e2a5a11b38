"""The report's predictions: the ensemble's confusion matrix before and after pruning, each checkpoint's
recomputed top-1 against accuracy.csv, and sampled test images with the prototypes that decided them (and
full reasoning sheets, paper Fig. 3, for the first few)."""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import torch

from protoaudit.core.stats import confusion as confusion_matrix
from protoaudit.engine.io import jsonable
from protoaudit.engine.run import PRUNED_SUFFIX, pruned_name
from protoaudit.errors import InputError
from protoaudit.report.context import ReportContext
from protoaudit.report.images import box_thumbnail, to_uint8

SHEET_PROTOTYPES = 3  # prototypes listed per member and class on an embedded reasoning sheet


@torch.no_grad()
def forward(ctx: ReportContext, name: str) -> torch.Tensor:
    """(N, K) test logits of checkpoint ``name``: the ones saved when it was made
    (``members/<m>/logits.safetensors``), or — with ``verify``, or for a run that has none — from running
    the saved checkpoint over the test split."""
    saved = None if ctx.options.verify else ctx.run.logits(name)
    split = ctx.bundle.test
    if saved is not None and "test" in saved and len(saved["test"]) == len(split):
        ctx.logits_source[name] = "saved logits"
        return saved["test"]
    ctx.logits_source[name] = "checkpoint re-run"
    model = ctx.run.member(name)
    logits = []
    with torch.no_grad():
        for start in range(0, len(split), ctx.options.batch_size):
            x = split.batch(list(range(start, min(start + ctx.options.batch_size, len(split)))))
            logits.append(model(x)[0])
    return torch.cat(logits)


def predictions(
    ctx: ReportContext, rows: list[dict[str, Any]], pruned: list[str], class_names: list[str]
) -> dict[str, Any]:
    unavailable = {
        "confusion": {
            "available": False,
            "note": "the dataset could not be rebuilt",
            "models": [],
            "checkpoints": [],
        },
        "reasoning": {
            "available": False,
            "note": "the dataset could not be rebuilt",
            "sheets_note": None,
            "images": [],
        },
    }
    members = ctx.run.member_names
    if ctx.bundle is None or not members:
        return unavailable
    ctx.reporter.log("report: ensemble test logits")
    labels = np.asarray(ctx.bundle.test.labels, dtype=np.int64)
    k = len(class_names)
    outputs = {name: forward(ctx, name) for name in members}
    confusion = []
    groups: list[tuple[bool, list[str]]] = [(False, members)]
    pruned_members = [pruned_name(m) for m in members]
    if pruned and all(p in pruned for p in pruned_members):
        groups.append((True, pruned_members))
        outputs.update({name: forward(ctx, name) for name in pruned_members})
    ensemble_rows = {r["pruned"]: r for r in rows if r["kind"] == "ensemble"}
    for is_pruned, names in groups:
        logits = torch.stack([outputs[n] for n in names]).sum(dim=0)
        predicted = logits.argmax(dim=1).numpy()
        matrix = confusion_matrix(labels, predicted, k)  # sklearn.metrics.confusion_matrix
        top1 = float((predicted == labels).mean()) if len(labels) else None
        recorded = ensemble_rows.get(is_pruned, {}).get("top1")
        confusion.append(
            {
                "model": "ensemble",
                "pruned": is_pruned,
                "members": names,
                "matrix": matrix.tolist(),
                "top1_recomputed": top1,
                "top1_recorded": recorded,
                "matches_accuracy_csv": None
                if recorded is None or top1 is None
                else bool(abs(recorded - top1) < 1e-9),
            }
        )
        if recorded is not None and top1 is not None and abs(recorded - top1) >= 1e-9:
            ctx.notes.append(
                f"The ensemble ({'after' if is_pruned else 'before'} pruning) recomputed from the saved members "
                f"scores top-1 {top1:.4f} on test; accuracy.csv records {recorded:.4f}."
            )
    recorded_rows = {(r["model"], r["pruned"]): r["top1"] for r in rows if r["kind"] == "member"}
    checkpoints = []
    for name, logits in outputs.items():
        top1 = float((logits.argmax(dim=1).numpy() == labels).mean()) if len(labels) else None
        is_pruned = name not in members
        recorded = recorded_rows.get(
            (name, is_pruned), recorded_rows.get((name.removesuffix(PRUNED_SUFFIX), is_pruned))
        )
        checkpoints.append(
            {
                "checkpoint": name,
                "pruned": is_pruned,
                "source": ctx.logits_source.get(name),
                "top1_recomputed": top1,
                "top1_recorded": recorded,
                "matches_accuracy_csv": None
                if recorded is None or top1 is None
                else bool(abs(recorded - top1) < 1e-9),
            }
        )
    ensemble = torch.stack([outputs[n] for n in members]).sum(dim=0)
    return {
        "confusion": {"available": True, "note": None, "models": confusion, "checkpoints": checkpoints},
        "reasoning": _reasoning(ctx, ensemble, outputs, members, labels, class_names),
    }


@torch.no_grad()
def _reasoning(
    ctx: ReportContext,
    ensemble: torch.Tensor,
    outputs: dict[str, torch.Tensor],
    members: list[str],
    labels: np.ndarray,
    class_names: list[str],
) -> dict[str, Any]:

    pruned_names = [pruned_name(m) for m in members]
    pruned_ensemble = (
        torch.stack([outputs[n] for n in pruned_names]).sum(dim=0)
        if all(n in outputs for n in pruned_names)
        else None
    )
    predicted = ensemble.argmax(dim=1).numpy()
    correct = np.flatnonzero(predicted == labels)
    wrong = np.flatnonzero(predicted != labels)
    chosen_correct = ctx.rng.permutation(correct)[: ctx.options.reasoning_correct].tolist()
    chosen_wrong = ctx.rng.permutation(wrong)[: ctx.options.reasoning_wrong].tolist()
    chosen = [*chosen_correct, *chosen_wrong]
    # full reasoning sheets for the first samples, shared between correct and wrong ones
    n_wrong = min(len(chosen_wrong), ctx.options.sheets // 2)
    n_correct = min(len(chosen_correct), ctx.options.sheets - n_wrong)
    n_wrong = min(len(chosen_wrong), ctx.options.sheets - n_correct)
    with_sheet = set(chosen_correct[:n_correct] + chosen_wrong[:n_wrong])
    test = ctx.bundle.test
    images = {}
    if chosen:
        batch = test.batch(chosen)
        images = dict(zip(chosen, zip(batch, to_uint8(batch.numpy()), strict=True), strict=True))
    sheets_note = None  # every sample can have its sheet: the engine computes it, report/sheet.py draws it
    out = []
    for i in chosen:
        x, pixels = images[i]
        p = int(predicted[i])
        top = torch.topk(ensemble[i], k=min(3, ensemble.shape[1]))
        entry: dict[str, Any] = {
            "split": "test",
            "index": int(i),
            "image_id": str(test.image_ids[i]),
            "label": int(labels[i]),
            "label_name": class_names[int(labels[i])],
            "predicted": p,
            "predicted_name": class_names[p],
            "correct": bool(p == labels[i]),
            "thumb": ctx.asset(f"test/{i}", partial(box_thumbnail, pixels, None)),
            "top_classes": [
                {"class": int(c), "class_name": class_names[int(c)], "logit": float(v)}
                for v, c in zip(top.values, top.indices, strict=True)
            ],
            "members": [],
            "members_pruned": [],
            "pruned_predicted": None,
            "pruned_predicted_name": None,
            "sheet": None,
        }
        entry["members"] = [
            _reading(ctx, outputs, name, name, x, pixels, i, p, class_names) for name in members
        ]
        if pruned_ensemble is not None:
            q = int(pruned_ensemble[i].argmax())
            entry["pruned_predicted"] = q
            entry["pruned_predicted_name"] = class_names[q]
            entry["members_pruned"] = [
                _reading(ctx, outputs, pruned_name(name), name, x, pixels, i, q, class_names)
                for name in members
            ]
        if i in with_sheet:
            entry["sheet"] = _sheet(ctx, i, x)
        out.append(entry)
    return {
        "available": True,
        "models": list(members),
        "pruned_models": pruned_names if pruned_ensemble is not None else [],
        "n_images": len(labels),
        "n_correct": len(correct),
        "n_wrong": len(wrong),
        "note": None if chosen else "no test image to show",
        "sheets_note": sheets_note,
        "images": out,
    }


@torch.no_grad()
def _reading(
    ctx: ReportContext,
    outputs: dict[str, torch.Tensor],
    name: str,
    parent: str,
    x: torch.Tensor,
    pixels: np.ndarray,
    i: int,
    target: int,
    class_names: list[str],
) -> dict[str, Any]:
    """What checkpoint ``name`` (member ``parent`` or its pruned copy) says of sampled image ``i``, and its
    evidence for class ``target`` (the ensemble prediction the entry explains)."""
    predicted = int(outputs[name][i].argmax())
    return {
        "member": name,
        "pruned_model": name != parent,
        "predicted": predicted,
        "predicted_name": class_names[predicted],
        "logit_predicted": float(outputs[name][i, target]),
        "evidence": _evidence(ctx, name, x, pixels, i, target, class_names, parent),
    }


def _evidence(
    ctx: ReportContext,
    name: str,
    x: torch.Tensor,
    pixels: np.ndarray,
    i: int,
    p: int,
    class_names: list[str],
    parent: str,
) -> list[dict[str, Any]]:
    """The three prototypes of checkpoint ``name`` that add most to class ``p``'s logit on test image
    ``i`` (similarity × weight). For a pruned checkpoint, each prototype also carries its number in
    ``parent`` (the member it was pruned from; ``prototypes.csv`` column ``parent_prototype``)."""
    from protoaudit.core.geometry import percentile_boxes
    from protoaudit.core.model import similarity

    model = ctx.run.member(name)
    parents: list[int] | None = None
    if name != parent:
        table = ctx.run.prototypes(name)
        if "parent_prototype" in table:
            parents = [int(v) for v in table["parent_prototype"]]
    # one pass through the member: its forward's min distances, and the maps, from the same distances
    distances = model.distances(model.latent(x[None]))  # (1, m, H, W)
    sims = similarity(distances.amin(dim=(2, 3))[0])  # (m,) at each prototype's closest patch
    contribution = sims * model.last_layer.weight[p]  # (m,) evidence for class p
    best = torch.topk(contribution, k=min(3, contribution.numel())).indices
    maps = similarity(distances)[0, best]  # (3, H, W)
    boxes = percentile_boxes(maps, x.shape[-1])
    pruned_in_parent = ctx.pruned_sets.get(parent, set())
    evidence = []
    for rank, j in enumerate(best.tolist()):
        box = [int(v) for v in boxes[rank]]
        original = j if parents is None else parents[j]
        evidence.append(
            {
                "prototype": j,
                "parent_prototype": None if parents is None else original,
                "pruned": name == parent and j in pruned_in_parent,
                "class": int(model.prototype_class[j]),
                "class_name": class_names[int(model.prototype_class[j])],
                "similarity": float(sims[j]),
                "weight": float(model.last_layer.weight[p, j]),
                "contribution": float(contribution[j]),
                "box": box,
                "thumb": ctx.asset(
                    f"test/{i}/box/{'-'.join(map(str, box))}",
                    partial(box_thumbnail, pixels, box),
                ),
                "prototype_thumb": ctx.prototype_thumbs.get((parent, original)),
            }
        )
    return evidence


def _sheet(ctx: ReportContext, index: int, image: torch.Tensor) -> dict[str, Any] | None:
    from protoaudit.engine.explain import explain_image
    from protoaudit.engine.index.queries import QueryImage
    from protoaudit.report.sheet import render_sheet_html

    test = ctx.bundle.test
    query = QueryImage(
        image, str(test.image_ids[index]), int(test.labels[index]), test.part_mask(index), "test", index
    )
    try:
        sheet = explain_image(ctx.run, query, top_classes=3, bundle=ctx.bundle)
        fragment = render_sheet_html(sheet, max_prototypes=SHEET_PROTOTYPES)
        document = jsonable(sheet.to_dict())
    except (InputError, ValueError, KeyError, TypeError) as exc:
        ctx.notes.append(f"reasoning sheet of test image {index} failed: {str(exc).splitlines()[0]}")
        return None
    _add_sheet_subtotals(document, SHEET_PROTOTYPES)
    if "<script" in fragment.lower():
        raise ValueError(
            "protoaudit.engine.explain returned a reasoning sheet with a script; refusing to embed it"
        )
    key = f"sheet/test/{index}"
    ctx.fragments[key] = fragment
    return {"fragment": key, "data": document}


def _add_sheet_subtotals(document: Any, shown: int) -> None:
    """The subtotals a reasoning sheet's HTML shows (points of the ``shown`` prototypes listed, of the other
    own-class prototypes, and how many those are), added to its dict so report.json holds every number."""
    for cls in document.get("classes", []) if isinstance(document, dict) else []:
        for member in cls.get("members", []):
            points = [float(p["points"]) for p in member.get("prototypes", [])]
            member["shown_points"] = sum(points[:shown])
            member["more_points"] = sum(points[shown:])
            member["n_shown"] = len(points[:shown])
            member["n_more"] = len(points[shown:])
