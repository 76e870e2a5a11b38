"""A reviewer's own pruning decisions, kept as an append-only log in the run: ``decisions.jsonl``.

Each line is one JSON object::

    {"time": "2026-12-02T06:30:00+0000", "member": "vgg", "action": "remove", "prototypes": [12, 15],
     "reason": "sits on the watermark", "weights_sha256": "<sha256 of members/vgg/model.safetensors>"}

``action`` is ``remove`` (prune these prototypes whatever the detector says) or ``keep`` (never prune them).
Prototype numbers are those of the unpruned member (``members/<m>/prototypes.csv``), and the digest pins the
weights they refer to: a decision recorded against other weights (the member was retrained or replaced) is
*stale* and is not applied. Decisions apply in the order they were recorded, after the detector's flags; a
later decision on the same prototype wins. Lines are never rewritten or removed: the file only grows (each new
version is written whole to a temporary file and renamed, so a crash never leaves half a line).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from protoaudit.engine.io import sha256_file, write_bytes
from protoaudit.errors import InputError

DECISIONS_FILE = "decisions.jsonl"
ACTIONS = ("remove", "keep")


def parse_selection(text: str, option: str) -> tuple[str, list[int]]:
    """``"vgg:2,5"`` → ("vgg", [12, 15]); a bad selection raises :class:`InputError` naming the option."""
    member, sep, numbers = text.partition(":")
    if not sep or not member.strip() or not numbers.strip():
        raise InputError(f"{option} {text!r}: expected MEMBER:PROTOTYPE[,PROTOTYPE...], e.g. vgg:2,5")
    out: list[int] = []
    for part in numbers.split(","):
        try:
            value = int(part.strip())
        except ValueError:
            raise InputError(f"{option} {text!r}: {part.strip()!r} is not a prototype number") from None
        if value < 0:
            raise InputError(f"{option} {text!r}: prototype numbers start at 0, got {value}")
        if value not in out:
            out.append(value)
    return member.strip(), out


def weights_digest(run_path: Path, member: str) -> str:
    return sha256_file(run_path / "members" / member / "model.safetensors")


def new_decisions(
    run_path: Path,
    members: dict[str, int],
    remove: list[str],
    keep: list[str],
    reason: str | None,
) -> list[dict[str, Any]]:
    """Validated records for ``--remove`` / ``--keep`` selections (nothing is written).

    members: prunable member name → its number of prototypes.
    """
    if not remove and not keep:
        return []
    if reason is None or not reason.strip():
        raise InputError('--remove and --keep need --reason "..." (why the reviewer decided so)')
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    records: list[dict[str, Any]] = []
    chosen: dict[tuple[str, int], str] = {}
    for action, option, selections in (("remove", "--remove", remove), ("keep", "--keep", keep)):
        for text in selections:
            member, prototypes = parse_selection(text, option)
            if member not in members:
                raise InputError(
                    f"{option} {text!r}: no ProtoPNet member {member!r}; members: {', '.join(sorted(members))}"
                )
            out_of_range = [p for p in prototypes if p >= members[member]]
            if out_of_range:
                raise InputError(
                    f"{option} {text!r}: member {member!r} has prototypes 0..{members[member] - 1}, "
                    f"not {', '.join(map(str, out_of_range))}"
                )
            for p in prototypes:
                other = chosen.setdefault((member, p), action)
                if other != action:
                    raise InputError(f"prototype {member}:{p} is both in --remove and in --keep")
            records.append(
                {
                    "time": stamp,
                    "member": member,
                    "action": action,
                    "prototypes": prototypes,
                    "reason": reason.strip(),
                    "weights_sha256": weights_digest(run_path, member),
                }
            )
    return records


def read_decisions(run_path: Path) -> list[dict[str, Any]]:
    """Every recorded decision, oldest first ([] when the run has none); a malformed line raises
    :class:`InputError` naming it."""
    path = run_path / DECISIONS_FILE
    if not path.is_file():
        return []
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{number}: not a JSON object ({exc.msg})") from None
        if (
            not isinstance(record, dict)
            or record.get("action") not in ACTIONS
            or not isinstance(record.get("member"), str)
            or not isinstance(record.get("prototypes"), list)
            or not all(isinstance(p, int) for p in record["prototypes"])
        ):
            raise InputError(
                f"{path}:{number}: expected member, action (remove/keep) and a list of prototypes"
            )
        out.append(record)
    return out


def append_decisions(run_path: Path, records: list[dict[str, Any]]) -> None:
    """Add ``records`` at the end of the log (the earlier lines are kept byte for byte)."""
    if not records:
        return
    path = run_path / DECISIONS_FILE
    before = path.read_bytes() if path.is_file() else b""
    if before and not before.endswith(b"\n"):
        before += b"\n"
    lines = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)
    write_bytes(path, before + lines.encode("utf-8"))


def apply_decisions(
    flags: np.ndarray, member: str, records: list[dict[str, Any]], digest: str
) -> tuple[np.ndarray, list[str], list[dict[str, Any]]]:
    """The pruning decision after a reviewer's records: (pruned (m,) bool, per prototype "" / "removed by
    reviewer" / "kept by reviewer", the member's stale records — made for other weights, not applied)."""
    pruned = np.asarray(flags, dtype=bool).copy()
    note = [""] * len(pruned)
    stale = []
    for record in records:
        if record["member"] != member:
            continue
        if record.get("weights_sha256") != digest:
            stale.append(record)
            continue
        for p in record["prototypes"]:
            if 0 <= p < len(pruned):
                pruned[p] = record["action"] == "remove"
                note[p] = "removed by reviewer" if record["action"] == "remove" else "kept by reviewer"
    return pruned, note, stale
