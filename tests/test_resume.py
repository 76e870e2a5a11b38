"""Resume after a crash: checkpoints hold the whole training state (no pickle), are written atomically, and a
resumed run ends bit-identical to an uninterrupted one with the same seed and threads.

Refusals of bad checkpoints and run directories (tampered, newer format, other architecture) are in the
bad-input corpus, tests/test_bad_inputs.py.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from protoaudit.engine.checkpoint import MemberCheckpoint, capture, pack, unpack
from protoaudit.engine.data import build_dataset
from protoaudit.engine.io import load_tensors
from protoaudit.engine.recipe import load_recipe
from protoaudit.engine.train import TrainedMember, train_member
from protoaudit.errors import OutputError

from .conftest import TINY_RECIPE, run_cli


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Deep equality, bit-exact for tensors and types (a tuple stays a tuple, an int key an int)."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_optimizer_and_scheduler_states_round_trip_without_pickle(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.Adam(
        [{"params": model[0].parameters(), "lr": 1e-3}, {"params": model[1].parameters(), "lr": 3e-3}]
    )
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(3):
        model(torch.randn(5, 3)).sum().backward()
        opt.step()
        sched.step()
    original = {"opt": opt.state_dict(), "sched": sched.state_dict(), "gen": torch.Generator().get_state()}
    tensors: dict[str, torch.Tensor] = {}
    tree = pack(original, tensors, "x")
    text = json.dumps(tree)  # the non-tensor part is plain JSON
    assert "__items__" in text  # int-keyed optimizer states survive
    assert "__tuple__" in text  # and Adam's betas tuple
    restored = unpack(json.loads(text), tensors)
    assert_same(restored, original)
    assert isinstance(restored["opt"]["state"][0]["step"], torch.Tensor)
    assert restored["opt"]["param_groups"][0]["betas"] == (0.9, 0.999)


def _interrupt_after(n: int) -> type[MemberCheckpoint]:
    class Interrupting(MemberCheckpoint):
        """A checkpoint whose n-th save is followed by a crash (KeyboardInterrupt)."""

        saves = 0

        def save(self, state: Any) -> None:
            super().save(state)
            type(self).saves += 1
            if type(self).saves == n:
                raise KeyboardInterrupt

    return Interrupting


@pytest.fixture(scope="module")
def small() -> tuple[Any, Any]:
    recipe = load_recipe(
        TINY_RECIPE,
        overrides=["schedule.epochs=4", "schedule.push_start=2", "schedule.push_every=2"],
        threads=1,
    )
    torch.set_num_threads(1)
    return recipe, build_dataset(recipe.data, recipe.seed)


def _train(small: tuple[Any, Any], checkpoint: MemberCheckpoint) -> TrainedMember:
    recipe, bundle = small
    return train_member(recipe.members[0], recipe, bundle, torch.device("cpu"), seed=5, checkpoint=checkpoint)


def _comparable_history(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in h.items() if not k.startswith("seconds")} for h in history]  # timings differ


# Schedule: epochs 1..4, push after 2 and 4 → saves: 1 sgd (warm), 2 sgd (push pending), 2 push, 3 sgd,
# 4 sgd (push pending), 4 push.
@pytest.fixture(scope="module")
def reference(small: tuple[Any, Any], tmp_path_factory: pytest.TempPathFactory) -> TrainedMember:
    """The member trained without interruption (with checkpoints, as a resumable run is)."""
    return _train(small, MemberCheckpoint(tmp_path_factory.mktemp("reference")))


@pytest.mark.parametrize("crash_after_save", [1, 2, 3, 5, 6])
def test_resume_from_each_kind_of_checkpoint_is_bit_identical(
    small: tuple[Any, Any], reference: TrainedMember, tmp_path: Path, crash_after_save: int
) -> None:
    directory = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):
        _train(small, _interrupt_after(crash_after_save)(directory))
    saved = MemberCheckpoint(directory).load()
    assert saved is not None
    torch.manual_seed(12345)  # the resumed process starts from another global RNG state: it must be restored
    resumed = _train(small, MemberCheckpoint(directory))
    for key, value in reference.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    assert resumed.selected_epoch == reference.selected_epoch
    assert resumed.val_top1 == reference.val_top1
    assert _comparable_history(resumed.history) == _comparable_history(reference.history)
    for name in ("image_index", "h", "w", "distance", "boxes"):
        assert torch.equal(getattr(resumed.push, name), getattr(reference.push, name)), name


def test_a_failed_checkpoint_write_keeps_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    gen = torch.Generator().manual_seed(0)
    checkpoint = MemberCheckpoint(tmp_path / "ck", {"member": "m"})
    checkpoint.save(capture(1, "sgd", model, {"joint": opt}, sched, gen, [{"epoch": 1}], {}, None))
    before = sorted(p.name for p in checkpoint.directory.iterdir())

    import protoaudit.engine.checkpoint as ck
    from protoaudit.engine.io import write_text

    def full_disk(path: Any, text: str) -> None:  # the pointer write hits a full disk half-way
        if str(path).endswith("latest.json"):
            raise OutputError(f"cannot write {path}: {os.strerror(errno.ENOSPC)}")
        write_text(path, text)

    monkeypatch.setattr(ck, "write_text", full_disk)
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(OutputError):
        checkpoint.save(capture(2, "sgd", model, {"joint": opt}, sched, gen, [], {}, None))
    assert sorted(p.name for p in checkpoint.directory.iterdir()) == before  # nothing new, nothing half
    state = checkpoint.load()
    assert state is not None
    assert state.epoch == 1
    assert state.history == [{"epoch": 1}]
    assert not torch.equal(state.model["weight"], model.weight.detach())
    monkeypatch.undo()
    checkpoint.save(capture(3, "push", model, {"joint": opt}, sched, gen, [], {}, None))
    names = sorted(p.name for p in checkpoint.directory.iterdir())
    assert len(names) == 2  # the older tensor file is gone
    assert "latest.json" in names
    tensor_file = next(p for p in checkpoint.directory.iterdir() if p.suffix == ".safetensors")
    assert "rng.generator" in load_tensors(tensor_file)  # RNG states are tensors in safetensors
    checkpoint.remove()
    assert not checkpoint.directory.exists()


def _tree(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """kill -9 a `train-ensemble` process while it trains, `--resume` it, and compare with a run never killed."""
    args = ["--threads", "1", "--set", "schedule.epochs=8", "--set", "index.build=false"]
    code, _, err = run_cli(
        ["train-ensemble", str(TINY_RECIPE), "--out", str(tmp_path / "straight"), "--quiet", *args], capsys
    )
    assert code == 0, err

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    killed_dir = tmp_path / "killed" / "tiny"
    command = [
        sys.executable,
        "-m",
        "protoaudit",
        "train-ensemble",
        str(TINY_RECIPE),
        "--out",
        str(tmp_path / "killed"),
    ]
    proc = subprocess.Popen([*command, "--quiet", *args], stderr=subprocess.PIPE, env=env)
    pointer = killed_dir / "members" / "vgg" / "checkpoint" / "latest.json"
    deadline = time.monotonic() + 120
    seen: list[tuple[float, int]] = []  # (time, epoch) of each checkpoint seen
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            epoch = json.loads(pointer.read_text())["epoch"]
        except (OSError, ValueError, KeyError):
            epoch = 0
        if epoch and (not seen or seen[-1][1] != epoch):
            seen.append((time.monotonic(), epoch))
        if len(seen) >= 3:  # a few checkpoints in: kill half an epoch after the latest one
            epoch_seconds = (seen[-1][0] - seen[0][0]) / max(1, seen[-1][1] - seen[0][1])
            time.sleep(epoch_seconds / 2)
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed; give it more epochs"
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    status = json.loads((killed_dir / "run.json").read_text())["status"]
    assert status == "running"  # kill -9: no chance to record anything
    assert not (killed_dir / "accuracy.csv").exists()
    interrupted_at = json.loads(pointer.read_text())["epoch"]
    assert 1 <= interrupted_at < 8

    resumed = subprocess.run(
        [*command, "--resume", *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "vgg resuming from its checkpoint after epoch" in resumed.stderr

    straight = _tree(tmp_path / "straight" / "tiny")
    after = _tree(killed_dir)
    assert after["accuracy.csv"] == straight["accuracy.csv"]
    for member in ("vgg", "resnet"):
        key = f"members/{member}/model.safetensors"
        a, b = load_tensors(tmp_path / "straight" / "tiny" / key), load_tensors(killed_dir / key)
        assert torch.equal(a["prototype_vectors"], b["prototype_vectors"])
        assert after[key] == straight[key]  # every tensor, bit for bit
        assert after[f"members/{member}/prototypes.csv"] == straight[f"members/{member}/prototypes.csv"]
    assert not [name for name in after if "checkpoint" in name or name.endswith(".tmp")]
    meta = json.loads(after["run.json"])
    assert meta["status"] == "complete"
    assert len(meta["resumed"]) == 1


def test_resume_refusals_and_a_complete_run(tiny_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = _tree(tiny_run)
    base = ["train-ensemble", str(TINY_RECIPE), "--out", str(tiny_run.parent), "--resume"]
    code, out, err = run_cli([*base, "--json"], capsys)
    assert code == 0
    assert "already complete; nothing to resume" in err
    assert [r["model"] for r in json.loads(out)["accuracy"]][-1] == "ensemble"  # the recorded accuracy table

    code, out, err = run_cli([*base, "--quiet", "--set", "schedule.epochs=5"], capsys)
    assert code == 2
    assert "recipe differs from the run's recipe.toml (schedule.epochs: 3 → 5)" in err
    assert len(err.strip().splitlines()) == 1, err

    code, _, err = run_cli([*base, "--force"], capsys)
    assert code == 2
    assert "--resume and --force contradict" in err
    assert _tree(tiny_run) == before  # none of this touched the run


def test_resume_with_nothing_to_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["train-ensemble", str(TINY_RECIPE), "--out", str(tmp_path), "--resume"], capsys)
    assert code == 2
    assert "nothing to resume" in err
    assert list(tmp_path.iterdir()) == []


KILL_AT = Path(__file__).with_name("kill_at.py")


@pytest.mark.slow
def test_augmented_run_killed_at_four_points_resumes_to_identical_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """kill -9 an augmented run mid-joint, mid-push, before a weights file is renamed into place and between
    members — each time in the process that resumed the previous kill — then `--resume` it to the end: every
    file equals a run never killed, bit for bit, and no temporary is left."""
    args = ["--threads", "1", "--set", "data.augment=true", "--set", "index.build=false"]
    code, _, err = run_cli(
        ["train-ensemble", str(TINY_RECIPE), "--out", str(tmp_path / "straight"), "-q", *args], capsys
    )
    assert code == 0, err
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    train = ["train-ensemble", str(TINY_RECIPE), "--out", str(tmp_path / "killed"), "-q", *args]
    run_dir = tmp_path / "killed" / "tiny"
    vgg = run_dir / "members" / "vgg"
    points = [  # (point, member, n-th occurrence in that process, flags)
        ("joint", "vgg", 1, []),  # epoch 2, the first joint epoch: checkpoint after epoch 1 (warm)
        ("push", "vgg", 2, ["--resume"]),  # resumed at epoch 2: its second push is epoch 3's
        ("rename", "vgg", 1, ["--resume"]),  # vgg's weights written to a temporary, not yet renamed
        ("between", "resnet", 1, ["--resume"]),  # vgg finished, resnet not started
    ]
    for point, member, n, flags in points:
        proc = subprocess.run(
            [sys.executable, str(KILL_AT), point, member, str(n), "--", *train, *flags],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert proc.returncode == -signal.SIGKILL, (point, proc.returncode, proc.stderr[-2000:])
        assert json.loads((run_dir / "run.json").read_text())["status"] == "running"
        assert not (run_dir / "accuracy.csv").exists()
        if point == "rename":  # the kill left the weights' temporary beside the missing model.safetensors
            assert list(vgg.glob(".model.safetensors.*.tmp"))
            assert not (vgg / "model.json").exists()
        if point == "between":
            assert (vgg / "model.json").is_file()
            assert not list(run_dir.rglob("*.tmp"))  # the resumed writer removed the stale temporary
    resumed = subprocess.run(
        [sys.executable, "-m", "protoaudit", *train, "--resume"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    straight, after = _tree(tmp_path / "straight" / "tiny"), _tree(run_dir)
    assert after["accuracy.csv"] == straight["accuracy.csv"]
    for name in ("vgg", "resnet"):
        key = f"members/{name}/model.safetensors"
        a, b = load_tensors(tmp_path / "straight" / "tiny" / key), load_tensors(run_dir / key)
        assert a.keys() == b.keys()
        for tensor in a:
            assert torch.equal(a[tensor], b[tensor]), (name, tensor)
        assert after[key] == straight[key]
        assert after[f"members/{name}/prototypes.csv"] == straight[f"members/{name}/prototypes.csv"]
    assert not [name for name in after if "checkpoint" in name or name.endswith(".tmp")]
    meta = json.loads(after["run.json"])
    assert meta["status"] == "complete"
    assert len(meta["resumed"]) == 4
