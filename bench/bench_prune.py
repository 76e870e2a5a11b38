"""P3 — prune from the push cache vs a bare FAISS flat search of the same sizes, and vs a re-enactment of the
original code's per-image × per-prototype loop.

At the paper's scale of prototypes by default: 2000 prototypes (200 classes × 10), D = 128, 49 patches per image
(7 × 7), 6000 training images (CUB's 5994), k = 6, τ = 3. Latent patches are generated (uniform in (0, 1) like
the sigmoid output); each prototype is a perturbed copy of a patch of an image of its class, as after push.

    python bench/bench_prune.py [--images 6000] [--threads 2]

Prints one table: seconds for each path, and ratios measured side by side in this run.
"""

from __future__ import annotations

import argparse
import heapq
import resource
import time
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import torch

from protoaudit.core.purity import knn_class_purity, prune_decision
from protoaudit.engine.index.search import PatchIndex


def best_of(repeat: int, fn):  # type: ignore[no-untyped-def]
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def original_loop(
    latents: np.ndarray,
    labels: np.ndarray,
    prototypes: np.ndarray,
    proto_class: np.ndarray,
    k: int,
    batch: int,
) -> np.ndarray:
    """The original prune.py's search, on cached latents: per batch, the distance maps of all prototypes; then a
    Python loop over images × prototypes keeping each prototype's k nearest images in a heap."""
    m = len(prototypes)
    heaps: list[list[tuple[float, int]]] = [[] for _ in range(m)]
    p = torch.from_numpy(prototypes)
    p2 = (p * p).sum(1)
    for start in range(0, len(latents), batch):
        z = torch.from_numpy(latents[start : start + batch])  # (B, HW, D)
        d = torch.clamp((z * z).sum(-1, keepdim=True) - 2 * z @ p.t() + p2, min=0).numpy()  # (B, HW, m)
        for b in range(len(z)):
            image = start + b
            for j in range(m):
                closest = -float(np.amin(d[b, :, j]))
                if len(heaps[j]) < k:
                    heapq.heappush(heaps[j], (closest, image))
                else:
                    heapq.heappushpop(heaps[j], (closest, image))
    neighbours = np.array([[labels[i] for _, i in sorted(h, reverse=True)] for h in heaps])
    return knn_class_purity(neighbours, proto_class)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--grid", type=int, default=7)
    parser.add_argument("--k", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--skip-original", action="store_true", help="skip the slow per-image × per-prototype loop"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)

    rng = np.random.default_rng(0)
    hw = args.grid * args.grid
    n, m = args.images, args.classes * args.per_class
    labels = np.arange(n) % args.classes
    latents = rng.random((n, hw, args.dim), dtype=np.float32)
    proto_class = np.arange(m) // args.per_class
    sources = np.array([rng.choice(np.flatnonzero(labels == c)) for c in proto_class])
    prototypes = latents[sources, rng.integers(0, hw, m)] + rng.normal(0, 0.05, (m, args.dim)).astype(
        np.float32
    )
    vectors = latents.reshape(-1, args.dim)
    meta = pd.DataFrame(
        {
            "image_index": np.repeat(np.arange(n), hw),
            "label": np.repeat(labels, hw),
            "h": np.tile(np.repeat(np.arange(args.grid), args.grid), n),
            "w": np.tile(np.arange(args.grid), n * args.grid),
        }
    )
    index = faiss.IndexFlatL2(args.dim)
    index.add(vectors)
    patch_index = PatchIndex(
        index,
        meta,
        {
            "member": "bench",
            "split": "train",
            "dim": args.dim,
            "grid": [args.grid, args.grid],
            "kind": "flat",
        },
        Path("."),
    )

    bare_s, _ = best_of(args.repeat, lambda: index.search(prototypes, args.k))

    def ours() -> np.ndarray:
        _, rows = patch_index.search(prototypes, args.k, per_image=True)
        purity = knn_class_purity(labels[meta["image_index"].to_numpy()[rows]], proto_class)
        prune_decision(purity, 3)
        return purity

    ours_s, purity = best_of(args.repeat, ours)
    rows = [
        {"path": "bare FAISS flat search (k patches)", "seconds": bare_s, "ratio_to_bare": 1.0},
        {
            "path": "protoaudit prune search (k images, one patch each) + purity",
            "seconds": ours_s,
            "ratio_to_bare": ours_s / bare_s,
        },
    ]
    if not args.skip_original:
        orig_s, orig_purity = best_of(
            1, lambda: original_loop(latents, labels, prototypes, proto_class, args.k, 100)
        )
        agree = float((orig_purity == purity).mean())
        rows.append(
            {
                "path": "original per-image x per-prototype loop (cached latents)",
                "seconds": orig_s,
                "ratio_to_bare": orig_s / bare_s,
            }
        )
    table = pd.DataFrame(rows)
    print(
        f"P3 prune search: {n} images x {hw} patches = {n * hw} patches, {m} prototypes, D = {args.dim}, k = {args.k}, threads = {args.threads}"
    )
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if not args.skip_original:
        print(
            f"original loop / protoaudit: {orig_s / ours_s:.1f}x; purity agreement with the original loop: {agree:.4f}"
        )
    print(f"goal: protoaudit / bare <= 1.5 -> {'met' if ours_s / bare_s <= 1.5 else 'NOT met'}")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
