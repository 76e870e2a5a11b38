"""CUB-format part locations, honestly: a cell without a part location is "no part annotated" (unknown), never
background; background only where the patch's cell lies wholly outside the object's bounding box (full images);
precision and recall over the prototypes whose kind is known, with the count of unknown ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.test_data_cub import make_cub

RECIPE = """
name = "cub_audit"
seed = 0
device = "cpu"
threads = 1

[data]
kind = "cub"
root = "{root}"
variant = "full"
image_size = 32
n_classes = 3
val_fraction = 0.25
augment = "none"

[schedule]
epochs = 2
warm_epochs = 1
push_start = 1
push_every = 1
last_layer_epochs = 2
batch_size = 4
eval_batch_size = 8
workers = 0

[[members]]
name = "vgg"
trunk = "tiny_vgg"
weights = "none"
prototypes_per_class = 4
prototype_dim = 8
"""


@pytest.fixture(scope="module")
def cub_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from protoaudit.engine.ensemble import train_ensemble
    from protoaudit.engine.prune import prune_run
    from protoaudit.engine.recipe import load_recipe
    from protoaudit.engine.run import load_run

    tmp = tmp_path_factory.mktemp("cub")
    make_cub(tmp / "data", train_per_class=6)
    recipe_path = tmp / "cub_audit.toml"
    recipe_path.write_text(RECIPE.format(root=tmp / "data"))
    run_dir = train_ensemble(load_recipe(recipe_path, out=str(tmp / "runs"))).run_dir
    prune_run(load_run(run_dir), finetune_epochs=0)
    return run_dir


def test_object_box_follows_the_resize_of_the_full_image(cub_run: Path) -> None:
    from protoaudit.engine.run import load_run

    push = load_run(cub_run).dataset().push
    first = push.image_ids.index(next(i for i in push.image_ids if i.endswith("_1.jpg")))
    # image 1: 120 × 100 px, box (10, 20) – (50, 60), resized to 32 × 32
    np.testing.assert_allclose(push.object_box(first), [20 * 0.32, 60 * 0.32, 10 * 32 / 120, 50 * 32 / 120])


def test_no_part_location_is_unknown_and_background_only_outside_the_box(cub_run: Path) -> None:
    from protoaudit.engine.run import load_run

    run = load_run(cub_run)
    push = run.dataset().push
    purity = pd.read_csv(cub_run / "purity.csv", keep_default_na=False)
    protos = run.prototypes("vgg").set_index("prototype")
    grid = 4  # tiny_vgg: 32 px / 8
    assert set(purity["source_part_kind"]) <= {"discriminative", "background", "no part annotated"}
    seen = set()
    for row in purity.itertuples():
        src = protos.loc[row.prototype]
        i, h, w = int(src["source_index"]), int(src["h"]), int(src["w"])
        y0, y1, x0, x1 = push.object_box(i)
        cell = (h * 32 // grid, (h + 1) * 32 // grid, w * 32 // grid, (w + 1) * 32 // grid)
        outside = cell[1] <= y0 or cell[0] >= y1 or cell[3] <= x0 or cell[2] >= x1
        keypoints = push.part_keypoints(i)
        in_cell = [
            int(p)
            for p, y, x in keypoints
            if h == min(grid - 1, y * grid // 32) and w == min(grid - 1, x * grid // 32)
        ]
        if in_cell:
            assert row.source_part_kind == "discriminative"
            assert row.source_part_name == run.dataset().part_names[min(in_cell)]
        elif outside:
            assert row.source_part_kind == "background"
        else:
            assert row.source_part_kind == "no part annotated"
        seen.add(row.source_part_kind)
    assert "no part annotated" in seen  # the generated birds leave most cells without a location


def test_scores_are_over_known_labels_and_say_how_many_were_unknown(cub_run: Path) -> None:
    audit = json.loads((cub_run / "audit.json").read_text())
    purity = pd.read_csv(cub_run / "purity.csv", keep_default_na=False)
    unknown = int((purity["source_part_kind"] == "no part annotated").sum())
    member = audit["members"]["vgg"]
    assert member["prototypes_part_unknown"] == unknown
    detectors = audit["detectors"]
    assert detectors["labels"] == "location"
    assert audit["causal"]["available"] is False
    known = purity[purity["source_part_kind"] != "no part annotated"]
    bad = known["source_part_kind"] == "background"
    for name, scores in detectors["pooled"].items():
        flags = known[f"flag_{name}"].astype(str).str.lower() == "true"
        assert scores["n_unknown"] == unknown, name
        assert scores["n_labelled"] == len(known), name
        assert scores["n_flagged"] == int(flags.sum()), name
        hit = int((flags & bad).sum())
        assert scores["precision"] == (hit / int(flags.sum()) if flags.any() else None), name
        assert scores["recall"] == (hit / int(bad.sum()) if bad.any() else None), name
