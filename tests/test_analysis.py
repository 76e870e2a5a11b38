"""Global analysis (paper Fig. 5b): the k nearest images of each split to every prototype, one patch each."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from protoaudit.core.model import squared_distances
from protoaudit.engine.analysis import NEAREST_COLUMNS, global_analysis, nearest_to_prototypes
from protoaudit.engine.index.build import collect_latents
from protoaudit.engine.run import load_run
from protoaudit.report.strips import strip_path, write_strips


@pytest.mark.parametrize("split", ["train", "test"])
def test_nearest_images_equal_a_forward_pass(tiny_run: Path, split: str) -> None:
    run = load_run(tiny_run)
    bundle = run.dataset()
    images = bundle.push if split == "train" else bundle.test
    model = run.member("resnet")
    table = nearest_to_prototypes(run, "resnet", split, k=4)
    assert list(table.columns) == NEAREST_COLUMNS
    # independent of the index: each image's smallest distance to each prototype, from a fresh pass
    z = collect_latents(model, images, 64, torch.device("cpu"))
    with torch.no_grad():
        per_image = squared_distances(z, model.prototype_vectors).flatten(2).amin(2)  # (N, m)
    for j in range(model.n_prototypes):
        rows = table[table.prototype == j]
        expected = torch.sort(per_image[:, j], stable=True)
        assert rows["image_index"].tolist() == expected.indices[:4].tolist()
        np.testing.assert_allclose(rows["distance"], expected.values[:4].numpy(), atol=1e-4)
        assert rows["rank"].tolist() == [1, 2, 3, 4]
        assert rows["image_id"].tolist() == [images.image_ids[i] for i in rows["image_index"]]
    if split == "train":  # after push each prototype is a patch of its source image
        first = table[table["rank"] == 1].set_index("prototype")
        sources = run.prototypes("resnet")
        assert (first["distance"] < 1e-5).all()
        for j, row in sources.iterrows():
            # the source image, or another image holding the identical patch
            if first.loc[j, "image_id"] == row["source_image"]:
                assert (first.loc[j, "h"], first.loc[j, "w"]) == (row["h"], row["w"])


def test_global_analysis_files(tiny_run: Path, tmp_path: Path) -> None:
    from PIL import Image

    target = tmp_path / "tiny"
    shutil.copytree(tiny_run, target)
    run = load_run(target)
    bundle = run.dataset()
    summary = global_analysis(
        run, k=3, members=["vgg"], on_table=lambda m, split, t: write_strips(run, m, split, t, bundle)
    )
    assert summary[["member", "split"]].values.tolist() == [["vgg", "train"], ["vgg", "test"]]
    classes = np.asarray(run.member("vgg").config.prototype_class)
    for split in ("train", "test"):
        table = pd.read_csv(target / "members" / "vgg" / f"nearest_{split}.csv")
        assert list(table.columns) == NEAREST_COLUMNS
        assert len(table) == 12 * 3
        own = (table["label"].to_numpy() == classes[table["prototype"].to_numpy()]).mean()
        assert summary[summary.split == split]["own_class"].iloc[0] == pytest.approx(own)
        widths = set()
        for j in range(12):
            with Image.open(strip_path(target, "vgg", split, j)) as img:
                widths.add(img.size[0])
                assert img.size[1] >= 128  # 32 px images shown at 4×
        assert min(widths) > 3 * 128 + 40  # the prototype, then its three nearest images
    assert not (target / "members" / "resnet" / "nearest_train.csv").exists()


def test_global_analysis_reuses_prunes_search(tiny_run: Path, tmp_path: Path) -> None:
    """After prune, global analysis reads prune's nearest_train.csv (searched with k = 10) instead of searching
    the training index again, and writes the same bytes a fresh search gives; a record that no longer holds (a
    smaller k than asked, another index) means a search."""
    import json

    from protoaudit.engine.prune import prune_run
    from tests.conftest import counted_searches

    run_dir = tmp_path / "tiny"
    shutil.copytree(tiny_run, run_dir)
    prune_run(load_run(run_dir), k=6, threshold=3, finetune_epochs=0)
    run = load_run(run_dir)
    names = run.member_names

    def analyse(**kwargs: object) -> list[str]:
        with counted_searches() as searched:
            global_analysis(run, **kwargs)  # type: ignore[arg-type]
        return [split for split, _, _ in searched]

    assert analyse(k=5) == []  # both splits: prune's one search of each index
    for member in names:  # prune's tables stay whole (10 ranks, as a fresh search gives them)
        fresh = nearest_to_prototypes(run, member, "train", 10).to_csv(index=False, lineterminator="\n")
        assert (run_dir / "members" / member / "nearest_train.csv").read_text() == fresh
        # the test table comes from the distances of the member's test pass: the same rows, and distances
        # equal to the search's up to the rounding of a differently ordered sum
        fresh_test = nearest_to_prototypes(run, member, "test", 10)
        saved_test = pd.read_csv(
            run_dir / "members" / member / "nearest_test.csv", converters={"image_id": str}
        )
        columns = ["prototype", "rank", "image_index", "image_id", "label", "h", "w"]
        assert saved_test[columns].equals(fresh_test[columns])
        np.testing.assert_allclose(saved_test["distance"], fresh_test["distance"], rtol=1e-5, atol=1e-5)
        record = json.loads((run_dir / "members" / member / "nearest_test.json").read_text())
        assert record["source"] == "test pass"
        assert json.loads((run_dir / "members" / member / "nearest_train.json").read_text())["source"] == (
            "index search"
        )
    assert analyse(k=11, members=[names[0]]) == ["train", "test"]  # 10 ranks < 11: searched again
    assert analyse(k=6, members=[names[0]]) == []  # every table now has its record for k = 11
    record_path = run_dir / "members" / names[0] / "nearest_train.json"
    record = json.loads(record_path.read_text())
    record["index"]["faiss_bytes"] += 1  # another index than the one the table came from
    record_path.write_text(json.dumps(record))
    assert analyse(k=6, members=[names[0]], splits=("train",)) == ["train"]
