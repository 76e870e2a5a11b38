"""The patch index: every latent patch of a member's push (training) and test splits, searchable with FAISS.

A *patch* is one (D,) float32 column z[:, h, w] of the latent map z = f(x) (N, D, H, W) that prototypes are
compared with (paper §2.1). Per member and split the index is two files::

    members/<m>/patches.faiss       + patches.parquet        the push (training) split
    members/<m>/patches_test.faiss  + patches_test.parquet   the test split

Row r of the FAISS index is row r of the parquet table: ``image_index`` (into the split), ``image_id``,
``image_path`` ("" for images held in memory), ``label``, ``h``, ``w`` and ``part`` (the ground-truth part at the
patch, see :func:`patch_part`; -1 when the dataset has no part annotation). Rows are ordered image by image,
then h, then w. Distances are squared L2, the distance prototypes use.

The parquet schema metadata records the checkpoint the index was built from (sha256 of the member's
``model.safetensors``); :func:`load_index` refuses a stale index with :class:`StaleIndexError`.

The index is built at the end of training from the latents the push pass already computed (the selected
epoch's push pass: the last-layer stage does not change them) and the latents of the pass that evaluates the
member on the test split, so building it costs no extra forward pass. ``protoaudit index RUN`` rebuilds it
with one forward pass per split.

Search backends (identical results for the exact ``flat`` index):

* ``faiss``: faiss on the CPU (the default without CUDA);
* ``faiss-gpu``: a GPU-enabled faiss when CUDA exists and faiss was built with GPU support;
* ``torch``: exact k-NN in torch (on the GPU when CUDA exists, else the CPU), ties broken by the lower row.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import torch

from protoaudit.engine.io import sha256_file, write_bytes
from protoaudit.errors import CheckpointError, InputError, StaleIndexError

if TYPE_CHECKING:
    from protoaudit.core.model import ProtoPNet
    from protoaudit.engine.data import DatasetBundle, ImageSplit
    from protoaudit.engine.progress import Reporter
    from protoaudit.engine.recipe import IndexConfig
    from protoaudit.engine.run import Run

INDEX_FORMAT_VERSION = 1
SPLITS = ("train", "test")
FILES = {
    "train": ("patches.faiss", "patches.parquet"),
    "test": ("patches_test.faiss", "patches_test.parquet"),
}
META_KEY = b"protoaudit.index"
META_COLUMNS = ["image_index", "image_id", "image_path", "label", "h", "w", "part"]
PART_MIN_FRACTION = 0.25
GPU_FAISS_MAX_K = 2048  # GPU faiss answers at most this many neighbours per query
Backend = Literal["auto", "faiss", "faiss-gpu", "torch"]


# -- the part at a patch -------------------------------------------------------------------------------


def _cell_edges(size: int, cells: int) -> np.ndarray:
    """(cells + 1,) int64 pixel edges splitting ``size`` pixels into ``cells`` nearly equal cells."""
    return (np.arange(cells + 1) * size) // cells


def _neighbourhood(edges: np.ndarray, i: int, size: int) -> tuple[int, int]:
    """Pixel range of cell i widened by half a cell on each side, clipped to the image."""
    half = (edges[i + 1] - edges[i]) // 2
    return max(0, int(edges[i] - half)), min(size, int(edges[i + 1] + half))


def patch_parts(
    mask: np.ndarray | None, grid: int | tuple[int, int], min_fraction: float = PART_MIN_FRACTION
) -> np.ndarray:
    """The ground-truth part at every patch of an image, by :func:`patch_part`'s definition.

    mask: (S, S) uint8 part id per pixel (0 = background) or None → (H, W) int64 (all -1 when ``mask`` is None).
    """
    hh, ww = (grid, grid) if isinstance(grid, int) else grid
    if mask is None:
        return np.full((hh, ww), -1, dtype=np.int64)
    mask = np.asarray(mask)
    ys, xs = _cell_edges(mask.shape[0], hh), _cell_edges(mask.shape[1], ww)
    out = np.zeros((hh, ww), dtype=np.int64)
    n_ids = int(mask.max()) + 1
    for h in range(hh):
        y0, y1 = _neighbourhood(ys, h, mask.shape[0])
        for w in range(ww):
            x0, x1 = _neighbourhood(xs, w, mask.shape[1])
            counts = np.bincount(mask[y0:y1, x0:x1].ravel(), minlength=n_ids)
            counts[0] = 0  # background never wins against a part
            best = int(counts.argmax())
            cell_area = (ys[h + 1] - ys[h]) * (xs[w + 1] - xs[w])
            if counts[best] > 0 and counts[best] >= min_fraction * cell_area:
                out[h, w] = best
    return out


def patch_part(
    mask: np.ndarray | None,
    h: int,
    w: int,
    grid: int | tuple[int, int],
    min_fraction: float = PART_MIN_FRACTION,
) -> int:
    """The ground-truth part "at" latent patch (h, w) of an image, or -1 when the image has no part mask.

    The patch's *cell* is its share of the input image under the latent grid: rows ⌊h·S/H⌋ … ⌊(h+1)·S/H⌋ − 1
    and columns ⌊w·S/W⌋ … ⌊(w+1)·S/W⌋ − 1. A latent patch sees far more than its cell (its receptive field
    spans several cells) and a part rarely falls on cell boundaries, so the part is looked for in the cell's
    neighbourhood: the cell widened by half a cell on each side. The part at the patch is the most frequent
    non-background part id there (ties: the lower id) when it covers at least ``min_fraction`` (default 1/4) of
    a cell's area, else 0 (background).

    mask: (S, S) uint8 (0 = background) or None; grid: H (square) or (H, W).
    """
    hh, ww = (grid, grid) if isinstance(grid, int) else grid
    if not (0 <= h < hh and 0 <= w < ww):
        raise ValueError(f"patch ({h}, {w}) is outside the {hh}×{ww} latent grid")
    if mask is None:
        return -1
    return int(patch_parts(mask, (hh, ww), min_fraction)[h, w])


def patch_parts_from_keypoints(
    keypoints: np.ndarray, grid: int | tuple[int, int], image_size: int
) -> np.ndarray:
    """The part at every patch where parts are annotated as keypoints (CUB's part locations), not masks.

    keypoints: (q, 3) int64 (part id, y, x) in the S × S input frame → (H, W) int64: the lowest part id whose
    keypoint lies in the patch's cell (see :func:`patch_part`), else 0 — here 0 means "no part location in
    the cell", which is not necessarily background.
    """
    hh, ww = (grid, grid) if isinstance(grid, int) else grid
    out = np.zeros((hh, ww), dtype=np.int64)
    for part, y, x in sorted((int(p), int(y), int(x)) for p, y, x in np.asarray(keypoints).reshape(-1, 3)):
        h = min(hh - 1, max(0, y * hh // image_size))  # the cell rows ⌊h·S/H⌋ … hold y when h = ⌊y·H/S⌋
        w = min(ww - 1, max(0, x * ww // image_size))
        if out[h, w] == 0:
            out[h, w] = part
    return out


# -- patches and their metadata ------------------------------------------------------------------------


def latents_to_patches(latents: torch.Tensor) -> np.ndarray:
    """(N, D, H, W) latents → (N·H·W, D) float32 patches, ordered image, h, w (C-contiguous)."""
    n, d, hh, ww = latents.shape
    flat = latents.detach().permute(0, 2, 3, 1).reshape(n * hh * ww, d)
    return np.ascontiguousarray(flat.to("cpu", torch.float32).numpy())


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


# -- building ------------------------------------------------------------------------------------------


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


def index_paths(member_dir: str | os.PathLike[str], split: str) -> tuple[Path, Path]:
    if split not in FILES:
        raise InputError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    faiss_name, meta_name = FILES[split]
    return Path(member_dir) / faiss_name, Path(member_dir) / meta_name


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
    data = faiss.serialize_index(index).tobytes()
    write_bytes(faiss_path, data)
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
        "faiss_bytes": len(data),
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


# -- loading and searching -----------------------------------------------------------------------------


def _run_root(run_dir: str | os.PathLike[str] | Run) -> Path:
    path = getattr(run_dir, "path", None)
    return Path(path) if path is not None else Path(run_dir)  # type: ignore[arg-type]


def _rebuild_hint(run_dir: Path) -> str:
    return f"rebuild it with: protoaudit index {run_dir}"


def read_index_info(meta_path: Path) -> dict[str, Any]:
    """The information recorded in a ``patches*.parquet`` file's schema metadata."""
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(meta_path)
    except FileNotFoundError:
        raise CheckpointError(f"{meta_path}: file not found") from None
    except Exception as exc:
        raise CheckpointError(f"{meta_path}: not a readable parquet file ({exc})") from None
    raw = (schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise CheckpointError(f"{meta_path}: not a protoaudit patch index (no {META_KEY.decode()} metadata)")
    info: dict[str, Any] = json.loads(raw)
    return info


def resolve_backend(backend: Backend, kind: str) -> tuple[str, torch.device]:
    """The search backend to use and the torch device of the ``torch`` backend."""
    import faiss

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    gpu_faiss = cuda and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if backend == "auto":
        if gpu_faiss:
            return "faiss-gpu", device
        return ("torch" if cuda and kind == "flat" else "faiss"), device
    if backend == "faiss-gpu" and not gpu_faiss:
        raise InputError("backend faiss-gpu needs CUDA and a GPU-enabled faiss; use --backend auto")
    if backend == "torch" and kind != "flat":
        raise InputError(
            "backend torch searches exactly and needs a flat index (recipe [index] kind = 'flat')"
        )
    if backend not in ("faiss", "faiss-gpu", "torch"):
        raise InputError(f"backend must be auto, faiss, faiss-gpu or torch, got {backend!r}")
    return backend, device


def exact_knn_torch(
    database: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    database_norms: torch.Tensor | None = None,
    chunk: int = 1 << 16,
    margin: int = 16,
    memory: int = 1 << 26,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest rows of ``database`` (N, D) to each query (n, D) by squared L2, in torch.

    Candidates come from ‖q‖² − 2 q·x + ‖x‖² (clamped ≥ 0) over chunks of the database, ``margin`` more than
    k; their distances are then recomputed as Σ (q − x)², which is exact to float32 rounding, so near-ties
    are ordered as a float64 brute force orders them; ties go to the lower row. Queries go in blocks so that
    no temporary holds more than about ``memory`` floats.
    Returns (distances (n, k') float32 ascending, rows (n, k') int64) with k' = min(k, N).
    """
    n_db, dim = database.shape
    k = min(k, n_db)
    wanted = min(k + margin, n_db)
    norms = database_norms if database_norms is not None else (database * database).sum(1)
    block = max(1, memory // max(min(chunk, n_db) + wanted, wanted * dim))
    out_d, out_i = [], []
    for q_start in range(0, len(queries), block):
        q = queries[q_start : q_start + block]
        qn = (q * q).sum(1, keepdim=True)
        best_d = torch.zeros(len(q), 0, device=q.device)
        best_i = torch.zeros(len(q), 0, dtype=torch.long, device=q.device)
        for start in range(0, n_db, chunk):
            x = database[start : start + chunk]
            d = (qn - 2 * q @ x.T + norms[start : start + chunk][None]).clamp_(min=0)
            dd, ii = d.topk(min(wanted, d.shape[1]), dim=1, largest=False, sorted=False)
            best_d = torch.cat([best_d, dd], 1)
            best_i = torch.cat([best_i, ii + start], 1)
            if best_d.shape[1] > wanted:
                best_d, sel = best_d.topk(wanted, dim=1, largest=False, sorted=False)
                best_i = best_i.gather(1, sel)
        # refine: exact differences for the candidates, then ascending distance with ties by the lower row
        best_d = ((q[:, None, :] - database[best_i]) ** 2).sum(-1)
        by_row = best_i.argsort(dim=1)
        best_i, best_d = best_i.gather(1, by_row), best_d.gather(1, by_row)
        by_dist = best_d.argsort(dim=1, stable=True)[:, :k]
        out_d.append(best_d.gather(1, by_dist))
        out_i.append(best_i.gather(1, by_dist))
    if not out_d:
        return torch.zeros(0, k, device=queries.device), torch.zeros(
            0, k, dtype=torch.long, device=queries.device
        )
    return torch.cat(out_d), torch.cat(out_i)


@dataclass
class PatchIndex:
    """A loaded patch index of one member and split.

    ``meta``: one row per patch (:data:`META_COLUMNS`); ``info``: what was recorded at build time
    (checkpoint sha256, kind, dim, grid, image size…); ``index``: the faiss index.
    """

    index: Any
    meta: pd.DataFrame
    info: dict[str, Any]
    path: Path
    backend: str = "faiss"
    device: torch.device = torch.device("cpu")  # noqa: RUF009  (immutable)

    def __post_init__(self) -> None:
        self._image_of_row = self.meta["image_index"].to_numpy(dtype=np.int64)
        counts = np.bincount(self._image_of_row) if len(self._image_of_row) else np.zeros(1, np.int64)
        self.max_patches_per_image = int(counts.max()) if len(counts) else 0
        # rows of each image: image i's rows are order[starts[i]:starts[i + 1]]
        self._row_order = np.argsort(self._image_of_row, kind="stable")
        n_images = int(self._image_of_row.max()) + 1 if len(self._image_of_row) else 0
        self._row_starts = np.searchsorted(self._image_of_row[self._row_order], np.arange(n_images + 1))
        self._database: torch.Tensor | None = None
        self._norms: torch.Tensor | None = None
        self._gpu_index: Any = None

    @property
    def member(self) -> str:
        return str(self.info["member"])

    @property
    def split(self) -> str:
        return str(self.info["split"])

    @property
    def dim(self) -> int:
        return int(self.info["dim"])

    @property
    def grid(self) -> tuple[int, int]:
        hh, ww = self.info["grid"]
        return int(hh), int(ww)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def vectors(self, rows: np.ndarray | None = None) -> np.ndarray:
        """(len(rows), D) float32 patches (all of them when ``rows`` is None)."""
        if self.info["kind"] == "flat":  # read from the index's own storage (the result is a copy)
            import faiss

            stored = faiss.rev_swig_ptr(self.index.get_xb(), self.ntotal * self.dim).reshape(
                self.ntotal, self.dim
            )
            return stored.copy() if rows is None else stored[np.asarray(rows, dtype=np.int64)]
        if rows is None:
            return np.asarray(self.index.reconstruct_n(0, self.ntotal), dtype=np.float32)
        rows = np.asarray(rows, dtype=np.int64)
        self.index.make_direct_map()
        return (
            np.stack([self.index.reconstruct(int(r)) for r in rows])
            if len(rows)
            else np.zeros((0, self.dim), np.float32)
        )

    def image_rows(self, image_index: int) -> np.ndarray:
        """(H·W,) int64 rows of one image's patches, in h, w order."""
        if not 0 <= image_index < len(self._row_starts) - 1:
            return np.zeros(0, dtype=np.int64)
        return self._row_order[self._row_starts[image_index] : self._row_starts[image_index + 1]]

    def image_latents(self, image_index: int) -> np.ndarray:
        """(D, H, W) float32 latent map of one image of the split, read back from the index."""
        hh, ww = self.grid
        rows = self.image_rows(image_index)
        if len(rows) != hh * ww:
            raise InputError(f"image {image_index} is not in the {self.split} index of {self.member}")
        return self.vectors(rows).reshape(hh, ww, self.dim).transpose(2, 0, 1).copy()

    # -- search ----------------------------------------------------------------------------------------
    def search(
        self, queries: np.ndarray | torch.Tensor, k: int, per_image: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest patches to each query by squared L2.

        queries: (n, D) float32. Returns (distances (n, k) float32 ascending, rows (n, k) int64 into ``meta``);
        places without a result hold ``inf`` and -1.

        ``per_image=True``: each image contributes at most its closest patch, so the answer is the k nearest
        *images* (paper §2.6: pruning's k nearest training images). It searches k' patches, keeps the first
        occurrence of each image in distance order (that image's closest patch), and doubles k' for the
        queries that found fewer than k distinct images. k' starts at 4k and never needs to exceed
        (k − 1)·P + 1 (P = patches per image): among that many nearest patches at most (k − 1)·P belong to
        the first k − 1 images, so the k-th distinct image is always among them — the answer is exact on a
        flat index (approximate on IVF, as IVF search itself).
        """
        q = queries.detach().cpu().numpy() if isinstance(queries, torch.Tensor) else np.asarray(queries)
        q = np.ascontiguousarray(q, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be (n, {self.dim}) float32, got shape {q.shape}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if not per_image:
            return self._search(q, k)
        return self._search_per_image(q, k)

    def _search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        n = len(q)
        out_d = np.full((n, k), np.inf, dtype=np.float32)
        out_r = np.full((n, k), -1, dtype=np.int64)
        kk = min(k, self.ntotal)
        if n == 0 or kk == 0:
            return out_d, out_r
        if self.backend == "torch" or (
            self.backend == "faiss-gpu" and kk > GPU_FAISS_MAX_K and self.info["kind"] == "flat"
        ):
            d_t, r_t = self._torch_search(q, kk)
            d, r = d_t.cpu().numpy(), r_t.cpu().numpy()
        elif self.backend == "faiss-gpu" and kk <= GPU_FAISS_MAX_K:
            d, r = self._faiss_gpu().search(q, kk)
        else:
            d, r = self.index.search(q, kk)
        out_d[:, :kk] = np.where(r >= 0, d, np.inf)
        out_r[:, :kk] = r
        return out_d, out_r

    def _torch_search(self, q: np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._database is None:
            self._database = torch.from_numpy(self.vectors()).to(self.device)
            self._norms = (self._database * self._database).sum(1)
        return exact_knn_torch(self._database, torch.from_numpy(q).to(self.device), k, self._norms)

    def _faiss_gpu(self) -> Any:  # pragma: no cover - needs CUDA and a GPU faiss
        import faiss

        if self._gpu_index is None:
            resources = faiss.StandardGpuResources()
            self._gpu_index = faiss.index_cpu_to_gpu(resources, self.device.index or 0, self.index)
            self._gpu_resources = resources
        return self._gpu_index

    def _search_per_image(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        n = len(q)
        out_d = np.full((n, k), np.inf, dtype=np.float32)
        out_r = np.full((n, k), -1, dtype=np.int64)
        if n == 0 or self.ntotal == 0:
            return out_d, out_r
        bound = min(self.ntotal, (k - 1) * self.max_patches_per_image + 1)
        kk = min(bound, 4 * k)
        todo = np.arange(n)
        while len(todo):
            d, r = self._search(q[todo], kk)
            finished = np.zeros(len(todo), dtype=bool)
            for i, (dist, rows) in enumerate(zip(d, r, strict=True)):
                rows = rows[rows >= 0]
                _, first = np.unique(self._image_of_row[rows], return_index=True)
                first = np.sort(first)[:k]
                if len(first) == k or kk >= bound:
                    out_d[todo[i], : len(first)] = dist[first]
                    out_r[todo[i], : len(first)] = rows[first]
                    finished[i] = True
            todo = todo[~finished]
            kk = min(bound, 2 * kk)
        return out_d, out_r


def load_index(
    run_dir: str | os.PathLike[str] | Run,
    member: str,
    split: str = "train",
    backend: Backend = "auto",
    check: bool = True,
) -> PatchIndex:
    """Open the patch index of ``member`` and ``split`` ("train": the push split, or "test") of a run.

    Raises :class:`StaleIndexError` when the member's ``model.safetensors`` changed since the index was built
    (``check=False`` skips that test), and :class:`CheckpointError` when the files are missing or damaged.
    """
    import faiss

    root = _run_root(run_dir)
    member_dir = root / "members" / member
    faiss_path, meta_path = index_paths(member_dir, split)
    if not (member_dir / "model.json").is_file():
        raise InputError(f"run {root} has no member {member!r}")
    if not meta_path.is_file() or not faiss_path.is_file():
        raise CheckpointError(
            f"member {member} of {root} has no {split} patch index; build it with: protoaudit index {root}"
        )
    info = read_index_info(meta_path)
    version = info.get("format_version")
    if not isinstance(version, int) or version > INDEX_FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_path}: index format {version!r} is not readable here; {_rebuild_hint(root)}"
        )
    if check:
        current = sha256_file(member_dir / "model.safetensors")
        if current != info.get("checkpoint_sha256"):
            raise StaleIndexError(
                f"the {split} patch index of member {member} was built from another checkpoint than "
                f"members/{member}/model.safetensors; {_rebuild_hint(root)}"
            )
    if faiss_path.stat().st_size != info.get("faiss_bytes"):
        raise StaleIndexError(
            f"{faiss_path} does not belong to {meta_path.name} (interrupted build?); {_rebuild_hint(root)}"
        )
    try:
        index: Any = faiss.read_index(str(faiss_path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unreadable"
        raise CheckpointError(
            f"{faiss_path}: not a readable faiss index ({first}); {_rebuild_hint(root)}"
        ) from None
    import pyarrow.parquet as pq

    meta = pq.read_table(meta_path).to_pandas()
    if index.ntotal != len(meta) or index.d != info.get("dim"):
        raise StaleIndexError(
            f"{faiss_path} and {meta_path.name} disagree on the patches; {_rebuild_hint(root)}"
        )
    if info.get("kind") == "ivf" and info.get("nprobe"):
        index.nprobe = int(info["nprobe"])
    chosen, device = resolve_backend(backend, str(info.get("kind", "flat")))
    return PatchIndex(index, meta, info, meta_path, chosen, device)


def index_status(run_dir: str | os.PathLike[str] | Run, member: str, split: str) -> str:
    """ "fresh", "stale" or "missing": whether a member's index of a split can be queried as it is."""
    try:
        root = _run_root(run_dir)
        faiss_path, meta_path = index_paths(root / "members" / member, split)
        if not meta_path.is_file() or not faiss_path.is_file():
            return "missing"
        info = read_index_info(meta_path)
        sha = sha256_file(root / "members" / member / "model.safetensors")
        fresh = info.get("checkpoint_sha256") == sha and faiss_path.stat().st_size == info.get("faiss_bytes")
        return "fresh" if fresh else "stale"
    except CheckpointError:
        return "stale"


def member_names(run: Run) -> list[str]:
    """Every member of a run with a checkpoint: the recipe's members, then others (e.g. pruned members)."""
    names = [m for m in run.member_names if (run.path / "members" / m / "model.json").is_file()]
    members_dir = run.path / "members"
    if members_dir.is_dir():
        names += sorted(
            p.name for p in members_dir.iterdir() if (p / "model.json").is_file() and p.name not in names
        )
    return names


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
    """
    from protoaudit.engine.train import resolve_device

    recipe = run.recipe()
    names = list(members) if members else member_names(run)
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


# -- queries -------------------------------------------------------------------------------------------


@dataclass
class QueryImage:
    """An image to explain or query with: pixels (3, S, S) float32 in [0, 1] at the run's image size."""

    pixels: torch.Tensor
    image_id: str
    label: int | None = None
    mask: np.ndarray | None = None  # (S, S) uint8 part ids, when the dataset has them
    split: str | None = None  # "train" (the push split), "val" or "test"; None for an image file
    index: int | None = None  # index into that split


def _read_image_file(path: Path, image_size: int) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"cannot read image {path}: {reason} (expected a PNG or JPEG file)") from None
    array = np.asarray(rgb, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def load_query_image(
    run: Run, image: str | os.PathLike[str], bundle: DatasetBundle | None = None
) -> QueryImage:
    """An image file (PNG/JPEG, resized to the run's image size) or an image id of the run's dataset
    (e.g. ``test/000012``; the dataset is rebuilt from the recipe unless ``bundle`` is given)."""
    text = str(image)
    path = Path(text).expanduser()
    image_size = int(run.recipe().data.image_size)
    if path.is_file():
        return QueryImage(_read_image_file(path, image_size), path.name)
    if path.exists():
        raise InputError(f"image {text} is not a file (expected a PNG or JPEG file or a dataset image id)")
    if bundle is None:
        bundle = run.dataset()
    for split_name, split in (("train", bundle.push), ("val", bundle.val), ("test", bundle.test)):
        try:
            i = split.image_ids.index(text)
        except ValueError:
            continue
        pixels = split.batch([i])[0].float()
        return QueryImage(pixels, text, int(split.labels[i]), split.part_mask(i), split_name, i)
    example = bundle.test.image_ids[0] if len(bundle.test) else "test/000000"
    raise InputError(
        f"image {text!r} is neither a file nor an image id of the run's dataset (ids look like {example})"
    )


@torch.no_grad()
def image_latents(model: ProtoPNet, image: QueryImage) -> torch.Tensor:
    """(D, H, W) float32 latent map of one image."""
    model.eval()
    device = model.prototype_vectors.device
    return model.latent(image.pixels[None].to(device))[0].float()


def _class_names(run: Run, member: str) -> list[str]:
    return list(run.member(member).config.class_names)


def _describe_rows(frame: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    frame.insert(
        frame.columns.get_loc("label") + 1,
        "class_name",
        [names[int(v)] if v >= 0 else "" for v in frame["label"]],
    )
    return frame


def nearest_patches_to_prototype(
    run: Run,
    member: str,
    prototype: int,
    k: int = 5,
    split: str = "train",
    per_image: bool = True,
    backend: Backend = "auto",
) -> pd.DataFrame:
    """The k nearest patches of ``split`` to one prototype (paper Fig. 5b), one per image by default.

    Columns: rank, image_index, image_id, label, class_name, h, w, part, distance (squared L2).
    """
    model = run.member(member)
    if not 0 <= prototype < model.n_prototypes:
        raise InputError(f"member {member} has prototypes 0…{model.n_prototypes - 1}, not {prototype}")
    index = load_index(run, member, split, backend)
    query = model.prototype_vectors.detach()[prototype : prototype + 1].float()
    distances, rows = index.search(query, k, per_image=per_image)
    return _rows_frame(index, distances[0], rows[0], _class_names(run, member))


def _rows_frame(index: PatchIndex, distances: np.ndarray, rows: np.ndarray, names: list[str]) -> pd.DataFrame:
    ok = rows >= 0
    frame = index.meta.iloc[rows[ok]][["image_index", "image_id", "label", "h", "w", "part"]].reset_index(
        drop=True
    )
    frame.insert(0, "rank", np.arange(1, int(ok.sum()) + 1))
    frame["distance"] = distances[ok].astype(np.float64)
    return _describe_rows(frame, names)


def nearest_patches_to_image(
    run: Run,
    image: str | os.PathLike[str] | QueryImage,
    member: str,
    k: int = 3,
    split: str = "train",
    per_image: bool = False,
    backend: Backend = "auto",
) -> pd.DataFrame:
    """For each patch (query_h, query_w) of an image, its k nearest patches of ``split`` (training by default).

    Columns: query_h, query_w, rank, image_index, image_id, label, class_name, h, w, part, distance.
    """
    model = run.member(member)
    index = load_index(run, member, split, backend)
    query = image if isinstance(image, QueryImage) else load_query_image(run, image)
    z = image_latents(model, query)
    hh, ww = z.shape[1:]
    patches = z.permute(1, 2, 0).reshape(hh * ww, -1)
    distances, rows = index.search(patches, k, per_image=per_image)
    names = _class_names(run, member)
    frames = []
    for p in range(hh * ww):
        frame = _rows_frame(index, distances[p], rows[p], names)
        frame.insert(0, "query_w", p % ww)
        frame.insert(0, "query_h", p // ww)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def nearest_prototypes_to_image(
    run: Run,
    image: str | os.PathLike[str] | QueryImage,
    k: int = 3,
    members: Sequence[str] | None = None,
) -> pd.DataFrame:
    """For each patch (h, w) of an image, its k nearest prototypes of each member (distances are comparable
    only within a member: each member has its own latent space).

    Columns: member, h, w, rank, prototype, class, class_name, distance, similarity.
    """
    from protoaudit.core.model import similarity, squared_distances

    query = image if isinstance(image, QueryImage) else load_query_image(run, image)
    frames = []
    for name in members or run.member_names:
        model = run.member(name)
        z = image_latents(model, query)
        d = squared_distances(z[None], model.prototype_vectors.detach())[0]  # (m, H, W)
        m, hh, ww = d.shape
        kk = min(k, m)
        dist, proto = d.permute(1, 2, 0).reshape(hh * ww, m).topk(kk, dim=1, largest=False)
        patch = np.repeat(np.arange(hh * ww), kk)
        proto_np = proto.flatten().cpu().numpy()
        classes = np.asarray(model.config.prototype_class)[proto_np]
        frames.append(
            pd.DataFrame(
                {
                    "member": name,
                    "h": patch // ww,
                    "w": patch % ww,
                    "rank": np.tile(np.arange(1, kk + 1), hh * ww),
                    "prototype": proto_np,
                    "class": classes,
                    "class_name": [model.config.class_names[c] for c in classes],
                    "distance": dist.flatten().cpu().double().numpy(),
                    "similarity": similarity(dist).flatten().cpu().double().numpy(),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)
