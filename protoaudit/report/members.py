"""The report's per-member sections: each prototype with its push source, k-NN class purity, ground-truth
part, nearest training patches and thumbnails; and the last layer of every checkpoint."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from protoaudit.errors import CheckpointError
from protoaudit.report.context import ReportContext
from protoaudit.report.images import box_thumbnail, patch_thumbnail, to_uint8
from protoaudit.report.tables import as_bool, is_missing, opt_float, opt_int, read_csv, records, split_list

if TYPE_CHECKING:
    from protoaudit.core.model import ProtoPNet


def grid(ctx: ReportContext, name: str, model: torch.nn.Module) -> tuple[int, int] | None:
    """Member ``name``'s latent grid (H, W): from its patch index, else from one image through the member."""
    if ctx.bundle is None:
        return None
    if name not in ctx.grids:
        found = _indexed_grid(ctx, name)
        if found is None:  # no patch index (a pruned member): one image through the member
            with torch.no_grad():
                z = model.latent(ctx.bundle.push.batch([0]))  # type: ignore[operator]
            found = (int(z.shape[-2]), int(z.shape[-1]))
        ctx.grids[name] = found
    return ctx.grids[name]


def _indexed_grid(ctx: ReportContext, name: str) -> tuple[int, int] | None:
    """The latent grid recorded with the member's training patch index, when it has one."""
    from protoaudit.engine.index.files import index_paths
    from protoaudit.engine.index.search import read_index_info

    meta_path = index_paths(ctx.run.path / "members" / name, "train")[1]
    if not meta_path.is_file():
        return None
    try:
        hh, ww = read_index_info(meta_path)["grid"]
    except (CheckpointError, KeyError, TypeError, ValueError):
        return None
    return int(hh), int(ww)


def push_images(ctx: ReportContext, indices: list[int]) -> dict[int, np.ndarray]:
    """Push-split images ``indices`` as (S, S, 3) uint8, each decoded once."""
    out: dict[int, np.ndarray] = {}
    unique = sorted(set(indices))
    for start in range(0, len(unique), 256):
        chunk = unique[start : start + 256]
        images = to_uint8(ctx.bundle.push.batch(chunk).numpy())
        out.update(zip(chunk, images, strict=True))
    return out


def _purity_cells(row: dict[str, Any], p: pd.Series, part_names: list[str] | None) -> None:
    """Fill ``row`` from prototype's line ``p`` of purity.csv."""
    raw = p.get("purity")
    integral = isinstance(raw, int | np.integer) and not isinstance(raw, bool | np.bool_)
    row["purity"] = int(raw) if integral else opt_float(raw)
    row["k"] = opt_int(p.get("k"))
    row["pruned"] = as_bool(p.get("pruned"))
    row["nearest_classes"] = split_list(p.get("nearest_classes"), int)
    row["nearest_image_ids"] = split_list(p.get("nearest_image_ids"))
    row["nearest_distance"] = opt_float(p.get("nearest_distance"))
    part = opt_int(p.get("source_part"))
    row["source_part"] = part
    kind = p.get("source_part_kind")
    row["source_part_kind"] = None if is_missing(kind) else str(kind)
    if part is not None and part >= 0 and part_names and part < len(part_names):
        row["source_part_name"] = part_names[part]
    row["part_purity"] = opt_float(p.get("part_purity"))
    near_parts = [v for v in (split_list(p.get("nearest_parts"), int) or []) if v > 0]
    if near_parts:
        major = max(sorted(set(near_parts)), key=near_parts.count)
        row["nearest_major_part"] = (
            part_names[major] if part_names and major < len(part_names) else str(major)
        )
    row["consistent"] = as_bool(p.get("consistent"))
    row["stability"] = opt_float(p.get("stability"))


