"""Figures computed from logits: top-1 accuracy and the ensemble's summed logits."""

from __future__ import annotations

import numpy as np
import torch


def top1(logits: torch.Tensor, labels: np.ndarray) -> float:
    if len(labels) == 0:
        return float("nan")
    return float((logits.argmax(1).numpy() == np.asarray(labels)).mean())


def ensemble_logits(member_logits: list[torch.Tensor]) -> torch.Tensor:
    """Sum of the members' (N, K) logits (the original combine step)."""
    return torch.stack(member_logits).sum(dim=0)
