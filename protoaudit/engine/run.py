"""A run directory and its contracts (DESIGN.md "Contracts"), and the Python API to load one.

::

    reports/<name>/recipe.toml                    the recipe exactly as run
    reports/<name>/run.json                       versions, seed, device, fingerprints, timings, status
    reports/<name>/accuracy.csv                   one row per model: top-1 on the test split
    reports/<name>/members/<m>/model.safetensors  weights (never pickle)
    reports/<name>/members/<m>/model.json         architecture, class names, stage history, metrics
    reports/<name>/members/<m>/prototypes.csv     one row per prototype after push
    reports/<name>/members/<m>/logits.safetensors (N, K) test logits, saved once when the member is made
    reports/<name>/members/<m>/test_distances.safetensors  (N, m) min distances of the test pass that made them
    reports/<name>/members/<m>/faithfulness.json  deletion curves of a sample of its prototypes
    reports/<name>/members/<m>-pruned/...         the pruned copy of member m (protoaudit prune)
    reports/<name>/purity.csv, audit.json, duplicates.csv   written by protoaudit prune

This module owns the layout: every other module finds a run file through the functions here (``member_path``,
``pruned_name``, ``accuracy_row``, ``save_logits``/``load_logits``, ``save_test_distances``/``load_test_distances``, ``save_faithfulness``/``load_faithfulness``,
``RunWriter``). Every file is written
atomically. One process at a time writes into a run: every command that writes holds
the run's advisory lock (:func:`writing`) on ``.protoaudit.lock``, the first file of every run directory (so
a folder is recognisably a run from its first moment on); commands that only read never take it.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import platform
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from protoaudit.core.model import MemberConfig, ProtoPNet
from protoaudit.engine.io import (
    load_tensors,
    read_json,
    save_tensors,
    sha256_file,
    tensor_file_metadata,
    write_json,
    write_text,
)
from protoaudit.errors import CheckpointError, InputError, OutputError, Remedy

if TYPE_CHECKING:
    from protoaudit.engine.data import DatasetBundle
    from protoaudit.engine.recipe import MemberRecipe, Recipe

FORMAT_VERSION = 1
LOCK_FILE = ".protoaudit.lock"  # a run's first file; its writer holds an advisory lock on it
WRITER_FILE = ".writer.json"  # who holds the lock: pid, host, command, since (removed on release)
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
TEST_DISTANCES_FILE = "test_distances.safetensors"
FAITHFULNESS_FILE = "faithfulness.json"


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


def trained_meta(
    member: MemberRecipe,
    history: list[dict[str, Any]],
    selected_epoch: int | None,
    val_top1: float,
    test_top1: float,
    stage_seconds: dict[str, float],
    last_layer: dict[str, Any] | None = None,
    imported: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The part of ``model.json`` a trained (or imported) member or baseline records about its training;
    ``last_layer``: the dense layer against the solved one on the test split (``last_layer_solver = "fista"``);
    ``imported``: the original file an imported member came from (no history, no selected epoch)."""
    from protoaudit.core.trunks import trunk_info

    meta = {
        "name": member.name,
        "recipe": member.model_dump(mode="json"),
        "history": history,
        "selected_epoch": selected_epoch,
        "metrics": {"val_top1": val_top1, "test_top1": test_top1},
        "stage_seconds": stage_seconds,
        "trunk_family": trunk_info(member.trunk).family,
    }
    if last_layer is not None:
        meta["last_layer"] = last_layer
    if imported is not None:
        meta["imported"] = imported
    return meta


def pruned_meta(
    parent: str,
    parent_meta: dict[str, Any],
    k: int,
    threshold: int,
    finetune_epochs: int,
    last_layer: dict[str, Any],
    pruned_prototypes: list[int],
    test_top1: float,
) -> dict[str, Any]:
    """The part of ``model.json`` the pruned copy of member ``parent`` records: how it was pruned (``last_layer``:
    the retune's solver report), and its parent's recipe and trunk family."""
    return {
        "name": pruned_name(parent),
        "parent": parent,
        "pruning": {
            "k": k,
            "threshold": threshold,
            "finetune_epochs": finetune_epochs,
            "last_layer": last_layer,
            "pruned_prototypes": pruned_prototypes,
        },
        "recipe": parent_meta.get("recipe"),
        "trunk_family": parent_meta.get("trunk_family"),
        "metrics": {"test_top1": test_top1},
    }


