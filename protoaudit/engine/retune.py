"""The last layer retuned after prototypes are removed (paper §2.6): a copy of the member without them, its
last layer trained again on the push images' distances to the remaining prototypes (from the patch index's
search) with the recipe's solver, as the training's stage 4."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from protoaudit.core.model import ProtoPNet
from protoaudit.engine.train import fit_last_layer

if TYPE_CHECKING:
    from protoaudit.engine.data import DatasetBundle
    from protoaudit.engine.recipe import Recipe


def retuned_copy(
    model: ProtoPNet,
    pruned: np.ndarray,
    push_min_distances: torch.Tensor,
    bundle: DatasetBundle,
    recipe: Recipe,
    finetune_epochs: int,
    info: dict[str, Any] | None = None,
) -> ProtoPNet:
    """A copy of ``model`` without the prototypes where ``pruned`` (m,) is True and their last-layer columns,
    its last layer retrained on ``push_min_distances`` (n_push, m: every push image's smallest distance to
    every prototype, as the index search keeps them) without the removed columns (the training's stage 4 with
    the recipe's solver), in eval mode; ``info`` receives the solver's report (solver, iterations, converged,
    residual)."""
    keep = ~np.asarray(pruned, dtype=bool)
    if push_min_distances.shape != (len(bundle.push), len(keep)):
        raise ValueError(
            f"push distances of shape {tuple(push_min_distances.shape)} for {len(bundle.push)} push images "
            f"and {len(keep)} prototypes"
        )
    pruned_model = copy.deepcopy(model).cpu()
    pruned_model.keep_prototypes(torch.as_tensor(keep))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a K × m layer in batches of a few images: more threads only wait on each other
    try:
        report = _retune(
            pruned_model, push_min_distances[:, torch.as_tensor(keep)], bundle, recipe, finetune_epochs
        )
    finally:
        torch.set_num_threads(threads)
    if info is not None:
        info.update(report)
    return pruned_model.eval()


def _retune(
    pruned_model: ProtoPNet,
    min_d: torch.Tensor,
    bundle: DatasetBundle,
    recipe: Recipe,
    finetune_epochs: int,
) -> dict[str, Any]:
    if not pruned_model.n_prototypes or finetune_epochs <= 0:  # 0: keep h's remaining columns as they are
        return {}
    # the training's stage 4 with the recipe's solver (FISTA: to its tolerance; Adam: finetune_epochs)
    retune = fit_last_layer(
        pruned_model,
        min_d,
        torch.tensor(np.asarray(bundle.push.labels), dtype=torch.long),
        recipe,
        None,
        torch.Generator().manual_seed(recipe.seed),
        epochs=finetune_epochs,
    )
    return {k: retune[k] for k in ("solver", "iterations", "converged", "residual") if k in retune}
