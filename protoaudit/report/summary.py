"""The report's run summary, class names, accuracy table (before and after pruning) and purity rule."""

from __future__ import annotations

import tomllib
from typing import Any

import pandas as pd

from protoaudit.engine.run import PRUNED_SUFFIX
from protoaudit.errors import CheckpointError
from protoaudit.report.context import ReportContext
from protoaudit.report.tables import as_bool, opt_float, opt_int, read_csv, records


def run_summary(ctx: ReportContext) -> dict[str, Any]:
    """run.json and recipe.toml as the report shows them: status, seed, versions, dataset, stage timings."""
    run = ctx.run
    meta = run.meta
    recipe_path = run.path / "recipe.toml"
    try:
        recipe_text = recipe_path.read_text(encoding="utf-8") if recipe_path.is_file() else None
    except UnicodeDecodeError:
        from protoaudit.errors import RecipeError

        raise RecipeError(f"recipe {recipe_path} is not UTF-8 text") from None
    description = ""
    data_kind = None
    if recipe_text is not None:
        try:
            parsed = tomllib.loads(recipe_text)
            description = str(parsed.get("description", ""))
            data_kind = parsed.get("data", {}).get("kind")
        except tomllib.TOMLDecodeError:
            ctx.notes.append("recipe.toml of the run is not valid TOML")
    timings: list[dict[str, Any]] = []
    for step, value in (meta.get("timings") or {}).items():
        if isinstance(value, int | float):
            timings.append({"step": step, "stage": "", "seconds": float(value)})
        elif isinstance(value, dict):
            for stage, seconds in value.items():
                if isinstance(seconds, int | float):
                    timings.append({"step": step, "stage": stage, "seconds": float(seconds)})
    dataset = meta.get("dataset") or {}
    return {
        "name": run.name,
        "path": str(run.path),
        "description": description,
        "status": meta.get("status"),
        "started": meta.get("started"),
        "finished": meta.get("finished"),
        "seconds": meta.get("seconds"),
        "seed": meta.get("seed"),
        "threads": meta.get("threads"),
        "device": meta.get("device"),
        "recipe_sha256": meta.get("recipe_sha256"),
        "versions": meta.get("versions") or {},
        "dataset": {
            "kind": data_kind,
            "fingerprint": dataset.get("fingerprint"),
            "n_classes": dataset.get("n_classes"),
            "splits": dataset.get("splits") or {},
            "image_size": None if ctx.bundle is None else ctx.bundle.image_size,
        },
        "members": run.member_names,
        "timings": timings,
        "recipe_toml": recipe_text,
    }


def class_names(ctx: ReportContext) -> list[str]:
    """The dataset's class names; without the dataset, run.json's or the first member's."""
    if ctx.bundle is not None:
        return list(ctx.bundle.class_names)
    names = ctx.run.meta.get("dataset", {}).get("summary", {}).get("class_names")
    if isinstance(names, list):
        return [str(n) for n in names]
    first = ctx.run.member_names[0] if ctx.run.member_names else None
    return list(ctx.run.member(first).config.class_names) if first else []


def accuracy(ctx: ReportContext) -> dict[str, Any]:
    """accuracy.csv's rows, and one line per model pairing its top-1 before and after pruning."""
    path = ctx.run.path / "accuracy.csv"
    frame = read_csv(path)
    if frame is None:
        raise CheckpointError(f"{path}: file not found; the run did not finish (see run.json's status)")
    rows: list[dict[str, Any]] = []
    for r in records(frame):
        rows.append(
            {
                "model": str(r.get("model")),
                "kind": str(r.get("kind")),
                "backbone": None if r.get("backbone") is None else str(r.get("backbone")),
                "pruned": bool(as_bool(r.get("pruned"))),
                "top1": opt_float(r.get("top1")),
                "top1_low": opt_float(r.get("top1_low")),  # 95 % interval, where accuracy.csv has it
                "top1_high": opt_float(r.get("top1_high")),
                "n_prototypes": opt_int(r.get("n_prototypes")),
                "n_test": opt_int(r.get("n_test")),
            }
        )
    # before / after pruning, one line per model (a pruned row names its model with or without "-pruned")
    pairs: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        base = r["model"].removesuffix(PRUNED_SUFFIX)
        pair = pairs.setdefault(
            (r["kind"], base), {"model": base, "kind": r["kind"], "before": None, "after": None}
        )
        pair["after" if r["pruned"] else "before"] = {
            "top1": r["top1"],
            "top1_low": r["top1_low"],
            "top1_high": r["top1_high"],
            "n_prototypes": r["n_prototypes"],
        }
    any_pruned = any(r["pruned"] for r in rows)
    return {
        "rows": rows,
        "before_after": list(pairs.values()),
        "pruned_available": any_pruned,
        "intervals": any(r["top1_low"] is not None for r in rows),
        "interval_level": 0.95,  # top1_low / top1_high, where accuracy.csv has them
        "note": None if any_pruned else f"accuracy after pruning {ctx.prune_hint}",
    }


def pruned_checkpoints(ctx: ReportContext) -> list[str]:
    """The pruned members ``members/<m>-pruned/`` that exist (run.json's "pruning" lists them too)."""
    run = ctx.run
    listed = (run.meta.get("pruning") or {}).get("members") or []
    names = [f"{m}{PRUNED_SUFFIX}" for m in run.member_names] + [str(n) for n in listed]
    out: list[str] = []
    for name in names:
        if name not in out and (run.path / "members" / name / "model.json").is_file():
            out.append(name)
    return out


def purity_summary(ctx: ReportContext, frame: pd.DataFrame | None) -> dict[str, Any]:
    """How purity.csv states purity: ``count`` (how many of the k nearest images share the prototype's
    class, the paper's τ-test) or ``fraction`` (count / k); and k and τ."""
    run = ctx.run
    pruning = run.meta.get("pruning") or {}
    audit_path = run.path / "audit.json"
    threshold = pruning.get("threshold")
    audit: Any = None
    if audit_path.is_file():
        from protoaudit.engine.io import read_json

        audit = read_json(audit_path)
    if threshold is None and isinstance(audit, dict):
        threshold = audit.get("threshold")
    if frame is None or "purity" not in frame:
        return {
            "available": False,
            "file": "purity.csv",
            "note": f"k-NN class purity {ctx.prune_hint}",
            "k": None,
            "threshold": None,
            "scale": None,
        }
    # audit.json states the scale; protoaudit prune has always written counts (runs before it said so)
    scale = audit.get("purity_scale", "count") if isinstance(audit, dict) else "count"
    k = opt_int(frame["k"].iloc[0]) if "k" in frame and len(frame) else pruning.get("k")
    return {
        "available": True,
        "file": "purity.csv",
        "note": None,
        "k": k,
        "threshold": opt_int(threshold),
        "scale": scale,
    }
