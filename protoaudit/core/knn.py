"""Exact nearest neighbours by squared L2 between latent patches and prototypes, in torch."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch


def latents_to_patches(latents: torch.Tensor) -> np.ndarray:
    """(N, D, H, W) latents → (N·H·W, D) float32 patches, ordered image, h, w (C-contiguous)."""
    n, d, hh, ww = latents.shape
    flat = latents.detach().permute(0, 2, 3, 1).reshape(n * hh * ww, d)
    return np.ascontiguousarray(flat.to("cpu", torch.float32).numpy())


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

    Candidates come from ‖x‖² − 2 q·x (one BLAS ``addmm`` per chunk of the database; ‖q‖² is the same for
    every row of a query, so it cannot change which rows are nearest) and a partial top-k, ``margin`` more
    than k; their distances are then recomputed as Σ (q − x)², which is exact to float32 rounding, so
    near-ties are ordered as a float64 brute force orders them; ties go to the lower row. Queries go in
    blocks so that no temporary holds more than about ``memory`` floats.
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
        best_d = torch.zeros(len(q), 0, dtype=q.dtype, device=q.device)
        best_i = torch.zeros(len(q), 0, dtype=torch.long, device=q.device)
        for start in range(0, n_db, chunk):
            x = database[start : start + chunk]
            d = torch.addmm(norms[start : start + chunk][None], q, x.T, alpha=-2)  # ‖x‖² − 2 q·x
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


def min_distances_by_image(
    vectors: torch.Tensor,
    image_index: torch.Tensor,
    n_images: int,
    prototypes: torch.Tensor,
    chunk: int = 65536,
) -> torch.Tensor:
    """Smallest squared distance from each prototype to any patch of each image, from stored patches.

    vectors: (P, D) float32 patches; image_index: (P,) int64 their image; prototypes: (m, D) → (n_images, m).
    """
    m = prototypes.shape[0]
    out = torch.full((n_images, m), float("inf"))
    p2 = (prototypes * prototypes).sum(1)
    for start in range(0, len(vectors), chunk):
        v = vectors[start : start + chunk]
        d = torch.clamp((v * v).sum(1, keepdim=True) - 2 * v @ prototypes.t() + p2, min=0.0)
        idx = image_index[start : start + chunk, None].expand(-1, m)
        out.scatter_reduce_(0, idx, d, reduce="amin")
    return out


_U32 = 2.0**-24  # unit roundoff of float32


def _input_rounding() -> float:
    """Relative rounding of a CPU float32 matmul's inputs: 0 at full precision, else as bf16 (the coarsest).
    Where the precision cannot be read (torch refuses the legacy getter once a backend's ``fp32_precision`` was
    set), it is taken as reduced: the safe side of the bound."""
    mkldnn = getattr(torch.backends.mkldnn, "matmul", None)
    reduced = getattr(mkldnn, "fp32_precision", "none") not in ("none", "ieee")
    try:
        reduced = reduced or torch.get_float32_matmul_precision() != "highest"
    except RuntimeError:
        reduced = True
    return 2.0**-8 if reduced else 0.0


_POOLS: dict[int, ThreadPoolExecutor] = {}
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_POOLS.clear)  # a forked child has none of the pools' threads


def _one_torch_thread() -> None:
    """A pool worker's start: torch's per-thread setup runs first (at the first query of the count), so the
    one thread set next stays the worker's for its life."""
    torch.get_num_threads()
    torch.set_num_threads(1)


def _one_thread_pool(workers: int) -> ThreadPoolExecutor:
    """A pool of ``workers`` threads whose torch operations each run on one thread (torch's thread count is
    per thread): many small products in parallel, without a parallel region (and its barrier) per product."""
    if workers not in _POOLS:
        threads = torch.get_num_threads()
        pool = ThreadPoolExecutor(workers, "block-knn", _one_torch_thread)
        started = threading.Barrier(workers, timeout=30)
        try:
            list(pool.map(lambda _: started.wait(), range(workers)))  # every worker started, on one thread
        except BaseException:
            pool.shutdown(wait=False)
            raise
        finally:
            torch.set_num_threads(threads)  # what threads started later inherit, as it was
        _POOLS[workers] = pool
    return _POOLS[workers]


