"""The report's sections on what ``protoaudit prune`` wrote besides purity: the ground-truth audit
(``audit.json``) and the duplicate prototypes (``duplicates.csv``). The detector, shortcut and decision
sections are :mod:`protoaudit.report.detectors`."""

from __future__ import annotations

from typing import Any

from protoaudit.engine.io import jsonable
from protoaudit.report.context import ReportContext
from protoaudit.report.definitions import AUDIT_LABELS
from protoaudit.report.tables import read_csv, records


def audit_section(ctx: ReportContext) -> dict[str, Any]:
    """audit.json, and its per-member metrics as one table (a row per metric, a column per member)."""
    path = ctx.run.path / "audit.json"
    if not path.is_file():
        return {
            "available": False,
            "note": f"ground-truth audit {ctx.prune_hint}",
            "data": None,
            "members_table": None,
        }
    from protoaudit.engine.io import read_json

    data = jsonable(read_json(path))
    members_table = None
    metrics: list[dict[str, Any]] = []
    names: list[str] = []
    if isinstance(data, dict) and isinstance(data.get("members"), dict):
        members_table = [
            {"member": name, **values} for name, values in data["members"].items() if isinstance(values, dict)
        ]
        names = [str(r["member"]) for r in members_table]
        keys: list[str] = []
        for r in members_table:
            keys += [k for k in r if k != "member" and k not in keys]
        pooled = {k: data.get(k) for k in ("pruning_precision", "pruning_recall")}
        for key in keys:
            label, kind, definition = AUDIT_LABELS.get(key, (key.replace("_", " "), "number", None))
            metrics.append(
                {
                    "key": key,
                    "label": label,
                    "kind": kind,
                    "definition": definition,
                    "values": [
                        next((r.get(key) for r in members_table if r["member"] == n), None) for n in names
                    ],
                    "all": pooled.get(key),
                }
            )
    return {
        "available": True,
        "note": None,
        "data": data,
        "members_table": members_table,
        "member_names": names,
        "metrics": metrics,
    }


def duplicates_section(ctx: ReportContext) -> dict[str, Any]:
    """duplicates.csv: prototypes of one member that coincide."""
    frame = read_csv(ctx.run.path / "duplicates.csv")
    if frame is None:
        return {
            "available": False,
            "note": f"duplicate prototypes {ctx.prune_hint}",
            "columns": [],
            "rows": [],
        }
    return {
        "available": True,
        "note": None,
        "columns": [str(c) for c in frame.columns],
        "rows": records(frame),
    }
