"""``protoaudit data check``: planted problems are reported by name and stop training before it starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_data_cub import make_cub
from tests.test_data_imagefolder import make_tree

from .conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]


def write_recipe(path: Path, data: str, out: Path) -> Path:
    path.write_text(
        f"""name = "check"
out = "{out}"
device = "cpu"
threads = 1
[data]
{data}
[schedule]
epochs = 1
warm_epochs = 0
push_start = 1
last_layer_epochs = 1
batch_size = 4
[[members]]
name = "vgg"
trunk = "tiny_vgg"
prototypes_per_class = 1
prototype_dim = 8
"""
    )
    return path


def plant_problems(tree: Path) -> None:
    """A corrupt image in dog/ and an empty class folder ferret/."""
    (tree / "dog" / "05.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (tree / "ferret").mkdir()


def test_clean_image_folder_passes_with_counts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_tree(tmp_path / "pets")
    recipe = write_recipe(
        tmp_path / "r.toml",
        f'kind = "imagefolder"\nroot = "{tmp_path / "pets"}"\nimage_size = 32\nn_classes = 3\ntest_fraction = 0.34\nval_fraction = 0.25',
        tmp_path / "runs",
    )
    code, stdout, _ = run_cli(["data", "check", str(recipe), "--json"], capsys)
    assert code == 0
    document = json.loads(stdout)
    assert document["ok"] is True
    assert document["images_verified"] == 18
    assert [c["name"] for c in document["classes"]] == ["cat", "dog", "owl"]
    assert document["classes"][1] == {"class": 1, "name": "dog", "train": 3, "val": 1, "test": 2}
    assert document["totals"] == {"train": 9, "val": 3, "test": 6}
    code, stdout, _ = run_cli(["data", "check", str(recipe)], capsys)
    assert code == 0
    assert "dog" in stdout
    assert "total" in stdout


def test_corrupt_image_and_empty_class_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_tree(tmp_path / "pets")
    plant_problems(tmp_path / "pets")
    recipe = write_recipe(
        tmp_path / "r.toml",
        f'kind = "imagefolder"\nroot = "{tmp_path / "pets"}"\nimage_size = 32',
        tmp_path / "runs",
    )
    code, stdout, stderr = run_cli(["data", "check", str(recipe)], capsys)
    assert code == 2
    assert "dog/05.jpg cannot be decoded" in stderr
    assert str(tmp_path / "pets" / "dog" / "05.jpg") in stderr
    assert "class 'ferret' has no images" in stderr
    assert "error:" in stderr
    assert "error" not in stdout
    assert "cannot be decoded" not in stdout
    assert stderr.count("cannot be decoded") == 1
    assert "more problem" in stderr

    code, stdout, _ = run_cli(["data", "check", str(recipe), "--json"], capsys)
    assert code == 2
    problems = json.loads(stdout)["problems"]
    assert {(p["kind"], p["severity"]) for p in problems} == {
        ("corrupt_image", "error"),
        ("empty_class", "error"),
    }
    corrupt = next(p for p in problems if p["kind"] == "corrupt_image")
    assert corrupt["path"] == str(tmp_path / "pets" / "dog" / "05.jpg")


def test_missing_image_and_class_count_mismatch_in_cub(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = make_cub(tmp_path / "cub")
    victim = next((base / "images" / "002.Bird_1").iterdir())
    victim.unlink()
    recipe = write_recipe(
        tmp_path / "r.toml",
        f'kind = "cub"\nroot = "{base}"\nimage_size = 32\nn_classes = 200',
        tmp_path / "runs",
    )
    code, stdout, _ = run_cli(["data", "check", str(recipe), "--json"], capsys)
    assert code == 2
    document = json.loads(stdout)
    messages = [p["message"] for p in document["problems"]]
    assert any(f"image 002.Bird_1/{victim.name}" in m and "is missing" in m for m in messages)
    assert "the recipe expects 200 classes (data.n_classes) but the dataset has 3" in messages
    assert document["expected_classes"] == 200
    assert document["n_classes"] == 3


def test_training_fails_fast_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from protoaudit.engine.ensemble import train_ensemble
    from protoaudit.engine.recipe import load_recipe
    from protoaudit.errors import DatasetError

    make_tree(tmp_path / "pets")
    plant_problems(tmp_path / "pets")
    recipe = write_recipe(
        tmp_path / "r.toml",
        f'kind = "imagefolder"\nroot = "{tmp_path / "pets"}"\nimage_size = 32',
        tmp_path / "runs",
    )
    with pytest.raises(DatasetError, match=r"class 'ferret' has no images \(and 1 more problem"):
        train_ensemble(load_recipe(recipe))
    assert not (tmp_path / "runs").exists()
    code, _, stderr = run_cli(["train-ensemble", str(recipe), "--quiet"], capsys)
    assert code == 2
    assert "class 'ferret' has no images (and 1 more problem(s)" in stderr
    assert len([line for line in stderr.splitlines() if line.startswith("error:")]) == 1
    assert not (tmp_path / "runs").exists()


def test_unreadable_dataset_folder_is_one_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = write_recipe(
        tmp_path / "r.toml", f'kind = "cub"\nroot = "{tmp_path / "nowhere"}"', tmp_path / "runs"
    )
    code, stdout, stderr = run_cli(["data", "check", str(recipe), "--json"], capsys)
    assert code == 2
    assert json.loads(stdout)["problems"][0]["message"].startswith(
        f"CUB-200-2011 folder {tmp_path / 'nowhere'} does not exist"
    )
    assert "does not exist" in stderr
