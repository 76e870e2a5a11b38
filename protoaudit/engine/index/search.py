"""Loading a patch index (refusing a stale one) and searching it: FAISS on CPU or GPU, or exact k-NN in torch."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import torch

from protoaudit.core.knn import (
    BlockKnn,
    augmented_patches,
    exact_knn_torch,
    min_distances_by_image,
    nearest_images_by_product,
)
from protoaudit.engine.index.files import INDEX_FORMAT_VERSION, META_KEY, index_paths
from protoaudit.engine.io import sha256_file
from protoaudit.engine.run import verified_weights_sha256
from protoaudit.errors import CheckpointError, InputError, Remedy, StaleIndexError

if TYPE_CHECKING:
    from protoaudit.engine.run import Run


GPU_FAISS_MAX_K = 2048  # GPU faiss answers at most this many neighbours per query
BLOCK_KNN_MAX_K = 256  # the CPU torch backend answers up to this many neighbours by BlockKnn (exact, proven)
BLOCK_KNN_QUERIES = 256  # queries per BlockKnn search (its per-block minima are queries × patches / 16)
# a per-image search of fewer queries than this prepares the index's augmented patches once (kept for the
# next searches): a few queries then read them instead of rebuilding them chunk by chunk
PREPARED_BELOW_QUERIES = 64


Backend = Literal["auto", "faiss", "faiss-gpu", "torch"]


def _run_root(run_dir: str | os.PathLike[str] | Run) -> Path:
    path = getattr(run_dir, "path", None)
    return Path(path) if path is not None else Path(run_dir)  # type: ignore[arg-type]


def _rebuild(run_dir: Path) -> Remedy:
    return Remedy("rebuild it", "index", str(run_dir))


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


def resolve_backend(backend: Backend, kind: str, interactive: bool = False) -> tuple[str, torch.device]:
    """The search backend to use and the torch device of the ``torch`` backend.

    ``interactive``: the index answers a few queries at a time (one image's patches, one prototype). FAISS
    answers fewer than 20 queries on the CPU without BLAS, one query after another; ``auto`` then picks the
    exact torch search for a flat index (on the CPU :class:`~protoaudit.core.knn.BlockKnn`: one float32 product
    per cache-sized chunk, then float64 re-ranking of the rows a proven error bound leaves in doubt; prepared at
    the first search). Large batches (pruning's search of every prototype) stay on FAISS.
    """
    import faiss

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    gpu_faiss = cuda and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if backend == "auto":
        if gpu_faiss:
            return "faiss-gpu", device
        return ("torch" if (cuda or interactive) and kind == "flat" else "faiss"), device
    if backend == "faiss-gpu" and not gpu_faiss:
        raise InputError("backend faiss-gpu needs CUDA and a GPU-enabled faiss; use --backend auto")
    if backend == "torch" and kind != "flat":
        raise InputError(
            "backend torch searches exactly and needs a flat index (recipe [index] kind = 'flat')"
        )
    if backend not in ("faiss", "faiss-gpu", "torch"):
        raise InputError(f"backend must be auto, faiss, faiss-gpu or torch, got {backend!r}")
    return backend, device


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
        self._block_knn: BlockKnn | None = None  # built at the first CPU torch search, not at loading
        self._augmented: torch.Tensor | None = None  # [x, ‖x‖², 0…] for per-image searches of few queries
        # every image's patches in consecutive rows, as many per image (as protoaudit writes an index)
        p = self.max_patches_per_image
        self._image_major = (
            p > 0
            and len(self._image_of_row) == n_images * p
            and bool((self._image_of_row.reshape(n_images, p) == np.arange(n_images)[:, None]).all())
        )
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
        self,
        queries: np.ndarray | torch.Tensor,
        k: int,
        per_image: bool = False,
        minima: torch.Tensor | None = None,
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
        flat index (approximate on IVF, as IVF search itself). On the CPU, a flat index whose images each
        own P consecutive rows (as protoaudit builds them) is answered instead by
        :func:`~protoaudit.core.knn.nearest_images_by_product`: one pass of cache-sized products, each image
        reduced to its closest patch at once — the same answer as the patch search, without searching
        k' > k patches per query. ``minima`` (with ``per_image``): an (images, n) float32 tensor that receives
        every image's smallest squared distance to every query (inf for an image without patches).
        """
        q = queries.detach().cpu().numpy() if isinstance(queries, torch.Tensor) else np.asarray(queries)
        q = np.ascontiguousarray(q, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be (n, {self.dim}) float32, got shape {q.shape}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if not per_image:
            return self._search(q, k)
        return self._search_per_image(q, k, minima)

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
            if self.info["kind"] == "flat" and self.device.type == "cpu":
                self._database = self._flat_storage()
            else:
                self._database = torch.from_numpy(self.vectors()).to(self.device)
        queries = torch.from_numpy(q).to(self.device)
        if self.device.type == "cpu" and k <= BLOCK_KNN_MAX_K:  # a few queries: BlockKnn (exact)
            if self._block_knn is None:
                self._block_knn = BlockKnn(self._database)
            parts = [
                self._block_knn.search(queries[s : s + BLOCK_KNN_QUERIES], k)
                for s in range(0, len(queries), BLOCK_KNN_QUERIES)
            ]
            return torch.cat([d for d, _ in parts]), torch.cat([r for _, r in parts])
        if self._norms is None:
            self._norms = torch.linalg.vector_norm(self._database, dim=1).square_()
        return exact_knn_torch(self._database, queries, k, self._norms)

    def _faiss_gpu(self) -> Any:  # pragma: no cover - needs CUDA and a GPU faiss
        import faiss

        if self._gpu_index is None:
            resources = faiss.StandardGpuResources()
            self._gpu_index = faiss.index_cpu_to_gpu(resources, self.device.index or 0, self.index)
            self._gpu_resources = resources
        return self._gpu_index

    def _flat_storage(self) -> torch.Tensor:
        """(N, D) float32 patches of a flat CPU index: its own storage, without a copy (it lives as long as
        the index)."""
        import faiss

        stored = faiss.rev_swig_ptr(self.index.get_xb(), self.ntotal * self.dim)
        return torch.from_numpy(stored.reshape(self.ntotal, self.dim))

    @property
    def n_images(self) -> int:
        """Images of the split the index covers (its largest image index + 1)."""
        return len(self._row_starts) - 1

    def _search_per_image(
        self, q: np.ndarray, k: int, minima: torch.Tensor | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        n = len(q)
        out_d = np.full((n, k), np.inf, dtype=np.float32)
        out_r = np.full((n, k), -1, dtype=np.int64)
        if minima is not None and tuple(minima.shape) != (self.n_images, n):
            raise ValueError(f"minima must be ({self.n_images}, {n}), got {tuple(minima.shape)}")
        if n == 0 or self.ntotal == 0:
            return out_d, out_r
        if (
            self._image_major
            and self.info["kind"] == "flat"
            and (self.backend == "faiss" or (self.backend == "torch" and self.device.type == "cpu"))
        ):
            storage = self._flat_storage()
            if self._augmented is None and n < PREPARED_BELOW_QUERIES:  # few queries: read, not rebuild
                self._augmented = augmented_patches(storage)
            d_t, r_t = nearest_images_by_product(
                storage,
                self.max_patches_per_image,
                torch.from_numpy(q),
                k,
                minima=minima,
                augmented=self._augmented,
            )
            out_d[:, : d_t.shape[1]], out_r[:, : r_t.shape[1]] = d_t.numpy(), r_t.numpy()
            return out_d, out_r
        if minima is not None:
            minima.copy_(
                min_distances_by_image(
                    torch.from_numpy(self.vectors()),
                    torch.tensor(self._image_of_row),
                    self.n_images,
                    torch.from_numpy(q),
                )
            )
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
    interactive: bool = False,
) -> PatchIndex:
    """Open the patch index of ``member`` and ``split`` ("train": the push split, or "test") of a run.

    ``interactive``: the index will answer a few queries at a time (see :func:`resolve_backend`).
    Raises :class:`StaleIndexError` when the member's ``model.safetensors`` changed since the index was built
    (``check=False`` skips that test), and :class:`CheckpointError` when the files are missing or damaged.
    """
    import faiss

    root = _run_root(run_dir)
    member_dir = root / "members" / member
    faiss_path, meta_path = index_paths(member_dir, split)
    if not (member_dir / "model.json").is_file():
        if member_dir.is_dir():
            raise CheckpointError(
                f"{member_dir / 'model.json'} is missing: member {member}'s metadata is gone"
            )
        raise InputError(f"run {root} has no member {member!r}")
    if not meta_path.is_file() or not faiss_path.is_file():
        raise CheckpointError(
            f"member {member} of {root} has no {split} patch index",
            remedy=Remedy("build it", "index", str(root)),
        )
    info = read_index_info(meta_path)
    version = info.get("format_version")
    if not isinstance(version, int) or version > INDEX_FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_path}: index format {version!r} is not readable here", remedy=_rebuild(root)
        )
    if check:  # a weights file changed since model.json is tampered, not a reason to rebuild the index
        current = verified_weights_sha256(member_dir)
        if current != info.get("checkpoint_sha256"):
            raise StaleIndexError(
                f"the {split} patch index of member {member} was built from another checkpoint than "
                f"members/{member}/model.safetensors",
                remedy=_rebuild(root),
            )
    if faiss_path.stat().st_size != info.get("faiss_bytes"):
        raise StaleIndexError(
            f"{faiss_path} does not belong to {meta_path.name} (interrupted build?)", remedy=_rebuild(root)
        )
    try:
        index: Any = faiss.read_index(str(faiss_path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unreadable"
        raise CheckpointError(
            f"{faiss_path}: not a readable faiss index ({first})", remedy=_rebuild(root)
        ) from None
    import pyarrow.parquet as pq

    meta = pq.read_table(meta_path).to_pandas()
    if index.ntotal != len(meta) or index.d != info.get("dim"):
        raise StaleIndexError(
            f"{faiss_path} and {meta_path.name} disagree on the patches", remedy=_rebuild(root)
        )
    if info.get("kind") == "ivf" and info.get("nprobe"):
        index.nprobe = int(info["nprobe"])
    chosen, device = resolve_backend(backend, str(info.get("kind", "flat")), interactive)
    return PatchIndex(index, meta, info, meta_path, chosen, device)


def index_status(run_dir: str | os.PathLike[str] | Run, member: str, split: str) -> str:
    """ "fresh", "stale", "broken" or "missing": whether a member's index of a split can be queried as it is.

    "stale": built from other weights than the member's current ``model.safetensors``; "broken": its files
    are unreadable or do not belong together (an interrupted or damaged build).
    """
    root = _run_root(run_dir)
    faiss_path, meta_path = index_paths(root / "members" / member, split)
    if not meta_path.is_file() and not faiss_path.is_file():
        return "missing"
    if not meta_path.is_file() or not faiss_path.is_file():
        return "broken"
    try:
        info = read_index_info(meta_path)
    except CheckpointError:
        return "broken"
    if faiss_path.stat().st_size != info.get("faiss_bytes"):
        return "broken"
    try:
        sha = sha256_file(root / "members" / member / "model.safetensors")
    except OSError:
        return "stale"
    return "fresh" if info.get("checkpoint_sha256") == sha else "stale"


def member_names(run: Run) -> list[str]:
    """Every member of a run with a checkpoint: the recipe's members, then others (e.g. pruned members)."""
    names = [m for m in run.member_names if (run.path / "members" / m / "model.json").is_file()]
    members_dir = run.path / "members"
    if members_dir.is_dir():
        names += sorted(
            p.name for p in members_dir.iterdir() if (p / "model.json").is_file() and p.name not in names
        )
    return names


@dataclass
class NearestImages:
    """Each prototype's k nearest images of an indexed split, each image by its closest patch (paper §2.6).

    distances: (m, k) float32 ascending (inf where the split has fewer than k images); rows: (m, k) int64 into
    the index's ``meta`` (-1 there). A smaller k's answer is the first columns of a larger one's, so one search
    with the largest k any consumer needs serves them all (:meth:`first`).
    """

    distances: np.ndarray
    rows: np.ndarray
    meta: pd.DataFrame
    # (images, m) float32: every image's smallest squared distance to every prototype, where the search kept
    # them (``nearest_images(..., with_minima=True)``): the last-layer input and the audit's distances
    min_distances: torch.Tensor | None = None

    @property
    def k(self) -> int:
        return int(self.rows.shape[1])

    def first(self, k: int) -> NearestImages:
        if k > self.k:
            raise ValueError(f"searched the {self.k} nearest images, asked for {k}")
        return NearestImages(self.distances[:, :k], self.rows[:, :k], self.meta, self.min_distances)

    def column(self, name: str, missing: Any = -1) -> np.ndarray:
        """(m, k) values of ``meta[name]`` at each neighbour, ``missing`` where there is none."""
        values = self.meta[name].to_numpy()
        return np.where(self.rows >= 0, values[np.maximum(self.rows, 0)], missing)

    def table(self) -> pd.DataFrame:
        """One row per prototype and rank (columns prototype, rank, image_index, image_id, label, h, w,
        distance); missing ranks are left out."""
        m, k = self.rows.shape
        flat_rows, flat_d = self.rows.ravel(), self.distances.ravel()
        ok = flat_rows >= 0
        meta = self.meta.iloc[flat_rows[ok]]
        return pd.DataFrame(
            {
                "prototype": np.repeat(np.arange(m), k)[ok],
                "rank": np.tile(np.arange(1, k + 1), m)[ok],
                "image_index": meta["image_index"].to_numpy(),
                "image_id": meta["image_id"].to_numpy(),
                "label": meta["label"].to_numpy(),
                "h": meta["h"].to_numpy(),
                "w": meta["w"].to_numpy(),
                "distance": flat_d[ok].astype(np.float64),
            }
        )


def nearest_images_from_minima(
    index: PatchIndex, prototypes: torch.Tensor | np.ndarray, min_distances: torch.Tensor, k: int
) -> NearestImages:
    """Each prototype's k nearest images of the index's split from every image's smallest distance to it,
    where a pass over the split already computed them (:class:`protoaudit.engine.train.TestPass`): no search.

    min_distances: (n, m) float32 for the index's n images and the m ``prototypes`` (m, D). The order is the
    search's: ascending distance, ties to the lower image; each chosen image's closest patch is found again
    among its own patches in float64 (the first among equals), a few per prototype. Returns
    :class:`NearestImages` with ``min_distances`` kept."""
    d = min_distances.detach().to("cpu", torch.float32)
    n, m = d.shape
    q = prototypes.detach().double().cpu().numpy() if isinstance(prototypes, torch.Tensor) else prototypes
    q = np.asarray(q, dtype=np.float64)
    if q.shape[0] != m or n != index.n_images or index.ntotal % max(n, 1):
        raise ValueError(
            f"min distances {(n, m)} do not fit {q.shape[0]} prototypes and an index of {index.n_images} images"
        )
    per_image, found = index.ntotal // max(n, 1), min(k, n)
    values = d.numpy().T  # (m, n)
    distances = np.full((m, k), np.inf, dtype=np.float32)  # as the search pads: inf and row −1 past n images
    rows = np.full((m, k), -1, dtype=np.int64)
    if found:
        kth = np.partition(values, found - 1, axis=1)[:, found - 1 : found]  # (m, 1): no image above it ranks
        qi, img = np.nonzero(values <= kth)
        order = np.lexsort((img, values[qi, img], qi))  # by prototype, then distance, then image
        qi, img = qi[order], img[order]
        pick = np.searchsorted(qi, np.arange(m))[:, None] + np.arange(found)  # ≥ found candidates each
        images = img[pick]  # (m, found)
        distances[:, :found] = values[np.arange(m)[:, None], images]
        # each chosen image's closest patch, image by image: its patches read once, against the prototypes
        # that chose it (float64 ‖x‖² − 2x·q; ‖q‖² is the same for every patch of a pair)
        proto = np.repeat(np.arange(m), found)
        chosen = images.ravel()
        by_image = np.argsort(chosen, kind="stable")
        starts = np.flatnonzero(np.r_[True, np.diff(chosen[by_image]) != 0])
        patch = np.empty(len(chosen), dtype=np.int64)
        for a, b in zip(starts, np.r_[starts[1:], len(chosen)], strict=True):
            pairs = by_image[a:b]
            i = int(chosen[pairs[0]])
            x = index.vectors(np.arange(i * per_image, (i + 1) * per_image)).astype(np.float64)
            scores = (x * x).sum(1)[:, None] - 2.0 * (x @ q[proto[pairs]].T)  # (P, pairs)
            patch[pairs] = scores.argmin(0)  # the first among equals
        rows[:, :found] = images * per_image + patch.reshape(m, found)
    return NearestImages(distances, rows, index.meta, d)


def nearest_images(
    index: PatchIndex, prototypes: torch.Tensor | np.ndarray, k: int, with_minima: bool = False
) -> NearestImages:
    """The k nearest images of the index's split to each prototype (m, D): the one search that prune, the
    ground-truth audit, global analysis and the report share. ``with_minima``: keep every image's smallest
    distance to every prototype too (:attr:`NearestImages.min_distances`), from the same products."""
    vectors = prototypes.detach().float() if isinstance(prototypes, torch.Tensor) else prototypes
    minima = torch.full((index.n_images, len(vectors)), float("inf")) if with_minima else None
    distances, rows = index.search(vectors, k, per_image=True, minima=minima)
    return NearestImages(distances, rows, index.meta, minima)
