"""The command line: bad recipes exit 2 naming the key path; --json; Ctrl-C leaves nothing half-written."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import TINY_RECIPE, run_cli

VALID = TINY_RECIPE.read_text()


BAD_RECIPES = [
    ("unknown top-level key", VALID + "\nbogus = 1\n", "bogus: unknown key"),
    (
        "unknown nested key",
        VALID.replace("batch_size = 8", "batch_sise = 8"),
        "schedule.batch_sise: unknown key",
    ),
    ("wrong type", VALID.replace("epochs = 3", 'epochs = "three"'), "schedule.epochs:"),
    (
        "negative epochs",
        VALID.replace("epochs = 3", "epochs = -1"),
        "schedule.epochs: Input should be greater than or equal to 1",
    ),
    (
        "zero prototypes",
        VALID.replace("prototypes_per_class = 4", "prototypes_per_class = 0", 1),
        "members[0].prototypes_per_class:",
    ),
    ("unknown trunk", VALID.replace('"tiny_vgg"', '"vgg20"'), "members[0].trunk: unknown trunk 'vgg20'"),
    (
        "duplicate member",
        VALID.replace('name = "resnet"', 'name = "vgg"'),
        "members: member names must be unique",
    ),
    ("bad device", VALID.replace('device = "cpu"', 'device = "tpu"'), "device:"),
    ("missing members", VALID.split("[[members]]")[0], "members: required key is missing"),
    (
        "warm longer than training",
        VALID.replace("warm_epochs = 1", "warm_epochs = 9"),
        "schedule: warm_epochs (9) must be <= epochs (3)",
    ),
    ("malformed TOML", VALID.replace("epochs = 3", "epochs = = 3"), "invalid TOML"),
    ("unknown data kind", VALID.replace('kind = "parts"', 'kind = "mnist"'), "data:"),
    (
        "missing weights file",
        VALID.replace('trunk = "tiny_vgg"', 'trunk = "tiny_vgg"\nweights = "/nonexistent/w.pth"'),
        "members.vgg.weights: file /nonexistent/w.pth does not exist",
    ),
]


@pytest.mark.parametrize(("case", "text", "expected"), BAD_RECIPES, ids=[c[0] for c in BAD_RECIPES])
def test_bad_recipe_exits_2_naming_the_key(
    case: str, text: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = tmp_path / "bad.toml"
    recipe.write_text(text)
    code, out, err = run_cli(
        ["train-ensemble", str(recipe), "--out", str(tmp_path / "runs"), "--quiet"], capsys
    )
    assert code == 2
    assert expected in err
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs").exists(), "nothing may be written for a bad recipe"


def test_missing_recipe_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["train-ensemble", str(tmp_path / "nope.toml")], capsys)
    assert code == 2
    assert "does not exist" in err


def test_bad_override(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["train-ensemble", str(TINY_RECIPE), "--set", "schedule.epochs"], capsys)
    assert code == 2
    assert "KEY.PATH=VALUE" in err
    code, _, err = run_cli(
        ["train-ensemble", str(TINY_RECIPE), "--set", "members.nobody.prototype_dim=4"], capsys
    )
    assert code == 2
    assert "no member named 'nobody'" in err


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0
    assert out.startswith("protoaudit ")
    code, out, _ = run_cli(["train-ensemble", "--help"], capsys)
    assert code == 0
    assert "protoaudit train-ensemble recipes/quickstart.toml" in out


def test_train_json_and_refusal_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "train-ensemble",
        str(TINY_RECIPE),
        "--out",
        str(tmp_path),
        "--set",
        "schedule.epochs=2",
        "--set",
        "schedule.push_start=2",
        "--json",
        "--quiet",
    ]
    code, out, _ = run_cli(args, capsys)
    assert code == 0
    doc = json.loads(out)
    assert Path(doc["run_dir"]) == tmp_path / "tiny"
    assert [r["model"] for r in doc["accuracy"]] == ["vgg", "resnet", "ensemble"]
    code, out, err = run_cli(args, capsys)
    assert code == 2
    assert "already exists" in err
    assert "--force" in err
    code, _, _ = run_cli([*args, "--force"], capsys)
    assert code == 0


@pytest.mark.slow
def test_ctrl_c_leaves_no_half_written_file(tmp_path: Path) -> None:
    """SIGINT in the middle of training: exit 130, run.json says interrupted, every file present is whole."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "protoaudit",
            "train-ensemble",
            str(TINY_RECIPE),
            "--out",
            str(tmp_path),
            "--set",
            "schedule.epochs=40",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    run_dir = tmp_path / "tiny"
    deadline = time.monotonic() + 900  # a guard against a hang, not a timing: loaded machines are slow
    while not (run_dir / "members" / "vgg" / "model.json").exists() and time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    # 130 is the documented code; an interpreter that ends by the signal itself reports -SIGINT (seen once
    # under load in CI, with the interruption message already printed). Either way the run stopped on Ctrl-C.
    assert proc.returncode in (130, -signal.SIGINT), err.decode()[-2000:]
    hint = err.decode().strip().splitlines()[-1]
    assert f"protoaudit train-ensemble {run_dir / 'recipe.toml'} --resume" in hint  # a command that resumes
    assert not [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")]
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["status"] == "interrupted"
    for path in run_dir.rglob("*.json"):
        json.loads(path.read_text())
    from protoaudit.engine.run import load_member

    load_member(run_dir / "members" / "vgg")  # the finished member is whole and loads


def test_error_line_keeps_brackets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Key paths and the count of further problems are printed as written, not read as rich markup."""
    recipe = tmp_path / "bad.toml"
    recipe.write_text(VALID.replace("epochs = 3", "epochs = -1").replace("batch_size = 8", "batch_size = 0"))
    code, _, err = run_cli(["train-ensemble", str(recipe)], capsys)
    assert code == 2
    assert re.search(r"\[and \d+ more problem\(s\)\]$", err.strip())
