"""Stanford Cars from its devkit layout (and the single-file cars_annos.mat layout), generated tiny."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CAR_NAMES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Aston Martin V8 Vantage Convertible 2012"]
ANNOTATION_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")


def _struct(rows: list[tuple[object, ...]], fields: tuple[str, ...]) -> np.ndarray:
    """A 1 × N MATLAB struct array, as scipy writes it and the devkit holds it."""
    out = np.zeros((1, len(rows)), dtype=[(f, "O") for f in fields])
    for i, row in enumerate(rows):
        out[0, i] = tuple(
            np.array([v]) if isinstance(v, str) else np.array([[v]], dtype=np.uint16) for v in row
        )
    return out


def _cell(strings: list[str]) -> np.ndarray:
    out = np.empty((1, len(strings)), dtype=object)
    for i, s in enumerate(strings):
        out[0, i] = np.array([s])
    return out


def car_image(k: int, w: int, h: int, box: tuple[int, int, int, int], rng: np.random.Generator) -> np.ndarray:
    """Noise with the car (a block of the class colour) inside the 1-based inclusive box x1..x2, y1..y2."""
    pixels = rng.integers(0, 50, size=(h, w, 3)).astype(np.uint8)
    x1, y1, x2, y2 = box
    pixels[y1 - 1 : y2, x1 - 1 : x2] = [(220, 30, 30), (30, 220, 30), (30, 30, 220)][k]
    return pixels


def make_cars(root: Path, train_per_class: int = 4, test_per_class: int = 2, seed: int = 0) -> Path:
    """Write cars_train/, cars_test/, devkit/cars_meta.mat, devkit/cars_train_annos.mat,
    devkit/cars_test_annos.mat (no classes, as distributed) and cars_test_annos_withlabels.mat."""
    import scipy.io

    rng = np.random.default_rng(seed)
    for folder in ("cars_train", "cars_test", "devkit"):
        (root / folder).mkdir(parents=True)
    sides: dict[str, list[tuple[object, ...]]] = {"train": [], "test": []}
    for side, per_class in (("train", train_per_class), ("test", test_per_class)):
        n = 0
        for k in range(len(CAR_NAMES)):
            for _ in range(per_class):
                n += 1
                w, h = int(rng.integers(60, 90)), int(rng.integers(50, 80))
                x1, y1 = int(rng.integers(1, 15)), int(rng.integers(1, 15))
                x2, y2 = int(rng.integers(x1 + 20, w)), int(rng.integers(y1 + 20, h))
                if side == "train" and n == 1:
                    w, h, (x1, y1, x2, y2) = 80, 60, (11, 21, 50, 60)
                fname = f"{n:05d}.jpg"
                Image.fromarray(car_image(k, w, h, (x1, y1, x2, y2), rng)).save(
                    root / f"cars_{side}" / fname, quality=95
                )
                sides[side].append((x1, y1, x2, y2, k + 1, fname))
    scipy.io.savemat(root / "devkit" / "cars_meta.mat", {"class_names": _cell(CAR_NAMES)})
    scipy.io.savemat(
        root / "devkit" / "cars_train_annos.mat", {"annotations": _struct(sides["train"], ANNOTATION_FIELDS)}
    )
    no_class = [(*r[:4], r[5]) for r in sides["test"]]
    scipy.io.savemat(
        root / "devkit" / "cars_test_annos.mat",
        {"annotations": _struct(no_class, ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "fname"))},
    )
    scipy.io.savemat(
        root / "cars_test_annos_withlabels.mat", {"annotations": _struct(sides["test"], ANNOTATION_FIELDS)}
    )
    return root


def test_devkit_listing_and_box_convention(tmp_path: Path) -> None:
    """MATLAB box x1 = 11 … x2 = 50 (1-based, inclusive) is the continuous region x ∈ [10, 50]."""
    from protoaudit.engine.data.cars import list_cars

    make_cars(tmp_path)
    listing = list_cars(tmp_path, "bb")
    assert listing.class_names == CAR_NAMES
    assert len(listing) == 18
    assert listing.is_train.sum() == 12
    assert listing.labels[listing.is_train].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert listing.image_ids[0] == "cars_train/00001.jpg"
    assert listing.image_ids[12] == "cars_test/00001.jpg"
    assert listing.boxes is not None
    assert listing.boxes[0].tolist() == [10.0, 20.0, 50.0, 60.0]
    assert [p for p in listing.problems if p.severity == "error"] == []
    assert list_cars(tmp_path, "full").boxes is None


def test_crop_keeps_only_the_car(tmp_path: Path) -> None:
    """Cropped to its box, every pixel of a training image is the class colour (JPEG noise aside);
    the whole image is mostly dark noise around it."""
    from protoaudit.engine.data.cars import list_cars
    from protoaudit.engine.data.files import bundle_from_listing

    make_cars(tmp_path)
    push = bundle_from_listing(list_cars(tmp_path, "bb"), 16, 0.0, None, seed=0).push
    first = push.image(0).astype(int)
    assert np.abs(first[2:-2, 2:-2] - np.array([220, 30, 30])).max() < 40
    full = bundle_from_listing(list_cars(tmp_path, "full"), 16, 0.0, None, seed=0).push.image(0).astype(int)
    assert full[:, :, 0].mean() < first[:, :, 0].mean() - 30


def test_missing_test_labels_and_single_file_layout(tmp_path: Path) -> None:
    import scipy.io

    from protoaudit.engine.data.cars import list_cars
    from protoaudit.errors import DatasetError

    make_cars(tmp_path / "devkit_layout")
    (tmp_path / "devkit_layout" / "cars_test_annos_withlabels.mat").unlink()
    with pytest.raises(DatasetError, match=r"cars_test_annos_withlabels\.mat"):
        list_cars(tmp_path / "devkit_layout")

    single = tmp_path / "single"
    (single / "car_ims").mkdir(parents=True)
    rng = np.random.default_rng(1)
    rows = []
    for i in range(6):
        k = i % 3
        Image.fromarray(car_image(k, 40, 30, (5, 5, 30, 25), rng)).save(
            single / "car_ims" / f"{i + 1:06d}.jpg"
        )
        rows.append((f"car_ims/{i + 1:06d}.jpg", 5, 5, 30, 25, k + 1, int(i >= 3)))
    fields = ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test")
    scipy.io.savemat(
        single / "cars_annos.mat", {"annotations": _struct(rows, fields), "class_names": _cell(CAR_NAMES)}
    )
    listing = list_cars(single, "bb")
    assert listing.is_train.tolist() == [True] * 3 + [False] * 3
    assert listing.labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert listing.boxes is not None
    assert listing.boxes[0].tolist() == [4.0, 4.0, 30.0, 25.0]


@pytest.mark.slow
def test_short_run_from_the_cars_recipe(tmp_path: Path) -> None:
    from protoaudit.engine.ensemble import train_ensemble
    from protoaudit.engine.recipe import load_recipe

    make_cars(tmp_path / "cars")
    overrides = [
        f"data.root={tmp_path / 'cars'}",
        "data.image_size=32",
        "data.n_classes=3",
        "data.val_fraction=0.25",
        "data.augment=flip",
        "schedule.epochs=2",
        "schedule.warm_epochs=1",
        "schedule.push_start=2",
        "schedule.last_layer_epochs=2",
        "schedule.batch_size=4",
        "schedule.eval_batch_size=8",
        "schedule.workers=0",
    ]
    for name, trunk in {
        "vgg19": "tiny_vgg",
        "resnet34": "tiny_resnet",
        "densenet121": "tiny_densenet",
    }.items():
        overrides += [
            f"members.{name}.{k}"
            for k in (f"trunk={trunk}", "weights=none", "prototypes_per_class=1", "prototype_dim=8")
        ]
    overrides += ["members.resnet34_baseline.trunk=tiny_resnet", "members.resnet34_baseline.weights=none"]
    recipe = load_recipe(
        ROOT / "recipes" / "cars.toml",
        overrides=overrides,
        out=str(tmp_path / "runs"),
        device="cpu",
        threads=1,
    )
    result = train_ensemble(recipe)
    accuracy = pd.read_csv(result.run_dir / "accuracy.csv")
    assert accuracy["kind"].tolist() == ["member"] * 3 + ["ensemble", "baseline"]
    assert accuracy.loc[4, "backbone"] == "tiny_resnet"
    assert (accuracy["n_test"] == 6).all()


def test_data_check_names_a_corrupt_car_and_an_empty_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A truncated JPEG in cars_test/ and a car model in cars_meta.mat that no annotation uses."""
    import json

    import scipy.io

    from protoaudit.cli import main

    make_cars(tmp_path / "cars")
    victim = tmp_path / "cars" / "cars_test" / "00002.jpg"
    victim.write_bytes(victim.read_bytes()[:200])
    scipy.io.savemat(
        tmp_path / "cars" / "devkit" / "cars_meta.mat",
        {"class_names": _cell([*CAR_NAMES, "Bugatti Veyron 16.4 Coupe 2009"])},
    )
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        f'name = "c"\n[data]\nkind = "cars"\nroot = "{tmp_path / "cars"}"\nimage_size = 32\n'
        '[[members]]\nname = "v"\ntrunk = "tiny_vgg"\n'
    )
    with pytest.raises(SystemExit) as exc:
        main(["data", "check", str(recipe), "--json"])
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    problems = {p["kind"]: p for p in json.loads(out)["problems"]}
    assert problems["empty_class"]["message"] == "class 'Bugatti Veyron 16.4 Coupe 2009' has no images"
    assert problems["corrupt_image"]["message"].startswith("image cars_test/00002.jpg cannot be decoded")
    assert problems["corrupt_image"]["path"] == str(victim)
    assert err.startswith(
        "error: class 'Bugatti Veyron 16.4 Coupe 2009' has no images (and 1 more problem(s)"
    )
