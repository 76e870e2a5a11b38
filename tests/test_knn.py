"""BlockKnn: exact k nearest rows by a float32 coarse pass with a proven bound and float64 re-ranking."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from protoaudit.core.knn import BlockKnn
from tests.test_index import _hand_built_index

SMALL = {"block": 4, "chunk": 64, "group": 2}  # many chunks, blocks and groups on small data


def brute_force64(database: torch.Tensor, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 Σ (q − x)² for every row, ascending, ties to the lower row (a stable sort)."""
    d = ((queries.double()[:, None, :] - database.double()[None]) ** 2).sum(-1)
    order = torch.sort(d, dim=1, stable=True).indices[:, :k]
    return d.gather(1, order), order


def assert_same(knn: BlockKnn, database: torch.Tensor, queries: torch.Tensor, k: int) -> None:
    dist, rows = knn.search(queries, k)
    ref_d, ref_r = brute_force64(database, queries, k)
    assert dist.dtype == torch.float32
    assert rows.dtype == torch.int64
    assert rows.shape == ref_r.shape == (len(queries), min(k, len(database)))
    torch.testing.assert_close(rows, ref_r, rtol=0, atol=0)
    torch.testing.assert_close(dist, ref_d.float(), rtol=2**-23, atol=0)  # the float64 values, rounded


@pytest.mark.parametrize(("n", "dim"), [(1, 3), (63, 5), (1000, 16), (4099, 128)])
@pytest.mark.parametrize("params", [SMALL, {}])
def test_equals_float64_brute_force_on_random_data(n: int, dim: int, params: dict[str, int]) -> None:
    gen = torch.Generator().manual_seed(n + dim)
    database = torch.rand(n, dim, generator=gen)
    queries = torch.cat([database[: min(n, 3)], torch.rand(20, dim, generator=gen)])
    knn = BlockKnn(database, **params)
    for k in (1, 5, 17):
        assert_same(knn, database, queries, k)


def test_many_exact_ties_go_to_the_lower_rows() -> None:
    gen = torch.Generator().manual_seed(1)
    base = torch.rand(40, 8, generator=gen)
    database = torch.cat([base, base[torch.randint(0, 40, (600,), generator=gen)], base[:5].repeat(20, 1)])
    queries = torch.cat([base[:6], base[:6] + 1e-3])
    knn = BlockKnn(database, **SMALL)
    for k in (3, 10, 30):  # more tied rows than k: the lowest rows, in order
        assert_same(knn, database, queries, k)
    _, rows = knn.search(base[:1], 5)
    equal = (database == base[0]).all(1).nonzero().ravel()
    assert len(equal) > 5
    assert rows[0].tolist() == equal[:5].tolist()


def test_adversarial_large_norms_and_tiny_differences() -> None:
    # rows ‖x‖ ≈ 1.1e4 that differ by 1e-3: ‖x‖² − 2 q·x in float32 cannot tell them apart (its rounding is
    # ~10 here, the differences ~1e-5), so the coarse pass finds everything a candidate and float64 decides
    gen = torch.Generator().manual_seed(2)
    dim = 32
    centre = torch.full((dim,), 2000.0)
    database = centre + torch.randint(-4, 5, (3000, dim), generator=gen).float() * 2.0**-10
    queries = centre + torch.randint(-4, 5, (7, dim), generator=gen).float() * 2.0**-10 + 2.0**-12
    knn = BlockKnn(database, **SMALL)
    coarse = (database * database).sum(1) - 2 * queries @ database.T
    _, ref_r = brute_force64(database, queries, 5)
    assert not torch.equal(coarse.argsort(dim=1, stable=True)[:, :5], ref_r)  # float32 alone gets it wrong
    for k in (1, 5, 40):
        assert_same(knn, database, queries, k)
    # and a few far rows of large norm among small ones: their blocks' bounds are large, the others' small
    mixed = torch.rand(2000, dim, generator=gen)
    mixed[::97] *= 1e4
    assert_same(BlockKnn(mixed, **SMALL), mixed, torch.cat([mixed[:3], mixed[::97][:3] * 1.0001]), 6)


def test_k_beyond_the_candidates_and_the_whole_database() -> None:
    gen = torch.Generator().manual_seed(3)
    database = torch.rand(150, 6, generator=gen)
    queries = torch.rand(4, 6, generator=gen)
    knn = BlockKnn(database, **SMALL)
    for k in (64, 149, 150, 1000):  # more than the candidate blocks hold; k = ntotal; k > ntotal
        assert_same(knn, database, queries, k)
    assert knn.search(queries, 1000)[1].shape == (4, 150)
    assert knn.search(queries[:0], 5)[1].shape == (0, 5)


