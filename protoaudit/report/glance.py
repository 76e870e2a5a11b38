"""The report's first screen: what a reviewer asks first, drawn from the sections already built."""

from __future__ import annotations

from typing import Any

from protoaudit.report.context import ReportContext
from protoaudit.report.definitions import AUDIT_LABELS


def glance(ctx: ReportContext, data: dict[str, Any]) -> dict[str, Any]:
    """Accuracy before and after pruning (with 95 % intervals where accuracy.csv has them), how many
    prototypes were pruned and on which ground-truth parts they sat, and the headline audit figures."""
    purity = data["purity"]
    pruning = []
    for m in data["members"]:
        rows = [r for r in m["prototypes"] if r["pruned"] is not None]
        if not rows:
            continue
        pruned = [r for r in rows if r["pruned"]]
        kinds: dict[str, int] = {}
        for r in pruned:
            kind = r["source_part_kind"] or "unknown"
            kinds[kind] = kinds.get(kind, 0) + 1
        pruning.append(
            {
                "member": m["name"],
                "n_prototypes": len(m["prototypes"]),
                "n_pruned": len(pruned),
                "n_kept": len(rows) - len(pruned),
                "pruned_on": [{"kind": k, "n": v} for k, v in sorted(kinds.items())],
            }
        )
    audit = data["audit"]
    headline: list[dict[str, Any]] = []
    if audit["available"] and isinstance(audit["data"], dict):
        run_wide = audit["data"]
        for key in ("pruning_precision", "pruning_recall"):
            if isinstance(run_wide.get(key), int | float):
                headline.append({"key": key, "label": AUDIT_LABELS[key][0], "value": run_wide[key]})
        for m, values in (run_wide.get("members") or {}).items():
            for key in ("part_purity", "consistency", "stability"):
                if isinstance(values, dict) and isinstance(values.get(key), int | float):
                    headline.append(
                        {
                            "key": f"{m}.{key}",
                            "label": f"{AUDIT_LABELS[key][0]} — {m}",
                            "value": values[key],
                        }
                    )
    faith = data["faithfulness"]
    deletion = None
    if faith.get("available") and faith.get("summary", {}).get("n"):
        deletion = faith["summary"]
    return {
        "pruning": pruning,
        "pruning_rule": None
        if not purity["available"]
        else {"k": purity["k"], "threshold": purity["threshold"]},
        "headline": headline,
        "duplicates": len(data["duplicates"]["rows"]) if data["duplicates"]["available"] else None,
        "deletion": deletion,
        "stale": stale_note(ctx),
    }


def stale_note(ctx: ReportContext) -> str | None:
    """A note when the run's files may not belong together: purity.csv without a pruning in run.json."""
    pruning = ctx.run.meta.get("pruning") or {}
    if not pruning and (ctx.run.path / "purity.csv").is_file():
        return "purity.csv exists but run.json records no pruning: the files may come from another run"
    return None
