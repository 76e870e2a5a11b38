"""One writer per run directory: an advisory lock that a second writer cannot take (one line naming the
holder, exit 2, nothing touched), that readers never take, that dies with its process; and what a writer
does once it holds it: stale temporaries go, a folder interrupted before its first run.json is recoverable."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from protoaudit.engine.run import LOCK_FILE, load_run, writing

from .conftest import TINY_RECIPE, run_cli
from .test_resume import KILL_AT, _tree


def test_a_second_writer_is_refused_and_a_nested_one_shares_the_lock(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with writing(run_dir, "first"):
        assert (run_dir / LOCK_FILE).is_file()  # the first file of the folder
        with writing(run_dir, "nested"):  # the same process, e.g. train-ensemble building indexes
            pass
        holder = json.loads((run_dir / ".writer.json").read_text())
        assert holder["pid"] == os.getpid()
        script = f"from protoaudit.engine.run import writing\nwith writing({str(run_dir)!r}, 'second'): pass"
        second = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert second.returncode != 0
        assert "RunBusyError" in second.stderr
        assert f"pid {os.getpid()} on {socket.gethostname()} (first, since " in second.stderr
    assert not (run_dir / ".writer.json").exists()
    with writing(run_dir, "after"), writing(tmp_path / "." / "run", "the same folder spelled otherwise"):
        pass  # released: the next writer gets it; a nested call for the same folder shares it


def test_two_concurrent_writers_one_clean_refusal_files_intact(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A `train-ensemble` holds its run; `--resume`, `--force` and `prune` on that run are each refused with
    one line naming it, and change nothing; a reader loads a finished member meanwhile; the holder finishes."""
    hold = tmp_path / "hold"
    hold.mkdir()
    train = ["train-ensemble", str(TINY_RECIPE), "--out", str(tmp_path / "runs"), "-q", "--threads", "1"]
    train += ["--set", "index.build=false"]
    holder = subprocess.Popen(
        [sys.executable, str(KILL_AT), "hold", "resnet", "1", "--", *train],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "KILL_AT_HOLD": str(hold)},
    )
    run_dir = tmp_path / "runs" / "tiny"
    try:
        deadline = time.monotonic() + 240
        while not (hold / "holding").exists():
            assert holder.poll() is None, holder.stderr.read() if holder.stderr else ""
            assert time.monotonic() < deadline, "the holder never reached its hold point"
            time.sleep(0.05)
        before = _tree(run_dir)
        for extra in (["--resume"], ["--force"]):
            code, out, err = run_cli([*train, *extra], capsys)
            assert code == 2, err
            assert out == ""
            lines = err.strip().splitlines()
            assert len(lines) == 1, err
            assert lines[0].startswith(f"error: run {run_dir} is being written by pid {holder.pid} on ")
            assert "(train-ensemble, since " in lines[0]
        code, _, err = run_cli(["prune", str(run_dir), "-q"], capsys)
        assert code == 2
        assert f"is being written by pid {holder.pid}" in err
        assert _tree(run_dir) == before  # the refused writers touched nothing
        reader = load_run(run_dir)  # readers take no lock
        assert reader.member("vgg").n_prototypes == 12
    finally:
        (hold / "release").write_text("")
        _, stderr = holder.communicate(timeout=300)
    assert holder.returncode == 0, stderr[-2000:]
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["status"] == "complete"
    assert (run_dir / "accuracy.csv").is_file()
    load_run(run_dir).member("resnet")  # whole and matching its recorded sha256


def test_stale_temporaries_are_removed_by_the_next_writer(tiny_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "tiny"
    shutil.copytree(tiny_run, run_dir)
    stale = [run_dir / ".accuracy.csv.abc123.tmp", run_dir / "members" / "vgg" / ".model.safetensors.x.tmp"]
    for path in stale:
        path.write_bytes(b"half a file")
    keep = run_dir / "members" / "vgg" / "notes.tmp"  # not a temporary of an atomic write
    keep.write_text("mine")
    with writing(run_dir, "index"):
        assert not any(p.exists() for p in stale)
    assert keep.read_text() == "mine"


def _killed_before_run_json(tmp_path: Path) -> Path:
    """What a kill between the lock (or recipe.toml) and the first run.json leaves."""
    run_dir = tmp_path / "runs" / "tiny"
    run_dir.mkdir(parents=True)
    (run_dir / LOCK_FILE).write_text("")
    from protoaudit.engine.recipe import load_recipe

    recipe = load_recipe(TINY_RECIPE, overrides=["index.build=false"], out=str(tmp_path / "runs"))
    (run_dir / "recipe.toml").write_text(recipe.to_toml())
    return run_dir


def test_resume_of_a_run_killed_before_its_first_run_json_starts_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = _killed_before_run_json(tmp_path)
    args = ["train-ensemble", str(TINY_RECIPE), "--out", str(tmp_path / "runs"), "--set", "index.build=false"]
    code, _, err = run_cli([*args, "--resume", "--set", "schedule.epochs=2"], capsys)
    assert code == 2  # another recipe than the one recorded: refused, with the keys
    assert "recipe differs from the run's recipe.toml (schedule.epochs: 3 → 2)" in err
    code, _, err = run_cli([*args, "--resume"], capsys)
    assert code == 0, err
    assert "interrupted before training started" in err
    assert json.loads((run_dir / "run.json").read_text())["status"] == "complete"


def test_force_replaces_a_run_shaped_folder_without_run_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = _killed_before_run_json(tmp_path)
    (run_dir / "members").mkdir()
    args = ["train-ensemble", str(TINY_RECIPE), "--out", str(tmp_path / "runs"), "-q"]
    code, _, err = run_cli([*args, "--set", "index.build=false"], capsys)
    assert code == 2  # without --force an existing run is never replaced
    assert "already exists; pass --force" in err
    code, _, err = run_cli([*args, "--force", "--set", "index.build=false"], capsys)
    assert code == 0, err
    assert json.loads((run_dir / "run.json").read_text())["status"] == "complete"