def _over_chunks(work: Callable[[int, int], None], n_chunks: int) -> None:
    """``work(first, step)`` for the chunks first, first + step, …: on this thread, or with torch's thread count
    > 1 on that many threads of one torch thread each."""
    workers = min(torch.get_num_threads(), n_chunks)
    if workers > 1:
        list(_one_thread_pool(workers).map(work, range(workers), [workers] * workers))
    else:
        work(0, 1)


class BlockKnn:
    """Exact k nearest rows by squared L2, for a few queries at a time against a large fixed database.

    Prepared once (the database transposed in chunks of ``chunk`` rows, each (D + 1, chunk) float32 and
    contiguous, its last row the squared norms; the largest norm of each block of ``block`` rows), then
    :meth:`search` answers with one float32 matrix product per chunk (staying in cache; with torch's thread
    count > 1, as many threads share the chunks), keeps only the smallest coarse score of each block, and
    recomputes in float64 the rows of every block that may hold a neighbour.

    Why it is exact. The coarse score of query q and row x is c = fl([−2q, 1]·[x, fl(‖x‖²)]), the exact score
    s = ‖x‖² − 2 q·x (‖q‖² is the same for every row, so s orders rows as the distance does). For any order of
    summation, fused or not, a float32 dot product of n terms is off by at most γ_n Σ|a_i b_i| (γ_n = n·u /
    (1 − n·u), u = 2⁻²⁴), so the float32 norm is off by at most γ_D‖x‖², and Σ|a_i b_i| ≤ 2‖q‖‖x‖ + fl(‖x‖²).
    So |c − s| ≤ E = 2·((γ_{D+1} + 2r)·(2‖q‖M + M²) + γ_{D+1}·M²) + 10⁻¹²·(‖q‖ + M)², M ≥ the block's largest
    ‖x‖ and M² ≥ its largest fl(‖x‖²), r the rounding of the inputs when float32 matrix products run at reduced
    precision (0 by default); the factor 2 covers the second-order terms and the last term the float64
    re-ranking. Over k distinct groups of blocks, the k smallest values of (group's smallest c) + E are each
    ≥ the exact score of a distinct row, so the k-th exact score s_k is at most the k-th of them, T. Any row
    with s ≤ s_k has c ≤ s + E ≤ T + E, so its block's smallest c is ≤ T + E: every such block is re-ranked
    in float64, and the answer is the float64 brute force's, ties to the lower row.
    """

    def __init__(self, database: torch.Tensor, block: int = 16, chunk: int = 4096, group: int = 8) -> None:
        if database.device.type != "cpu" or database.dtype != torch.float32:
            raise ValueError(
                f"BlockKnn needs a CPU float32 database, got {database.dtype} on {database.device}"
            )
        if not bool(torch.isfinite(database).all()):
            raise ValueError("BlockKnn needs a finite database: a NaN or infinite row has no distance")
        n, dim = database.shape
        self.database = database.numpy()  # a view: the rows re-ranked in float64
        self.n, self.dim, self.block = n, dim, block
        self.nb = max(group, chunk // block // group * group)  # blocks per chunk
        self.chunk = self.nb * block
        self.group = group
        n_chunks = -(-max(n, 1) // self.chunk)
        self.chunks = torch.empty(n_chunks, dim + 1, self.chunk, dtype=torch.float32)
        self.chunks[-1].zero_()

        def prepare(first: int, step: int) -> None:  # chunks first, first + step, …: rows, then ‖x‖²
            for c in range(first, n_chunks, step):
                x = database[c * self.chunk : (c + 1) * self.chunk]
                self.chunks[c, :dim, : len(x)] = x.T
                torch.sum(x * x, 1, out=self.chunks[c, dim, : len(x)])

        _over_chunks(prepare, n_chunks)
        norms = self.chunks[:, dim].reshape(-1)  # float32 sums: off by at most γ_D·‖x‖²
        self.chunks[-1, dim, n - (n_chunks - 1) * self.chunk :] = float("inf")  # padding rows never win
        gamma = dim * _U32 / (1 - dim * _U32)
        x_norm = np.sqrt(norms.numpy().astype(np.float64) / (1 - gamma)) * (1 + 1e-12)  # ≥ ‖x‖
        x_norm[n:] = 0.0
        # block g = (chunk c, slot b) holds rows c·chunk + b + t·nb, t < block: neighbouring rows in distinct
        # blocks; group (c, j) holds blocks (c, j + i·nb / group), i < group
        self.block_norm = x_norm.reshape(-1, block, self.nb).max(1).reshape(-1)
        self.group_norm = self.block_norm.reshape(-1, group, self.nb // group).max(1).reshape(-1)

    def _bound(self, q_norm: np.ndarray, x_norm: np.ndarray) -> np.ndarray:
        """float64 bound on |coarse − exact| score for queries of norm ``q_norm`` and rows of norm ≤ ``x_norm``
        (broadcast)."""
        u, r = _U32, _input_rounding()
        gamma = (self.dim + 1) * u / (1 - (self.dim + 1) * u)
        m2 = x_norm * x_norm
        bound: np.ndarray = (
            2 * ((gamma + 2 * r) * (2 * q_norm * x_norm + m2) + gamma * m2) + 1e-12 * (q_norm + x_norm) ** 2
        )
        return bound

    def _augmented(self, queries: torch.Tensor) -> torch.Tensor:
        """(n, D + 1) float32 [−2q, 1]: its product with a chunk is the chunk's coarse scores."""
        q = queries.detach().to("cpu", torch.float32)
        return torch.cat([-2 * q, torch.ones(len(q), 1)], 1)

    def coarse_scores(self, queries: torch.Tensor) -> torch.Tensor:
        """(n, N) float32 coarse scores c of every row, as :meth:`search` computes them (for checking)."""
        qa = self._augmented(queries)
        return torch.cat([qa @ self.chunks[c] for c in range(len(self.chunks))], 1)[:, : self.n]

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact k nearest rows to each query (n, D): (distances (n, k') float32 ascending, the float64 brute
        force's rounded; rows (n, k') int64, ties to the lower row), k' = min(k, N). On the CPU."""
        n_q, k = len(queries), min(k, self.n)
        if n_q == 0 or k == 0:
            return torch.zeros(n_q, k), torch.zeros(n_q, k, dtype=torch.long)
        qa = self._augmented(queries)
        if not bool(torch.isfinite(qa).all()):
            raise ValueError("BlockKnn needs finite queries: a NaN or infinite query has no nearest row")
        n_chunks, per_group = len(self.chunks), self.nb // self.group
        block_min = torch.empty(n_q, n_chunks, self.nb, dtype=torch.float32)

        def coarse_pass(first: int, step: int) -> None:  # chunks first, first + step, …
            buf = torch.empty(n_q, self.chunk, dtype=torch.float32)
            for c in range(first, n_chunks, step):
                torch.mm(qa, self.chunks[c], out=buf)
                torch.amin(buf.view(n_q, self.block, self.nb), dim=1, out=block_min[:, c])

        _over_chunks(coarse_pass, n_chunks)
        # the rest on small arrays, in numpy (one thread, little overhead per operation)
        mins = block_min.numpy()
        q64 = qa[:, : self.dim].numpy().astype(np.float64) / -2  # exact: the float32 queries
        q_norm = np.sqrt(np.einsum("ij,ij->i", q64, q64))[:, None]
        group_min = (
            mins.reshape(n_q, n_chunks, self.group, per_group).min(2).reshape(n_q, -1).astype(np.float64)
        )
        bound = self._bound(q_norm, self.group_norm[None])
        upper = group_min + bound  # each ≥ the exact score of a row of its own group
        limit = np.full(n_q, np.inf)
        if upper.shape[1] >= k:
            limit = np.partition(upper, k - 1, axis=1)[:, k - 1]
        qi, h = np.nonzero(group_min - bound <= limit[:, None])
        blocks = ((h // per_group) * self.nb + h % per_group)[:, None] + np.arange(self.group) * per_group
        lower = mins.reshape(n_q, -1)[qi[:, None], blocks] - self._bound(q_norm[qi], self.block_norm[blocks])
        keep = lower <= limit[qi, None]
        qi, g = np.broadcast_to(qi[:, None], blocks.shape)[keep], blocks[keep]
        # every row of the candidate blocks, exactly in float64
        rows = ((g // self.nb) * self.chunk + g % self.nb)[:, None] + np.arange(self.block) * self.nb
        dist = np.empty(rows.shape)
        slab = max(1, (1 << 22) // (self.block * self.dim))
        for s in range(0, len(rows), slab):
            diff = q64[qi[s : s + slab], None] - self.database[np.minimum(rows[s : s + slab], self.n - 1)]
            dist[s : s + slab] = np.einsum("ijk,ijk->ij", diff, diff)
        dist[rows >= self.n] = np.inf
        qi, rows, dist = np.repeat(qi, self.block), rows.reshape(-1), dist.reshape(-1)
        order = np.lexsort((rows, dist, qi))  # by query, then distance, then row
        counts = np.bincount(qi, minlength=n_q)
        assert counts.min() >= k, "fewer candidate rows than k: the bound was violated"
        pick = order[(np.cumsum(counts) - counts)[:, None] + np.arange(k)]
        return torch.from_numpy(dist[pick].astype(np.float32)), torch.from_numpy(rows[pick])


def _augmented_width(dim: int) -> int:
    """Columns of [x, ‖x‖², 0…]: a multiple of 8 keeps the float32 product on its fast path."""
    return -(-(dim + 1) // 8) * 8


def _augment(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write [x, ‖x‖², 0…] of the rows ``x`` (r, D) into ``out`` (≥ r, width, zero past D + 1)."""
    r, dim = x.shape
    out[:r, :dim] = x
    torch.sum(x * x, 1, out=out[:r, dim])
    return out[:r]


def augmented_patches(patches: torch.Tensor) -> torch.Tensor:
    """(N, D) float32 patches → (N, width) [x, ‖x‖², 0…], as :func:`nearest_images_by_product` builds them
    chunk by chunk (the same values): prepared once, for an index that answers many searches."""
    n, dim = patches.shape
    out = torch.zeros(n, _augmented_width(dim))
    for start in range(0, n, 1 << 16):
        _augment(patches[start : start + (1 << 16)], out[start:])
    return out


def nearest_images_by_product(
    patches: torch.Tensor,
    per_image: int,
    queries: torch.Tensor,
    k: int,
    images_per_chunk: int | None = None,
    minima: torch.Tensor | None = None,
    augmented: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's k nearest *images*, an image by its closest patch, against image-major patches.

    patches: (n·P, D) float32 on the CPU, image i's P patches in rows i·P … i·P + P − 1; queries: (m, D).
    One float32 product per chunk of ``images_per_chunk`` images (by default as many as keep a chunk's
    products near 2²³ floats), [x, ‖x‖²]·[−2q, 1] = ‖x‖² − 2 q·x (‖q‖² is
    the same for every row of a query and is added at the end), in cache, reduced at once to each image's
    smallest score; the (n·P, m) product never exists whole. Each thread keeps, per query, the k smallest
    image scores it has seen (this chunk's included); only an image scoring at most their largest can still
    be among the k nearest, and only for those is the closest patch looked up (a few per query and chunk, not
    every image's).
    With torch's thread count > 1 as many threads of one torch thread each share the chunks.
    The answer is the float32 one of FAISS's flat search over every patch, kept per image: the k smallest
    scores, ties to the lower image, and within an image the lower patch.
    Returns (distances (m, k') float32 ascending, rows (m, k') int64 into ``patches``), k' = min(k, n).
    ``minima``: an (n, m) float32 tensor that receives every image's smallest squared distance to every query
    (the last-layer input, as :func:`min_distances_by_image`), from the same products. ``augmented``: the
    patches as :func:`augmented_patches` prepares them, read instead of augmenting each chunk (the answer is the
    same; a few queries then cost one read of the database).
    """
    if patches.device.type != "cpu" or patches.dtype != torch.float32:
        raise ValueError(f"needs CPU float32 patches, got {patches.dtype} on {patches.device}")
    n_rows, dim = patches.shape
    if per_image < 1 or n_rows % per_image:
        raise ValueError(f"{n_rows} patches are not whole images of {per_image} patches")
    n = n_rows // per_image
    m, k = len(queries), min(k, n)
    if minima is not None and (minima.shape != (n, m) or minima.dtype != torch.float32):
        raise ValueError(f"minima must be ({n}, {m}) float32, got {tuple(minima.shape)} {minima.dtype}")
    if m == 0 or k == 0:
        return torch.zeros(m, k), torch.zeros(m, k, dtype=torch.long)
    q = queries.detach().to("cpu", torch.float32)
    width = _augmented_width(dim)
    if augmented is not None and augmented.shape != (n_rows, width):
        raise ValueError(f"augmented patches must be ({n_rows}, {width}), got {tuple(augmented.shape)}")
    qa = torch.zeros(width, m)
    qa[:dim], qa[dim] = -2 * q.t(), 1.0
    if images_per_chunk is None:
        images_per_chunk = max(1, min((1 << 23) // (per_image * m), (1 << 16) // per_image))
    n_chunks = -(-n // images_per_chunk)
    found: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def scan(first: int, step: int) -> None:  # chunks first, first + step, …
        rows = images_per_chunk * per_image
        xa = torch.zeros(rows, width) if augmented is None else None
        buf = torch.empty(rows, m)
        mins = torch.empty(images_per_chunk, m)
        kept = torch.full((m, k), float("inf"))  # per query, the k smallest image scores seen so far
        mine: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for c in range(first, n_chunks, step):
            i0, i1 = c * images_per_chunk, min(n, (c + 1) * images_per_chunk)
            rows_c = slice(i0 * per_image, i1 * per_image)
            xc = augmented[rows_c] if augmented is not None else _augment(patches[rows_c], xa)  # type: ignore[arg-type]
            r = len(xc)
            torch.mm(xc, qa, out=buf[:r])
            scores = buf[:r].view(i1 - i0, per_image, m)
            chunk_min = torch.amin(scores, 1, out=mins[: i1 - i0] if minima is None else minima[i0:i1])
            kept = torch.cat([kept, chunk_min.t()], 1).topk(k, 1, largest=False, sorted=False).values
            img, qi = (chunk_min <= kept.amax(1)).nonzero(as_tuple=True)
            patch = scores[img, :, qi].argmin(1)  # the first among equals: the lower patch
            mine.append((qi, img + i0, chunk_min[img, qi], patch))
        found.extend(mine)  # list.extend is atomic: each thread adds its candidates once

    _over_chunks(scan, n_chunks)
    qi, img, value, patch = (torch.cat(parts) for parts in zip(*found, strict=True))
    order = np.lexsort((img.numpy(), value.numpy(), qi.numpy()))  # by query, then score, then image
    counts = np.bincount(qi.numpy(), minlength=m)
    assert counts.min() >= k, "a query kept fewer than k candidate images"
    pick = torch.from_numpy(order[(np.cumsum(counts) - counts)[:, None] + np.arange(k)])
    q2 = (q * q).sum(1)
    if minima is not None:
        minima.add_(q2).clamp_(min=0.0)
    rows = img[pick] * per_image + patch[pick]
    return torch.clamp(value[pick] + q2[:, None], min=0.0), rows
