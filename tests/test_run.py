"""The run directory contract, the Python API, and determinism, on one trained tiny run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from protoaudit.core.metrics import ensemble_logits, top1
from protoaudit.engine.ensemble import train_ensemble
from protoaudit.engine.recipe import load_recipe
from protoaudit.engine.run import load_member, load_run
from protoaudit.engine.train import predict
from protoaudit.errors import CheckpointError

from .conftest import TINY_RECIPE


def test_run_directory_contract(tiny_run: Path) -> None:
    for name in ("recipe.toml", "run.json", "accuracy.csv"):
        assert (tiny_run / name).is_file(), name
    for member in ("vgg", "resnet"):
        for name in ("model.safetensors", "model.json", "prototypes.csv"):
            assert (tiny_run / "members" / member / name).is_file()
    meta = json.loads((tiny_run / "run.json").read_text())
    assert meta["status"] == "complete"
    assert meta["format_version"] == 1
    assert meta["seed"] == 0
    assert meta["threads"] == 1
    assert set(meta["versions"]) >= {"protoaudit", "torch", "faiss"}
    assert len(meta["dataset"]["fingerprint"]) == 64
    assert set(meta["timings"]["vgg"]) >= {"warm", "joint", "push", "last_layer"}
    assert not list(tiny_run.rglob("*.tmp")), "temporary files left behind"
    # the recipe as run reloads to the same recipe
    assert load_recipe(tiny_run / "recipe.toml").sha256() == meta["recipe_sha256"]


def test_accuracy_csv_matches_reloaded_members(tiny_run: Path) -> None:
    run = load_run(tiny_run)
    bundle = run.dataset()
    acc = run.accuracy().set_index("model")
    logits = []
    for name in run.member_names:
        model = run.member(name)
        member_logits = predict(model, bundle.test, 64, torch.device("cpu"))
        assert top1(member_logits, bundle.test.labels) == pytest.approx(acc.loc[name, "top1"], abs=1e-12)
        assert acc.loc[name, "n_prototypes"] == model.n_prototypes
        saved = run.logits(name)  # saved once at training: what reports and audits read instead
        assert saved is not None
        # the same predictions; logits agree to float32 rounding magnified by log((d + 1)/(d + 1e-4)) near d = 0
        assert saved["test"].argmax(1).tolist() == member_logits.argmax(1).tolist()
        torch.testing.assert_close(saved["test"], member_logits, rtol=0, atol=1e-2)
        assert saved["labels.test"].tolist() == list(bundle.test.labels)
        logits.append(member_logits)
    combined = ensemble_logits(logits)
    torch.testing.assert_close(combined, logits[0] + logits[1])
    assert top1(combined, bundle.test.labels) == pytest.approx(acc.loc["ensemble", "top1"], abs=1e-12)
    assert acc.loc["ensemble", "n_prototypes"] == sum(acc.loc[n, "n_prototypes"] for n in run.member_names)


def test_prototypes_equal_the_patches_prototypes_csv_names(tiny_run: Path) -> None:
    run = load_run(tiny_run)
    bundle = run.dataset()
    for name in run.member_names:
        model = run.member(name)
        table = run.prototypes(name)
        assert list(table["prototype"]) == list(range(model.n_prototypes))
        with torch.no_grad():
            z = model.latent(bundle.push.batch(table["source_index"].tolist()))
        for row in table.itertuples():
            assert bundle.push.image_ids[row.source_index] == row.source_image
            assert (
                row.label == row._2 == model.config.prototype_class[row.prototype]
            )  # _2: the "class" column
            patch = z[row.Index, :, row.h, row.w]
            torch.testing.assert_close(
                model.prototype_vectors[row.prototype].detach(), patch, rtol=0, atol=1e-6
            )


def test_same_seed_and_threads_give_identical_files(tiny_run: Path, tmp_path: Path) -> None:
    recipe = load_recipe(TINY_RECIPE, out=str(tmp_path))
    again = train_ensemble(recipe).run_dir
    assert (again / "accuracy.csv").read_bytes() == (tiny_run / "accuracy.csv").read_bytes()
    for member in ("vgg", "resnet"):
        a = (again / "members" / member / "model.safetensors").read_bytes()
        b = (tiny_run / "members" / member / "model.safetensors").read_bytes()
        assert a == b, member


def test_member_round_trip_and_corrupt_files(tiny_run: Path, tmp_path: Path) -> None:
    model, meta = load_member(tiny_run / "members" / "vgg")
    assert meta["name"] == "vgg"
    assert meta["kind"] == "protopnet"
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        first = model(x)[0]
    copy = tmp_path / "vgg"
    copy.mkdir()
    for f in ("model.json", "model.safetensors"):
        (copy / f).write_bytes((tiny_run / "members" / "vgg" / f).read_bytes())
    again, _ = load_member(copy)
    with torch.no_grad():
        torch.testing.assert_close(again(x)[0], first)
    data = (copy / "model.safetensors").read_bytes()
    (copy / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="safetensors"):
        load_member(copy)


def test_accuracy_columns(tiny_run: Path) -> None:
    frame = pd.read_csv(tiny_run / "accuracy.csv")
    assert list(frame.columns) == [
        "model", "kind", "backbone", "pruned", "top1", "n_prototypes", "n_test", "top1_low", "top1_high",
    ]  # fmt: skip
    assert list(frame["model"]) == ["vgg", "resnet", "ensemble"]
    assert np.all((frame["top1"] >= 0) & (frame["top1"] <= 1))
