"""Exact nearest neighbours by squared L2 between latent patches and prototypes, in torch."""

from __future__ import annotations

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
