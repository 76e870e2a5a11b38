"""Atomic writing and pickle-free weight files."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from protoaudit.engine.io import atomic_write, load_tensors, save_tensors
from protoaudit.errors import CheckpointError


def test_atomic_write_leaves_nothing_on_error(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    with pytest.raises(RuntimeError), atomic_write(target) as handle:
        handle.write("half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_keeps_the_old_file_until_success(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_write(target) as handle:
        handle.write("new")
        raise KeyboardInterrupt
    assert target.read_text() == "old"
    with atomic_write(target) as handle:
        handle.write("new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_tensors_round_trip(tmp_path: Path) -> None:
    tensors = {"w": torch.randn(3, 4), "i": torch.arange(5)}
    save_tensors(tmp_path / "t.safetensors", tensors)
    loaded = load_tensors(tmp_path / "t.safetensors")
    assert set(loaded) == {"w", "i"}
    torch.testing.assert_close(loaded["w"], tensors["w"])


def test_pickle_renamed_safetensors_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self) -> tuple:
            return (marker.write_text, ("x",))

    path = tmp_path / "model.safetensors"
    path.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_tensors(path)
    assert not marker.exists()


def test_truncated_safetensors_is_refused(tmp_path: Path) -> None:
    save_tensors(tmp_path / "t.safetensors", {"w": torch.randn(10, 10)})
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[:-7])
    with pytest.raises(CheckpointError):
        load_tensors(tmp_path / "t.safetensors")
