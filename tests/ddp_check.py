"""Run under ``torchrun --nproc-per-node 2``: push, evaluation and one epoch of joint SGD, each across the ranks.

Rank 0 writes what it computed to OUT (safetensors) for tests/test_distributed.py to compare with a single
process doing the same work. Batch norm runs on frozen statistics in the SGD epoch so that the two are
comparable (with batch statistics each rank would normalise its own half-batch).
"""

from __future__ import annotations

import sys

import torch

from protoaudit.engine.distributed import from_env
from protoaudit.engine.io import save_tensors
from tests.ddp_common import run_steps


def main() -> None:
    info = from_env()
    torch.set_num_threads(1)
    out = run_steps(info)
    if info.is_main:
        save_tensors(sys.argv[1], out)


if __name__ == "__main__":
    main()
