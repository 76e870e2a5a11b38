"""Prune background prototypes by k-NN class purity (paper §2.6, original prune.py).

For each prototype: its k nearest *training images* by latent distance, over all classes, each image counting
once through its closest patch — searched in the member's patch index, so no pass over the images is needed.
A prototype is pruned when fewer than τ of those images are of its class; then the last layer is retrained on
the remaining prototypes (CE + L1, as the last-layer stage) from the indexed training patches, and the pruned
member is saved as a new checkpoint ``members/<m>-pruned/`` — the unpruned one is never touched. The audits
that prune writes into audit.json live beside it: :mod:`~protoaudit.engine.ground_truth`,
:mod:`~protoaudit.engine.shortcut`, :mod:`~protoaudit.engine.duplicates`, :mod:`~protoaudit.engine.causal_audit`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from protoaudit.core.causal import MIN_DROP
from protoaudit.core.detectors import DETECTOR_NAMES
from protoaudit.core.metrics import ensemble_logits, top1
from protoaudit.core.model import ProtoPNet
from protoaudit.core.purity import knn_class_purity, prune_decision
from protoaudit.core.stats import top1_interval
from protoaudit.engine.analysis import write_nearest
from protoaudit.engine.causal_audit import (
    MemberAudit,
    audit_member,
    causal_entry,
    detectors_entry,
    table_columns,
)
from protoaudit.engine.decisions import (
    append_decisions,
    apply_decisions,
    new_decisions,
    read_decisions,
    weights_digest,
)
from protoaudit.engine.duplicates import find_duplicates
from protoaudit.engine.ground_truth import (
    PART_PURITY_TOP,
    add_ground_truth,
    ground_truth_audit,
    pooled_precision_recall,
)
from protoaudit.engine.index.search import (
    NearestImages,
    PatchIndex,
    load_index,
    nearest_images,
    nearest_images_from_minima,
)
from protoaudit.engine.io import write_json
from protoaudit.engine.progress import NULL_REPORTER, Reporter
from protoaudit.engine.retune import retuned_copy
from protoaudit.engine.run import (
    ACCURACY_COLUMNS,
    PRUNED_SUFFIX,
    TEST_DISTANCES_FILE,
    Run,
    RunWriter,
    accuracy_row,
    load_logits,
    load_test_distances,
    member_path,
    pruned_meta,
    pruned_name,
    save_logits,
    save_member,
    write_csv,
)
from protoaudit.engine.shortcut import shortcut_entry
from protoaudit.engine.train import predict
from protoaudit.errors import CheckpointError, InputError, Remedy, StaleIndexError

if TYPE_CHECKING:
    from protoaudit.engine.data import DatasetBundle
    from protoaudit.engine.recipe import Recipe


@dataclass
class MemberPruning:
    name: str
    purity: pd.DataFrame
    pruned_model: ProtoPNet
    test_logits: torch.Tensor
    audit: dict[str, Any] = field(default_factory=dict)
    member_audit: MemberAudit | None = None
    stale_decisions: list[dict[str, Any]] = field(default_factory=list)
    duplicates: list[dict[str, Any]] = field(default_factory=list)
    retune: dict[str, Any] = field(default_factory=dict)  # the last-layer solver's report after pruning


@dataclass
class PruneResult:
    run: Run
    purity: pd.DataFrame
    accuracy: pd.DataFrame
    audit: dict[str, Any]
    duplicates: pd.DataFrame
    seconds: float


def prune_member(
    run: Run,
    name: str,
    bundle: DatasetBundle,
    k: int,
    threshold: int,
    finetune_epochs: int,
    recipe: Recipe,
    device: torch.device,
    index: PatchIndex,
    nearest: NearestImages,
    reporter: Reporter = NULL_REPORTER,
    detector: str = "knn_purity",
    decisions: list[dict[str, Any]] | None = None,
    test_distances: torch.Tensor | None = None,
) -> MemberPruning:
    """k-NN class purity of every prototype of member ``name`` from its ``k`` nearest training images
    (``nearest``, searched once in ``index``), its causal labels and every detector's flags, the pruned member
    (the prototypes ``detector`` flags, then the reviewer's ``decisions``), and its test logits.
    ``test_distances``: every test image's distance to every prototype, where the test index gave them."""
    model = run.member(name)
    meta = index.meta
    nearest = nearest.first(k)
    distances, rows = nearest.distances, nearest.rows
    valid = rows >= 0
    labels = nearest.column("label")
    image_ids = meta["image_id"].to_numpy()[np.maximum(rows, 0)]
    proto_class = np.asarray(model.config.prototype_class)
    purity = knn_class_purity(labels, proto_class)
    paper_flags = prune_decision(purity, threshold)
    push_d = nearest.min_distances
    if push_d is None or push_d.shape[0] != len(bundle.push):
        raise StaleIndexError(
            f"the train patch index of member {name} covers "
            f"{index.n_images} images, the recipe's push split {len(bundle.push)}",
            remedy=Remedy("rebuild it", "index", str(run.path)),
        )
    member_audit = audit_member(
        model,
        push_d,
        bundle,
        run.prototypes(name)["source_index"].to_numpy(),
        paper_flags,
        recipe.schedule.eval_batch_size,
        device,
        test_distances,
    )
    if detector not in member_audit.detection.flags:
        raise InputError(f"--detector {detector}: {member_audit.detection.skipped.get(detector, 'unknown')}")
    digest = weights_digest(run.path, name)
    pruned, decided, stale = apply_decisions(
        member_audit.detection.flags[detector], name, decisions or [], digest
    )

    table = pd.DataFrame(
        {
            "member": name,
            "prototype": np.arange(len(proto_class)),
            "class": proto_class,
            "class_name": [model.config.class_names[c] for c in proto_class],
            "purity": purity,
            "k": k,
            "nearest_image_ids": [
                ";".join(str(i) for i, ok in zip(ids, v, strict=True) if ok)
                for ids, v in zip(image_ids, valid, strict=True)
            ],
            "nearest_classes": [";".join(str(c) for c in row[row >= 0]) for row in labels],
            "nearest_distance": np.where(valid[:, 0], distances[:, 0], np.nan),
            "pruned": pruned,
            "detector": detector,
            "decision": decided,
        }
    )
    for column, values in table_columns(member_audit).items():
        table[column] = values
    add_ground_truth(table, run, name, meta, rows, bundle)

    # the pruned member: drop the prototypes and their last-layer columns, retrain h from the indexed patches
    retune_info: dict[str, Any] = {}
    pruned_model = retuned_copy(model, pruned, push_d, bundle, recipe, finetune_epochs, info=retune_info)
    test_logits = predict(pruned_model.to(device), bundle.test, recipe.schedule.eval_batch_size, device).cpu()
    pruned_model.cpu()
    why = f"purity < {threshold} of k = {k}" if detector == "knn_purity" else f"flagged by {detector}"
    reporter.log(f"[bold]{name}[/bold]: pruned {int(pruned.sum())} of {len(pruned)} prototypes ({why})")
    for record in stale:
        reporter.log(
            f"[yellow]{name}[/yellow]: a decision of {record.get('time')} was made for other weights "
            "(weights_sha256 differs); not applied"
        )
    return MemberPruning(
        name,
        table,
        pruned_model,
        test_logits,
        member_audit=member_audit,
        stale_decisions=stale,
        retune=retune_info,
    )


def _test_search(
    run: Run, name: str, n_test: int, k: int, reporter: Reporter = NULL_REPORTER
) -> tuple[NearestImages, dict[str, Any], str] | None:
    """Each prototype's ``k`` nearest test images of member ``name`` with every test image's distance to every
    prototype (the detectors' test distances), and the test patch index's recorded information: from the
    distances the member's test pass saved (``test_distances.safetensors``, checked against its weights and its
    saved logits) where they exist, else from one search of its test patch index; None when the index is
    missing, stale or of another test split (the audit then runs one pass over the test images instead). The
    third item says which source was used."""
    try:
        index = load_index(run.path, name, "test")
    except (InputError, FileNotFoundError):  # StaleIndexError is an InputError
        return None
    if index.n_images != n_test:
        return None
    model = run.member(name)
    try:
        d = load_test_distances(run.path, name, n_test, model.n_prototypes)
    except CheckpointError as exc:  # a damaged file: said, and the index searched instead
        reporter.log(f"[yellow]{name}[/yellow]: {exc}; searching the test index instead")
        d = None
    if d is not None:
        logits = load_logits(run.path, name) or {}
        recorded = logits.get("test")
        with torch.no_grad():
            again = model.head(d)
        if (
            recorded is not None
            and recorded.shape == again.shape
            and torch.allclose(again, recorded, 1e-4, 1e-4)
        ):
            return nearest_images_from_minima(index, model.prototype_vectors, d, k), index.info, "test pass"
        reporter.log(
            f"[yellow]{name}[/yellow]: {TEST_DISTANCES_FILE} does not give the saved test logits; "
            "searching the test index instead"
        )
    return nearest_images(index, model.prototype_vectors, k, with_minima=True), index.info, "index search"


def prunable_members(run: Run) -> list[str]:
    """The run's ProtoPNet members (baselines and pruned copies excluded)."""
    out = []
    for name in run.member_names:
        if name.endswith(PRUNED_SUFFIX):
            continue
        if run.member_meta(name).get("kind", "protopnet") != "protopnet":
            continue
        out.append(name)
    return out


def prune_run(
    run: Run,
    k: int = 6,
    threshold: int = 3,
    finetune_epochs: int | None = None,
    device: str | torch.device = "cpu",
    reporter: Reporter = NULL_REPORTER,
    detector: str = "knn_purity",
    remove: list[str] | None = None,
    keep: list[str] | None = None,
    reason: str | None = None,
) -> PruneResult:
    """Prune every member of ``run``, write purity.csv, pruned checkpoints, accuracy rows, audit.json and
    duplicates.csv, and return them.

    ``detector`` names the detector whose flags are pruned (default: the paper's k-NN purity); ``remove`` and
    ``keep`` (``"vgg:2,5"``) with ``reason`` are a reviewer's decisions, appended to ``decisions.jsonl`` and
    applied after the detector's flags together with every earlier decision of the log."""
    if detector not in DETECTOR_NAMES:
        raise InputError(f"--detector {detector!r}: expected one of {', '.join(DETECTOR_NAMES)}")
    if k < 1:
        raise InputError(f"k must be >= 1, got {k}")
    if not 1 <= threshold <= k:
        raise InputError(f"the purity threshold must be between 1 and k = {k}, got {threshold}")
    from protoaudit.engine.run import writing

    with writing(run.path, "prune"):
        return _prune_run(
            run, k, threshold, finetune_epochs, device, reporter, detector, remove, keep, reason
        )


def _prune_run(
    run: Run,
    k: int,
    threshold: int,
    finetune_epochs: int | None,
    device: str | torch.device,
    reporter: Reporter,
    detector: str,
    remove: list[str] | None,
    keep: list[str] | None,
    reason: str | None,
) -> PruneResult:
    """prune_run's work, holding the run's lock."""
    started = time.perf_counter()
    device = torch.device(device)
    recipe = run.recipe()
    bundle = run.dataset()
    epochs = recipe.schedule.last_layer_epochs if finetune_epochs is None else finetune_epochs
    if epochs < 0:
        raise InputError(f"the last-layer fine-tuning epochs must be >= 0, got {epochs}")
    names = prunable_members(run)
    if not names:
        raise InputError(f"run {run.path} has no ProtoPNet member to prune")
    counts = {n: run.member(n).n_prototypes for n in names}
    earlier = read_decisions(run.path)
    recorded = new_decisions(run.path, counts, remove or [], keep or [], reason)
    results = []
    audit: dict[str, Any] = {
        "k": k,
        "threshold": threshold,
        "purity_scale": "count",  # purity.csv's purity: how many of the k nearest images share the class
        "finetune_epochs": epochs,
        "detector": detector,
        "members": {},
    }
    nearest_by_member: dict[str, NearestImages] = {}
    index_by_member: dict[str, PatchIndex] = {}
    test_by_member: dict[str, tuple[NearestImages, dict[str, Any], str]] = {}
    for name in names:
        # one index load and one search per member, with the largest k any consumer needs
        index = load_index(run.path, name, "train")
        nearest = nearest_images(
            index, run.member(name).prototype_vectors, max(k, PART_PURITY_TOP), with_minima=True
        )
        # the test index once too: the detectors' test distances and nearest_test.csv from one search
        test_search = _test_search(run, name, len(bundle.test), max(k, PART_PURITY_TOP), reporter)
        if test_search is not None:
            test_by_member[name] = test_search
        result = prune_member(
            run,
            name,
            bundle,
            k,
            threshold,
            epochs,
            recipe,
            device,
            index,
            nearest,
            reporter,
            detector,
            earlier + recorded,
            test_search[0].min_distances if test_search is not None else None,
        )
        result.audit = ground_truth_audit(run.member(name), result.purity, nearest, bundle, recipe, device)
        nearest_by_member[name] = nearest
        index_by_member[name] = index
        results.append(result)
    member_audits = {r.name: r.member_audit for r in results if r.member_audit is not None}
    audit["causal"] = {
        "available": any(a.causal is not None for a in member_audits.values()),
        "min_drop": MIN_DROP,
        "members": {
            n: causal_entry(a, run.member(n).config.prototype_class) for n, a in member_audits.items()
        },
    }
    audit["detectors"] = detectors_entry({r.name: r.purity for r in results}, member_audits, detector)
    audit["shortcut"] = shortcut_entry(run, results, bundle, recipe, epochs)
    audit["decisions"] = {
        "log": earlier + recorded,
        "new": len(recorded),
        "stale": [rec for r in results for rec in r.stale_decisions],
    }

    # write: pruned checkpoints first, then the tables that refer to them
    accuracy = run.accuracy()
    accuracy = accuracy[~accuracy["pruned"].astype(bool)].copy()
    new_rows = []
    for result in results:
        parent_meta = run.member_meta(result.name)
        parent_protos = run.prototypes(result.name)
        kept = ~result.purity["pruned"].to_numpy()
        protos = parent_protos[kept].copy()
        protos.insert(1, "parent_prototype", protos["prototype"].to_numpy())
        protos["prototype"] = np.arange(len(protos))
        test_top1 = top1(result.test_logits, bundle.test.labels)
        pruned_dir = member_path(run.path, pruned_name(result.name))
        save_member(
            pruned_dir,
            result.pruned_model,
            pruned_meta(
                result.name,
                parent_meta,
                k,
                threshold,
                epochs,
                result.retune,
                result.purity.loc[result.purity["pruned"], "prototype"].astype(int).tolist(),
                test_top1,
            ),
            protos,
        )
        save_logits(pruned_dir, {"test": result.test_logits}, {"test": bundle.test.labels})
        new_rows.append(
            accuracy_row(
                result.name,
                "member",
                result.pruned_model.config.trunk,
                test_top1,
                result.pruned_model.n_prototypes,
                len(bundle.test),
                pruned=True,
                interval=top1_interval(result.test_logits, bundle.test.labels),
            )
        )
        audit["members"][result.name] = {
            "n_prototypes": len(kept),
            "n_pruned": int((~kept).sum()),
            "mean_purity": float(result.purity["purity"].mean()),
            "top1": float(accuracy.loc[(accuracy["model"] == result.name), "top1"].iloc[0])
            if (accuracy["model"] == result.name).any()
            else None,
            "top1_pruned": test_top1,
            **result.audit,
        }
    combined = ensemble_logits([r.test_logits for r in results])
    new_rows.append(
        accuracy_row(
            "ensemble",
            "ensemble",
            "+".join(r.pruned_model.config.trunk for r in results),
            top1(combined, bundle.test.labels),
            sum(r.pruned_model.n_prototypes for r in results),
            len(bundle.test),
            pruned=True,
            interval=top1_interval(combined, bundle.test.labels),
        )
    )
    accuracy = pd.concat([accuracy, pd.DataFrame(new_rows)], ignore_index=True)[ACCURACY_COLUMNS]
    audit["ensemble"] = {
        "top1": float(
            accuracy.loc[(accuracy["model"] == "ensemble") & ~accuracy["pruned"].astype(bool), "top1"].iloc[0]
        )
        if ((accuracy["model"] == "ensemble") & ~accuracy["pruned"].astype(bool)).any()
        else None,
        "top1_pruned": top1(combined, bundle.test.labels),
    }
    audit.update(pooled_precision_recall([r.purity for r in results]))
    purity = pd.concat([r.purity for r in results], ignore_index=True)
    duplicates = find_duplicates(run, names)
    audit["duplicates"] = len(duplicates)
    for result in results:  # the nearest images the report shows, and global analysis reuses
        nearest = nearest_by_member[result.name]
        write_nearest(
            run.path, result.name, "train", nearest.table(), nearest.k, index_by_member[result.name].info
        )
        if result.name in test_by_member:
            test_nearest, test_info, source = test_by_member[result.name]
            write_nearest(
                run.path, result.name, "test", test_nearest.table(), test_nearest.k, test_info, source
            )
    append_decisions(run.path, recorded)
    write_csv(run.path / "purity.csv", purity)
    write_csv(run.path / "duplicates.csv", duplicates)
    from protoaudit.engine.evaluation import evaluate  # compactness, uncertainty, calibration, push effect

    audit.update(evaluate(run, bundle, batch_size=recipe.schedule.eval_batch_size))
    write_json(run.path / "audit.json", audit, strict=True)
    write_csv(run.path / "accuracy.csv", accuracy)
    RunWriter.reopen(run).update(
        pruning={
            "k": k,
            "threshold": threshold,
            "finetune_epochs": epochs,
            "members": [pruned_name(n) for n in names],
        }
    )
    return PruneResult(run, purity, accuracy, audit, duplicates, time.perf_counter() - started)
