"""Prune background prototypes by k-NN class purity (paper §2.6, original prune.py), and audit prototypes
against ground-truth parts where the dataset has them.

For each prototype: its k nearest *training images* by latent distance, over all classes, each image counting
once through its closest patch — searched in the member's patch index, so no pass over the images is needed.
A prototype is pruned when fewer than τ of those images are of its class; then the last layer is retrained on
the remaining prototypes (CE + L1, as the last-layer stage) from the indexed training patches, and the pruned
member is saved as a new checkpoint ``members/<m>-pruned/`` — the unpruned one is never touched.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from protoaudit.core.causal import MIN_DROP
from protoaudit.core.detectors import DETECTOR_NAMES
from protoaudit.core.geometry import box_iou
from protoaudit.core.knn import min_distances_by_image
from protoaudit.core.metrics import ensemble_logits, top1
from protoaudit.core.model import ProtoPNet
from protoaudit.core.purity import (
    activated_parts,
    consistency,
    duplicate_pairs,
    knn_class_purity,
    part_purity,
    perturb,
    precision_recall,
    prune_decision,
    stability,
)
from protoaudit.core.stats import top1_interval
from protoaudit.engine.analysis import NEAREST_COLUMNS, nearest_csv_path
from protoaudit.engine.causal_audit import (
    SHIFT_LEAK_NOTE,
    MemberAudit,
    audit_member,
    causal_entry,
    detectors_entry,
    evaluate_without,
    table_columns,
)
from protoaudit.engine.decisions import (
    append_decisions,
    apply_decisions,
    new_decisions,
    read_decisions,
    weights_digest,
)
from protoaudit.engine.index.search import NearestImages, PatchIndex, load_index, nearest_images
from protoaudit.engine.io import read_json, write_json
from protoaudit.engine.progress import NULL_REPORTER, Reporter
from protoaudit.engine.run import (
    ACCURACY_COLUMNS,
    PRUNED_SUFFIX,
    Run,
    RunWriter,
    accuracy_row,
    member_path,
    pruned_name,
    save_logits,
    save_member,
    write_csv,
)
from protoaudit.engine.train import fit_last_layer, predict
from protoaudit.errors import InputError, Remedy

if TYPE_CHECKING:
    from protoaudit.engine.data import DatasetBundle, ImageSplit
    from protoaudit.engine.recipe import Recipe

PART_PURITY_TOP = 10  # PIP-Net's top-10 patches
CONSISTENCY_THRESHOLD = 0.8  # Huang et al.'s μ
BAD_PART_KINDS = ("background", "shared", "shortcut")  # what pruning should remove, where parts are known
UNKNOWN_PART_KINDS = ("unknown", "no part annotated")  # left out of precision and recall


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
) -> MemberPruning:
    """k-NN class purity of every prototype of member ``name`` from its ``k`` nearest training images
    (``nearest``, searched once in ``index``), its causal labels and every detector's flags, the pruned member
    (the prototypes ``detector`` flags, then the reviewer's ``decisions``), and its test logits."""
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
    vectors = torch.as_tensor(index.vectors())
    image_index = torch.tensor(meta["image_index"].to_numpy(), dtype=torch.long)
    member_audit = audit_member(
        model,
        vectors,
        image_index,
        bundle,
        run.prototypes(name)["source_index"].to_numpy(),
        paper_flags,
        recipe.schedule.eval_batch_size,
        device,
        _test_patches(run, name),
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
    _add_ground_truth(table, run, name, meta, rows, bundle)

    # the pruned member: drop the prototypes and their last-layer columns, retrain h from the indexed patches
    retune_info: dict[str, Any] = {}
    pruned_model = retuned_copy(
        model, pruned, vectors, image_index, bundle, recipe, finetune_epochs, info=retune_info
    )
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


def _test_patches(run: Run, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The test split's indexed patches of member ``name`` (vectors, image index), or None when the index is
    missing or stale (the audit then runs one pass over the test images instead)."""
    try:
        index = load_index(run.path, name, "test")
    except (InputError, FileNotFoundError):  # StaleIndexError is an InputError
        return None
    return (
        torch.as_tensor(index.vectors()),
        torch.tensor(index.meta["image_index"].to_numpy(), dtype=torch.long),
    )


def retuned_copy(
    model: ProtoPNet,
    pruned: np.ndarray,
    vectors: torch.Tensor,
    image_index: torch.Tensor,
    bundle: Any,
    recipe: Any,
    finetune_epochs: int,
    info: dict[str, Any] | None = None,
) -> ProtoPNet:
    """A copy of ``model`` without the prototypes where ``pruned`` (m,) is True and their last-layer columns,
    its last layer retrained on the indexed push patches (the training's stage 4 with the recipe's solver), in
    eval mode; ``info`` receives the solver's report (solver, iterations, converged, residual)."""
    pruned_model = copy.deepcopy(model).cpu()
    pruned_model.keep_prototypes(torch.as_tensor(~np.asarray(pruned, dtype=bool)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a K × m layer in batches of a few images: more threads only wait on each other
    try:
        report = _retune(pruned_model, vectors, image_index, bundle, recipe, finetune_epochs)
    finally:
        torch.set_num_threads(threads)
    if info is not None:
        info.update(report)
    return pruned_model.eval()


def _retune(
    pruned_model: ProtoPNet,
    vectors: torch.Tensor,
    image_index: torch.Tensor,
    bundle: Any,
    recipe: Any,
    finetune_epochs: int,
) -> dict[str, Any]:
    if not pruned_model.n_prototypes or finetune_epochs <= 0:  # 0: keep h's remaining columns as they are
        return {}
    min_d = min_distances_by_image(
        vectors, image_index, len(bundle.push), pruned_model.prototype_vectors.detach()
    )
    # the training's stage 4 with the recipe's solver (FISTA: to its tolerance; Adam: finetune_epochs)
    retune = fit_last_layer(
        pruned_model,
        min_d,
        torch.tensor(np.asarray(bundle.push.labels), dtype=torch.long),
        recipe,
        None,
        torch.Generator().manual_seed(recipe.seed),
        epochs=finetune_epochs,
    )
    return {k: retune[k] for k in ("solver", "iterations", "converged", "residual") if k in retune}


def _add_ground_truth(
    table: pd.DataFrame, run: Run, name: str, meta: pd.DataFrame, rows: np.ndarray, bundle: DatasetBundle
) -> None:
    """Source-patch part and the parts of the k nearest patches, where the index knows parts."""
    kinds = getattr(bundle, "part_kinds", None)
    part_col = meta["part"].to_numpy() if "part" in meta else None
    if part_col is None or (part_col < 0).all():
        table["source_part"] = -1
        table["source_part_kind"] = "unknown"
        table["nearest_parts"] = ""
        return
    prototypes = run.prototypes(name)
    key = pd.MultiIndex.from_arrays([meta["image_index"], meta["h"], meta["w"]])
    lookup = pd.Series(np.arange(len(meta)), index=key)
    src_rows = lookup.reindex(
        pd.MultiIndex.from_arrays([prototypes["source_index"], prototypes["h"], prototypes["w"]])
    )
    source_part = np.where(src_rows.notna(), part_col[src_rows.fillna(0).astype(int).to_numpy()], -1)
    table["source_part"] = source_part
    names = getattr(bundle, "part_names", None) or []
    table["source_part_name"] = [names[p] if 0 <= p < len(names) else "" for p in source_part]
    if kinds is None and hasattr(bundle.push, "part_keypoints"):
        # part locations (CUB): a cell without one is not known to be background
        grid = (int(meta["h"].max()) + 1, int(meta["w"].max()) + 1)
        table["source_part_kind"] = _keypoint_part_kinds(bundle, prototypes, source_part, grid)
        return _finish_nearest(table, part_col, rows)
    table["source_part_kind"] = [
        (kinds[p] if kinds is not None and 0 <= p < len(kinds) else ("background" if p == 0 else "unknown"))
        for p in source_part
    ]
    _finish_nearest(table, part_col, rows)


def _finish_nearest(table: pd.DataFrame, part_col: np.ndarray, rows: np.ndarray) -> None:
    table["nearest_parts"] = [";".join(str(part_col[r]) for r in row if r >= 0) for row in rows]


def _keypoint_part_kinds(
    bundle: Any, prototypes: pd.DataFrame, source_part: np.ndarray, grid: tuple[int, int]
) -> list[str]:
    """Location kinds where parts are annotated as points: an annotated part is an object part
    ("discriminative"); a cell without a part location is "no part annotated" — unless the dataset gives the
    object's bounding box and the patch's cell lies wholly outside it, which is background."""
    push = bundle.push
    size = bundle.image_size
    out = []
    for (i, h, w), p in zip(prototypes[["source_index", "h", "w"]].to_numpy(), source_part, strict=True):
        if p > 0:
            out.append("discriminative")
            continue
        if p < 0:
            out.append("unknown")
            continue
        box = push.object_box(int(i)) if hasattr(push, "object_box") else None
        if box is None:
            out.append("no part annotated")
            continue
        y0, y1, x0, x1 = box
        gh, gw = grid
        cy0, cy1 = int(h) * size // gh, (int(h) + 1) * size // gh
        cx0, cx1 = int(w) * size // gw, (int(w) + 1) * size // gw
        outside = cy1 <= y0 or cy0 >= y1 or cx1 <= x0 or cx0 >= x1
        out.append("background" if outside else "no part annotated")
    return out


def ground_truth_audit(
    model: ProtoPNet,
    table: pd.DataFrame,
    nearest: NearestImages,
    bundle: DatasetBundle,
    recipe: Recipe,
    device: torch.device,
) -> dict[str, Any]:
    """Precision/recall of pruning against background/shared-part prototypes, PIP-Net part purity (over the
    first :data:`PART_PURITY_TOP` of ``nearest``), and Huang et al.'s consistency and stability — only where
    ground-truth parts are known."""
    audit: dict[str, Any] = {}
    known = ~table["source_part_kind"].isin(UNKNOWN_PART_KINDS).to_numpy()
    if known.any():
        bad = table["source_part_kind"].isin(BAD_PART_KINDS).to_numpy()
        precision, recall = precision_recall(table["pruned"].to_numpy()[known], bad[known])
        audit.update(
            {
                "prototypes_on_background": int((table["source_part_kind"] == "background").sum()),
                "prototypes_on_shared_parts": int((table["source_part_kind"] == "shared").sum()),
                "prototypes_on_shortcut": int((table["source_part_kind"] == "shortcut").sum()),
                "prototypes_on_discriminative_parts": int(
                    (table["source_part_kind"] == "discriminative").sum()
                ),
                "prototypes_part_unknown": int((~known).sum()),
                "pruning_precision": precision,
                "pruning_recall": recall,
            }
        )
        purity = part_purity(nearest.first(PART_PURITY_TOP).column("part"))
        table["part_purity"] = purity
        audit["part_purity"] = float(purity.mean())
        audit["part_purity_kept"] = (
            float(purity[~table["pruned"].to_numpy()].mean()) if (~table["pruned"]).any() else None
        )
    scores = _consistency_stability(model, bundle, recipe, device)
    if scores is not None:
        consistent, stable = scores
        table["consistent"] = consistent
        table["stability"] = stable
        kept = ~table["pruned"].to_numpy()
        audit["consistency"] = float(np.mean(consistent))
        audit["stability"] = float(np.nanmean(stable))
        audit["consistency_kept"] = float(np.mean(consistent[kept])) if kept.any() else None
        audit["stability_kept"] = float(np.nanmean(stable[kept])) if kept.any() else None
    return audit


def _keypoints(split: ImageSplit, i: int) -> np.ndarray | None:
    """(q, 3) int (part id, y, x) of the visible ground-truth parts of image i: the split's annotated part
    locations where it has them, else the centroid of each part's pixels in its mask."""
    if hasattr(split, "part_keypoints"):
        points = split.part_keypoints(i)
        return None if points is None else np.asarray(points, dtype=np.int64).reshape(-1, 3)
    mask = split.part_mask(i)
    if mask is None:
        return None
    out = []
    for p in np.unique(mask):
        if p == 0:
            continue
        ys, xs = np.nonzero(mask == p)
        out.append((int(p), round(ys.mean()), round(xs.mean())))
    return np.asarray(out, dtype=np.int64).reshape(-1, 3)


@torch.no_grad()
def _consistency_stability(
    model: ProtoPNet, bundle: DatasetBundle, recipe: Recipe, device: torch.device
) -> tuple[np.ndarray, np.ndarray] | None:
    test = bundle.test
    if len(test) == 0:
        return None
    found = [_keypoints(test, i) for i in range(len(test))]
    keypoints = [k for k in found if k is not None]
    if len(keypoints) != len(found):
        return None
    n_parts = max(
        len(bundle.part_names or []) - 1, max((int(k[:, 0].max()) for k in keypoints if len(k)), default=0)
    )
    if n_parts == 0:
        return None
    size = bundle.image_size
    half = max(1, round(36 / 224 * size))
    generator = torch.Generator().manual_seed(recipe.seed)
    model = model.to(device).eval()
    maps_clean, maps_noisy = [], []
    batch = recipe.schedule.eval_batch_size
    for start in range(0, len(test), batch):
        idx = list(range(start, min(start + batch, len(test))))
        x = test.batch(idx)
        noisy = perturb(x, model.std.cpu(), generator)
        maps_clean.append(model.distances(model.latent(x.to(device))).cpu())
        maps_noisy.append(model.distances(model.latent(noisy.to(device))).cpu())
    from protoaudit.core.model import similarity

    sim_clean, sim_noisy = similarity(torch.cat(maps_clean)), similarity(torch.cat(maps_noisy))
    labels = np.asarray(test.labels)
    visible = np.zeros((len(test), n_parts), dtype=np.uint8)
    for i, points in enumerate(keypoints):
        visible[i, points[:, 0] - 1] = 1
    m = model.n_prototypes
    consistent = np.zeros(m, dtype=bool)
    stable = np.full(m, np.nan)
    for j, k in enumerate(model.config.prototype_class):
        own = np.flatnonzero(labels == k)
        if len(own) == 0:
            continue
        pts = [keypoints[i] for i in own]
        parts_clean = activated_parts(sim_clean[own, j], pts, size, half, n_parts)
        parts_noisy = activated_parts(sim_noisy[own, j], pts, size, half, n_parts)
        consistent[j] = consistency(parts_clean, visible[own], CONSISTENCY_THRESHOLD)
        stable[j] = stability(parts_clean, parts_noisy)
    return consistent, stable


def find_duplicates(run: Run, names: list[str], tolerance: float = 1e-4) -> pd.DataFrame:
    """Duplicate prototypes: within a member, a shared source patch or squared distance ≤ tolerance; across
    members (different latent spaces), the same source image with overlapping boxes (IoU ≥ 0.5)."""
    rows: list[dict[str, Any]] = []
    tables = {n: run.prototypes(n) for n in names}
    for n in names:
        model = run.member(n)
        t = tables[n]
        sources = t[["source_index", "h", "w"]].to_numpy()
        for i, j, reason, d in duplicate_pairs(model.prototype_vectors.detach().numpy(), sources, tolerance):
            rows.append(
                {
                    "member_a": n,
                    "prototype_a": i,
                    "member_b": n,
                    "prototype_b": j,
                    "reason": reason,
                    "distance": d,
                }
            )
    for a_pos, a in enumerate(names):
        for b in names[a_pos + 1 :]:
            ta, tb = tables[a], tables[b]
            merged = ta.merge(tb, on="source_index", suffixes=("_a", "_b"))
            for r in merged.itertuples(index=False):
                iou = box_iou(
                    (r.box_y0_a, r.box_y1_a, r.box_x0_a, r.box_x1_a),
                    (r.box_y0_b, r.box_y1_b, r.box_x0_b, r.box_x1_b),
                )
                if iou >= 0.5:
                    rows.append(
                        {
                            "member_a": a,
                            "prototype_a": r.prototype_a,
                            "member_b": b,
                            "prototype_b": r.prototype_b,
                            "reason": f"same source image, box IoU {iou:.2f}",
                            "distance": float("nan"),
                        }
                    )
    return pd.DataFrame(
        rows, columns=["member_a", "prototype_a", "member_b", "prototype_b", "reason", "distance"]
    )


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
    for name in names:
        # one index load and one search per member, with the largest k any consumer needs
        index = load_index(run.path, name, "train")
        nearest = nearest_images(index, run.member(name).prototype_vectors, max(k, PART_PURITY_TOP))
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
    audit["shortcut"] = _shortcut_entry(run, results, bundle, recipe, epochs, index_by_member)
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
            {
                "name": pruned_name(result.name),
                "parent": result.name,
                "pruning": {
                    "k": k,
                    "threshold": threshold,
                    "finetune_epochs": epochs,
                    "last_layer": result.retune,
                    "pruned_prototypes": result.purity.loc[result.purity["pruned"], "prototype"]
                    .astype(int)
                    .tolist(),
                },
                "recipe": parent_meta.get("recipe"),
                "trunk_family": parent_meta.get("trunk_family"),
                "metrics": {"test_top1": test_top1},
            },
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
    audit.update(_pooled(results))
    purity = pd.concat([r.purity for r in results], ignore_index=True)
    duplicates = find_duplicates(run, names)
    audit["duplicates"] = len(duplicates)
    for result in results:  # the nearest training images the report shows beside each prototype
        write_csv(
            nearest_csv_path(run.path, result.name, "train"),
            nearest_by_member[result.name].table()[NEAREST_COLUMNS],
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


def _shortcut_entry(
    run: Run,
    results: list[MemberPruning],
    bundle: DatasetBundle,
    recipe: Recipe,
    epochs: int,
    indexes: dict[str, PatchIndex],
) -> dict[str, Any]:
    """audit.json ``shortcut``: the prototypes on the shortcut (causal label), and the top-1 of every member
    and of the ensemble on ``test`` and ``test_shifted``, before and after removing each detector's flags (the
    last layer retuned each time, as pruning does) and for the pruned members as saved."""
    shifted = getattr(bundle, "test_shifted", None)
    labels = {"test": np.asarray(bundle.test.labels)}
    if shifted is not None:
        labels["test_shifted"] = np.asarray(shifted.labels)
    on_shortcut = {
        r.name: r.purity.loc[r.purity["concept_kind"] == "shortcut", "prototype"].astype(int).tolist()
        for r in results
        if "concept_kind" in r.purity
    }
    logits: dict[str, dict[str, dict[str, torch.Tensor]]] = {}  # removal → member → split → logits
    counts: dict[str, dict[str, int]] = {}
    for r in results:
        ma = r.member_audit
        if ma is None:
            continue
        model = run.member(r.name)
        distances = {"test": ma.test_min_distances}
        if ma.shifted_min_distances is not None:
            distances["test_shifted"] = ma.shifted_min_distances
        m = model.n_prototypes
        removals: dict[str, tuple[np.ndarray, ProtoPNet]] = {"none": (np.zeros(m, bool), model)}
        index = indexes[r.name]  # loaded (and its weights checked) once, by prune_run
        vectors = torch.as_tensor(index.vectors())
        image_index = torch.tensor(index.meta["image_index"].to_numpy(), dtype=torch.long)
        pruned = r.purity["pruned"].to_numpy().astype(bool)
        # one retune per distinct set of flags; nothing flagged leaves the member as it is
        retuned = {pruned.tobytes(): r.pruned_model, np.zeros(m, bool).tobytes(): model}
        for det_name, flags in ma.detection.flags.items():
            key = np.asarray(flags, dtype=bool).tobytes()
            if key not in retuned:
                retuned[key] = retuned_copy(model, flags, vectors, image_index, bundle, recipe, epochs)
            removals[det_name] = (flags, retuned[key])
        removals["pruned member"] = (pruned, r.pruned_model)
        for removal, (flags, reduced) in removals.items():
            keep = ~np.asarray(flags, dtype=bool)
            logits.setdefault(removal, {})[r.name] = {
                split: evaluate_without(reduced, keep, d) for split, d in distances.items()
            }
            counts.setdefault(removal, {})[r.name] = int((~keep).sum())
    rows = []
    for removal, per_member in logits.items():
        for member, per_split in per_member.items():
            rows.append(
                {
                    "model": member,
                    "removed": removal,
                    "n_removed": counts[removal][member],
                    **{split: top1(per_split[split], labels[split]) for split in per_split},
                }
            )
        splits = set.intersection(*(set(v) for v in per_member.values())) if per_member else set()
        rows.append(
            {
                "model": "ensemble",
                "removed": removal,
                "n_removed": sum(counts[removal].values()),
                **{
                    split: top1(ensemble_logits([v[split] for v in per_member.values()]), labels[split])
                    for split in sorted(splits)
                },
            }
        )
    return {
        "available": shifted is not None,
        "splits": list(labels),
        "prototypes_on_shortcut": on_shortcut,
        "rows": rows,
        "note": SHIFT_LEAK_NOTE if shifted is not None else "the dataset has no test_shifted split",
    }


def _pooled(results: list[MemberPruning]) -> dict[str, Any]:
    """Pruning precision and recall over all members' prototypes together."""
    t = pd.concat([r.purity for r in results])
    t = t[~t["source_part_kind"].isin(UNKNOWN_PART_KINDS)]
    if not len(t):
        return {}
    precision, recall = precision_recall(
        t["pruned"].to_numpy(), t["source_part_kind"].isin(BAD_PART_KINDS).to_numpy()
    )
    return {"pruning_precision": precision, "pruning_recall": recall}


def flat_metrics(audit: dict[str, Any]) -> dict[str, float]:
    """The audit as ``key → number`` for ``--fail-under``: ``<member>.<metric>``, ``ensemble.<metric>``, the
    pooled ``pruning_precision`` / ``pruning_recall``, and each detector's pooled scores against its labels,
    ``detector.<name>.precision`` / ``.recall`` / ``.f1``."""
    out: dict[str, float] = {}
    for member, values in audit.get("members", {}).items():
        for key, value in values.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                out[f"{member}.{key}"] = float(value)
    for key, value in audit.get("ensemble", {}).items():
        if isinstance(value, int | float):
            out[f"ensemble.{key}"] = float(value)
    for key in ("pruning_precision", "pruning_recall"):
        if isinstance(audit.get(key), int | float):
            out[key] = float(audit[key])
    from protoaudit.engine.evaluation import flat_metrics as evaluation_metrics

    out.update(evaluation_metrics(audit))
    for name, scores in (audit.get("detectors") or {}).get("pooled", {}).items():
        for key in ("precision", "recall", "f1"):
            if isinstance(scores.get(key), int | float):
                out[f"detector.{name}.{key}"] = float(scores[key])
    return out


def load_audit(run: Run) -> dict[str, Any]:
    path = run.path / "audit.json"
    if not path.is_file():
        raise InputError(
            f"run {run.path} has no audit.json yet", remedy=Remedy("make it", "prune", str(run.path))
        )
    data = read_json(path)
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    return data
