"""Building the patch index: every latent patch of a member's push and test splits, with its row metadata."""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from protoaudit.core.geometry import patch_parts, patch_parts_from_keypoints
from protoaudit.core.knn import latents_to_patches
from protoaudit.engine.index.files import (
    INDEX_FORMAT_VERSION,
    META_COLUMNS,
    META_KEY,
    SPLITS,
    index_paths,
)
from protoaudit.engine.index.search import index_status, member_names, read_index_info
from protoaudit.engine.io import atomic_write, sha256_file, write_bytes
from protoaudit.errors import CheckpointError, InputError

if TYPE_CHECKING:
    from protoaudit.core.model import ProtoPNet
    from protoaudit.engine.data import DatasetBundle, ImageSplit
    from protoaudit.engine.progress import Reporter
    from protoaudit.engine.recipe import IndexConfig
    from protoaudit.engine.run import Run


def _image_paths(split: ImageSplit) -> list[str]:
    for name in ("image_paths", "paths"):
        paths = getattr(split, name, None)
        if paths is not None and len(paths) == len(split):
            return [str(p) for p in paths]
    return [""] * len(split)


def _image_parts(split: ImageSplit, i: int, grid: tuple[int, int], image_size: int | None) -> np.ndarray:
    mask = split.part_mask(i)
    keypoints = getattr(split, "part_keypoints", None)
    if mask is None and keypoints is not None and image_size is not None:
        points = keypoints(i)
        if points is not None:
            return patch_parts_from_keypoints(points, grid, image_size)
    return patch_parts(mask, grid)


def patch_metadata(split: ImageSplit, grid: tuple[int, int], image_size: int | None = None) -> pd.DataFrame:
    """One row per patch of ``split`` (image, h, w order): the columns of :data:`META_COLUMNS`.

    ``part`` comes from the split's part masks (:func:`patch_part`), else from its part keypoints when it
    has them and ``image_size`` is given (:func:`patch_parts_from_keypoints`), else -1.
    """
    n = len(split)
    hh, ww = grid
    per = hh * ww
    parts = np.concatenate(
        [_image_parts(split, i, grid, image_size).ravel() for i in range(n)] or [np.zeros(0, np.int64)]
    )
    return pd.DataFrame(
        {
            "image_index": np.repeat(np.arange(n, dtype=np.int64), per),
            "image_id": np.repeat(np.asarray(split.image_ids, dtype=object), per),
            "image_path": np.repeat(np.asarray(_image_paths(split), dtype=object), per),
            "label": np.repeat(np.asarray(split.labels, dtype=np.int64), per),
            "h": np.tile(np.repeat(np.arange(hh, dtype=np.int64), ww), n),
            "w": np.tile(np.arange(ww, dtype=np.int64), n * hh),
            "part": parts.astype(np.int64),
        },
        columns=META_COLUMNS,
    )


