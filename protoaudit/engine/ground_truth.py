"""Prototypes audited against the dataset's ground-truth parts, where it has them: the part under each
prototype's source patch, pruning's precision and recall against background, shared-part and shortcut
prototypes, PIP-Net part purity, and Huang et al.'s consistency and stability."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from protoaudit.core.model import ProtoPNet
from protoaudit.core.purity import (
    activated_parts,
    consistency,
    part_purity,
    perturb,
    precision_recall,
    stability,
)

if TYPE_CHECKING:
    from protoaudit.engine.data import DatasetBundle, ImageSplit
    from protoaudit.engine.index.search import NearestImages
    from protoaudit.engine.recipe import Recipe
    from protoaudit.engine.run import Run

PART_PURITY_TOP = 10  # PIP-Net's top-10 patches
CONSISTENCY_THRESHOLD = 0.8  # Huang et al.'s μ
BAD_PART_KINDS = ("background", "shared", "shortcut")  # what pruning should remove, where parts are known
UNKNOWN_PART_KINDS = ("unknown", "no part annotated")  # left out of precision and recall


def add_ground_truth(
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
    bundle: DatasetBundle, prototypes: pd.DataFrame, source_part: np.ndarray, grid: tuple[int, int]
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


def pooled_precision_recall(tables: list[pd.DataFrame]) -> dict[str, Any]:
    """Pruning precision and recall over all members' prototypes together (their purity.csv tables)."""
    t = pd.concat(tables)
    t = t[~t["source_part_kind"].isin(UNKNOWN_PART_KINDS)]
    if not len(t):
        return {}
    precision, recall = precision_recall(
        t["pruned"].to_numpy(), t["source_part_kind"].isin(BAD_PART_KINDS).to_numpy()
    )
    return {"pruning_precision": precision, "pruning_recall": recall}
