"""A run directory and its contracts (DESIGN.md "Contracts"), and the Python API to load one.

::

    reports/<name>/recipe.toml                    the recipe exactly as run
    reports/<name>/run.json                       versions, seed, device, fingerprints, timings, status
    reports/<name>/accuracy.csv                   one row per model: top-1 on the test split
    reports/<name>/members/<m>/model.safetensors  weights (never pickle)
    reports/<name>/members/<m>/model.json         architecture, class names, stage history, metrics
    reports/<name>/members/<m>/prototypes.csv     one row per prototype after push
    reports/<name>/members/<m>/logits.safetensors (N, K) test logits, saved once when the member is made
    reports/<name>/members/<m>-pruned/...         the pruned copy of member m (protoaudit prune)
    reports/<name>/purity.csv, audit.json, duplicates.csv   written by protoaudit prune

This module owns the layout: every other module finds a run file through the functions here (``member_path``,
``pruned_name``, ``accuracy_row``, ``save_logits``/``load_logits``, ``RunWriter``). Every file is written
atomically.
"""

from __future__ import annotations

import io
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from protoaudit.core.model import MemberConfig, ProtoPNet
from protoaudit.engine.io import load_tensors, read_json, save_tensors, sha256_file, write_json, write_text
from protoaudit.errors import CheckpointError, InputError, Remedy

FORMAT_VERSION = 1
# top1_low / top1_high: the 95 % percentile bootstrap interval of top1 (the same resamples for every model)
ACCURACY_COLUMNS = [
    "model",
    "kind",
    "backbone",
    "pruned",
    "top1",
    "n_prototypes",
    "n_test",
    "top1_low",
    "top1_high",
]
MEMBERS_DIR = "members"
PRUNED_SUFFIX = "-pruned"  # members/<m>-pruned/: the pruned copy of member m
LOGITS_FILE = "logits.safetensors"


def member_path(run_dir: str | os.PathLike[str], name: str) -> Path:
    """The folder of member (or pruned member, or imported member) ``name`` of a run."""
    return Path(run_dir) / MEMBERS_DIR / name


def pruned_name(name: str) -> str:
    """The name of member ``name``'s pruned copy."""
    return f"{name}{PRUNED_SUFFIX}"


def accuracy_row(
    model: str,
    kind: str,
    backbone: str,
    top1: float,
    n_prototypes: int,
    n_test: int,
    pruned: bool = False,
    interval: dict[str, float] | None = None,
) -> dict[str, Any]:
    """One row of ``accuracy.csv`` (columns :data:`ACCURACY_COLUMNS`); kind is member, ensemble or baseline.
    ``interval``: ``{"top1_low", "top1_high"}`` (:func:`protoaudit.core.stats.top1_interval`)."""
    interval = interval or {}
    return {
        "model": model,
        "kind": kind,
        "backbone": backbone,
        "pruned": pruned,
        "top1": top1,
        "n_prototypes": n_prototypes,
        "n_test": n_test,
        "top1_low": interval.get("top1_low", float("nan")),
        "top1_high": interval.get("top1_high", float("nan")),
    }


def accuracy_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=ACCURACY_COLUMNS)


def save_logits(member_dir: Path, logits: dict[str, torch.Tensor], labels: dict[str, Any]) -> None:
    """Write ``logits.safetensors``: for each split, ``<split>`` (N, K) float32 and ``labels.<split>`` (N,)
    int64, so that reports and audits read a member's predictions instead of running it again."""
    tensors = {split: t.detach().to("cpu", torch.float32).contiguous() for split, t in logits.items()}
    for split, y in labels.items():
        tensors[f"labels.{split}"] = torch.as_tensor(y, dtype=torch.int64).contiguous()
    save_tensors(
        member_dir / LOGITS_FILE, tensors, metadata={"format": f"protoaudit-logits/{FORMAT_VERSION}"}
    )


def load_logits(run_dir: str | os.PathLike[str], name: str) -> dict[str, torch.Tensor] | None:
    """A member's saved logits and labels (keys ``test``, ``labels.test``, …), or None for a run written
    before they were saved."""
    path = member_path(run_dir, name) / LOGITS_FILE
    if not path.is_file():
        return None
    return dict(load_tensors(path))


def versions() -> dict[str, str]:
    from protoaudit import __version__

    out = {"protoaudit": __version__, "python": platform.python_version(), "torch": torch.__version__}
    try:
        import faiss

        out["faiss"] = faiss.__version__
    except ImportError:  # pragma: no cover - faiss is a dependency
        out["faiss"] = "not installed"
    return out


def write_csv(path: str | os.PathLike[str], frame: pd.DataFrame) -> None:
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False, lineterminator="\n")
    write_text(path, buffer.getvalue())


def check_format(meta: dict[str, Any], where: Path) -> None:
    version = meta.get("format_version")
    if not isinstance(version, int):
        raise CheckpointError(f"{where}: no format_version; not written by protoaudit")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{where}: format version {version} is newer than this protoaudit reads ({FORMAT_VERSION}); upgrade protoaudit"
        )


# -- members -------------------------------------------------------------------------------------------


def save_member(
    member_dir: Path, model: ProtoPNet, meta: dict[str, Any], prototypes: pd.DataFrame | None = None
) -> None:
    """Write ``model.safetensors`` then ``model.json`` (which records the weights' sha256) and prototypes.csv."""
    member_dir.mkdir(parents=True, exist_ok=True)
    weights = member_dir / "model.safetensors"
    state = {k: v for k, v in model.state_dict().items()}
    # one metadata key only: safetensors does not keep the order of several, and files must be reproducible
    save_tensors(weights, state, metadata={"format": f"protoaudit-member/{FORMAT_VERSION}"})
    if prototypes is not None:
        write_csv(member_dir / "prototypes.csv", prototypes)
    document = {
        "format_version": FORMAT_VERSION,
        "kind": "protopnet",
        **meta,
        "config": model.config.to_dict(),
        "weights_sha256": sha256_file(weights),
    }
    write_json(member_dir / "model.json", document)