def test_the_error_bound_holds() -> None:
    # |coarse − exact| ≤ bound for every row, the coarse score computed as the search computes it
    gen = torch.Generator().manual_seed(4)
    for scale in (1.0, 1e3):
        database = (torch.rand(5000, 128, generator=gen) - 0.3) * scale
        database[::50] *= 7
        queries = (torch.rand(49, 128, generator=gen) - 0.3) * scale
        knn = BlockKnn(database)
        coarse = knn.coarse_scores(queries)
        q64, x64 = queries.double(), database.double()
        exact = (x64 * x64).sum(1) - 2 * q64 @ x64.T
        bound = knn._bound(q64.norm(dim=1, keepdim=True), x64.norm(dim=1)[None] * (1 + 1e-5))  # ≥ its M
        error = (coarse.double() - exact).abs()
        assert (error <= bound).all()
        assert error.max() > 1e-3 * bound.max()  # the bound is not vacuous: within 1000× of what happens
        # a block's bound covers each of its rows
        rows = torch.arange(len(database))
        chunk, slot = rows // knn.chunk, rows % knn.nb
        assert (knn.block_norm[(chunk * knn.nb + slot).numpy()] >= x64.norm(dim=1).numpy()).all()


def test_patch_index_uses_it_lazily(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    vectors = rng.random((2000, 16), dtype=np.float32)
    vectors[1500:1520] = vectors[3]
    index = _hand_built_index(tmp_path, vectors, list(np.repeat(np.arange(400), 5)))
    index.backend = "torch"
    assert index._block_knn is None  # loading does not prepare it
    queries = np.concatenate([vectors[3:4], rng.random((48, 16), dtype=np.float32)])
    dist, rows = index.search(queries, 5)
    if index.device.type == "cpu":
        assert index._block_knn is not None
    ref_d, ref_r = brute_force64(torch.from_numpy(vectors), torch.from_numpy(queries), 5)
    np.testing.assert_array_equal(rows, ref_r.numpy())
    np.testing.assert_allclose(dist, ref_d.numpy(), rtol=1e-6, atol=1e-6)
    assert rows[0].tolist() == [3, 1500, 1501, 1502, 1503]


def test_same_answer_on_one_thread_and_on_several() -> None:
    gen = torch.Generator().manual_seed(6)
    database = torch.rand(3000, 24, generator=gen)
    queries = torch.rand(49, 24, generator=gen)
    knn = BlockKnn(database, block=8, chunk=256)
    before = torch.get_num_threads()
    try:
        answers = []
        for threads in (1, 3):  # serial; three threads sharing the chunks
            torch.set_num_threads(threads)
            answers.append(knn.search(queries, 7))
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(answers[0], answers[1], rtol=0, atol=0)
    assert_same(knn, database, queries, 7)


def test_pool_workers_keep_one_torch_thread_after_their_first_operation() -> None:
    from protoaudit.core.knn import _one_thread_pool

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        knn = BlockKnn(torch.rand(3000, 24, generator=torch.Generator().manual_seed(8)), block=8, chunk=256)
        knn.search(torch.rand(5, 24), 3)

        def after_a_large_operation(_: int) -> int:
            torch.rand(512, 512).sum()  # an operation that sets up the thread's parallel region
            return torch.get_num_threads()

        assert list(_one_thread_pool(2).map(after_a_large_operation, range(2))) == [1, 1]
        assert torch.get_num_threads() == 2  # the caller's count, as it was
    finally:
        torch.set_num_threads(before)


def test_reduced_matmul_precision_setting_still_gives_the_exact_answer() -> None:
    gen = torch.Generator().manual_seed(9)
    database, queries = torch.rand(2000, 16, generator=gen), torch.rand(7, 16, generator=gen)
    knn = BlockKnn(database, block=8, chunk=256)
    matmul = torch.backends.mkldnn.matmul
    saved = matmul.fp32_precision
    try:
        matmul.fp32_precision = "bf16"  # torch then refuses its legacy precision getter
        assert_same(knn, database, queries, 5)
    finally:
        matmul.fp32_precision = saved


@pytest.mark.parametrize("where", ["database", "queries"])
def test_non_finite_input_is_refused(where: str) -> None:
    database, queries = torch.rand(500, 8), torch.rand(3, 8)
    (database if where == "database" else queries)[1, 2] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        BlockKnn(database).search(queries, 2)
