"""The GPU check (issue "Scale and speed"): one prepared script, a few minutes on one GPU.

1. A CUB-size epoch — 5994 generated 224-px images, 200 classes, batch 64 — for ProtoPNet members with the
   paper's trunks (VGG19, ResNet34, DenseNet121; 10 prototypes per class, D = 128/256/128, bf16 autocast,
   channels-last) against the bare trunks with a linear head: seconds per epoch and the ratio.
2. P2: push of 2000 prototypes over the push set vs one eval forward pass over it (goal ≤ 1.2× on a GPU).
3. P3: the pruning search (k = 6 nearest images, one patch each) over the indexed patches on the GPU vs a bare
   exact k-NN search of the same sizes.

    python bench/gpu_check.py                     # on a CUDA machine
    python bench/gpu_check.py --device cpu --images 32 --size 64 --classes 8 --trunks resnet34   # a smoke run
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from protoaudit.core.knn import exact_knn_torch, latents_to_patches
from protoaudit.core.losses import protopnet_loss
from protoaudit.core.model import MemberConfig, ProtoPNet
from protoaudit.core.trunks import create_trunk, trunk_info
from protoaudit.engine.data import TensorSplit
from protoaudit.engine.index.build import patch_metadata
from protoaudit.engine.index.search import PatchIndex
from protoaudit.engine.push import push_prototypes
from protoaudit.engine.train import predict

DIMS = {"vgg19": 128, "resnet34": 256, "densenet121": 128}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def epoch_seconds(step, n_batches: int, device: torch.device) -> float:  # type: ignore[no-untyped-def]
    step()  # warm-up (cudnn autotuning, allocation)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        step()
    sync(device)
    return time.perf_counter() - t0


def measure_trunk(
    name: str,
    x: torch.Tensor,
    y: torch.Tensor,
    classes: int,
    size: int,
    n_batches: int,
    device: torch.device,
    amp: bool,
) -> tuple[float, float]:
    """Seconds for n_batches joint steps of a ProtoPNet member and of the bare trunk with a linear head."""
    coefs = {"cross_entropy": 1.0, "cluster": 0.8, "separation": -0.08, "l1": 1e-4}
    member = ProtoPNet(
        MemberConfig(
            trunk=name,
            n_classes=classes,
            prototypes_per_class=10,
            prototype_dim=DIMS.get(name, 128),
            image_size=size,
        )
    )
    member = member.to(device, memory_format=torch.channels_last).train()
    member.last_layer.weight.requires_grad_(False)
    opt = torch.optim.Adam([p for p in member.parameters() if p.requires_grad], lr=1e-4)
    identity = member.class_identity()

    def member_step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits, min_d = member(x)
        loss = protopnet_loss(logits.float(), min_d, y, identity, member.last_layer.weight, coefs).total
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    bare = torch.nn.Sequential(
        create_trunk(name),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(trunk_info(name).out_channels, classes),
    )
    bare = bare.to(device, memory_format=torch.channels_last).train()
    bare_opt = torch.optim.Adam(bare.parameters(), lr=1e-4)

    def bare_step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(bare(x).float(), y)
        bare_opt.zero_grad(set_to_none=True)
        loss.backward()
        bare_opt.step()

    return epoch_seconds(member_step, n_batches, device), epoch_seconds(bare_step, n_batches, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--images", type=int, default=5994)
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--trunks", nargs="+", default=["vgg19", "resnet34", "densenet121"])
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    amp = device.type == "cuda"
    rows = []
    n_batches = max(1, args.images // args.batch)
    x = torch.rand(args.batch, 3, args.size, args.size, device=device).contiguous(
        memory_format=torch.channels_last
    )
    y = torch.randint(0, args.classes, (args.batch,), device=device)
    for name in args.trunks:
        t_member, t_bare = measure_trunk(name, x, y, args.classes, args.size, n_batches, device, amp)
        rows.append(
            {
                "check": f"epoch {name} ({n_batches * args.batch} imgs)",
                "protoaudit_s": t_member,
                "baseline_s": t_bare,
                "ratio": t_member / t_bare,
            }
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # P2 and P3 at the paper's scale of prototypes: 2000 prototypes, D = 128, 7 x 7 patches (resnet34 at 224 px)
    rng = np.random.default_rng(0)
    n = min(args.images, 2000)
    images = rng.integers(0, 256, (n, args.size, args.size, 3), dtype=np.uint8)
    labels = np.arange(n) % args.classes
    split = TensorSplit(images, labels, [f"img/{i}" for i in range(n)])
    model = (
        ProtoPNet(
            MemberConfig(
                trunk="resnet34",
                n_classes=args.classes,
                prototypes_per_class=10,
                prototype_dim=128,
                image_size=args.size,
            )
        )
        .to(device)
        .eval()
    )
    predict(model, split, 128, device)
    sync(device)
    t0 = time.perf_counter()
    predict(model, split, 128, device)
    sync(device)
    t_fwd = time.perf_counter() - t0
    kept: list[torch.Tensor] = []
    t0 = time.perf_counter()
    push_prototypes(model, split, 128, device, args.size, lambda z, _i: kept.append(z))
    sync(device)
    t_push = time.perf_counter() - t0
    rows.append(
        {
            "check": f"P2 push 2000 prototypes ({n} imgs)",
            "protoaudit_s": t_push,
            "baseline_s": t_fwd,
            "ratio": t_push / t_fwd,
        }
    )
    latents = torch.cat(kept)
    grid = tuple(latents.shape[2:])
    vectors = latents_to_patches(latents)
    import faiss

    flat = faiss.IndexFlatL2(vectors.shape[1])
    flat.add(vectors)
    info = {"member": "gpu", "split": "train", "dim": vectors.shape[1], "grid": list(grid), "kind": "flat"}
    index = PatchIndex(flat, patch_metadata(split, grid), info, Path("."), backend="torch", device=device)
    queries = model.prototype_vectors.detach().float().cpu().numpy()
    index.search(queries[:10], 6, per_image=True)  # loads the patches onto the device
    database = torch.from_numpy(vectors).to(device)
    sync(device)
    t0 = time.perf_counter()
    exact_knn_torch(database, torch.from_numpy(queries).to(device), 6)
    sync(device)
    t_bare = time.perf_counter() - t0
    t0 = time.perf_counter()
    index.search(queries, 6, per_image=True)
    sync(device)
    t_prune = time.perf_counter() - t0
    rows.append(
        {
            "check": f"P3 prune search ({len(vectors)} patches)",
            "protoaudit_s": t_prune,
            "baseline_s": t_bare,
            "ratio": t_prune / t_bare,
        }
    )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device: {name}; bf16 autocast: {amp}; channels-last; batch {args.batch}; {args.size} px; {args.classes} classes"
    )
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
