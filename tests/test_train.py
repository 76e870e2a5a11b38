"""Training stages: which parameters move in each stage, push, model selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from protoaudit.core.geometry import percentile_boxes
from protoaudit.core.model import ProtoPNet
from protoaudit.engine.data import build_dataset
from protoaudit.engine.push import push_prototypes
from protoaudit.engine.recipe import load_recipe
from protoaudit.engine.train import (
    _optimizers,
    _sgd_epoch,
    build_member,
    last_layer_stage,
    push_epochs,
    set_stage,
)

from .conftest import TINY_RECIPE


@pytest.fixture(scope="module")
def setup() -> tuple:
    recipe = load_recipe(TINY_RECIPE)
    bundle = build_dataset(recipe.data, recipe.seed)
    torch.manual_seed(0)
    model = build_member(recipe.members[0], bundle)
    return recipe, bundle, model


def _snapshot(model: ProtoPNet) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], model: ProtoPNet, prefix: str) -> bool:
    return any(not torch.equal(before[k], v) for k, v in model.state_dict().items() if k.startswith(prefix))


@pytest.mark.parametrize("stage", ["warm", "joint"])
def test_last_layer_fixed_during_warm_and_joint(setup: tuple, stage: str) -> None:
    recipe, bundle, model = setup
    before = _snapshot(model)
    set_stage(model, stage)
    opt = _optimizers(model, recipe)[stage]
    _sgd_epoch(
        model,
        bundle.train,
        opt,
        recipe.loss.model_dump(),
        8,
        torch.Generator().manual_seed(0),
        torch.device("cpu"),
        lambda n: None,
    )
    assert not _changed(before, model, "last_layer")
    assert _changed(before, model, "prototype_vectors")
    assert _changed(before, model, "add_on")
    # warm freezes the trunk's weights (batch norm still tracks batch statistics); joint trains them
    trunk_params = {f"trunk.{n}" for n, _ in model.trunk.named_parameters()}
    moved = any(not torch.equal(before[k], model.state_dict()[k]) for k in trunk_params)
    assert moved == (stage == "joint")


def test_only_last_layer_changes_in_last_layer_stage(setup: tuple) -> None:
    recipe, bundle, model = setup
    before = _snapshot(model)
    labels = torch.as_tensor(bundle.push.labels)
    min_d = torch.rand(len(labels), model.n_prototypes) * 3
    opt = _optimizers(model, recipe)["last_layer"]
    last_layer_stage(model, min_d, labels, opt, 2, 1e-4, 8, torch.Generator().manual_seed(0))
    assert _changed(before, model, "last_layer")
    for prefix in ("trunk", "add_on", "prototype_vectors"):
        assert not _changed(before, model, prefix), prefix


def test_push_moves_each_prototype_onto_a_same_class_patch(setup: tuple) -> None:
    _, bundle, model = setup
    seen: list[torch.Tensor] = []
    result = push_prototypes(
        model, bundle.push, 16, torch.device("cpu"), bundle.image_size, lambda z, i: seen.append(z)
    )
    latents = torch.cat(seen)
    assert latents.shape[0] == len(bundle.push)
    for j in range(model.n_prototypes):
        i, h, w = int(result.image_index[j]), int(result.h[j]), int(result.w[j])
        assert int(bundle.push.labels[i]) == model.config.prototype_class[j]
        torch.testing.assert_close(
            model.prototype_vectors[j].detach(), latents[i, :, h, w], rtol=0, atol=1e-6
        )
        # it is the nearest same-class patch: no other patch of the class is closer to the pushed vector
        own = np.flatnonzero(bundle.push.labels == model.config.prototype_class[j])
        d = ((latents[own] - model.prototype_vectors[j].detach()[None, :, None, None]) ** 2).sum(1)
        assert float(d.min()) <= 1e-10
    assert result.boxes.shape == (model.n_prototypes, 4)
    assert bool(
        (result.boxes[:, 0] < result.boxes[:, 1]).all() and (result.boxes[:, 2] < result.boxes[:, 3]).all()
    )


@pytest.mark.parametrize("uneven", [False, True])
def test_push_decisions_equal_a_float64_brute_force_over_own_class_patches(
    setup: tuple, uneven: bool
) -> None:
    # push compares each image with its own class's prototypes only; the decisions must be those of scanning
    # every patch of the class in float64 (uneven: classes keep 1, 2, … prototypes, one class none)
    import copy

    from protoaudit.engine.push import class_members

    _, bundle, base = setup
    model = copy.deepcopy(base)
    classes = model.prototype_class
    if uneven:
        rank = torch.zeros_like(classes)
        for k in classes.unique():
            where = (classes == k).nonzero().flatten()
            rank[where] = torch.arange(len(where))
        keep = (rank <= classes % 3) & (classes != 1)  # class 1 loses all its prototypes
        model.keep_prototypes(keep)
        assert len(set(model.config.prototype_class)) < len(set(classes.tolist()))
        members, slot = class_members(model.prototype_class, model.n_classes)
        for j, k in enumerate(model.config.prototype_class):
            assert int(members[k, slot[j]]) == j
        assert int((members >= 0).sum()) == model.n_prototypes
    before = model.prototype_vectors.detach().double().clone()
    seen: list[torch.Tensor] = []
    result = push_prototypes(
        model, bundle.push, 7, torch.device("cpu"), bundle.image_size, lambda z, i: seen.append(z)
    )
    latents = torch.cat(seen).double()  # (N, D, H, W)
    _, _, hh, ww = latents.shape
    labels = torch.as_tensor(bundle.push.labels)
    for j, k in enumerate(model.config.prototype_class):
        own = (labels == k).nonzero().flatten()
        d = ((latents[own] - before[j][None, :, None, None]) ** 2).sum(1).flatten()  # image, h, w order
        best = int(d.argmin())  # the first among equals: the lowest image, then h, then w
        assert int(result.image_index[j]) == int(own[best // (hh * ww)])
        assert (int(result.h[j]), int(result.w[j])) == divmod(best % (hh * ww), ww)
        assert float(result.distance[j]) == pytest.approx(float(d[best]), rel=1e-5, abs=1e-6)


def test_percentile_box_surrounds_the_hot_region() -> None:
    maps = torch.zeros(2, 4, 4)
    maps[0, 0, 0] = 5.0  # hot top-left cell
    maps[1, 2:4, 1:3] = 3.0  # hot bottom-middle block
    boxes = percentile_boxes(maps, 32)
    y0, y1, x0, x1 = boxes[0].tolist()
    assert y0 == 0
    assert x0 == 0
    assert y1 <= 12
    assert x1 <= 12
    y0, y1, x0, x1 = boxes[1].tolist()
    assert y0 >= 14
    assert y1 == 32
    assert x0 >= 6
    assert x1 <= 26


def test_percentile_threshold_is_torch_quantile_bit_for_bit() -> None:
    from protoaudit.core.geometry import _quantile_rows

    generator = torch.Generator().manual_seed(0)
    for size in (28, 56, 64):
        values = torch.rand(300, size * size, generator=generator) * 7
        tied = torch.round(values * 2) / 2  # many equal values around every rank
        for rows in (values, tied, torch.ones(3, size * size)):
            for q in (0.95, 0.5, 0.9, 0.999, 0.0, 1.0, 0.333):
                assert torch.equal(_quantile_rows(rows, q), torch.quantile(rows, q, dim=1)), (size, q)
    maps = torch.rand(40, 7, 7, generator=generator)
    up = torch.nn.functional.interpolate(maps[:, None], size=(56, 56), mode="bicubic", align_corners=False)
    threshold = torch.quantile(up[:, 0].flatten(1), 0.95, dim=1)
    mask = up[:, 0] >= threshold[:, None, None]
    rows, cols = mask.any(dim=2), mask.any(dim=1)
    expected = torch.stack(
        [
            rows.float().argmax(1),
            56 - rows.flip(1).float().argmax(1),
            cols.float().argmax(1),
            56 - cols.flip(1).float().argmax(1),
        ],
        dim=1,
    )
    assert torch.equal(percentile_boxes(maps, 56), expected)


def test_push_schedule() -> None:
    class S:
        epochs, push_start, push_every = 10, 4, 3

    assert push_epochs(S) == [4, 7, 10]
    S.epochs = 11
    assert push_epochs(S) == [4, 7, 10, 11]


def test_bf16_autocast_and_channels_last_keep_distances_in_float32(setup: tuple) -> None:
    recipe, bundle, model = setup
    model = model.to(memory_format=torch.channels_last)
    x = bundle.train.batch([0, 1, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = model.latent(x)
        d = model.distances(z)
    assert z.dtype == torch.bfloat16  # the trunk and add-on ran in bfloat16
    assert d.dtype == torch.float32
    torch.testing.assert_close(d, model.distances(z.float()), rtol=0, atol=0)
    before = _snapshot(model)
    set_stage(model, "joint")
    opt = _optimizers(model, recipe)["joint"]
    metrics = _sgd_epoch(
        model,
        bundle.train,
        opt,
        recipe.loss.model_dump(),
        8,
        torch.Generator().manual_seed(0),
        torch.device("cpu"),
        lambda n: None,
        amp="bf16",
        channels_last=True,
    )
    assert np.isfinite(metrics["loss"])
    assert _changed(before, model, "prototype_vectors")
