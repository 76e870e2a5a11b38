"""P1, P2, P6 — the cost of each ProtoPNet stage against the plain forward pass it rides on.

P1  one joint training step (CE + cluster + separation, Adam) vs the same trunk with a linear head (goal ≤ 1.10×)
P2  push (class-specific projection + the 95th-percentile boxes of every prototype) vs one eval forward pass over
    the push set (goal ≤ 1.05× on CPU)
P6  push + test pass with patch indexes + k-NN purity + global nearest patches (train and test) vs plain forward
    passes over the two splits (goal ≤ 1.1×). As ``protoaudit prune`` does, one search of the training index
    (each prototype's 10 nearest images: purity's k = 6, part purity's 10, and ``nearest_train.csv``) serves
    purity and the global analysis of the training split; the test split's nearest images (k = 5, as
    ``protoaudit global-analysis`` writes ``nearest_test.csv``) are read off the min distances its test pass
    computed for the logits, as training saves them and prune reads them (no second product).

Each stage that exceeds the forward passes it rides on is broken down: the seconds of each part of the best
run, so that what the remaining time is spent on is printed beside the ratio.

Defaults are the paper's scale of prototypes: 200 classes × 10 = 2000 prototypes, D = 128, 49 patches per image
(a 7 × 7 latent grid: the small ResNet-style trunk at 56 px). Images are generated. P1 can use a torchvision trunk
at 224 px (``--p1-trunk resnet34 --p1-size 224``).

    python bench/bench_stages.py [--images 2000] [--threads 2]
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from protoaudit.core.geometry import percentile_boxes
from protoaudit.core.knn import latents_to_patches
from protoaudit.core.losses import protopnet_loss
from protoaudit.core.model import MemberConfig, ProtoPNet
from protoaudit.core.purity import knn_class_purity, part_purity
from protoaudit.core.trunks import create_trunk, trunk_info
from protoaudit.engine.data import TensorSplit
from protoaudit.engine.index.build import build_faiss_index, patch_metadata
from protoaudit.engine.index.search import PatchIndex, nearest_images, nearest_images_from_minima
from protoaudit.engine.push import push_prototypes
from protoaudit.engine.train import predict, predict_with_latents


def best_of(repeat: int, fn):  # type: ignore[no-untyped-def]
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def interleaved(repeat: int, fns: list) -> list[float]:  # type: ignore[type-arg]
    """Run the functions in turn ``repeat`` times; the best time of each."""
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def p1(
    trunk: str, size: int, classes: int, per_class: int, dim: int, batch: int, repeat: int
) -> dict[str, float]:
    torch.manual_seed(0)
    x = torch.rand(batch, 3, size, size)
    y = torch.randint(0, classes, (batch,))
    model = ProtoPNet(
        MemberConfig(
            trunk=trunk, n_classes=classes, prototypes_per_class=per_class, prototype_dim=dim, image_size=size
        )
    )
    model.train()
    model.last_layer.weight.requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    identity = model.class_identity()
    coefs = {"cross_entropy": 1.0, "cluster": 0.8, "separation": -0.08, "l1": 1e-4}

    def protopnet_step() -> None:
        logits, min_d = model(x)
        loss = protopnet_loss(logits, min_d, y, identity, model.last_layer.weight, coefs).total
        opt.zero_grad()
        loss.backward()
        opt.step()

    base = torch.nn.Sequential(
        create_trunk(trunk),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(trunk_info(trunk).out_channels, classes),
    )
    base.train()
    base_opt = torch.optim.Adam(base.parameters(), lr=1e-4)
    mean, std = model.mean, model.std

    def linear_step() -> None:
        loss = F.cross_entropy(base((x - mean) / std), y)
        base_opt.zero_grad()
        loss.backward()
        base_opt.step()

    protopnet_step(), linear_step()  # warm up
    t_proto, _ = best_of(repeat, protopnet_step)
    t_lin, _ = best_of(repeat, linear_step)
    return {"protopnet": t_proto, "linear": t_lin}


def add_p1(rows: list[dict[str, object]], args: argparse.Namespace) -> None:
    t = p1(args.p1_trunk, args.p1_size, args.classes, args.per_class, args.dim, args.p1_batch, args.repeat)
    rows.append(
        {
            "check": f"P1 joint step, {args.p1_trunk} {args.p1_size}px batch {args.p1_batch}",
            "protoaudit_s": t["protopnet"],
            "baseline_s": t["linear"],
            "baseline": "trunk + linear head step",
            "ratio": t["protopnet"] / t["linear"],
            "goal": 1.10,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="push-set images (test set: half as many)")
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--trunk", default="tiny_resnet")
    parser.add_argument("--size", type=int, default=56)
    parser.add_argument("--p1-trunk", default="resnet34")
    parser.add_argument("--p1-size", type=int, default=224)
    parser.add_argument("--p1-batch", type=int, default=8)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-p1", action="store_true", help="skip P1 (the joint step at 224 px)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []

    if not args.no_p1:
        add_p1(rows, args)

    rng = np.random.default_rng(0)
    n_train, n_test = args.images, args.images // 2
    labels = np.arange(n_train + n_test) % args.classes
    images = rng.integers(0, 256, (n_train + n_test, args.size, args.size, 3), dtype=np.uint8)
    ids = [f"img/{i:06d}" for i in range(len(labels))]
    everything = TensorSplit(images, labels, ids)
    push_split = everything.subset(np.arange(n_train))
    test_split = everything.subset(np.arange(n_train, n_train + n_test))
    torch.manual_seed(0)
    model = ProtoPNet(
        MemberConfig(
            trunk=args.trunk,
            n_classes=args.classes,
            prototypes_per_class=args.per_class,
            prototype_dim=args.dim,
            image_size=args.size,
        )
    ).eval()
    cpu = torch.device("cpu")
    predict(model, push_split, args.batch, cpu)  # warm up

    initial = model.prototype_vectors.detach().clone()

    def push_only() -> None:
        model.prototype_vectors.data.copy_(initial)
        push_prototypes(model, push_split, args.batch, cpu, args.size)

    def fwd_train() -> None:
        predict(model, push_split, args.batch, cpu)

    def fwd_test() -> None:
        predict(model, test_split, args.batch, cpu)

    parts: dict[str, float] = {}
    best_parts: dict[str, float] = {}

    def lap(name: str, t0: float) -> float:
        now = time.perf_counter()
        parts[name] = parts.get(name, 0.0) + now - t0
        return now

    def pipeline() -> None:
        parts.clear()
        t0 = time.perf_counter()
        model.prototype_vectors.data.copy_(initial)
        kept: list[torch.Tensor] = []
        push_prototypes(model, push_split, args.batch, cpu, args.size, lambda z, _i: kept.append(z))
        train_latents = torch.cat(kept)
        t0 = lap("push pass (forward + projection + boxes)", t0)
        # the test pass that evaluates keeps the latents (the test index) and every image's min distances
        test_pass = predict_with_latents(model, test_split, args.batch, cpu)
        t0 = lap("test pass (forward, latents and min distances kept)", t0)
        grid = tuple(train_latents.shape[2:])
        indexes = {}
        for name, split, lat in (
            ("train", push_split, train_latents),
            ("test", test_split, test_pass.latents),
        ):
            vectors = latents_to_patches(lat)
            indexes[name] = PatchIndex(
                build_faiss_index(vectors),
                patch_metadata(split, grid),
                {"member": "b", "split": name, "dim": args.dim, "grid": list(grid), "kind": "flat"},
                Path("."),
            )
        t0 = lap("indexes (patches, metadata, faiss add)", t0)
        protos = model.prototype_vectors.detach()
        nearest = nearest_images(indexes["train"], protos, 10)  # purity (k = 6), part purity (10), train
        t0 = lap("train search (10 nearest images, by products)", t0)
        classes = np.asarray(model.config.prototype_class)
        knn_class_purity(nearest.first(6).column("label"), classes)
        part_purity(nearest.column("part"))
        nearest.table()  # nearest_train.csv
        t0 = lap("purity, part purity, nearest_train table", t0)
        # global analysis, test: read off the test pass's distances, as prune does (no search)
        nearest_images_from_minima(indexes["test"], protos, test_pass.min_distances, 5).table()
        lap("test nearest images (from the test pass) + table", t0)
        if not best_parts or sum(parts.values()) < sum(best_parts.values()):
            best_parts.clear()
            best_parts.update(parts)

    # interleaved, best of each: drift in the machine's load hits both sides alike
    t_fwd_train, t_fwd_test, t_push, t_pipe = interleaved(
        args.repeat, [fwd_train, fwd_test, push_only, pipeline]
    )
    rows.append(
        {
            "check": f"P2 push ({model.n_prototypes} prototypes, boxes)",
            "protoaudit_s": t_push,
            "baseline_s": t_fwd_train,
            "baseline": "eval forward over the push set",
            "ratio": t_push / t_fwd_train,
            "goal": 1.05,
        }
    )
    rows.append(
        {
            "check": "P6 push + test pass + indexes + purity + global nearest",
            "protoaudit_s": t_pipe,
            "baseline_s": t_fwd_train + t_fwd_test,
            "baseline": "eval forward over push + test sets",
            "ratio": t_pipe / (t_fwd_train + t_fwd_test),
            "goal": 1.10,
        }
    )

    table = pd.DataFrame(rows)
    table["met"] = table["ratio"] <= table["goal"]
    print(
        f"{args.classes * args.per_class} prototypes, D = {args.dim}, {args.trunk} at {args.size}px ({model.latent(torch.rand(1, 3, args.size, args.size)).shape[2]}x grid), "
        f"{n_train} push + {n_test} test images, threads = {args.threads}, best of {args.repeat}"
    )
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    maps = push_prototypes(model, push_split, args.batch, cpu, args.size).activation_maps
    t_boxes, _ = best_of(args.repeat, lambda: percentile_boxes(maps, args.size))
    print(
        f"\nP2: of the push's {t_push:.3f} s, the {model.n_prototypes} boxes (bicubic upsampling and the 95th "
        f"percentile) take {t_boxes:.3f} s ({t_boxes / t_fwd_train:.1%} of the forward pass); the rest, "
        f"{t_push - t_boxes:.3f} s, is {(t_push - t_boxes) / t_fwd_train:.3f}x the forward pass"
    )
    print(
        f"P6: where the best pipeline run spent its time (forward passes: {t_fwd_train + t_fwd_test:.3f} s)"
    )
    for name, value in best_parts.items():
        share = value / (t_fwd_train + t_fwd_test)
        print(f"  {name:52s} {value:9.3f} s  {share:6.1%} of the forward passes")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
