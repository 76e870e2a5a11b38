"""The baseline member: same trunk, plain linear head, trained on the same data, outside the ensemble."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from .conftest import TINY_RECIPE


def tiny_with_baseline(out: Path) -> dict[str, object]:
    data = tomllib.loads(TINY_RECIPE.read_text())
    data["out"] = str(out)
    data["members"].append({"name": "plain", "kind": "baseline", "trunk": "tiny_resnet"})
    return data


def test_baseline_net_shapes_and_normalisation() -> None:
    from protoaudit.engine.baseline import BaselineConfig, BaselineNet

    net = BaselineNet(BaselineConfig("tiny_vgg", n_classes=4, image_size=32)).eval()
    logits = net(torch.rand(3, 3, 32, 32))
    assert logits.shape == (3, 4)
    assert logits.dtype == torch.float32
    assert torch.allclose(net.mean.flatten(), torch.tensor([0.5, 0.5, 0.5]))
    assert sum(p.numel() for p in net.head.parameters()) == 96 * 4 + 4


def test_recipe_needs_a_protopnet_member() -> None:
    from protoaudit.engine.recipe import recipe_from_dict
    from protoaudit.errors import RecipeError

    with pytest.raises(RecipeError, match="at least one member must be a ProtoPNet"):
        recipe_from_dict({"name": "x", "members": [{"name": "b", "kind": "baseline", "trunk": "tiny_vgg"}]})
    with pytest.raises(RecipeError, match=r"members\[0\]\.kind"):
        recipe_from_dict({"name": "x", "members": [{"name": "b", "kind": "linear", "trunk": "tiny_vgg"}]})


def test_baseline_rows_are_outside_the_ensemble(tmp_path: Path) -> None:
    """accuracy.csv has the baseline row; the ensemble row equals the sum of the two ProtoPNets' logits alone."""
    from protoaudit.engine.baseline import load_baseline, predict_baseline
    from protoaudit.engine.ensemble import train_ensemble
    from protoaudit.engine.recipe import recipe_from_dict
    from protoaudit.engine.run import load_run
    from protoaudit.engine.train import predict

    result = train_ensemble(recipe_from_dict(tiny_with_baseline(tmp_path)))
    accuracy = pd.read_csv(result.run_dir / "accuracy.csv")
    assert accuracy["model"].tolist() == ["vgg", "resnet", "ensemble", "plain"]
    assert accuracy["kind"].tolist() == ["member", "member", "ensemble", "baseline"]
    assert accuracy.loc[2, "backbone"] == "tiny_vgg+tiny_resnet"
    assert accuracy.loc[3, "n_prototypes"] == 0

    run = load_run(result.run_dir)
    assert run.member_names == ["vgg", "resnet"]
    assert run.meta["baselines"] == ["plain"]
    bundle = run.dataset()
    summed = sum(predict(run.member(n), bundle.test, 64, torch.device("cpu")) for n in run.member_names)
    assert isinstance(summed, torch.Tensor)
    ensemble_top1 = float((summed.argmax(1).numpy() == bundle.test.labels).mean())
    assert ensemble_top1 == pytest.approx(accuracy.loc[2, "top1"])

    model, meta = load_baseline(result.run_dir / "baselines" / "plain")
    assert meta["kind"] == "baseline"
    assert meta["config"]["trunk"] == "tiny_resnet"
    logits = predict_baseline(model, bundle.test, 64, torch.device("cpu"))
    top1 = float((logits.argmax(1).numpy() == np.asarray(bundle.test.labels)).mean())
    assert top1 == pytest.approx(accuracy.loc[3, "top1"])
    assert meta["metrics"]["test_top1"] == pytest.approx(top1)
    assert [h["stage"] for h in meta["history"]] == ["warm", "joint", "joint"]
    assert "val_top1" in meta["history"][-1]


def test_baseline_learns_on_separable_data() -> None:
    """Two classes told apart by brightness: after a few epochs the baseline beats chance clearly."""
    from protoaudit.engine.baseline import train_baseline
    from protoaudit.engine.data import DatasetBundle, TensorSplit
    from protoaudit.engine.recipe import recipe_from_dict

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 24).astype(np.int64)
    images = (rng.integers(0, 60, size=(48, 16, 16, 3)) + 150 * labels[:, None, None, None]).astype(np.uint8)
    split = TensorSplit(images, labels, [str(i) for i in range(48)])
    bundle = DatasetBundle(split, split, split, split, ["dark", "bright"], 16, "x", {})
    recipe = recipe_from_dict(
        {
            "name": "b",
            "schedule": {"epochs": 4, "warm_epochs": 1, "push_start": 2, "push_every": 2, "batch_size": 8},
            "lr": {"trunk": 1e-3},
            "members": [
                {"name": "p", "trunk": "tiny_vgg"},
                {"name": "b", "kind": "baseline", "trunk": "tiny_vgg"},
            ],
        }
    )
    trained = train_baseline(recipe.members[1], recipe, bundle, torch.device("cpu"), seed=0)
    assert trained.val_top1 >= 0.9
    assert trained.selected_epoch in (2, 4)
    first, last = trained.history[0], trained.history[-1]
    assert last["cross_entropy"] < first["cross_entropy"]