def member_section(ctx: ReportContext, name: str, purity_frame: pd.DataFrame | None) -> dict[str, Any]:
    """Member ``name``: its architecture and metrics, and one row per prototype."""
    ctx.reporter.log(f"report: member {name}")
    run, options = ctx.run, ctx.options
    model = run.member(name)
    meta = run.member_meta(name)
    prototypes = run.prototypes(name)
    member_dir = run.path / "members" / name
    purity = None
    if purity_frame is not None and "member" in purity_frame:
        purity = purity_frame[purity_frame["member"].astype(str) == name].set_index("prototype")
    nearest_frame, nearest_source, nearest_problem = nearest_patches(ctx, name, model, member_dir)
    nearest: dict[int, list[dict[str, Any]]] = {}
    if nearest_frame is not None:
        ordered = nearest_frame.sort_values(["prototype", "rank"], kind="stable")
        kept = ordered.groupby("prototype", sort=False).head(options.nearest)
        for r in records(kept):
            nearest.setdefault(int(r["prototype"]), []).append(r)
    part_names = None if ctx.bundle is None else ctx.bundle.part_names
    cells = grid(ctx, name, model)
    images: dict[int, np.ndarray] = {}
    with_thumbs = prototypes["prototype"].head(options.max_thumbnails).tolist() if cells else []
    with_set = set(with_thumbs)
    shown = 0
    if cells is not None:
        wanted = prototypes[prototypes["prototype"].isin(with_thumbs)]["source_index"].tolist()
        for j in with_thumbs:
            wanted += [
                int(n["image_index"]) for n in nearest.get(int(j), []) if n.get("image_index") is not None
            ]
        images = push_images(ctx, [int(i) for i in wanted])
    rows = []
    for r in records(prototypes):
        j = int(r["prototype"])
        box = [int(r["box_y0"]), int(r["box_y1"]), int(r["box_x0"]), int(r["box_x1"])]
        row: dict[str, Any] = {
            "prototype": j,
            "class": int(r["class"]),
            "class_name": str(r["class_name"]),
            "source_image": str(r["source_image"]),
            "source_index": int(r["source_index"]),
            "label": int(r["label"]),
            "h": int(r["h"]),
            "w": int(r["w"]),
            "distance": opt_float(r["distance"]),
            "box": box,
            "purity": None,
            "k": None,
            "pruned": None,
            "nearest_classes": None,
            "nearest_image_ids": None,
            "nearest_distance": None,
            "source_part": None,
            "source_part_kind": None,
            "source_part_name": None,
            "part_purity": None,
            "nearest_major_part": None,
            "consistent": None,
            "stability": None,
            "thumb": None,
            "nearest": None,
            "deletion": None,
        }
        if purity is not None and j in purity.index:
            _purity_cells(row, purity.loc[j], part_names)
        show = cells is not None and j in with_set and ctx.thumbnail_bytes < options.thumbnail_bytes
        shown += int(show)
        if show:
            row["thumb"] = ctx.counted_asset(
                f"push/{row['source_index']}/box/{'-'.join(map(str, box))}",
                partial(box_thumbnail, images[row["source_index"]], box),
            )
        if j in nearest:
            row["nearest"] = [_nearest_entry(ctx, n, images, cells if show else None) for n in nearest[j]]
        ctx.prototype_thumbs[(name, j)] = row["thumb"]
        if row["pruned"]:
            ctx.pruned_sets.setdefault(name, set()).add(j)
        rows.append(row)
    config = model.config
    return {
        "name": name,
        "backbone": config.trunk,
        "trunk_family": meta.get("trunk_family"),
        "n_prototypes": model.n_prototypes,
        "prototypes_per_class": config.prototypes_per_class,
        "prototype_dim": config.prototype_dim,
        "add_on": config.add_on,
        "grid": None if cells is None else list(cells),
        "selected_epoch": meta.get("selected_epoch"),
        "val_top1": (meta.get("metrics") or {}).get("val_top1"),
        "test_top1": (meta.get("metrics") or {}).get("test_top1"),
        "purity_available": purity is not None,
        "nearest_available": nearest_frame is not None,
        "nearest_source": nearest_source,
        "nearest_note": None
        if nearest_frame is not None
        else f"nearest training patches {nearest_problem or ctx.index_hint}",
        "thumbnails": shown,
        "prototypes": rows,
    }


