"""Training-state checkpoints: a crashed member resumes exactly where its last finished epoch or stage left it.

A member in training keeps one checkpoint in its run directory::

    members/<m>/checkpoint/latest.json                JSON: counters, history, optimizer and scheduler
                                                       settings, and the name + sha256 of the tensor file
    members/<m>/checkpoint/state-<seq>.safetensors     every tensor: weights, Adam moments, RNG states,
                                                       the best-so-far weights and push result

No pickle: ``optimizer.state_dict()`` and friends are split by :func:`pack` into a JSON tree and a flat
name → tensor map. Writing is atomic as a pair: the tensor file is written (atomically) under a new name, then
``latest.json`` (atomically) names it, then older tensor files are removed. A crash at any moment leaves a
``latest.json`` that names a complete tensor file whose sha256 it records. The checkpoint is removed once the
member's ``model.json`` is written (the finished member is the contract; see :mod:`protoaudit.run`).

What a checkpoint restores (everything an uninterrupted run carries from one epoch to the next): model weights
and buffers, the warm / joint / last-layer Adam states, the StepLR scheduler, the shuffling ``torch.Generator``,
the augmentation ``torch.Generator`` (every augmented draw of every training image comes from it), torch's
global RNG state (and CUDA's when on a GPU), the history list, the per-stage timings, and the best pushed
state so far (weights, push result, validation score, epoch) used for model selection.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from protoaudit.engine.io import load_tensors, read_json, sha256_file, write_bytes, write_text
from protoaudit.errors import CheckpointError, OutputError

CHECKPOINT_FORMAT = 2  # 2: the augmentation generator is part of the state
POINTER = "latest.json"
_STATE_FILE = re.compile(r"^state-(\d{6})\.safetensors$")
_MARKERS = ("__tensor__", "__tuple__", "__items__")


# -- JSON tree + tensor map --------------------------------------------------------------------------


def pack(obj: Any, tensors: dict[str, torch.Tensor], key: str) -> Any:
    """Split ``obj`` (nested dicts, lists, tuples, tensors, scalars) into a JSON-able tree and ``tensors``.

    Each tensor is replaced by ``{"__tensor__": name}`` and stored in ``tensors[name]`` (name = its path);
    tuples become ``{"__tuple__": [...]}``; dicts whose keys are not all strings (optimizer states are keyed
    by parameter index) become ``{"__items__": [[key, value], ...]}``. :func:`unpack` inverts it exactly.
    """
    if isinstance(obj, torch.Tensor):
        if key in tensors:
            raise ValueError(f"checkpoint: two tensors named {key!r}")
        tensors[key] = obj
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not any(k in _MARKERS for k in obj):
            return {k: pack(v, tensors, f"{key}.{k}") for k, v in obj.items()}
        return {"__items__": [[_scalar(k), pack(v, tensors, f"{key}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [pack(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [pack(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]
    return _scalar(obj)


def _scalar(obj: Any) -> Any:
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if hasattr(obj, "item") and not isinstance(obj, torch.Tensor):  # numpy scalars
        return obj.item()
    raise TypeError(f"checkpoint: cannot store a {type(obj).__name__} without pickle")


def unpack(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`pack`; a missing tensor is a :class:`CheckpointError`."""
    if isinstance(tree, dict):
        if set(tree) == {"__tensor__"}:
            name = tree["__tensor__"]
            if name not in tensors:
                raise CheckpointError(f"checkpoint: tensor {name!r} missing from the tensor file")
            return tensors[name]
        if set(tree) == {"__tuple__"}:
            return tuple(unpack(v, tensors) for v in tree["__tuple__"])
        if set(tree) == {"__items__"}:
            return {k: unpack(v, tensors) for k, v in tree["__items__"]}
        return {k: unpack(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [unpack(v, tensors) for v in tree]
    return tree


# -- the member's training state ---------------------------------------------------------------------


@dataclass
class TrainingState:
    """Everything :func:`protoaudit.train.train_member` carries between epochs.

    ``epoch`` is the last SGD epoch finished (1-based); ``phase`` is ``"sgd"`` when that epoch's SGD pass is
    done but its push + last-layer stage (if one is due) is not, ``"push"`` when both are done.
    """

    epoch: int
    phase: str
    model: dict[str, torch.Tensor]
    optimizers: dict[str, dict[str, Any]]
    scheduler: dict[str, Any]
    generator: torch.Tensor  # (5056,) uint8: the shuffling generator's state
    torch_rng: torch.Tensor  # uint8: torch.get_rng_state()
    augment_generator: torch.Tensor | None = None  # (5056,) uint8: the augmentation generator's state
    cuda_rng: list[torch.Tensor] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    best: dict[str, Any] | None = None  # score, epoch, state (weights), push (PushResult fields)
    identity: dict[str, Any] = field(default_factory=dict)  # member name, recipe sha256, seed


class MemberCheckpoint:
    """The checkpoint folder of one member: ``save`` after every epoch and stage, ``load`` to resume."""

    def __init__(self, directory: str | os.PathLike[str], identity: dict[str, Any] | None = None) -> None:
        self.directory = Path(directory)
        self.identity = dict(identity or {})
        self.seconds_writing = 0.0  # time spent in save(), for the bench and the member's timings

    # -- writing ---------------------------------------------------------------------------------------
    def save(self, state: TrainingState) -> None:
        """Write ``state`` as the member's checkpoint (atomically, see the module docstring)."""
        from safetensors.torch import save as serialise

        t0 = time.perf_counter()
        state.identity = {**self.identity, **state.identity}
        tensors: dict[str, torch.Tensor] = {}
        best = dict(state.best) if state.best is not None else None
        if best is not None and _same_tensors(best["state"], state.model):
            best["state"] = "model"  # the best state is the current one: store the weights once
        tree = {
            "format_version": CHECKPOINT_FORMAT,
            "kind": "protoaudit-training-state",
            "identity": state.identity,
            "epoch": state.epoch,
            "phase": state.phase,
            "history": state.history,
            "seconds": state.seconds,
            "model": pack(state.model, tensors, "model"),
            "optimizers": pack(state.optimizers, tensors, "optimizers"),
            "scheduler": pack(state.scheduler, tensors, "scheduler"),
            "rng": pack(
                {
                    "generator": state.generator,
                    "augment": state.augment_generator,
                    "torch": state.torch_rng,
                    "cuda": state.cuda_rng,
                },
                tensors,
                "rng",
            ),
            "best": pack(best, tensors, "best"),
        }
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot write {self.directory}: {exc.strerror or exc}") from None
        previous = self._state_files()
        seq = max((n for n, _ in previous), default=0) + 1
        tensor_file = self.directory / f"state-{seq:06d}.safetensors"
        data = serialise(
            _unshared(tensors), metadata={"format": f"protoaudit-checkpoint/{CHECKPOINT_FORMAT}"}
        )
        write_bytes(tensor_file, data)
        tree["tensors"] = {"file": tensor_file.name, "sha256": hashlib.sha256(data).hexdigest()}
        del data
        try:
            write_text(self.directory / POINTER, json.dumps(tree) + "\n")  # compact: written every epoch
        except BaseException:
            with contextlib.suppress(OSError):  # the previous checkpoint stays the valid one
                tensor_file.unlink()
            raise
        for _, old in previous:  # only now that latest.json names the new file
            with contextlib.suppress(FileNotFoundError):
                old.unlink()
        self.seconds_writing += time.perf_counter() - t0

    def remove(self) -> None:
        """Delete the checkpoint (the member is finished); the pointer goes first so no half state remains."""
        with contextlib.suppress(FileNotFoundError):
            (self.directory / POINTER).unlink()
        for _, path in self._state_files():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        for stray in self.directory.glob(".*.tmp") if self.directory.is_dir() else []:
            with contextlib.suppress(FileNotFoundError):
                stray.unlink()
        with contextlib.suppress(FileNotFoundError, OSError):
            self.directory.rmdir()

    def _state_files(self) -> list[tuple[int, Path]]:
        if not self.directory.is_dir():
            return []
        out = []
        for path in self.directory.iterdir():
            match = _STATE_FILE.match(path.name)
            if match:
                out.append((int(match.group(1)), path))
        return sorted(out)

    # -- reading ---------------------------------------------------------------------------------------
    def exists(self) -> bool:
        return (self.directory / POINTER).is_file()

    def load(self) -> TrainingState | None:
        """The saved state, or None when there is no checkpoint. Raises CheckpointError when it cannot be
        trusted: another format version, another member or recipe, or a tensor file that does not match."""
        pointer = self.directory / POINTER
        if not pointer.is_file():
            return None
        tree = read_json(pointer)
        where = f"checkpoint {pointer}"
        if not isinstance(tree, dict) or tree.get("kind") != "protoaudit-training-state":
            raise CheckpointError(f"{where}: not a protoaudit training checkpoint")
        version = tree.get("format_version")
        if not isinstance(version, int) or version > CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"{where}: format version {version} is not one this protoaudit reads ({CHECKPOINT_FORMAT}); upgrade protoaudit"
            )
        if version < CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"{where}: format version {version} was written by an older protoaudit and lacks the "
                "augmentation stream, so the run cannot continue identically; start it anew with --force"
            )
        identity = tree.get("identity", {})
        for key, expected in self.identity.items():
            if identity.get(key) != expected:
                raise CheckpointError(
                    f"{where}: written for {key} {_short(identity.get(key))!r}, not {_short(expected)!r}; "
                    "resume with the run's own recipe or start a new run"
                )
        info = tree.get("tensors", {})
        name = str(info.get("file", ""))
        if not _STATE_FILE.match(name):
            raise CheckpointError(f"{where}: names no tensor file")
        tensor_file = self.directory / name
        if not tensor_file.is_file():
            raise CheckpointError(f"{where}: its tensor file {name} is missing")
        if sha256_file(tensor_file) != info.get("sha256"):
            raise CheckpointError(f"{where}: {name} does not match the sha256 recorded in {POINTER}")
        tensors = load_tensors(tensor_file)
        try:
            rng = unpack(tree["rng"], tensors)
            model = unpack(tree["model"], tensors)
            best = unpack(tree["best"], tensors)
            if best is not None and best.get("state") == "model":
                best["state"] = model
            return TrainingState(
                epoch=int(tree["epoch"]),
                phase=str(tree["phase"]),
                model=model,
                optimizers=unpack(tree["optimizers"], tensors),
                scheduler=unpack(tree["scheduler"], tensors),
                generator=rng["generator"],
                torch_rng=rng["torch"],
                augment_generator=rng.get("augment"),
                cuda_rng=list(rng.get("cuda") or []),
                history=list(tree.get("history", [])),
                seconds=dict(tree.get("seconds", {})),
                best=best,
                identity=identity,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{where}: incomplete ({type(exc).__name__}: {exc})") from None


def state_dict_mismatch(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> str:
    """Empty when ``given`` fits ``expected`` key for key and shape for shape, else a short description."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            parts.append(f"{label} {keys[0]}" + (f" and {len(keys) - 1} more" if len(keys) > 1 else ""))
    if not parts:
        for key, value in expected.items():
            if tuple(given[key].shape) != tuple(value.shape):
                return f"{key} has shape {tuple(given[key].shape)}, expected {tuple(value.shape)}"
    return "; ".join(parts)


def _short(value: Any) -> Any:
    return value[:12] + "…" if isinstance(value, str) and len(value) > 16 else value


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].shape == b[k].shape and a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a
    )


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses two names over one storage: give such tensors their own copy."""
    seen: set[int] = set()
    out = {}
    for name, value in tensors.items():
        t = value.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else -1
        if ptr in seen:
            t = t.clone()
        elif ptr != -1:
            seen.add(ptr)
        out[name] = t
    return out


# -- capture and restore ---------------------------------------------------------------------------------


def capture(
    epoch: int,
    phase: str,
    model: torch.nn.Module,
    optimizers: dict[str, torch.optim.Optimizer],
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
    history: list[dict[str, Any]],
    seconds: dict[str, float],
    best: tuple[float, int, dict[str, torch.Tensor], Any] | None,
    augment_generator: torch.Generator | None = None,
) -> TrainingState:
    """Snapshot the training loop's state (tensors are referenced, not copied: save it before going on)."""
    best_doc = None
    if best is not None:
        score, best_epoch, weights, pushed = best
        best_doc = {
            "score": score,
            "epoch": best_epoch,
            "state": weights,
            "push": {name: getattr(pushed, name) for name in _PUSH_FIELDS},
        }
    return TrainingState(
        epoch=epoch,
        phase=phase,
        model=dict(model.state_dict()),
        optimizers={name: opt.state_dict() for name, opt in optimizers.items()},
        scheduler=scheduler.state_dict(),
        generator=generator.get_state(),
        torch_rng=torch.get_rng_state(),
        augment_generator=None if augment_generator is None else augment_generator.get_state(),
        cuda_rng=list(torch.cuda.get_rng_state_all()) if torch.cuda.is_initialized() else [],
        history=[dict(h) for h in history],
        seconds=dict(seconds),
        best=best_doc,
    )


_PUSH_FIELDS = ("image_index", "h", "w", "distance", "activation_maps", "boxes")


def restore(
    state: TrainingState,
    model: torch.nn.Module,
    optimizers: dict[str, torch.optim.Optimizer],
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
    where: Path,
    augment_generator: torch.Generator | None = None,
) -> tuple[float, int, dict[str, torch.Tensor], Any] | None:
    """Put ``state`` back into the freshly built loop objects; returns the best-so-far tuple.

    Call it after everything that draws from torch's RNG at start-up: it sets the global RNG state last.
    """
    from protoaudit.engine.push import PushResult

    mismatch = state_dict_mismatch(model.state_dict(), state.model)
    if mismatch:
        raise CheckpointError(f"checkpoint {where} does not fit this member's architecture ({mismatch})")
    model.load_state_dict(state.model, strict=True)
    if set(state.optimizers) != set(optimizers):
        raise CheckpointError(f"checkpoint {where}: optimizers {sorted(state.optimizers)} do not match")
    try:
        for name, opt in optimizers.items():
            opt.load_state_dict(state.optimizers[name])
        scheduler.load_state_dict(state.scheduler)
        generator.set_state(state.generator)
        if augment_generator is not None:
            if state.augment_generator is None:
                raise CheckpointError(f"checkpoint {where}: it holds no augmentation generator state")
            augment_generator.set_state(state.augment_generator)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {where}: optimizer or RNG state does not fit ({exc})") from None
    best = None
    if state.best is not None:
        b = state.best
        pushed = PushResult(**{name: b["push"][name] for name in _PUSH_FIELDS})
        device = next(model.parameters()).device
        weights = {k: v.to(device) for k, v in b["state"].items()}
        best = (float(b["score"]), int(b["epoch"]), weights, pushed)
    torch.set_rng_state(state.torch_rng)
    if state.cuda_rng and torch.cuda.is_available() and len(state.cuda_rng) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state.cuda_rng)
    return best
