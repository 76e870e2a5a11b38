"""Reading the run's CSV tables into the JSON values the report holds: rows as dicts, cells as plain values."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from protoaudit.engine.io import jsonable
from protoaudit.errors import CheckpointError


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """The rows of ``frame`` as JSON-ready dicts (missing cells → None)."""
    return [jsonable(r) for r in frame.astype(object).where(frame.notna(), None).to_dict(orient="records")]


def read_csv(path: Path) -> pd.DataFrame | None:
    """The table at ``path``, or None when the step that writes it has not run."""
    if not path.is_file():
        return None
    try:
        return pd.read_csv(path, keep_default_na=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable CSV ({str(exc).splitlines()[0]})") from None


def is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def as_bool(value: Any) -> bool | None:
    if is_missing(value):
        return None
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


def split_list(value: Any, cast: Callable[[str], Any] = str) -> list[Any] | None:
    """A ``;``-separated cell (``"3;1;1"``) as a list, each item through ``cast``."""
    if is_missing(value):
        return None
    return [cast(v) for v in str(value).split(";") if v != ""]


def opt_float(value: Any) -> float | None:
    if value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def opt_int(value: Any) -> int | None:
    out = opt_float(value)
    return None if out is None else int(out)
