"""Any class-per-folder tree, split by folders or by a fraction."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

COLOURS = {"cat": (200, 60, 60), "dog": (60, 200, 60), "owl": (60, 60, 200)}


def make_tree(root: Path, per_class: int = 6, seed: int = 0) -> Path:
    """root/<class>/<n>.png, images of different sizes and modes (RGB, grey, palette)."""
    rng = np.random.default_rng(seed)
    for name, colour in COLOURS.items():
        (root / name / "sub").mkdir(parents=True)
        for n in range(per_class):
            w, h = int(rng.integers(30, 70)), int(rng.integers(30, 70))
            pixels = np.full((h, w, 3), colour, dtype=np.uint8) + rng.integers(0, 30, size=(h, w, 3)).astype(
                np.uint8
            )
            img = Image.fromarray(pixels)
            if n == 1:
                img = img.convert("L")
            elif n == 2:
                img = img.convert("P")
            folder = root / name / ("sub" if n == 3 else "")
            img.save(folder / f"{n:02d}.{'jpg' if n % 2 else 'png'}")
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    return root


def test_fraction_split_is_stratified_and_seeded(tmp_path: Path) -> None:
    from protoaudit.engine.data.imagefolder import list_imagefolder

    make_tree(tmp_path)
    listing = list_imagefolder(tmp_path, test_fraction=1 / 3, seed=3)
    assert listing.class_names == ["cat", "dog", "owl"]
    assert len(listing) == 18  # notes.txt and .hidden skipped, sub/ included
    assert "cat/sub/03.jpg" in listing.image_ids
    for k in range(3):
        assert int((~listing.is_train & (listing.labels == k)).sum()) == 2
    again = list_imagefolder(tmp_path, test_fraction=1 / 3, seed=3)
    other = list_imagefolder(tmp_path, test_fraction=1 / 3, seed=4)
    assert again.is_train.tolist() == listing.is_train.tolist()
    assert other.is_train.tolist() != listing.is_train.tolist()


def test_folder_split_and_modes(tmp_path: Path) -> None:
    from protoaudit.engine.data.files import bundle_from_listing
    from protoaudit.engine.data.imagefolder import list_imagefolder

    make_tree(tmp_path / "train")
    make_tree(tmp_path / "test", per_class=2, seed=1)
    listing = list_imagefolder(tmp_path, "train", "test")
    assert listing.is_train.sum() == 18
    assert (~listing.is_train).sum() == 6
    assert listing.image_ids[0] == "train/cat/00.png"
    bundle = bundle_from_listing(listing, 24, 0.2, None, seed=0)
    assert len(bundle.val) == 3
    assert len(bundle.train) == 15
    assert len(bundle.test) == 6
    x = bundle.test.batch(list(range(6)))  # grey and palette files come out RGB
    assert x.shape == (6, 3, 24, 24)
    owl = bundle.test.labels.tolist().index(2)
    assert float(x[owl, 2].mean()) > float(x[owl, 0].mean()) + 0.3


def test_folder_split_needs_both_folders(tmp_path: Path) -> None:
    from protoaudit.engine.recipe import recipe_from_dict
    from protoaudit.errors import RecipeError

    data = {"kind": "imagefolder", "root": str(tmp_path), "train_folder": "train"}
    with pytest.raises(RecipeError, match="data: give both train_folder and test_folder"):
        recipe_from_dict({"name": "x", "data": data, "members": [{"name": "a", "trunk": "tiny_vgg"}]})


def test_short_run_on_an_image_folder(tmp_path: Path) -> None:
    from protoaudit.engine.ensemble import train_ensemble
    from protoaudit.engine.recipe import recipe_from_dict

    make_tree(tmp_path / "pets")
    recipe = recipe_from_dict(
        {
            "name": "pets",
            "out": str(tmp_path / "runs"),
            "threads": 1,
            "device": "cpu",
            "data": {
                "kind": "imagefolder",
                "root": str(tmp_path / "pets"),
                "image_size": 32,
                "n_classes": 3,
                "test_fraction": 0.34,
                "val_fraction": 0.25,
                "augment": "paper",
            },
            "schedule": {
                "epochs": 2,
                "warm_epochs": 1,
                "push_start": 2,
                "last_layer_epochs": 2,
                "batch_size": 4,
            },
            "members": [
                {"name": "vgg", "trunk": "tiny_vgg", "prototypes_per_class": 2, "prototype_dim": 8},
                {"name": "plain", "kind": "baseline", "trunk": "tiny_vgg"},
            ],
        }
    )
    result = train_ensemble(recipe)
    accuracy = pd.read_csv(result.run_dir / "accuracy.csv")
    assert accuracy["model"].tolist() == ["vgg", "ensemble", "plain"]
    assert (accuracy["n_test"] == 6).all()


def test_split_folders_without_split_keys_are_named(tmp_path: Path) -> None:
    from protoaudit.engine.data.imagefolder import list_imagefolder
    from protoaudit.errors import DatasetError

    make_tree(tmp_path / "train")
    make_tree(tmp_path / "test", per_class=2, seed=1)
    with pytest.raises(
        DatasetError, match=re.escape('set data.train_folder = "train" and data.test_folder = "test"')
    ):
        list_imagefolder(tmp_path)
    listing = list_imagefolder(tmp_path, "train", "test")  # the keys it names read the tree as meant
    assert listing.class_names == ["cat", "dog", "owl"]