@torch.no_grad()
def collect_latents(
    model: ProtoPNet,
    split: ImageSplit,
    batch_size: int,
    device: torch.device,
    workers: int = 0,
    advance: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """One forward pass: the (N, D, H, W) float32 latents of every image of ``split``, on the CPU."""
    from protoaudit.engine.data import iter_batches

    model.eval()
    parts = []
    for indices, x in iter_batches(
        split, torch.arange(len(split)), batch_size, workers, device.type == "cuda"
    ):
        parts.append(model.latent(x.to(device)).cpu())
        if advance is not None:
            advance(len(indices))
    if not parts:
        raise InputError("cannot index an empty split")
    return torch.cat(parts)


def build_faiss_index(vectors: np.ndarray, kind: str = "flat", nlist: int = 1024, nprobe: int = 16) -> Any:
    """A faiss index over (N, D) float32 ``vectors``: exact IndexFlatL2, or IndexIVFFlat (approximate).

    The IVF index uses min(nlist, N // 39) clusters (faiss wants about 39 training points per cluster),
    trained on every vector (k-means seeded, so the build is reproducible).
    """
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    index: Any
    if kind == "flat":
        index = faiss.IndexFlatL2(dim)
    elif kind == "ivf":
        lists = max(1, min(nlist, n // 39))
        quantizer = faiss.IndexFlatL2(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, lists, faiss.METRIC_L2)
        index.cp.seed = 1234
        index.train(vectors)
        index.nprobe = min(nprobe, lists)
    else:
        raise ValueError(f"index kind must be 'flat' or 'ivf', got {kind!r}")
    index.add(vectors)
    return index


def write_index(
    member_dir: str | os.PathLike[str],
    split: str,
    vectors: np.ndarray,
    meta: pd.DataFrame,
    grid: tuple[int, int],
    image_size: int,
    config: IndexConfig | None = None,
    checkpoint_sha256: str | None = None,
) -> dict[str, Any]:
    """Build and write the index of one split of a member; returns the information recorded with it.

    The faiss file is written first and the parquet file last: the parquet file records the faiss file's
    size and row count, so an interrupted build is detected as stale on load. Both writes are atomic.
    """
    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq

    member_dir = Path(member_dir)
    if len(vectors) != len(meta):
        raise ValueError(f"{len(vectors)} patches but {len(meta)} metadata rows")
    if checkpoint_sha256 is None:
        checkpoint_sha256 = sha256_file(member_dir / "model.safetensors")
    kind = config.kind if config is not None else "flat"
    t0 = time.perf_counter()
    index = build_faiss_index(
        vectors,
        kind,
        config.nlist if config is not None else 1024,
        config.nprobe if config is not None else 16,
    )
    faiss_path, meta_path = index_paths(member_dir, split)
    with atomic_write(faiss_path, "wb") as handle:  # streamed in faiss's chunks: no serialized copy in memory
        faiss.write_index(index, faiss.PyCallbackIOWriter(handle.write))  # type: ignore[attr-defined]
        faiss_bytes = handle.tell()
    info = {
        "format_version": INDEX_FORMAT_VERSION,
        "member": member_dir.name,
        "split": split,
        "checkpoint_sha256": checkpoint_sha256,
        "kind": kind,
        "metric": "squared_l2",
        "dim": int(vectors.shape[1]),
        "n_patches": len(vectors),
        "n_images": int(meta["image_index"].nunique()) if len(meta) else 0,
        "grid": list(grid),
        "image_size": int(image_size),
        "faiss_bytes": faiss_bytes,
        "nlist": int(getattr(index, "nlist", 0)),
        "nprobe": int(getattr(index, "nprobe", 0)),
        "build_seconds": time.perf_counter() - t0,
    }
    table = pa.Table.from_pandas(meta[META_COLUMNS], preserve_index=False)
    schema_meta = dict(table.schema.metadata or {})
    schema_meta.pop(b"pandas", None)  # keep the file free of pandas-version noise
    schema_meta[META_KEY] = json.dumps(info).encode()
    table = table.replace_schema_metadata(schema_meta)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    write_bytes(meta_path, buffer.getvalue())
    return info


def build_member_indexes(
    member_dir: str | os.PathLike[str],
    model: ProtoPNet,
    bundle: DatasetBundle,
    config: IndexConfig | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    workers: int = 0,
    latents: dict[str, torch.Tensor | None] | None = None,
    splits: Sequence[str] = SPLITS,
    reporter: Reporter | None = None,
) -> dict[str, dict[str, Any]]:
    """Write the index of each split of ``splits`` for one member (its ``model.safetensors`` must be saved).

    ``latents[split]``: the split's (N, D, H, W) latents when already computed (the push pass, the test
    evaluation); a split without them costs one forward pass. Returns split → recorded information.
    """
    device = torch.device(device)
    member_dir = Path(member_dir)
    sha = sha256_file(member_dir / "model.safetensors")
    out: dict[str, dict[str, Any]] = {}
    for split_name in splits:
        split = bundle.push if split_name == "train" else bundle.test
        if len(split) == 0:
            continue
        t0 = time.perf_counter()
        z = (latents or {}).get(split_name)
        passes = 0
        if z is None or len(z) != len(split):
            passes = 1
            if reporter is not None:
                with reporter.task(f"{member_dir.name} index {split_name}", len(split)) as advance:
                    z = collect_latents(model, split, batch_size, device, workers, advance)
            else:
                z = collect_latents(model, split, batch_size, device, workers)
        grid = (int(z.shape[2]), int(z.shape[3]))
        vectors = latents_to_patches(z)
        meta = patch_metadata(split, grid, bundle.image_size)
        info = write_index(member_dir, split_name, vectors, meta, grid, bundle.image_size, config, sha)
        info["seconds"] = time.perf_counter() - t0
        info["forward_passes"] = passes
        out[split_name] = info
    return out


def index_run(
    run: Run,
    members: Sequence[str] | None = None,
    splits: Sequence[str] = SPLITS,
    force: bool = False,
    device: str = "auto",
    reporter: Reporter | None = None,
) -> pd.DataFrame:
    """(Re)build the patch indexes of a run: every index that is missing or stale (all with ``force``).

    Returns one row per member and split: member, split, status (built, fresh), n_patches, seconds.
    Holds the run's lock (:func:`protoaudit.engine.run.writing`) while it works.
    """
    from protoaudit.engine.run import writing

    with writing(run.path, "index"):
        return _index_run(run, members, splits, force, device, reporter)


def _index_run(
    run: Run,
    members: Sequence[str] | None,
    splits: Sequence[str],
    force: bool,
    device: str,
    reporter: Reporter | None,
) -> pd.DataFrame:
    from protoaudit.engine.train import resolve_device

    recipe = run.recipe()
    names = list(members) if members else member_names(run)
    if not names:
        raise CheckpointError(f"run {run.path} has no member to index: no members/<name>/model.json is there")
    for name in names:
        if not (run.path / "members" / name / "model.json").is_file():
            raise InputError(
                f"run {run.path} has no member {name!r} (members: {', '.join(member_names(run))})"
            )
    for split in splits:
        if split not in SPLITS:
            raise InputError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    torch_device = resolve_device(device)
    rows: list[dict[str, Any]] = []
    bundle = None
    for name in names:
        todo = [s for s in splits if force or index_status(run, name, s) != "fresh"]
        for split in [s for s in splits if s not in todo]:
            info = read_index_info(index_paths(run.path / "members" / name, split)[1])
            rows.append(
                {
                    "member": name,
                    "split": split,
                    "status": "fresh",
                    "n_patches": info["n_patches"],
                    "seconds": 0.0,
                }
            )
        if not todo:
            continue
        if bundle is None:
            bundle = run.dataset()
        model = run.member(name, torch_device)
        built = build_member_indexes(
            run.path / "members" / name,
            model,
            bundle,
            recipe.index,
            torch_device,
            recipe.schedule.eval_batch_size,
            recipe.schedule.workers,
            splits=todo,
            reporter=reporter,
        )
        for split, info in built.items():
            rows.append(
                {
                    "member": name,
                    "split": split,
                    "status": "built",
                    "n_patches": info["n_patches"],
                    "seconds": info["seconds"],
                }
            )
            if reporter is not None:
                reporter.log(
                    f"[bold]{name}[/bold] {split}: {info['n_patches']} patches indexed in {info['seconds']:.2f} s"
                )
    return pd.DataFrame(rows, columns=["member", "split", "status", "n_patches", "seconds"])
