"""The report's section on bad prototypes: causal labels, every detector's verdict per prototype and its
measured precision/recall, the shortcut audit, and the reviewer's decisions.

Reads what ``protoaudit prune`` wrote (``audit.json`` keys ``causal``, ``detectors``, ``shortcut``,
``decisions``; ``purity.csv``); computes nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from protoaudit.engine.io import read_json

if TYPE_CHECKING:
    from protoaudit.engine.run import Run

JOINT = "background_carried_by_elements"
HINT = "not computed yet — run `protoaudit prune`"
VERDICT_COLUMNS = (
    "member",
    "prototype",
    "class_name",
    "concept",
    "concept_kind",
    "causal_drop",
    "causal_drop_all",
    "source_part_kind",
    "purity",
    "class_information",
    "shift_auc",
)


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def section(run: Run, data: dict[str, Any] | None = None) -> dict[str, Any]:  # noqa: ARG001 (every section takes the report data)
    """The section's data (strict JSON): ``available`` and, when it is, ``labels``, ``causal``, ``scores``,
    ``verdicts``, ``shortcut`` and ``decisions``."""
    path = run.path / "audit.json"
    if not path.is_file():
        return {"available": False, "note": f"detectors and causal labels {HINT}"}
    audit = read_json(path)
    detectors = audit.get("detectors") if isinstance(audit, dict) else None
    if not isinstance(detectors, dict):
        return {
            "available": False,
            "note": "this audit.json predates the detectors: run `protoaudit prune` again",
        }
    names = list(detectors.get("names", []))
    scores = []
    for scope, per_detector in [("all members", detectors.get("pooled", {}))] + [
        (member, values) for member, values in detectors.get("members", {}).items()
    ]:
        for name in names:
            if name in per_detector:
                scores.append({"detector": name, "members": scope, **per_detector[name]})
    verdicts: dict[str, Any] = {"columns": [], "rows": []}
    frame = None
    if (run.path / "purity.csv").is_file():
        frame = pd.read_csv(run.path / "purity.csv", keep_default_na=False, na_values=[""])
    if frame is not None:
        columns = [c for c in VERDICT_COLUMNS if c in frame]
        flag_columns = [f"flag_{n}" for n in names if f"flag_{n}" in frame]
        columns += flag_columns + [c for c in ("pruned", "decision") if c in frame]
        rows = []
        for record in frame[columns].to_dict(orient="records"):
            row = {c: _plain(v) for c, v in record.items()}
            for c in [*flag_columns, "pruned"]:
                if c in row and row[c] is not None:
                    row[c] = str(row[c]).lower() in ("true", "1")
            rows.append(row)
        verdicts = {"columns": columns, "rows": rows}
    causal = audit.get("causal") or {}
    counts = [
        {
            "member": member,
            **entry.get("counts", {}),
            **(
                {"of these background, silenced by removing every element": entry[JOINT]}
                if JOINT in entry
                else {}
            ),
        }
        for member, entry in (causal.get("members") or {}).items()
        if entry
    ]
    joint = sum(int((e or {}).get(JOINT, 0)) for e in (causal.get("members") or {}).values())
    decisions = audit.get("decisions") or {}
    log = [
        {
            "time": r.get("time"),
            "member": r.get("member"),
            "action": r.get("action"),
            "prototypes": ", ".join(str(p) for p in r.get("prototypes", [])),
            "reason": r.get("reason"),
            "weights_sha256": str(r.get("weights_sha256", ""))[:16],
        }
        for r in decisions.get("log", [])
    ]
    shortcut = audit.get("shortcut") or {}
    return {
        "available": True,
        "note": None,
        "selected": detectors.get("selected"),
        "labels": detectors.get("labels"),
        "thresholds": detectors.get("thresholds", {}),
        "inputs": detectors.get("inputs", {}),
        "skipped": detectors.get("skipped", {}),
        "causal": {
            "available": bool(causal.get("available")),
            "min_drop": causal.get("min_drop"),
            "counts": counts,
            "background_carried_by_elements": joint,
        },
        "scores": scores,
        "verdicts": verdicts,
        "shortcut": {
            "available": bool(shortcut.get("available")),
            "prototypes_on_shortcut": [
                {"member": m, "prototypes": ", ".join(map(str, p)) or "none", "count": len(p)}
                for m, p in (shortcut.get("prototypes_on_shortcut") or {}).items()
            ],
            "rows": shortcut.get("rows", []),
            "note": shortcut.get("note"),
        },
        "decisions": {"log": log, "stale": len(decisions.get("stale", []))},
    }
