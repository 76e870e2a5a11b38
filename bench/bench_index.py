"""Patch index: build time on the quick start, query latency against 300k patches, flat FAISS vs torch.

1. Quick start (a trained run, default reports/quickstart): per member, the time to build both indexes from
   latents already in memory (what training does at its end, no forward pass), the time of a standalone
   rebuild (``protoaudit index --force``: one forward pass per split, then the build), and the index seconds
   the run recorded during training.
2. 300k patches (random (0, 1) vectors, as the sigmoid outputs; 6123 images × 7 × 7, D = 128 as VGG/CUB and
   D = 32 as the quick start): p50 latency of one query of each kind through ``PatchIndex.search``:
   one prototype → its 10 nearest patches; one prototype → its 6 nearest images (one patch per image, as
   pruning asks); one image's 49 patches → each one's 5 nearest patches; and one image's nearest prototypes
   (its latent map against 2000 prototypes, the ``nearest-prototypes`` query, which needs no index).
   The one-image queries of the command line (``nearest-patches``) take the interactive path on a CPU:
   exact search by one BLAS product per database chunk and a partial top-k (``resolve_backend``); both
   paths are timed, and the bare matrix product beside them.
3. The same query batch (256 queries, k = 10) through flat FAISS and through a brute-force torch k-NN
   (‖q‖² − 2 q·x + ‖x‖² and top-k over chunks): seconds and their ratio, and how often the answers agree.

    python bench/bench_index.py [--run reports/quickstart] [--threads 1] [--patches 300000]

Prints numbers side by side, measured in this one run.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import torch


def p50(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def quickstart(run_dir: Path) -> None:
    from protoaudit.engine.index.build import build_member_indexes, collect_latents, index_run
    from protoaudit.engine.run import load_run

    print(f"\n== 1. index build on the quick start ({run_dir}) ==")
    if not (run_dir / "run.json").is_file():
        print(f"no run at {run_dir}: train it first (protoaudit train-ensemble recipes/quickstart.toml)")
        return
    run = load_run(run_dir)
    bundle = run.dataset()
    recipe = run.recipe()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / run_dir.name
        shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("patches*", "nearest*", "explain"))
        for name in run.member_names:
            model = run.member(name)
            t0 = time.perf_counter()
            latents = {
                "train": collect_latents(model, bundle.push, 256, torch.device("cpu")),
                "test": collect_latents(model, bundle.test, 256, torch.device("cpu")),
            }
            forward = time.perf_counter() - t0
            t0 = time.perf_counter()
            info = build_member_indexes(copy / "members" / name, model, bundle, recipe.index, latents=latents)
            from_latents = time.perf_counter() - t0
            recorded = run.meta.get("timings", {}).get(name, {}).get("index", float("nan"))
            rows.append(
                {
                    "member": name,
                    "patches (train + test)": sum(i["n_patches"] for i in info.values()),
                    "D": info["train"]["dim"],
                    "build from latents s": from_latents,
                    "forward passes s": forward,
                    "recorded in training s": recorded,
                }
            )
        t0 = time.perf_counter()
        index_run(load_run(copy), force=True, device="cpu")
        rebuild = time.perf_counter() - t0
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(
        f"standalone rebuild of every index (protoaudit index --force, forward passes included): {rebuild:.2f} s"
    )

    from protoaudit.core.model import ProtoPNet
    from protoaudit.engine.explain import explain_image
    from protoaudit.engine.index.queries import (
        image_latents,
        load_query_image,
        nearest_patches_to_image,
        nearest_prototypes_to_image,
    )

    query = load_query_image(run, bundle.test.image_ids[0], bundle)
    member = run.member_names[0]
    to_protos = p50(lambda: nearest_prototypes_to_image(run, query, 3), 20)
    to_patches = p50(lambda: nearest_patches_to_image(run, query, member, 3), 20)
    explain = p50(lambda: explain_image(run, query, top_classes=3, bundle=bundle), 10)
    models: list[ProtoPNet] = [run.member(name) for name in run.member_names]
    forward = p50(lambda: [image_latents(m, query) for m in models], 20)
    print(
        f"one test image, end to end (members loaded): one forward pass of every member "
        f"({len(models)}) p50 {1e3 * forward:.1f} ms; nearest prototypes of all members p50 "
        f"{1e3 * to_protos:.1f} ms; explain (reasoning sheet) p50 {1e3 * explain:.1f} ms; nearest training "
        f"patches ({member}, index loaded per call) p50 {1e3 * to_patches:.1f} ms"
    )


def large(n_patches: int, dim: int, repeat: int, seed: int = 0) -> dict[str, float]:
    from protoaudit.core.knn import exact_knn_torch
    from protoaudit.engine.index.search import PatchIndex

    rng = np.random.default_rng(seed)
    grid = 7
    n_images = -(-n_patches // (grid * grid))
    n = n_images * grid * grid
    vectors = rng.random((n, dim), dtype=np.float32)
    meta = pd.DataFrame(
        {
            "image_index": np.repeat(np.arange(n_images), grid * grid),
            "image_id": "",
            "image_path": "",
            "label": np.repeat(rng.integers(0, 200, n_images), grid * grid),
            "h": np.tile(np.repeat(np.arange(grid), grid), n_images),
            "w": np.tile(np.arange(grid), n_images * grid),
            "part": -1,
        }
    )
    t0 = time.perf_counter()
    flat = faiss.IndexFlatL2(dim)
    flat.add(vectors)
    build = time.perf_counter() - t0
    info = {"member": "bench", "split": "train", "dim": dim, "grid": [grid, grid], "kind": "flat"}
    index = PatchIndex(flat, meta, info, Path("."), "faiss")
    interactive = PatchIndex(flat, meta, info, Path("."), "torch")  # what the one-image queries use on a CPU
    prototype = vectors[12345:12346] + rng.normal(0, 0.01, (1, dim)).astype(np.float32)
    image = vectors[49 * 77 : 49 * 78]  # the 49 patches of one image
    prototypes = torch.from_numpy(rng.random((2000, dim), dtype=np.float32))
    latent_map = torch.from_numpy(image.T.reshape(1, dim, grid, grid).copy())

    def nearest_prototypes() -> None:
        from protoaudit.core.model import squared_distances

        d = squared_distances(latent_map, prototypes)[0]  # (m, H, W)
        d.permute(1, 2, 0).reshape(grid * grid, -1).topk(3, dim=1, largest=False)

    out = {
        "patches": float(n),
        "D": float(dim),
        "build s": build,
        "1 prototype → 10 patches ms": 1e3 * p50(lambda: index.search(prototype, 10), repeat),
        "1 prototype → 6 images ms": 1e3 * p50(lambda: index.search(prototype, 6, per_image=True), repeat),
        "1 image (49 patches) → 5 patches each ms": 1e3 * p50(lambda: index.search(image, 5), repeat),
        "  the same, interactive path (BLAS, exact) ms": 1e3
        * p50(lambda: interactive.search(image, 5), repeat),
        "  its matrix product alone ms": 1e3
        * p50(lambda: torch.from_numpy(image) @ interactive._database.T, repeat),  # type: ignore[union-attr]
        "1 prototype → 6 images, interactive ms": 1e3
        * p50(lambda: interactive.search(prototype, 6, per_image=True), repeat),
        "1 image → nearest of 2000 prototypes ms": 1e3 * p50(nearest_prototypes, repeat),
    }
    # the same batch through flat FAISS and a brute-force torch k-NN
    batch = np.ascontiguousarray(vectors[rng.choice(n, 256, replace=False)] + 0.01, dtype=np.float32)
    database = torch.from_numpy(vectors)
    norms = (database * database).sum(1)
    queries = torch.from_numpy(batch)

    def brute() -> tuple[torch.Tensor, torch.Tensor]:
        qn = (queries * queries).sum(1, keepdim=True)
        best_d, best_i = [], []
        for start in range(0, n, 1 << 16):
            d = (
                qn - 2 * queries @ database[start : start + (1 << 16)].T + norms[start : start + (1 << 16)]
            ).clamp_(min=0)
            dd, ii = d.topk(10, dim=1, largest=False)
            best_d.append(dd)
            best_i.append(ii + start)
        dd, sel = torch.cat(best_d, 1).topk(10, dim=1, largest=False)
        return dd, torch.cat(best_i, 1).gather(1, sel)

    t_faiss = p50(lambda: flat.search(batch, 10), max(3, repeat // 10))
    t_torch = p50(brute, max(3, repeat // 10))
    t_torch_exact = p50(lambda: exact_knn_torch(database, queries, 10, norms), max(3, repeat // 10))
    _, rows_faiss = flat.search(batch, 10)
    _, rows_torch = brute()
    _, rows_exact = exact_knn_torch(database, queries, 10, norms)
    out.update(
        {
            "batch 256×k10 faiss flat s": t_faiss,
            "batch 256×k10 torch brute force s": t_torch,
            "torch / faiss": t_torch / t_faiss,
            "batch 256×k10 torch backend (refined) s": t_torch_exact,
            "ids agree faiss vs torch": float((rows_faiss == rows_torch.numpy()).mean()),
            "ids agree faiss vs torch backend": float((rows_faiss == rows_exact.numpy()).mean()),
        }
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("reports/quickstart"))
    parser.add_argument("--patches", type=int, default=300_000)
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 32])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    print(
        f"threads: torch {torch.get_num_threads()}, faiss {faiss.omp_get_max_threads()}; faiss {faiss.__version__}"
    )
    quickstart(args.run)
    print(f"\n== 2–3. queries against {args.patches} random patches (p50 of {args.repeat}) ==")
    table = pd.DataFrame([large(args.patches, dim, args.repeat) for dim in args.dims]).T
    table.columns = [f"D = {d}" for d in args.dims]
    print(table.to_string(float_format=lambda v: f"{v:.4g}"))


if __name__ == "__main__":
    main()