def _nearest_entry(
    ctx: ReportContext, n: dict[str, Any], images: dict[int, np.ndarray], cells: tuple[int, int] | None
) -> dict[str, Any]:
    """One nearest training patch of a prototype; with its thumbnail when ``cells`` (the grid) is given."""
    entry: dict[str, Any] = {
        "rank": opt_int(n.get("rank")),
        "image_index": opt_int(n.get("image_index")),
        "image_id": None if n.get("image_id") is None else str(n.get("image_id")),
        "label": opt_int(n.get("label")),
        "distance": opt_float(n.get("distance")),
        "h": opt_int(n.get("h")),
        "w": opt_int(n.get("w")),
        "thumb": None,
    }
    i, h, w = entry["image_index"], entry["h"], entry["w"]
    if cells is not None and i in images and h is not None and w is not None:
        entry["thumb"] = ctx.counted_asset(
            f"push/{i}/cell/{h}-{w}", partial(patch_thumbnail, images[i], h, w, cells)
        )
    return entry


def nearest_patches(
    ctx: ReportContext, name: str, model: ProtoPNet, member_dir: Path
) -> tuple[pd.DataFrame | None, str | None, str | None]:
    """The nearest training patches of every prototype (one per image): ``nearest_train.csv`` when the
    index step wrote it, else one batched search of the member's fresh patch index, else nothing.
    Returns (frame, its source, why there is none: None when no index was built yet)."""
    frame = read_csv(member_dir / "nearest_train.csv")
    if frame is not None:
        return frame, "nearest_train.csv", None
    from protoaudit.engine.index.search import index_status, load_index, nearest_images
    from protoaudit.engine.io import TamperedWeightsError

    status = index_status(ctx.run, name, "train")
    if status == "missing":
        return None, None, None
    rebuild = f"rebuild it with `protoaudit index {ctx.run.path} --force`"
    if status != "fresh":
        what = "built from other weights" if status == "stale" else "unreadable or incomplete"
        return None, None, f"not shown: the patch index is {status} ({what}) — {rebuild}"
    try:
        loaded = load_index(ctx.run, name, "train", backend="faiss")
    except TamperedWeightsError:
        raise
    except CheckpointError as exc:
        return None, None, f"not shown: the patch index is broken ({exc}) — {rebuild}"
    table = nearest_images(loaded, model.prototype_vectors, ctx.options.nearest).table()
    return table, "patch index (members/<m>/patches.faiss)", None


def last_layer(ctx: ReportContext, name: str, pruned: bool = False) -> dict[str, Any]:
    """Checkpoint ``name``'s last layer h: own- and off-class weights, their sparsity and histogram."""
    model = ctx.run.member(name)
    weight = model.last_layer.weight.detach().cpu().double().numpy()  # (K, m)
    own = model.class_identity().t().cpu().numpy().astype(bool)  # (K, m)
    off = weight[~own]
    threshold = ctx.options.sparsity_threshold
    low, high = float(min(weight.min(), -0.5)), float(max(weight.max(), 1.0))
    edges = np.linspace(low, high, 31)
    return {
        "checkpoint": name,
        "pruned": pruned,
        "n_prototypes": model.n_prototypes,
        "n_own": int(own.sum()),
        "n_off": int(off.size),
        "own_mean": float(weight[own].mean()) if own.any() else None,
        "off_mean_abs": float(np.abs(off).mean()) if off.size else None,
        "off_max_abs": float(np.abs(off).max()) if off.size else None,
        "off_sparsity": float((np.abs(off) < threshold).mean()) if off.size else None,
        "histogram": {
            "edges": edges.tolist(),
            "own": np.histogram(weight[own], bins=edges)[0].tolist(),
            "off": np.histogram(off, bins=edges)[0].tolist(),
        },
    }