def model_document(kind: str, meta: dict[str, Any], config: dict[str, Any], weights: Path) -> dict[str, Any]:
    """``model.json`` of a member (``kind`` "protopnet") or baseline: ``meta`` (:func:`trained_meta`,
    :func:`pruned_meta`) between the format and the architecture ``config``, then the sha256 of ``weights``,
    already written."""
    return {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        **meta,
        "config": config,
        "weights_sha256": sha256_file(weights),
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


def save_test_distances(member_dir: Path, min_distances: torch.Tensor) -> None:
    """Write ``test_distances.safetensors``: every test image's smallest squared distance to every prototype,
    ``min_distances`` (N, m) float32, from the same pass as the saved logits (the min distances the logits
    were computed from). Tied to the member's weights by their sha256 (model.json's, so call it after
    :func:`save_member`): prune reads them instead of searching the test patch index again."""
    sha = recorded_weights_sha256(read_json(member_dir / "model.json"), member_dir)
    save_tensors(
        member_dir / TEST_DISTANCES_FILE,
        {"min_distances": min_distances.to(torch.float32)},
        metadata={"format": f"protoaudit-test-distances/{FORMAT_VERSION}", "weights_sha256": sha},
    )


def load_test_distances(
    run_dir: str | os.PathLike[str], name: str, n_images: int, n_prototypes: int
) -> torch.Tensor | None:
    """Member ``name``'s saved test min distances (N, m) when they belong to its current weights (the sha256
    model.json records) and have the asked shape; else None (a run written before them, a pruned or imported
    member, another test split). A file that is not readable safetensors is a :class:`CheckpointError`."""
    member_dir = member_path(run_dir, name)
    path = member_dir / TEST_DISTANCES_FILE
    if not path.is_file():
        return None
    sha = recorded_weights_sha256(read_json(member_dir / "model.json"), member_dir)
    if tensor_file_metadata(path).get("weights_sha256") != sha:
        return None
    d = load_tensors(path).get("min_distances")
    if d is None or d.shape != (n_images, n_prototypes):
        return None
    return d


def save_faithfulness(member_dir: Path, document: dict[str, Any]) -> None:
    """Write ``faithfulness.json``: a member's deletion curves (:mod:`protoaudit.engine.faithfulness`)."""
    write_json(member_dir / FAITHFULNESS_FILE, document, strict=True)


def load_faithfulness(run_dir: str | os.PathLike[str], name: str) -> dict[str, Any] | None:
    """Member ``name``'s deletion curves, or None where they were not recorded (runs before them, pruned and
    imported members)."""
    path = member_path(run_dir, name) / FAITHFULNESS_FILE
    if not path.is_file():
        return None
    document = read_json(path)
    if not isinstance(document, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return document


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
    try:
        member_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot write {member_dir}: {exc.strerror or exc}") from None
    weights = member_dir / "model.safetensors"
    state = {k: v for k, v in model.state_dict().items()}
    # one metadata key only: safetensors does not keep the order of several, and files must be reproducible
    save_tensors(weights, state, metadata={"format": f"protoaudit-member/{FORMAT_VERSION}"})
    if prototypes is not None:
        write_csv(member_dir / "prototypes.csv", prototypes)
    write_json(member_dir / "model.json", model_document("protopnet", meta, model.config.to_dict(), weights))


def load_member(
    member_dir: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[ProtoPNet, dict[str, Any]]:
    """Rebuild a member from ``model.json`` + ``model.safetensors``; raises CheckpointError on any mismatch."""
    d = Path(member_dir)
    if not (d / "model.json").is_file() and d.is_dir():
        raise CheckpointError(
            f"{d / 'model.json'} is missing: the member's metadata (architecture, classes, weights sha256) "
            "is gone, so its weights cannot be trusted or rebuilt"
        )
    meta = read_json(d / "model.json")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{d / 'model.json'}: expected a JSON object")
    check_format(meta, d / "model.json")
    try:
        config = MemberConfig.from_dict(meta["config"])
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{d / 'model.json'}: bad or missing architecture ({exc})") from None
    _check_config(config, d / "model.json")
    state = load_tensors(d / "model.safetensors", recorded_weights_sha256(meta, d), "model.json")
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


def _check_config(config: MemberConfig, where: Path) -> None:
    """Values of model.json that the weights' shapes do not check: classes and prototype → class."""
    k = config.n_classes
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise CheckpointError(f"{where}: config.n_classes must be a positive integer, got {k!r}")
    if len(config.class_names) != k:
        raise CheckpointError(f"{where}: {len(config.class_names)} class names for {k} classes")
    bad = [
        (j, c)
        for j, c in enumerate(config.prototype_class)
        if not isinstance(c, int) or isinstance(c, bool) or not 0 <= c < k
    ]
    if bad:
        j, c = bad[0]
        raise CheckpointError(
            f"{where}: config.prototype_class[{j}] is {c!r}, not a class index in 0..{k - 1}"
            + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
        )


PROTOTYPE_COLUMNS = ("prototype", "class", "source_index", "h", "w", "distance")


def read_prototypes(member_dir: Path) -> pd.DataFrame:
    """``prototypes.csv`` of a member, checked: present, readable, the push columns there and finite."""
    import numpy as np

    path = member_dir / "prototypes.csv"
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found (the member's push result; the run is incomplete)")
    try:
        frame = pd.read_csv(path)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise CheckpointError(f"{path}: not a readable CSV table ({str(exc).splitlines()[0]})") from None
    missing = [c for c in PROTOTYPE_COLUMNS if c not in frame.columns]
    if missing:
        raise CheckpointError(f"{path}: column {missing[0]!r} is missing")
    for column in PROTOTYPE_COLUMNS:
        values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=float)
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            raise CheckpointError(
                f"{path}: row {int(bad[0]) + 1} has {column} = {frame[column].iloc[bad[0]]}, not a finite number"
            )
    return frame


def recorded_weights_sha256(meta: dict[str, Any], member_dir: Path) -> str:
    """The sha256 of ``model.safetensors`` that ``model.json`` records (CheckpointError when it has none)."""
    recorded = meta.get("weights_sha256")
    if not isinstance(recorded, str) or len(recorded) != 64:
        raise CheckpointError(
            f"{member_dir / 'model.json'}: records no weights_sha256, so model.safetensors cannot be checked"
        )
    return recorded


def verified_weights_sha256(member_dir: str | os.PathLike[str]) -> str:
    """sha256 of the member's ``model.safetensors``, checked against the one its ``model.json`` records:
    a changed weights file raises :class:`protoaudit.io.TamperedWeightsError` naming it."""
    from protoaudit.engine.io import TamperedWeightsError

    d = Path(member_dir)
    meta = read_json(d / "model.json")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{d / 'model.json'}: expected a JSON object")
    recorded = recorded_weights_sha256(meta, d)
    try:
        current = sha256_file(d / "model.safetensors")
    except FileNotFoundError:
        raise CheckpointError(f"{d / 'model.safetensors'}: file not found") from None
    if current != recorded:
        raise TamperedWeightsError(d / "model.safetensors", "model.json")
    return current


# -- runs ----------------------------------------------------------------------------------------------


@dataclass
class Run:
    """A finished (or interrupted) run directory, loaded lazily. ``load_run(path)`` makes one."""

    path: Path
    meta: dict[str, Any]
    _members: dict[str, tuple[ProtoPNet, dict[str, Any]]] = field(default_factory=dict, repr=False)
    _bundle: DatasetBundle | None = field(default=None, repr=False)  # the dataset, built once per Run

    @property
    def name(self) -> str:
        return str(self.meta.get("name", self.path.name))

    @property
    def member_names(self) -> list[str]:
        return list(self.meta.get("members", []))

    def recipe(self) -> Recipe:
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
        """``accuracy.csv``, checked: present, readable and with its columns."""
        path = self.path / "accuracy.csv"
        if not path.is_file():
            raise CheckpointError(f"{path}: file not found; the run did not finish (see run.json's status)")
        try:
            frame = pd.read_csv(path)
        except (ValueError, UnicodeDecodeError) as exc:  # pandas' ParserError and EmptyDataError included
            raise CheckpointError(f"{path}: not a readable CSV table ({str(exc).splitlines()[0]})") from None
        missing = [c for c in ACCURACY_COLUMNS[:7] if c not in frame.columns]  # the interval came later
        if missing:
            raise CheckpointError(f"{path}: column {missing[0]!r} is missing")
        return frame

    def prototypes(self, name: str) -> pd.DataFrame:
        return read_prototypes(member_path(self.path, name))

    def logits(self, name: str) -> dict[str, torch.Tensor] | None:
        """Member ``name``'s saved test logits (see :func:`load_logits`)."""
        return load_logits(self.path, name)

    def dataset(self) -> DatasetBundle:
        """Rebuild the run's dataset from its recipe (deterministic) and check its fingerprint; built once per
        :class:`Run`, so the steps of one command (prune, its index, the report) share it."""
        from protoaudit.engine.data import build_dataset

        if self._bundle is not None:
            return self._bundle
        recipe = self.recipe()
        bundle = build_dataset(recipe.data, recipe.seed)
        recorded = self.meta.get("dataset", {}).get("fingerprint")
        if recorded and recorded != bundle.fingerprint:
            raise InputError(
                f"the dataset of run {self.path} changed since training (fingerprint {bundle.fingerprint[:12]} != {recorded[:12]})"
            )
        self._bundle = bundle
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


# -- one writer per run directory ----------------------------------------------------------------------


class RunBusyError(InputError):
    """Another process is writing into the run directory."""


_HELD: dict[Path, int] = {}  # run directories whose lock this process holds (nested writers reuse it)


def is_run_dir(path: Path) -> bool:
    """True for a folder a protoaudit writer made: it holds run.json or the run lock (the first file a
    writer creates), or nothing but a recipe.toml (a run of an earlier version interrupted at its start)."""
    if not path.is_dir():
        return False
    if (path / "run.json").is_file() or (path / LOCK_FILE).is_file():
        return True
    return [p.name for p in path.iterdir()] == ["recipe.toml"]


@contextlib.contextmanager
def writing(run_dir: str | os.PathLike[str], command: str) -> Iterator[None]:
    """Hold the single-writer lock of ``run_dir`` (created when missing) while ``command`` writes into it.

    A second writer gets :class:`RunBusyError` naming the holder (pid, host, command, since); readers take no
    lock and are never blocked. The lock is advisory (``flock`` through the ``filelock`` package) and dies
    with its process, so a ``kill -9`` leaves no stale lock. Once it holds the lock, the writer removes the
    ``.*.tmp`` temporaries that an interrupted writer left (no other writer can be using them). Nested calls
    in one process for the same folder share the lock.
    """
    from filelock import FileLock, Timeout

    path = Path(run_dir)
    key = path.resolve()
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a read-only or full disk is an output problem; a file in the way is bad input
        kind = InputError if exc.errno in (errno.ENOTDIR, errno.EEXIST) else OutputError
        raise kind(f"cannot create run directory {path}: {exc.strerror or exc}") from None
    lock = FileLock(str(path / LOCK_FILE), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RunBusyError(f"run {path} is being written by {_holder(path)}; wait for it to end") from None
    except OSError as exc:
        raise OutputError(f"cannot lock {path / LOCK_FILE}: {exc.strerror or exc}") from None
    try:
        remove_stale_temporaries(path)
        write_json(
            path / WRITER_FILE,
            {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "since": _now()},
        )
        _HELD[key] = 1
        yield
    finally:
        _HELD.pop(key, None)
        with contextlib.suppress(OSError):
            (path / WRITER_FILE).unlink()
        lock.release()


def _holder(path: Path) -> str:
    try:
        info = json.loads((path / WRITER_FILE).read_text(encoding="utf-8"))
        return f"pid {info['pid']} on {info['host']} ({info['command']}, since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not said which yet)"


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete the ``.<name>.<random>.tmp`` files that an interrupted atomic write left under ``run_dir``;
    call it only while holding the run's lock. Returns what it removed."""
    removed = []
    for stray in sorted(run_dir.rglob(".*.tmp")):
        if stray.is_file():
            with contextlib.suppress(FileNotFoundError):
                stray.unlink()
                removed.append(stray)
    return removed
