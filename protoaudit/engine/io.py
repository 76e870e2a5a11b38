"""Atomic file writing and safe (pickle-free) weight files.

Every file protoaudit writes goes through :func:`atomic_write`: the bytes land in a temporary file in the
same folder, are flushed to disk, and are renamed over the target. An interrupted run therefore leaves
either the old file or the new one, never half of one, and no temporary file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd

from protoaudit.errors import CheckpointError, OutputError

_DISK_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EPERM}


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success rename it to ``path``, on any error remove it."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise _output_error(target, exc) from exc
    try:
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions of a new file
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
            raise _output_error(target, exc) from exc
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _output_error(target: Path, exc: OSError) -> OutputError:
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return OutputError(f"cannot write {target}: {reason}")


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_write(path) as handle:
        handle.write(text)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_write(path, "wb") as handle:
        handle.write(data)


def write_json(path: str | os.PathLike[str], obj: Any, strict: bool = False) -> None:
    """Write ``obj`` as JSON. ``strict``: plain JSON values only (:func:`jsonable`: NaN and inf become null),
    for the files other tools parse; otherwise floats are kept exactly as they are (training state)."""
    if strict:
        text = json.dumps(jsonable(obj), indent=2, allow_nan=False)
    else:
        text = json.dumps(obj, indent=2, sort_keys=False, default=_json_default)
    write_text(path, text + "\n")


def jsonable(obj: Any) -> Any:
    """Plain JSON types only: numpy scalars → Python, NaN/inf → None, tuples → lists, keys → str."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [jsonable(v) for v in obj.tolist()]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, bool) or obj is None or isinstance(obj, str | int):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is pd.NA or obj is pd.NaT:
        return None
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot store {type(obj).__name__} in JSON")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_json(path: str | os.PathLike[str]) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: file not found") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc


def save_tensors(
    path: str | os.PathLike[str], tensors: Mapping[str, Any], metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file atomically. ``tensors`` maps names to torch tensors."""
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    write_bytes(path, data)


def load_tensors(
    path: str | os.PathLike[str], sha256: str | None = None, recorded_in: str = ""
) -> dict[str, Any]:
    """Read a safetensors file; anything else (a pickle, a truncated file) is a :class:`CheckpointError`.

    With ``sha256``, the bytes read are hashed (once, as they are loaded) and must match it: a file changed
    since its digest was recorded (in ``recorded_in``) is a :class:`CheckpointError` naming the file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError as exc:
        raise CheckpointError(f"{p}: file not found") from exc
    except IsADirectoryError as exc:
        raise CheckpointError(f"{p}: is a directory, expected a .safetensors file") from exc
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise TamperedWeightsError(p, recorded_in)
    try:
        return dict(load(data))
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as exc:
        raise CheckpointError(f"{p}: not a readable safetensors file ({_first_line(exc)})") from exc


class TamperedWeightsError(CheckpointError):
    """A weights file whose bytes no longer match the sha256 recorded when it was written."""

    def __init__(self, path: Path, recorded_in: str = "") -> None:
        where = recorded_in or "its metadata"
        super().__init__(
            f"{path}: its sha256 differs from the one recorded in {where}: the file changed after it was "
            "written (damaged or edited); refused: restore it from a copy or train the member again"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def tensor_file_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The string metadata of a safetensors file's header (read without loading its tensors); a file that is
    not safetensors is a :class:`CheckpointError`."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(exc)})") from exc


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
