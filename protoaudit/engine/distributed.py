"""Data-parallel training under ``torchrun`` (DistributedDataParallel; gloo on CPU, nccl on GPU).

``torchrun --nproc-per-node N -m protoaudit train-ensemble RECIPE`` starts N processes; each trains on its share of
every batch, DDP averages the gradients, batch norm is synchronised, push and the last-layer stage gather their
per-rank results so every rank holds the same prototypes and last layer, and only rank 0 writes files. Without
torchrun's environment (``WORLD_SIZE`` unset or 1) everything here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistInfo()


def from_env() -> DistInfo:
    """The process group torchrun describes in the environment (initialised once), or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
    return info


def device_for(info: DistInfo, requested: torch.device) -> torch.device:
    """Under torchrun on GPUs each rank takes the GPU of its local rank."""
    if info.enabled and requested.type == "cuda":
        return torch.device("cuda", info.local_rank)
    return requested


def threads_per_rank(info: DistInfo, requested: int | None) -> int | None:
    """Split the CPU threads among the ranks of this machine so they do not oversubscribe the cores."""
    if requested is not None or not info.enabled:
        return requested
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(info.world)))
    return max(1, (os.cpu_count() or 1) // local)


def shard(indices: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """This rank's share of a batch: every world-th element starting at its rank."""
    return indices[info.rank :: info.world] if info.enabled else indices


def all_gather_rows(local: torch.Tensor, info: DistInfo) -> list[torch.Tensor]:
    """Gather a (n_r, …) tensor of every rank (n_r may differ); returns the list in rank order."""
    if not info.enabled:
        return [local]
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(info.world)]
    dist.all_gather(sizes, torch.tensor([local.shape[0]], dtype=torch.long))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype)
    padded[: local.shape[0]] = local.cpu()
    out = [torch.zeros_like(padded) for _ in range(info.world)]
    dist.all_gather(out, padded)
    return [o[: int(s.item())] for o, s in zip(out, sizes, strict=True)]


def unshard(parts: list[torch.Tensor], n: int) -> torch.Tensor:
    """Inverse of :func:`shard` over ``range(n)``: interleave the ranks' rows back into the original order."""
    world = len(parts)
    out = torch.empty((n, *parts[0].shape[1:]), dtype=parts[0].dtype)
    for rank, part in enumerate(parts):
        out[rank::world] = part
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_ok(ok: bool, info: DistInfo) -> bool:
    """True when ``ok`` holds on every rank (a collective: every rank must call it)."""
    if not info.enabled:
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.long)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def sync_buffers(module: torch.nn.Module, info: DistInfo) -> None:
    """Give every rank rank 0's buffers (batch-norm running statistics): each rank updated its own during the
    epoch, and push and evaluation must all see one latent space. DDP does the same at each forward."""
    if not info.enabled:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=0)
