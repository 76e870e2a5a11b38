"""A run's audit.json, read back: the document, and its numbers flattened for ``--fail-under``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from protoaudit.engine.io import read_json
from protoaudit.errors import InputError, Remedy

if TYPE_CHECKING:
    from protoaudit.engine.run import Run


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
    """The run's audit.json; InputError, naming the command that writes it, when there is none."""
    path = run.path / "audit.json"
    if not path.is_file():
        raise InputError(
            f"run {run.path} has no audit.json yet", remedy=Remedy("make it", "prune", str(run.path))
        )
    data = read_json(path)
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    return data
