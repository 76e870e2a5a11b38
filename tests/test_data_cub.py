"""CUB-200-2011 from its own layout: a tiny generated folder with every annotation file in the real format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CUB_PART_NAMES = [
    "back",
    "beak",
    "belly",
    "breast",
    "crown",
    "forehead",
    "left eye",
    "left leg",
    "left wing",
    "nape",
    "right eye",
    "right leg",
    "right wing",
    "tail",
    "throat",
]
CLASS_COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]

# The hand-checked image: id 1, 120 × 100 px, red = 2x and green = 2y at pixel (x, y); bounding box
# x = 10, y = 20, width = 40, height = 40, i.e. the region (10, 20) – (50, 60).
GRADIENT_BOX = "10.0 20.0 40.0 40.0"


def gradient_image() -> np.ndarray:
    yy, xx = np.mgrid[0:100, 0:120]
    return np.stack([2 * xx, 2 * yy, np.zeros_like(xx)], axis=2).astype(np.uint8)


def make_cub(
    root: Path, train_per_class: int = 4, test_per_class: int = 2, n_classes: int = 3, seed: int = 0
) -> Path:
    """Write a tiny CUB_200_2011 folder: images/, images.txt, image_class_labels.txt, train_test_split.txt,
    bounding_boxes.txt, classes.txt, parts/parts.txt, parts/part_locs.txt."""
    rng = np.random.default_rng(seed)
    base = root / "CUB_200_2011"
    (base / "images").mkdir(parents=True)
    (base / "parts").mkdir()
    classes = [f"{k + 1:03d}.Bird_{k}" for k in range(n_classes)]
    images, labels, split, boxes, locs = [], [], [], [], []
    image_id = 0
    for k, name in enumerate(classes):
        (base / "images" / name).mkdir()
        for j in range(train_per_class + test_per_class):
            image_id += 1
            rel = f"{name}/Bird_{k}_{j:04d}_{image_id}.jpg"
            if image_id == 1:
                pixels = gradient_image()
                box = GRADIENT_BOX
                parts = {1: (30.0, 40.0, 1), 2: (5.0, 30.0, 1), 5: (45.0, 25.0, 1)}
                Image.fromarray(pixels).save(base / "images" / rel, format="PNG")  # lossless, .jpg name
            else:
                w, h = int(rng.integers(56, 90)), int(rng.integers(56, 90))
                pixels = rng.integers(0, 60, size=(h, w, 3)).astype(np.uint8)
                bw, bh = int(rng.integers(24, w - 8)), int(rng.integers(24, h - 8))
                bx, by = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
                pixels[by : by + bh, bx : bx + bw] = CLASS_COLOURS[k]
                box = f"{bx:.1f} {by:.1f} {bw:.1f} {bh:.1f}"
                parts = {p: (bx + bw / 2.0, by + bh / 3.0, 1) for p in (1, 2, 5)}
                Image.fromarray(pixels).save(base / "images" / rel, quality=95)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {k + 1}")
            split.append(f"{image_id} {1 if j < train_per_class else 0}")
            boxes.append(f"{image_id} {box}")
            for p in range(1, len(CUB_PART_NAMES) + 1):
                x, y, v = parts.get(p, (0.0, 0.0, 0))
                locs.append(f"{image_id} {p} {x:.1f} {y:.1f} {v}")
    (base / "images.txt").write_text("\n".join(images) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (base / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (base / "bounding_boxes.txt").write_text("\n".join(boxes) + "\n")
    (base / "classes.txt").write_text("\n".join(f"{k + 1} {n}" for k, n in enumerate(classes)) + "\n")
    (base / "parts" / "parts.txt").write_text(
        "\n".join(f"{p + 1} {n}" for p, n in enumerate(CUB_PART_NAMES)) + "\n"
    )
    (base / "parts" / "part_locs.txt").write_text("\n".join(locs) + "\n")
    return base


def test_listing_reads_every_annotation_file(tmp_path: Path) -> None:
    from protoaudit.engine.data.cub import list_cub

    base = make_cub(tmp_path)
    listing = list_cub(tmp_path, "bb")  # the parent folder works too
    assert listing.root == base
    assert listing.class_names == ["001.Bird_0", "002.Bird_1", "003.Bird_2"]
    assert len(listing) == 18
    assert listing.labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    assert listing.is_train.tolist() == ([True] * 4 + [False] * 2) * 3
    assert listing.boxes is not None
    assert listing.boxes[0].tolist() == [10.0, 20.0, 50.0, 60.0]  # (x, y, w, h) → (x0, y0, x1, y1)
    assert listing.part_names == CUB_PART_NAMES
    assert listing.parts is not None
    assert listing.parts.shape == (18, 15, 3)
    assert listing.parts[0, 0].tolist() == [30.0, 40.0, 1.0]
    assert listing.parts[0, 2].tolist() == [0.0, 0.0, 0.0]  # invisible
    assert [p for p in listing.problems if p.severity == "error"] == []
    assert list_cub(base, "full").boxes is None


def test_bounding_box_crop_matches_hand_computed_pixels(tmp_path: Path) -> None:
    """Box (10, 20) – (50, 60) resized to 20 × 20: output pixel (u, v) samples the source at
    x = 10 + 2(u + 0.5), y = 20 + 2(v + 0.5); with red = 2x at pixel centres x + 0.5, red = 2(x - 0.5)."""
    from protoaudit.engine.data.cub import list_cub
    from protoaudit.engine.data.files import bundle_from_listing

    make_cub(tmp_path)
    bundle = bundle_from_listing(list_cub(tmp_path, "bb"), 20, 0.0, None, seed=0)
    split = bundle.push
    i = split.image_ids.index(next(s for s in split.image_ids if s.endswith("_1.jpg")))
    img = split.image(i)
    assert img.shape == (20, 20, 3)
    assert img.dtype == np.uint8
    # hand-computed: (u, v) = (5, 5) → source (21, 31) → red 2 · 20.5 = 41, green 2 · 30.5 = 61
    assert abs(int(img[5, 5, 0]) - 41) <= 1
    assert abs(int(img[5, 5, 1]) - 61) <= 1
    for u in (1, 7, 12, 18):
        expected = 2 * (10 + 2 * (u + 0.5) - 0.5)
        assert abs(int(img[10, u, 0]) - expected) <= 1, (u, img[10, u, 0], expected)
        assert abs(int(img[u, 10, 1]) - 2 * (20 + 2 * (u + 0.5) - 0.5)) <= 1
    # the full variant resizes the whole 120 × 100 image: output column u samples x = 6(u + 0.5)
    full = bundle_from_listing(list_cub(tmp_path, "full"), 20, 0.0, None, seed=0).push.image(i)
    assert abs(int(full[10, 10, 0]) - 2 * (6 * 10.5 - 0.5)) <= 2


def test_part_locations_follow_crop_and_resize(tmp_path: Path) -> None:
    """Part (30, 40) in box (10, 20) – (50, 60) at 20 px: ((30 - 10) · 20 / 40, (40 - 20) · 20 / 40) = (10, 10).
    Part (5, 30) lies left of the box: flagged invisible. Part 3 was marked invisible by the annotators."""
    from protoaudit.engine.data.cub import list_cub
    from protoaudit.engine.data.files import bundle_from_listing

    make_cub(tmp_path)
    split = bundle_from_listing(list_cub(tmp_path, "bb"), 20, 0.0, None, seed=0).test
    train = bundle_from_listing(list_cub(tmp_path, "bb"), 20, 0.0, None, seed=0).push
    i = next(n for n, s in enumerate(train.image_ids) if s.endswith("_1.jpg"))
    locs = train.part_locations(i)
    assert locs is not None
    assert locs.shape == (15, 3)
    assert locs[0].tolist() == [10.0, 10.0, 1.0]  # back
    assert locs[1, 2] == 0.0  # beak outside the box
    assert locs[2, 2] == 0.0  # belly invisible
    assert locs[4].tolist() == [17.5, 2.5, 1.0]  # crown (45, 25) → (35 · 0.5, 5 · 0.5)
    # keypoints for the audits: (part id, row, column) of the visible parts, the pixel holding each location
    assert train.part_keypoints(i).tolist() == [[1, 10, 10], [5, 2, 17]]
    full = bundle_from_listing(list_cub(tmp_path, "full"), 20, 0.0, None, seed=0).push
    locs_full = full.part_locations(i)
    assert locs_full is not None
    assert locs_full[0].tolist() == [5.0, 8.0, 1.0]  # (30 · 20 / 120, 40 · 20 / 100)
    assert locs_full[1].tolist() == pytest.approx([5.0 / 6.0, 6.0, 1.0])  # the beak is in the full image
    assert split.part_locations(0) is not None


def test_file_split_batches_and_workers(tmp_path: Path) -> None:
    """``batch`` and the DataLoader path (``item`` in a worker process) give the same images."""
    import torch

    from protoaudit.engine.data import iter_batches
    from protoaudit.engine.data.cub import list_cub
    from protoaudit.engine.data.files import bundle_from_listing

    make_cub(tmp_path)
    push = bundle_from_listing(list_cub(tmp_path, "bb"), 24, 0.0, None, seed=0).push
    direct = push.batch([0, 3, 5])
    assert direct.shape == (3, 3, 24, 24)
    assert direct.dtype == torch.float32
    assert float(direct.min()) >= 0.0
    assert float(direct.max()) <= 1.0
    via_workers = torch.cat([x for _, x in iter_batches(push, torch.tensor([0, 3, 5]), 2, workers=1)])
    assert torch.equal(direct, via_workers)


def test_annotation_errors_name_the_file(tmp_path: Path) -> None:
    from protoaudit.engine.data.cub import list_cub
    from protoaudit.errors import DatasetError

    base = make_cub(tmp_path)
    with pytest.raises(DatasetError, match="not a CUB-200-2011 folder"):
        list_cub(tmp_path / "CUB_200_2011" / "images")
    lines = (base / "image_class_labels.txt").read_text().splitlines()
    (base / "image_class_labels.txt").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(DatasetError, match=r"image_class_labels.txt: no entry for image id 18"):
        list_cub(base)


@pytest.mark.slow
def test_short_run_from_the_cub_bb_recipe(tmp_path: Path) -> None:
    """recipes/cub_bb.toml with size overrides trains three ProtoPNets, their ensemble and the baseline."""
    from protoaudit.engine.ensemble import train_ensemble
    from protoaudit.engine.recipe import load_recipe

    make_cub(tmp_path / "data")
    members = {"vgg19": "tiny_vgg", "resnet34": "tiny_resnet", "densenet121": "tiny_densenet"}
    overrides = [
        f"data.root={tmp_path / 'data'}",
        "data.image_size=32",
        "data.n_classes=3",
        "data.val_fraction=0.25",
        "schedule.epochs=2",
        "schedule.warm_epochs=1",
        "schedule.push_start=1",
        "schedule.push_every=1",
        "schedule.last_layer_epochs=2",
        "schedule.batch_size=4",
        "schedule.eval_batch_size=8",
        "schedule.workers=0",
        "members.vgg19_baseline.trunk=tiny_vgg",
        "members.vgg19_baseline.weights=none",
    ]
    for name, trunk in members.items():
        overrides += [
            f"members.{name}.trunk={trunk}",
            f"members.{name}.weights=none",
            f"members.{name}.prototypes_per_class=2",
            f"members.{name}.prototype_dim=8",
        ]
    recipe = load_recipe(
        ROOT / "recipes" / "cub_bb.toml",
        overrides=overrides,
        out=str(tmp_path / "runs"),
        device="cpu",
        threads=1,
    )
    assert recipe.data.kind == "cub"
    assert recipe.data.variant == "bb"
    assert recipe.data.augment == "paper"
    result = train_ensemble(recipe)
    accuracy = pd.read_csv(result.run_dir / "accuracy.csv")
    assert accuracy["model"].tolist() == ["vgg19", "resnet34", "densenet121", "ensemble", "vgg19_baseline"]
    assert accuracy["kind"].tolist() == ["member"] * 3 + ["ensemble", "baseline"]
    assert (accuracy["n_test"] == 6).all()
    assert accuracy.loc[3, "n_prototypes"] == 3 * 3 * 2
    assert (result.run_dir / "baselines" / "vgg19_baseline" / "model.safetensors").is_file()
    prototypes = pd.read_csv(result.run_dir / "members" / "vgg19" / "prototypes.csv")
    assert prototypes["source_image"].str.endswith(".jpg").all()
    assert (prototypes["box_y1"] <= 32).all()
