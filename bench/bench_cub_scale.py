"""The audit at CUB-200-2011's size, from synthetic latents: every stage's seconds against the bare FAISS searches
it needs, and peak memory.

CUB's split: 5,994 training and 5,794 test images, 200 classes; a 7 × 7 latent grid (49 patches per image),
D = 128, 2000 prototypes per member (10 per class), 3 members. The latents are generated (class centres plus
noise, in (0, 1) like the add-on's sigmoid), and each prototype is one of its class's training patches, as after
push. Per member, one member at a time (as ``protoaudit prune`` works):

  index build    patches → faiss flat index + parquet metadata, written (``write_index``), both splits
  prune search   the index read back and each prototype's 10 nearest training images (``nearest_images``:
                 purity's k = 6, part purity's 10 and ``nearest_train.csv`` share it), keeping every training
                 image's distance to every prototype (the detectors' and the last-layer retune's input)
  purity         k-NN class purity, the pruning decision, purity.csv's columns
  audit          the ground-truth part at each source patch, PIP-Net part purity, pruning precision / recall
                 (consistency and stability need the images: not part of this benchmark)
  test nearest   the test index read back (its metadata and the patches of the chosen images) and each
                 prototype's 10 nearest test images read off every test image's distance to every prototype
                 (the detectors' input), which training's test pass saved (test_distances.safetensors) — as
                 ``protoaudit prune`` does; those distances are made here by one product outside the clock
  global         nearest_train.csv / nearest_test.csv from prune's two searches (``protoaudit prune`` writes
                 them with their records; ``global-analysis`` then reuses them instead of searching)
  report         what the report does per member: nearest_train.csv read back, prototype rows, and the
                 thumbnails of the default budget (up to ``ReportOptions.max_thumbnails`` prototypes per member
                 and ``thumbnail_bytes`` in all: the source image with its box and the cells of its 6 nearest
                 patches) encoded as the report encodes them

The baseline is the bare searches those stages need: per member one faiss ``search`` of the prototypes in the
training index (k = 10) and one in the test index (k = 5). Printed beside it, not in the audit's total: the
last-layer fine-tuning's input (every push image's distance to every kept prototype), which ``protoaudit
prune`` takes from the prune search's distances (a column selection), and for reference what computing it
again from the stored patches costs (``min_distances_by_image``, as prune did before). The report's size is estimated from the encoded
thumbnails (base64, as inlined) plus the members' rows as JSON; the synthetic images are smooth noise at
224 px, which PNG compresses better than photographs, so real CUB thumbnails weigh more.

    python bench/bench_cub_scale.py [--threads 2] [--small]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import torch

from protoaudit.core.knn import min_distances_by_image
from protoaudit.core.purity import knn_class_purity, part_purity, precision_recall, prune_decision
from protoaudit.engine.analysis import NEAREST_COLUMNS
from protoaudit.engine.index.build import write_index
from protoaudit.engine.index.files import META_COLUMNS
from protoaudit.engine.index.search import load_index, nearest_images, nearest_images_from_minima
from protoaudit.engine.io import load_tensors, save_tensors
from protoaudit.engine.run import write_csv
from protoaudit.report.build import ReportOptions
from protoaudit.report.images import box_thumbnail, patch_thumbnail

GRID = (7, 7)
IMAGE_SIZE = 224
N_PARTS = 15  # CUB's part locations


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic_split(
    rng: np.random.Generator, n: int, classes: int, dim: int, centres: np.ndarray
) -> tuple[np.ndarray, pd.DataFrame]:
    """(n·49, D) float32 patches in (0, 1) (image, h, w order) and their metadata rows."""
    per = GRID[0] * GRID[1]
    labels = np.arange(n) % classes
    vectors = np.empty((n * per, dim), dtype=np.float32)
    for start in range(0, n, 512):  # in blocks, to keep the temporaries small
        stop = min(n, start + 512)
        block = rng.normal(0.0, 0.35, (stop - start, per, dim)).astype(np.float32)
        background = rng.random((stop - start, per)) < 0.4
        block += np.where(background[..., None], 0.0, centres[labels[start:stop]][:, None, :])
        vectors[start * per : stop * per] = (1.0 / (1.0 + np.exp(-block))).reshape(-1, dim)
    parts = np.where(rng.random(n * per) < 0.4, 0, rng.integers(1, N_PARTS + 1, n * per))
    meta = pd.DataFrame(
        {
            "image_index": np.repeat(np.arange(n, dtype=np.int64), per),
            "image_id": np.repeat(np.asarray([f"{i:05d}.jpg" for i in range(n)], dtype=object), per),
            "image_path": "",
            "label": np.repeat(labels.astype(np.int64), per),
            "h": np.tile(np.repeat(np.arange(GRID[0], dtype=np.int64), GRID[1]), n),
            "w": np.tile(np.arange(GRID[1], dtype=np.int64), n * GRID[0]),
            "part": parts.astype(np.int64),
        },
        columns=META_COLUMNS,
    )
    return vectors, meta


def synthetic_image(index: int) -> np.ndarray:
    """(224, 224, 3) uint8: smooth noise (bilinear from 14 × 14) with a little grain, the same for an index."""
    rng = np.random.default_rng(index)
    coarse = torch.from_numpy(rng.random((1, 3, 14, 14), dtype=np.float32))
    smooth = torch.nn.functional.interpolate(coarse, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear")[0]
    grain = rng.normal(0, 0.03, (3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    pixels = np.clip((smooth.numpy() + grain) * 255, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(pixels.transpose(1, 2, 0))


class Clock:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.peak: dict[str, float] = {}

    def add(self, stage: str, t0: float) -> float:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - t0
        self.peak[stage] = peak_mib()
        return now


def audit_member(
    root: Path,
    name: str,
    rng: np.random.Generator,
    args: argparse.Namespace,
    clock: Clock,
    size: dict[str, int],
) -> dict[str, float]:
    m = args.classes * args.per_class
    centres = rng.normal(0.0, 1.0, (args.classes, args.dim)).astype(np.float32)
    train_vectors, train_meta = synthetic_split(rng, args.train, args.classes, args.dim, centres)
    test_vectors, test_meta = synthetic_split(rng, args.test, args.classes, args.dim, centres)
    proto_class = np.repeat(np.arange(args.classes), args.per_class)
    per = GRID[0] * GRID[1]
    # push: each prototype is a patch of a training image of its class
    source = np.array([rng.choice(np.arange(k, args.train, args.classes)) for k in proto_class])
    cell = rng.integers(0, per, m)
    prototypes = train_vectors[source * per + cell].copy()
    member_dir = root / "members" / name
    member_dir.mkdir(parents=True)
    (member_dir / "model.json").write_text("{}")

    t0 = time.perf_counter()
    for split, vectors, meta in (("train", train_vectors, train_meta), ("test", test_vectors, test_meta)):
        write_index(member_dir, split, vectors, meta, GRID, IMAGE_SIZE, checkpoint_sha256="synthetic")
    t0 = clock.add("index build (both splits, written)", t0)
    del test_vectors

    index = load_index(root, name, "train", backend="faiss", check=False)
    nearest = nearest_images(index, prototypes, 10, with_minima=True)
    t0 = clock.add("prune search (10 nearest training images, every image's distances)", t0)

    near6 = nearest.first(6)
    labels = near6.column("label")
    purity = knn_class_purity(labels, proto_class)
    pruned = prune_decision(purity, 3)
    image_ids = index.meta["image_id"].to_numpy()[np.maximum(near6.rows, 0)]
    valid = near6.rows >= 0
    table = pd.DataFrame(
        {
            "member": name,
            "prototype": np.arange(m),
            "class": proto_class,
            "purity": purity,
            "k": 6,
            "nearest_image_ids": [
                ";".join(str(i) for i, ok in zip(ids, v, strict=True) if ok)
                for ids, v in zip(image_ids, valid, strict=True)
            ],
            "nearest_classes": [";".join(str(c) for c in row[row >= 0]) for row in labels],
            "nearest_distance": np.where(valid[:, 0], near6.distances[:, 0], np.nan),
            "pruned": pruned,
        }
    )
    t0 = clock.add("purity (k = 6, tau = 3) and its table", t0)

    meta = index.meta
    key = pd.MultiIndex.from_arrays([meta["image_index"], meta["h"], meta["w"]])
    lookup = pd.Series(np.arange(len(meta)), index=key)
    src_rows = lookup.reindex(pd.MultiIndex.from_arrays([source, cell // GRID[1], cell % GRID[1]]))
    part_col = meta["part"].to_numpy()
    source_part = part_col[src_rows.to_numpy().astype(np.int64)]
    table["source_part"] = source_part
    table["nearest_parts"] = [";".join(str(part_col[r]) for r in row if r >= 0) for row in near6.rows]
    table["part_purity"] = part_purity(nearest.column("part"))
    precision_recall(pruned, source_part == 0)
    write_csv(root / f"purity_{name}.csv", table)
    t0 = clock.add("ground-truth audit (parts, part purity, precision)", t0)

    # the test pass of training computed every test image's distance to every prototype for the logits and
    # saved them (members/<m>/test_distances.safetensors); here the same numbers come from one product, made
    # outside the audit's clock as training's are
    test_index = load_index(root, name, "test", backend="faiss", check=False)
    made = nearest_images(test_index, prototypes, 1, with_minima=True).min_distances
    assert made is not None
    save_tensors(member_dir / "test_distances.safetensors", {"min_distances": made})
    del made, test_index
    t0 = time.perf_counter()
    test_index = load_index(root, name, "test", backend="faiss", check=False)
    saved = load_tensors(member_dir / "test_distances.safetensors")["min_distances"]
    nearest_test = nearest_images_from_minima(test_index, prototypes, saved, 10)
    t0 = clock.add("test nearest images (the test pass's saved distances read off)", t0)

    write_csv(member_dir / "nearest_train.csv", nearest.table()[NEAREST_COLUMNS])
    write_csv(member_dir / "nearest_test.csv", nearest_test.table()[NEAREST_COLUMNS])
    t0 = clock.add("global analysis (both CSVs, from prune's search and the test pass)", t0)

    options = ReportOptions()
    frame = pd.read_csv(member_dir / "nearest_train.csv")
    shown = frame.sort_values(["prototype", "rank"], kind="stable").groupby("prototype").head(options.nearest)
    rows = shown.astype(object).to_dict(orient="records")
    thumbs: dict[str, int] = {}
    budget = min(options.max_thumbnails, m)
    images: dict[int, np.ndarray] = {}

    def image(i: int) -> np.ndarray:
        if i not in images:
            images[i] = synthetic_image(i)
        return images[i]

    by_prototype: dict[int, list[dict[str, object]]] = {}
    for r in rows:
        by_prototype.setdefault(int(r["prototype"]), []).append(r)  # type: ignore[call-overload]
    spent = size["thumbnail_bytes"]
    for j in range(budget):  # as the report: prototype by prototype until the byte budget is spent
        if spent >= options.thumbnail_bytes:
            break
        made = {f"push/{source[j]}/box": lambda j=j: box_thumbnail(image(int(source[j])), (40, 120, 60, 150))}
        for r in by_prototype.get(j, []):
            i, h, w = int(r["image_index"]), int(r["h"]), int(r["w"])  # type: ignore[call-overload]
            made[f"push/{i}/cell/{h}-{w}"] = lambda i=i, h=h, w=w: patch_thumbnail(image(i), h, w, GRID)
        for key_, make in made.items():
            if key_ not in thumbs:
                thumbs[key_] = -(-4 * len(make()) // 3) + 22  # the base64 data URI
                spent += thumbs[key_]
        size["prototypes_shown"] += 1
    t0 = clock.add("report (rows, thumbnails of the default budget)", t0)
    size["thumbnails"] += len(thumbs)
    size["thumbnail_bytes"] += sum(thumbs.values())
    size["rows_bytes"] += len(json.dumps(table.astype(object).where(table.notna(), None).to_dict("records")))
    size["rows_bytes"] += len(json.dumps(rows, default=str))

    # the bare searches the stages above need, for the ratio
    bare = {}
    t = time.perf_counter()
    index.index.search(prototypes, 10)
    bare["train"] = time.perf_counter() - t
    t = time.perf_counter()
    test_index.index.search(prototypes, 5)
    bare["test"] = time.perf_counter() - t
    clock.peak["bare searches"] = peak_mib()

    # beside the audit: the last-layer fine-tuning's input, as prune takes it and as computed again
    t = time.perf_counter()
    assert nearest.min_distances is not None
    nearest.min_distances[:, torch.from_numpy(~pruned)].contiguous()
    bare["last layer input"] = time.perf_counter() - t
    t = time.perf_counter()
    min_distances_by_image(
        torch.from_numpy(index.vectors()),
        torch.tensor(meta["image_index"].to_numpy()),
        args.train,
        torch.from_numpy(prototypes[~pruned]),
    )
    bare["recomputed"] = time.perf_counter() - t
    clock.peak["last layer input"] = peak_mib()
    return bare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=5994)
    parser.add_argument("--test", type=int, default=5794)
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--small", action="store_true", help="a smoke run: 600 + 580 images, 20 classes")
    args = parser.parse_args()
    if args.small:
        args.train, args.test, args.classes, args.members = 600, 580, 20, 2
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    clock = Clock()
    bare: dict[str, float] = {"train": 0.0, "test": 0.0, "last layer input": 0.0, "recomputed": 0.0}
    size = {"thumbnails": 0, "thumbnail_bytes": 0, "rows_bytes": 0, "prototypes_shown": 0}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.members):
            for key, value in audit_member(Path(tmp), f"member{i}", rng, args, clock, size).items():
                bare[key] += value
            so_far = ", ".join(f"{k} {v:.1f}" for k, v in clock.seconds.items())
            print(
                f"after member {i + 1}: {so_far}; bare searches {bare['train'] + bare['test']:.1f} s",
                flush=True,
            )
    wall = time.perf_counter() - started
    searches = bare["train"] + bare["test"]
    m = args.classes * args.per_class
    print(
        f"{args.members} members × {m} prototypes, D = {args.dim}, {args.train} train + {args.test} test images "
        f"× {GRID[0] * GRID[1]} patches, threads = {args.threads}; faiss {faiss.__version__}"
    )
    rows = [
        {"stage": stage, "seconds": s, "x bare searches": s / searches, "peak RSS MiB": clock.peak[stage]}
        for stage, s in clock.seconds.items()
    ]
    total = sum(clock.seconds.values())
    rows.append(
        {
            "stage": "whole audit (goal <= 1.5x the bare searches)",
            "seconds": total,
            "x bare searches": total / searches,
            "peak RSS MiB": peak_mib(),
        }
    )
    rows.append(
        {
            "stage": "bare faiss searches (train k = 10, test k = 5)",
            "seconds": searches,
            "x bare searches": 1.0,
            "peak RSS MiB": clock.peak["bare searches"],
        }
    )
    rows.append(
        {
            "stage": "beside it: last-layer input (the prune search's distances)",
            "seconds": bare["last layer input"],
            "x bare searches": bare["last layer input"] / searches,
            "peak RSS MiB": clock.peak["last layer input"],
        }
    )
    rows.append(
        {
            "stage": "  the same recomputed from the patches (min_distances_by_image)",
            "seconds": bare["recomputed"],
            "x bare searches": bare["recomputed"] / searches,
            "peak RSS MiB": clock.peak["last layer input"],
        }
    )
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    mib = (size["thumbnail_bytes"] + size["rows_bytes"]) / 2**20
    print(
        f"report size estimate: {size['thumbnails']} thumbnails ({size['thumbnail_bytes'] / 2**20:.1f} MiB as "
        f"data URIs) + prototype rows ({size['rows_bytes'] / 2**20:.1f} MiB JSON) = {mib:.1f} MiB "
        f"(goal <= 10 MB; {size['prototypes_shown']} prototypes with thumbnails: max_thumbnails = "
        f"{ReportOptions().max_thumbnails} per member, thumbnail_bytes = {ReportOptions().thumbnail_bytes >> 20} MiB)"
    )
    print(f"peak RSS {peak_mib():.0f} MiB (goal <= 6 GB); wall {wall:.1f} s (synthetic latents included)")


if __name__ == "__main__":
    main()
