"""Deletion curves of a sample of a member's prototypes, computed once where the member is in memory (at the
end of its training) and kept in ``members/<m>/faithfulness.json``, so that the report
reads them instead of running the member again.

The check itself is :func:`protoaudit.core.faithfulness.deletion_curves`: occlude each sampled prototype's
source image (push split) in the order of its upsampled similarity map and in random orders, and record the
prototype's score after each step (a faithfulness check beside the paper's 95th-percentile box, which is not a
faithful attribution: Xu-Darme et al. 2023).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from protoaudit.core.faithfulness import deletion_curves
from protoaudit.core.model import ProtoPNet

DELETION_PROTOTYPES = 6  # prototypes per member given a deletion curve
DELETION_STEPS = 16
DELETION_RANDOM_ORDERS = 2
DELETION_SEED = 0  # of the sample and of the random orders; the report's default --seed
OCCLUSION = "per-channel mean of the image"
FAITHFULNESS_FORMAT = "protoaudit-faithfulness"
FAITHFULNESS_FORMAT_VERSION = 1


def sample_prototypes(n_prototypes: int, n: int, seed: int = DELETION_SEED) -> list[int]:
    """``n`` of ``n_prototypes`` prototypes drawn without replacement, in the order drawn."""
    return [int(j) for j in np.random.default_rng(seed).permutation(n_prototypes)[:n]]


def member_faithfulness(
    model: ProtoPNet,
    push: Any,
    source_index: list[int],
    prototypes: list[int] | None = None,
    *,
    n: int = DELETION_PROTOTYPES,
    steps: int = DELETION_STEPS,
    random_orders: int = DELETION_RANDOM_ORDERS,
    seed: int = DELETION_SEED,
) -> dict[str, Any]:
    """Deletion curves of ``prototypes`` (default: :func:`sample_prototypes` of ``n``) of ``model``, each on
    its source image ``push[source_index[j]]`` (prototypes.csv's ``source_index``).

    Returns the document of ``faithfulness.json``: the settings, ``fractions`` (T + 1,) and per prototype
    (in the order drawn) the raw scores ``activation`` (T + 1,) and ``random`` (R, T + 1)."""
    chosen = sample_prototypes(model.n_prototypes, n, seed) if prototypes is None else list(prototypes)
    document: dict[str, Any] = {
        "format": FAITHFULNESS_FORMAT,
        "format_version": FAITHFULNESS_FORMAT_VERSION,
        "method": "deletion",
        "steps": steps,
        "random_orders": random_orders,
        "seed": seed,
        "occlusion": OCCLUSION,
        "fractions": np.linspace(0.0, 1.0, steps + 1).tolist(),
        "prototypes": [],
    }
    if not chosen:
        return document
    was_training = model.training
    images = push.batch([int(source_index[j]) for j in chosen])
    curves = deletion_curves(
        model,
        images.to(model.prototype_vectors.device),
        torch.as_tensor(chosen),
        steps=steps,
        random_orders=random_orders,
        seed=seed,
    )
    model.train(was_training)
    document["fractions"] = curves.fractions.tolist()
    document["prototypes"] = [
        {
            "prototype": j,
            "source_index": int(source_index[j]),
            "activation": curves.activation[k].tolist(),
            "random": curves.random[k].tolist(),
        }
        for k, j in enumerate(chosen)
    ]
    return document


def record_faithfulness(member_dir: Path, model: ProtoPNet, push: Any, seed: int = DELETION_SEED) -> None:
    """Compute the deletion curves of the member saved in ``member_dir`` (``model``, its weights in memory)
    and write them to its ``faithfulness.json``, tied to the weights' sha256 that model.json records."""
    from protoaudit.engine.io import read_json
    from protoaudit.engine.run import read_prototypes, recorded_weights_sha256, save_faithfulness

    meta = read_json(member_dir / "model.json")
    table = read_prototypes(member_dir).sort_values("prototype")
    source_index = [int(i) for i in table["source_index"]]
    document = member_faithfulness(model, push, source_index, seed=seed)
    document["weights_sha256"] = recorded_weights_sha256(meta, member_dir)
    save_faithfulness(member_dir, document)
