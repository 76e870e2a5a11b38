"""The work tests/test_distributed.py runs once in a single process and once across torchrun ranks."""

from __future__ import annotations

import copy

import numpy as np
import torch

from protoaudit.engine.data import build_dataset
from protoaudit.engine.distributed import SINGLE, DistInfo
from protoaudit.engine.push import push_prototypes
from protoaudit.engine.recipe import load_recipe
from protoaudit.engine.train import _optimizers, _sgd_epoch, build_member, predict, set_stage

from .conftest import TINY_RECIPE

BATCH = 8


def run_steps(dist: DistInfo = SINGLE) -> dict[str, torch.Tensor]:
    recipe = load_recipe(TINY_RECIPE)
    bundle = build_dataset(recipe.data, recipe.seed)
    train = bundle.train.subset(np.arange(32))  # a whole number of batches: no tail to trim
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    model = build_member(recipe.members[0], bundle)
    # push and evaluation on a copy: near-ties among pushed prototypes would make the SGD comparison chaotic
    pushed_model = copy.deepcopy(model)
    pushed = push_prototypes(pushed_model, bundle.push, BATCH, cpu, bundle.image_size, dist=dist)
    pushed_prototypes = pushed_model.prototype_vectors.detach().clone()
    logits = predict(pushed_model, bundle.test, BATCH, cpu, dist=dist)
    set_stage(model, "joint")
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()
    forward = None
    if dist.enabled:
        forward = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = _optimizers(model, recipe)["joint"]
    generator = torch.Generator().manual_seed(0)
    coefs = recipe.loss.model_dump()
    _sgd_epoch(model, train, optimizer, coefs, BATCH, generator, cpu, lambda n: None, 0, dist, forward)
    return {
        "pushed_prototypes": pushed_prototypes,
        "push_image_index": pushed.image_index,
        "push_h": pushed.h,
        "push_w": pushed.w,
        "test_logits": logits,
        **{f"after_sgd.{k}": v.detach().clone() for k, v in model.state_dict().items()},
    }
