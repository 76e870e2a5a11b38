"""The last layer retuned after prototypes are removed (paper §2.6): a copy of the member without them, its
last layer trained again on the indexed push patches with the recipe's solver, as the training's stage 4."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from protoaudit.core.knn import min_distances_by_image
from protoaudit.core.model import ProtoPNet
from protoaudit.engine.train import fit_last_layer

if TYPE_CHECKING:
    from protoaudit.engine.data import DatasetBundle
    from protoaudit.engine.recipe import Recipe


def retuned_copy(
    model: ProtoPNet,
    pruned: np.ndarray,
    vectors: torch.Tensor,
    image_index: torch.Tensor,
    bundle: DatasetBundle,
    recipe: Recipe,
    finetune_epochs: int,
    info: dict[str, Any] | None = None,
) -> ProtoPNet:
    """A copy of ``model`` without the prototypes where ``pruned`` (m,) is True and their last-layer columns,
    its last layer retrained on the indexed push patches (the training's stage 4 with the recipe's solver), in
    eval mode; ``info`` receives the solver's report (solver, iterations, converged, residual)."""
    pruned_model = copy.deepcopy(model).cpu()
    pruned_model.keep_prototypes(torch.as_tensor(~np.asarray(pruned, dtype=bool)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a K × m layer in batches of a few images: more threads only wait on each other
    try:
        report = _retune(pruned_model, vectors, image_index, bundle, recipe, finetune_epochs)
    finally:
        torch.set_num_threads(threads)
    if info is not None:
        info.update(report)
    return pruned_model.eval()


def _retune(
    pruned_model: ProtoPNet,
    vectors: torch.Tensor,
    image_index: torch.Tensor,
    bundle: DatasetBundle,
    recipe: Recipe,
    finetune_epochs: int,
) -> dict[str, Any]:
    if not pruned_model.n_prototypes or finetune_epochs <= 0:  # 0: keep h's remaining columns as they are
        return {}
    min_d = min_distances_by_image(
        vectors, image_index, len(bundle.push), pruned_model.prototype_vectors.detach()
    )
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