def load_member(
    member_dir: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[ProtoPNet, dict[str, Any]]:
    """Rebuild a member from ``model.json`` + ``model.safetensors``; raises CheckpointError on any mismatch."""
    d = Path(member_dir)
    meta = read_json(d / "model.json")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{d / 'model.json'}: expected a JSON object")
    check_format(meta, d / "model.json")
    try:
        config = MemberConfig.from_dict(meta["config"])
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{d / 'model.json'}: bad or missing architecture ({exc})") from None
    state = load_tensors(d / "model.safetensors")
    model = ProtoPNet(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise CheckpointError(
            f"{d / 'model.safetensors'} does not fit the architecture in model.json ({detail})"
        ) from None
    return model.to(device).eval(), meta


# -- runs ----------------------------------------------------------------------------------------------


@dataclass
class Run:
    """A finished (or interrupted) run directory, loaded lazily. ``load_run(path)`` makes one."""

    path: Path
    meta: dict[str, Any]
    _members: dict[str, tuple[ProtoPNet, dict[str, Any]]] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return str(self.meta.get("name", self.path.name))

    @property
    def member_names(self) -> list[str]:
        return list(self.meta.get("members", []))

    def recipe(self) -> Any:
        from protoaudit.engine.recipe import load_recipe

        return load_recipe(self.path / "recipe.toml")

    def member(self, name: str, device: str | torch.device = "cpu") -> ProtoPNet:
        if name not in self._members:
            if name not in self.member_names and not member_path(self.path, name).is_dir():
                raise InputError(
                    f"run {self.path} has no member {name!r} (members: {', '.join(self.member_names)})"
                )
            self._members[name] = load_member(member_path(self.path, name), device)
        return self._members[name][0]

    def member_meta(self, name: str) -> dict[str, Any]:
        self.member(name)
        return self._members[name][1]

    def members(self, device: str | torch.device = "cpu") -> dict[str, ProtoPNet]:
        return {name: self.member(name, device) for name in self.member_names}

    def accuracy(self) -> pd.DataFrame:
        return pd.read_csv(self.path / "accuracy.csv")

    def prototypes(self, name: str) -> pd.DataFrame:
        return pd.read_csv(member_path(self.path, name) / "prototypes.csv")

    def logits(self, name: str) -> dict[str, torch.Tensor] | None:
        """Member ``name``'s saved test logits (see :func:`load_logits`)."""
        return load_logits(self.path, name)

    def dataset(self) -> Any:
        """Rebuild the run's dataset from its recipe (deterministic) and check its fingerprint."""
        from protoaudit.engine.data import build_dataset

        recipe = self.recipe()
        bundle = build_dataset(recipe.data, recipe.seed)
        recorded = self.meta.get("dataset", {}).get("fingerprint")
        if recorded and recorded != bundle.fingerprint:
            raise InputError(
                f"the dataset of run {self.path} changed since training (fingerprint {bundle.fingerprint[:12]} != {recorded[:12]})"
            )
        return bundle


def load_run(path: str | os.PathLike[str] | None = None, root: str | os.PathLike[str] = "reports") -> Run:
    """Open a run directory; with no path, the most recent run under ``root``."""
    run_dir = Path(path) if path is not None else latest_run(root)
    if not run_dir.is_dir():
        raise InputError(f"run directory {run_dir} does not exist")
    meta = read_json(run_dir / "run.json")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{run_dir / 'run.json'}: expected a JSON object")
    check_format(meta, run_dir / "run.json")
    return Run(run_dir, meta)


def latest_run(root: str | os.PathLike[str] = "reports") -> Path:
    candidates = [p.parent for p in Path(root).glob("*/run.json")]
    if not candidates:
        raise InputError(
            f"no run found under {root}/", remedy=Remedy("train one", "train-ensemble", "RECIPE")
        )
    return max(candidates, key=lambda p: (p / "run.json").stat().st_mtime)


class RunWriter:
    """Keeps ``run.json`` up to date while a run is in progress (status running → complete/interrupted/failed)."""

    def __init__(self, path: Path, document: dict[str, Any], enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled  # False on the ranks other than 0 under torchrun: they write nothing
        self.document = {"format_version": FORMAT_VERSION, **document, "status": "running", "started": _now()}
        self.flush()

    @classmethod
    def reopen(cls, run: Run) -> RunWriter:
        """A writer for a finished run's ``run.json`` (a later step such as prune records its part there);
        the document is kept as it is until :meth:`update`."""
        writer = cls.__new__(cls)
        writer.path, writer.enabled, writer.document = run.path, True, dict(run.meta)
        return writer

    def update(self, **changes: Any) -> None:
        self.document.update(changes)
        self.flush()

    def finish(self, status: str, **changes: Any) -> None:
        self.update(status=status, finished=_now(), **changes)

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        """Record how the run ended when it ends by an exception: interrupted (Ctrl-C) or failed."""
        if exc is None:
            return
        if isinstance(exc, KeyboardInterrupt):
            self.finish("interrupted")
        else:
            self.finish("failed", error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)

    def flush(self) -> None:
        if self.enabled:
            write_json(self.path / "run.json", self.document)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
