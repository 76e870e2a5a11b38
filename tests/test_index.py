"""The patch index: exact search equals brute force, one patch per image, round trips, stale indexes refused."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from protoaudit.core.geometry import patch_part, patch_parts
from protoaudit.core.knn import (
    augmented_patches,
    exact_knn_torch,
    latents_to_patches,
    nearest_images_by_product,
)
from protoaudit.engine.index.build import (
    build_faiss_index,
    collect_latents,
    index_run,
    patch_metadata,
    write_index,
)
from protoaudit.engine.index.files import META_COLUMNS
from protoaudit.engine.index.queries import (
    load_query_image,
    nearest_patches_to_image,
    nearest_patches_to_prototype,
    nearest_prototypes_to_image,
)
from protoaudit.engine.index.search import PatchIndex, index_status, load_index
from protoaudit.engine.io import load_tensors, save_tensors
from protoaudit.engine.run import load_run
from protoaudit.errors import CheckpointError, InputError, Remedy, StaleIndexError


def brute_force(database: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact k-NN in float64 torch by explicit differences; ties by the lower row."""
    x = torch.from_numpy(database).double()
    q = torch.from_numpy(queries).double()
    d = ((q[:, None, :] - x[None, :, :]) ** 2).sum(-1)  # (n, N)
    order = torch.sort(d, dim=1, stable=True).indices[:, :k]
    return d.gather(1, order).numpy(), order.numpy()


def brute_force_per_image(
    database: np.ndarray, images: np.ndarray, queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest images (each by its closest patch): (distances, rows of those closest patches)."""
    x = torch.from_numpy(database).double()
    q = torch.from_numpy(queries).double()
    d = ((q[:, None, :] - x[None, :, :]) ** 2).sum(-1).numpy()
    out_d = np.full((len(q), k), np.inf)
    out_r = np.full((len(q), k), -1)
    for i, row in enumerate(d):
        best = {}
        for r in np.argsort(row, kind="stable"):
            best.setdefault(int(images[r]), int(r))
        ranked = sorted(best.values(), key=lambda r: (row[r], r))[:k]
        out_d[i, : len(ranked)] = row[ranked]
        out_r[i, : len(ranked)] = ranked
    return out_d, out_r


@pytest.fixture(scope="module")
def run_copy(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the tiny run, for tests that rewrite files."""
    target = tmp_path_factory.mktemp("index") / "tiny"
    shutil.copytree(tiny_run, target)
    return target


# -- the part at a patch -------------------------------------------------------------------------------


def test_patch_part_definition() -> None:
    """A 12×12 mask on a 3×3 grid of 4×4 cells; each patch looks at its cell widened by 2 px on each side and
    needs a part on at least 4 pixels (a quarter of a cell). Expected values counted by hand."""
    mask = np.zeros((12, 12), dtype=np.uint8)
    mask[0:4, 0:4] = 3  # fills cell (0, 0)
    mask[6:8, 10:12] = 5  # 4 px inside cell (1, 2), also within the neighbourhood of (2, 2)
    mask[10:12, 0] = 2  # 2 px: too few anywhere
    expected = [[3, 3, 0], [3, 3, 5], [0, 0, 5]]
    assert patch_parts(mask, 3).tolist() == expected
    for h in range(3):
        for w in range(3):
            assert patch_part(mask, h, w, (3, 3)) == expected[h][w]
    mask[9, 8:11] = 7  # 3 px of part 7 next to part 5's 4 px in (2, 2)'s neighbourhood: part 5 still wins
    assert patch_part(mask, 2, 2, 3) == 5
    mask[9, 6:8] = 7  # now 5 px of part 7: it wins
    assert patch_part(mask, 2, 2, 3) == 7
    assert patch_part(None, 0, 0, 2) == -1
    assert (patch_parts(None, (2, 3)) == -1).all()
    with pytest.raises(ValueError, match="outside"):
        patch_part(mask, 3, 0, 3)


# -- the index written by training ----------------------------------------------------------------------


@pytest.mark.parametrize("member", ["vgg", "resnet"])
def test_training_indexes_hold_the_final_members_latents(tiny_run: Path, member: str) -> None:
    run = load_run(tiny_run)
    bundle = run.dataset()
    model = run.member(member)
    for split_name, split in (("train", bundle.push), ("test", bundle.test)):
        index = load_index(tiny_run, member, split_name)
        z = collect_latents(model, split, 64, torch.device("cpu"))
        _, _, hh, ww = z.shape
        assert index.grid == (hh, ww)
        assert index.ntotal == len(split) * hh * ww
        # the index came from the selected push pass / the test pass: the same as a fresh forward pass
        np.testing.assert_allclose(index.vectors(), latents_to_patches(z), atol=1e-5)
        meta = index.meta
        assert list(meta.columns) == META_COLUMNS
        assert meta["image_id"].iloc[:: hh * ww].tolist() == list(split.image_ids)
        assert meta["label"].iloc[:: hh * ww].tolist() == [int(v) for v in split.labels]
        row = 5 * hh * ww + 2 * ww + 1  # image 5, patch (2, 1)
        assert (meta["image_index"][row], meta["h"][row], meta["w"][row]) == (5, 2, 1)
        assert meta["part"][row] == patch_part(split.part_mask(5), 2, 1, (hh, ww))
        assert (meta["part"] >= 0).all()
        assert (meta["part"] > 0).any()
        latents = index.image_latents(5)
        np.testing.assert_allclose(latents, z[5].numpy(), atol=1e-5)


def test_flat_search_equals_brute_force_torch(tiny_run: Path) -> None:
    run = load_run(tiny_run)
    for member in ("vgg", "resnet"):
        index = load_index(tiny_run, member, "train", backend="faiss")
        database = index.vectors()
        rng = np.random.default_rng(0)
        queries = np.concatenate(
            [
                run.member(member).prototype_vectors.detach().numpy(),  # nearest patches to prototypes
                load_index(tiny_run, member, "test").vectors()[rng.choice(200, 30, replace=False)],
            ]
        ).astype(np.float32)
        assert len(queries) >= 20  # faiss's BLAS path (≥ 20 queries) as well as …
        for batch in (queries, queries[:5]):  # … its direct path
            dist, rows = index.search(batch, 10)
            ref_d, ref_r = brute_force(database, batch, 10)
            np.testing.assert_array_equal(rows, ref_r)
            np.testing.assert_allclose(dist, ref_d, atol=1e-4)
            assert dist.dtype == np.float32
            assert rows.dtype == np.int64
        # the torch backend (the GPU path where CUDA exists without a GPU faiss), here on the CPU
        torch_index = load_index(tiny_run, member, "train", backend="torch")
        assert torch_index.backend == "torch"
        t_dist, t_rows = torch_index.search(queries, 10)
        dist, rows = index.search(queries, 10)
        ref_d, ref_r = brute_force(database, queries, 10)
        np.testing.assert_array_equal(t_rows, ref_r)
        np.testing.assert_allclose(t_dist, ref_d, atol=1e-5)
        np.testing.assert_allclose(t_dist, dist, atol=1e-4)
        assert (t_rows == rows).mean() > 0.99  # the same answers, up to the order of float32 near-ties


def test_per_image_search_equals_brute_force_on_a_run(tiny_run: Path) -> None:
    index = load_index(tiny_run, "vgg", "train")
    database = index.vectors()
    images = index.meta["image_index"].to_numpy()
    queries = load_run(tiny_run).member("vgg").prototype_vectors.detach().numpy()
    for backend in ("faiss", "torch"):
        idx = load_index(tiny_run, "vgg", "train", backend=backend)
        dist, rows = idx.search(queries, 6, per_image=True)
        ref_d, ref_r = brute_force_per_image(database, images, queries, 6)
        np.testing.assert_array_equal(rows, ref_r)
        np.testing.assert_allclose(dist, ref_d, atol=1e-4)
        for r in rows:
            assert len(set(images[r])) == 6  # six distinct training images


def _hand_built_index(
    tmp_path: Path, vectors: np.ndarray, images: list[int], kind: str = "flat"
) -> PatchIndex:
    meta = pd.DataFrame(
        {
            "image_index": images,
            "image_id": [f"img{i}" for i in images],
            "image_path": "",
            "label": [i % 2 for i in images],
            "h": 0,
            "w": list(range(len(images))),
            "part": -1,
        }
    )
    member = tmp_path / "members" / "m"
    member.mkdir(parents=True)
    (member / "model.json").write_text(json.dumps({"weights_sha256": hashlib.sha256(b"weights").hexdigest()}))
    (member / "model.safetensors").write_bytes(b"weights")

    class Config:
        nlist, nprobe = 4, 4

    Config.kind = kind  # type: ignore[attr-defined]
    write_index(member, "train", vectors, meta, (1, len(images)), 8, Config())  # type: ignore[arg-type]
    return load_index(tmp_path, "m", "train", backend="faiss")


def test_nearest_images_from_minima_equal_the_per_image_search_with_ties(tmp_path: Path) -> None:
    """The k nearest images read off every image's min distance (what a test pass computes) are the index
    search's: ascending distance, ties to the lower image, each image's closest patch (the first among equals,
    found again among that image's patches)."""
    from protoaudit.engine.index.search import nearest_images, nearest_images_from_minima

    rng = np.random.default_rng(3)
    n, per, dim, m = 9, 4, 3, 5
    vectors = rng.integers(0, 3, size=(n * per, dim)).astype(np.float32)  # small integers: exact, many ties
    vectors[4:8] = vectors[0:4]  # image 1 repeats image 0: equal distances, image 0 must come first
    meta_images = np.repeat(np.arange(n), per).tolist()
    index = _hand_built_index(tmp_path, vectors, meta_images)
    queries = rng.integers(0, 3, size=(m, dim)).astype(np.float32)
    d = ((vectors[:, None, :] - queries[None]) ** 2).sum(-1).reshape(n, per, m)  # exact in float32
    minima = torch.from_numpy(d.min(1))
    for k in (1, 4, n, n + 3):
        got = nearest_images_from_minima(index, queries, minima, k)
        want = nearest_images(index, queries, k, with_minima=True)
        np.testing.assert_array_equal(got.rows, want.rows)
        np.testing.assert_array_equal(got.distances, want.distances)
        assert got.min_distances is not None
        assert torch.equal(got.min_distances, minima)
    first = nearest_images_from_minima(index, queries, minima, n)
    for j in range(m):  # image 0 ranks before its copy, image 1
        ranked = list(first.rows[j] // per)
        assert ranked.index(0) < ranked.index(1)
    with pytest.raises(ValueError, match="do not fit"):
        nearest_images_from_minima(index, queries[:2], minima, 3)


def test_per_image_hand_built_case(tmp_path: Path) -> None:
    # 1-D patches; image 0 owns the three nearest patches to the query 0.0, then image 1, image 2, image 3
    values = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 2.0, 0.7, 3.0]
    images = [0, 0, 0, 1, 1, 2, 2, 3, 3]
    index = _hand_built_index(tmp_path, np.array(values, np.float32)[:, None], images)
    query = np.zeros((1, 1), np.float32)
    dist, rows = index.search(query, 3)
    assert rows.tolist() == [[0, 1, 2]]  # all patches: image 0 three times
    dist, rows = index.search(query, 3, per_image=True)
    assert rows.tolist() == [[0, 3, 5]]  # one patch per image: images 0, 1, 2 by their closest patch
    np.testing.assert_allclose(dist, [[0.01, 0.16, 0.36]], atol=1e-6)
    dist, rows = index.search(query, 6, per_image=True)  # only four images: padded
    assert rows.tolist() == [[0, 3, 5, 7, -1, -1]]
    assert np.isinf(dist[0, 4:]).all()
    dist, rows = index.search(np.array([[2.9]], np.float32), 2, per_image=True)
    assert rows.tolist() == [[8, 6]]  # image 3 by 3.0, image 2 by 2.0 (not its closer-to-0 patch 0.6)
    np.testing.assert_allclose(dist, [[0.01, 0.81]], atol=1e-5)
    dist, rows = index.search(query, 20)
    assert rows[0, 9:].tolist() == [-1] * 11
    assert np.isinf(dist[0, 9:]).all()
    # images of uneven patch counts: the patch search, and every image's distance from the stored patches
    assert not index._image_major
    minima = torch.empty(4, 1)
    index.search(query, 2, per_image=True, minima=minima)
    np.testing.assert_allclose(minima[:, 0].numpy(), [0.01, 0.16, 0.36, 0.49], atol=1e-6)


def test_per_image_grows_k_until_enough_images(tmp_path: Path) -> None:
    # image 0 has 40 patches nearer than any other image's: the first search (4k = 8 patches) sees one image
    near = np.linspace(0.0, 0.4, 40)
    far = np.array([1.0, 1.1, 5.0])
    values = np.concatenate([near, far]).astype(np.float32)[:, None]
    images = [0] * 40 + [1, 2, 3]
    index = _hand_built_index(tmp_path, values, images)
    _dist, rows = index.search(np.zeros((1, 1), np.float32), 2, per_image=True)
    assert rows.tolist() == [[0, 40]]


@pytest.mark.parametrize("threads", [1, 2])
def test_nearest_images_by_product_equals_brute_force_with_ties(threads: int) -> None:
    rng = np.random.default_rng(4)
    n, per, dim = 300, 6, 5
    database = rng.random((n * per, dim), dtype=np.float32)
    database[250 * per : 251 * per] = database[17 * per : 18 * per]  # image 250 repeats image 17: 17 first
    database[40 * per + 4] = database[40 * per + 2]  # two equal patches in one image: the lower one
    queries = np.concatenate(
        [database[[17 * per + 3, 40 * per + 2]], rng.random((20, dim), dtype=np.float32)]
    )
    images = np.repeat(np.arange(n), per)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for k in (1, 4, 12):
            ref_d, ref_r = brute_force_per_image(database, images, queries, k)
            for chunk in (1, 7, None):  # one image per product, a few, the default
                d, r = nearest_images_by_product(
                    torch.from_numpy(database), per, torch.from_numpy(queries), k, chunk
                )
                np.testing.assert_array_equal(r.numpy(), ref_r)
                np.testing.assert_allclose(d.numpy(), ref_d, atol=1e-5)
                assert d.dtype == torch.float32
        # the patches prepared once give the same answer, bit for bit, for many queries and for one
        prepared = augmented_patches(torch.from_numpy(database))
        for q in (queries, queries[:1]):
            plain = nearest_images_by_product(torch.from_numpy(database), per, torch.from_numpy(q), 4)
            read = nearest_images_by_product(
                torch.from_numpy(database), per, torch.from_numpy(q), 4, augmented=prepared
            )
            assert torch.equal(plain[0], read[0])
            assert torch.equal(plain[1], read[1])
        # every image's smallest distance to every query, from the same products
        minima = torch.empty(n, len(queries))
        nearest_images_by_product(
            torch.from_numpy(database), per, torch.from_numpy(queries), 3, minima=minima
        )
        exact = ((database[None, :, :].astype(np.float64) - queries[:, None, :]) ** 2).sum(-1)
        np.testing.assert_allclose(minima.numpy(), exact.reshape(len(queries), n, per).min(2).T, atol=1e-5)
        _, r = nearest_images_by_product(torch.from_numpy(database), per, torch.from_numpy(queries[:2]), 2)
        assert r.tolist() == [[17 * per + 3, 250 * per + 3], [40 * per + 2, r[1, 1].item()]]
        d, r = nearest_images_by_product(
            torch.from_numpy(database[: 3 * per]), per, torch.from_numpy(queries), 9
        )
        assert r.shape == (len(queries), 3)  # k larger than the number of images: every image once
        assert sorted(set((r // per).flatten().tolist())) == [0, 1, 2]
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="whole images"):
        nearest_images_by_product(torch.from_numpy(database[:7]), per, torch.from_numpy(queries), 2)


def test_per_image_search_of_a_built_index_goes_through_the_product(
    tiny_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import protoaudit.engine.index.search as search

    calls: list[int] = []
    real = search.nearest_images_by_product

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(search, "nearest_images_by_product", counted)
    index = load_index(tiny_run, "vgg", "train", backend="faiss")
    assert index._image_major
    queries = load_run(tiny_run).member("vgg").prototype_vectors.detach().numpy()
    dist, rows = index.search(queries, 3, per_image=True)
    assert calls == [1]
    ref_d, ref_r = brute_force_per_image(index.vectors(), index.meta["image_index"].to_numpy(), queries, 3)
    np.testing.assert_array_equal(rows, ref_r)
    np.testing.assert_allclose(dist, ref_d, atol=1e-4)


def test_ivf_visiting_every_list_is_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    vectors = rng.random((400, 8), dtype=np.float32)
    images = list(np.repeat(np.arange(100), 4))
    index = _hand_built_index(tmp_path, vectors, images, kind="ivf")
    assert index.info["kind"] == "ivf"
    assert index.info["nlist"] == 4
    assert index.index.nprobe == 4
    queries = rng.random((7, 8), dtype=np.float32)
    dist, rows = index.search(queries, 5)
    ref_d, ref_r = brute_force(vectors, queries, 5)
    np.testing.assert_array_equal(rows, ref_r)
    np.testing.assert_allclose(dist, ref_d, atol=1e-4)


def test_exact_knn_torch_chunks_and_ties() -> None:
    rng = np.random.default_rng(2)
    database = rng.random((300, 6), dtype=np.float32)
    database[17] = database[250]  # a tie: the lower row comes first
    queries = np.concatenate([database[250:251], rng.random((9, 6), dtype=np.float32)])
    d, r = exact_knn_torch(torch.from_numpy(database), torch.from_numpy(queries), 7, chunk=64)
    ref_d, ref_r = brute_force(database, queries, 7)
    np.testing.assert_array_equal(r.numpy(), ref_r)
    np.testing.assert_allclose(d.numpy(), ref_d, atol=1e-5)
    assert r[0, :2].tolist() == [17, 250]
    d, r = exact_knn_torch(torch.from_numpy(database[:3]), torch.from_numpy(queries), 7)
    assert r.shape == (10, 3)  # k larger than the database
    small_blocks = exact_knn_torch(
        torch.from_numpy(database), torch.from_numpy(queries), 7, chunk=64, memory=500
    )
    np.testing.assert_array_equal(small_blocks[1].numpy(), ref_r)  # queries in blocks of one or two


def test_interactive_search_is_exact_by_blas(tmp_path: Path) -> None:
    # one image's 49 patches against the index, as `nearest-patches --image` asks: the interactive path
    rng = np.random.default_rng(3)
    vectors = rng.random((3000, 16), dtype=np.float32)
    vectors[2500] = vectors[40]  # an exact tie: the lower row comes first
    vectors[1200:1230] = vectors[7]  # more equal patches than the candidate margin
    images = list(np.repeat(np.arange(600), 5))
    _hand_built_index(tmp_path, vectors, images)
    index = load_index(tmp_path, "m", "train", interactive=True)
    if not torch.cuda.is_available():
        assert index.backend == "torch"
    queries = np.concatenate([vectors[40:41], vectors[100:148] + rng.normal(0, 0.01, (48, 16))]).astype(
        np.float32
    )
    for k in (1, 5, 12):
        dist, rows = index.search(queries, k)
        ref_d, ref_r = brute_force(vectors, queries, k)
        np.testing.assert_array_equal(rows, ref_r)
        np.testing.assert_allclose(dist, ref_d, atol=1e-4)
        assert dist.dtype == np.float32
    assert index.search(queries[:1], 2)[1].tolist() == [[40, 2500]]
    # 31 equal patches: the five lowest rows, in order
    assert index.search(vectors[7:8], 5)[1].tolist() == [[7, 1200, 1201, 1202, 1203]]
    dist, rows = index.search(queries, 4, per_image=True)
    ref_d, ref_r = brute_force_per_image(vectors, np.asarray(images), queries, 4)
    np.testing.assert_array_equal(rows, ref_r)
    np.testing.assert_allclose(dist, ref_d, atol=1e-4)
    # the same answers as FAISS gives for the batch (its BLAS path: more than 20 queries)
    faiss_index = load_index(tmp_path, "m", "train", backend="faiss")
    np.testing.assert_array_equal(faiss_index.search(queries, 5)[1], index.search(queries, 5)[1])


def test_nearest_patches_to_image_equals_brute_force(tiny_run: Path) -> None:
    from protoaudit.engine.index.queries import image_latents

    run = load_run(tiny_run)
    bundle = run.dataset()
    query = load_query_image(run, bundle.test.image_ids[1], bundle)
    table = nearest_patches_to_image(run, query, "vgg", k=3)
    index = load_index(tiny_run, "vgg", "train")
    z = image_latents(run.member("vgg"), query)
    patches = z.permute(1, 2, 0).reshape(-1, z.shape[0]).numpy()
    ref_d, ref_r = brute_force(index.vectors(), patches, 3)
    meta = index.meta.iloc[ref_r.ravel()]
    np.testing.assert_array_equal(table["image_index"].to_numpy(), meta["image_index"].to_numpy())
    np.testing.assert_array_equal(table[["h", "w"]].to_numpy(), meta[["h", "w"]].to_numpy())
    np.testing.assert_allclose(table["distance"].to_numpy(), ref_d.ravel(), atol=1e-4)


def test_write_and_load_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    vectors = rng.random((24, 5), dtype=np.float32)
    index = _hand_built_index(tmp_path, vectors, list(np.repeat(np.arange(6), 4)))
    np.testing.assert_array_equal(index.vectors(), vectors)
    assert index.meta["image_id"].tolist()[:5] == ["img0"] * 4 + ["img1"]
    assert index.meta.dtypes["image_index"] == np.int64
    assert index.info["n_patches"] == 24
    assert index.info["n_images"] == 6
    assert index.info["dim"] == 5
    assert index.info["member"] == "m"
    assert index.info["split"] == "train"
    with pytest.raises(ValueError, match=r"\(n, 5\)"):
        index.search(np.zeros((2, 4), np.float32), 3)


def test_patch_metadata_order() -> None:
    from protoaudit.engine.data import TensorSplit

    masks = np.zeros((2, 4, 4), np.uint8)
    masks[1, :2, 2:] = 9
    split = TensorSplit(np.zeros((2, 4, 4, 3), np.uint8), np.array([1, 0]), ["a", "b"], masks)
    meta = patch_metadata(split, (2, 2))
    assert meta[["image_index", "h", "w"]].values.tolist() == [
        [0, 0, 0],
        [0, 0, 1],
        [0, 1, 0],
        [0, 1, 1],
        [1, 0, 0],
        [1, 0, 1],
        [1, 1, 0],
        [1, 1, 1],
    ]
    # part 9 fills cell (0, 1) of image 1 and reaches into every other cell's neighbourhood (±1 px) with at
    # least a quarter cell (1 px): cells (0, 0) 2 px, (1, 0) 1 px, (1, 1) 2 px
    assert meta["part"].tolist() == [0, 0, 0, 0, 9, 9, 9, 9]
    assert meta["label"].tolist() == [1] * 4 + [0] * 4
    assert latents_to_patches(torch.arange(8.0).view(1, 2, 2, 2)).tolist() == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_parts_from_keypoints() -> None:
    from protoaudit.core.geometry import patch_parts_from_keypoints
    from protoaudit.engine.data import TensorSplit

    # a 16 px image, 2 × 2 grid of 8 px cells; part 4 at (1, 1) and part 2 at (6, 7): both in cell (0, 0)
    keypoints = np.array([[4, 1, 1], [2, 6, 7], [9, 15, 8]])
    assert patch_parts_from_keypoints(keypoints, 2, 16).tolist() == [[2, 0], [0, 9]]
    assert patch_parts_from_keypoints(np.zeros((0, 3)), (1, 3), 16).tolist() == [[0, 0, 0]]

    class KeypointSplit(TensorSplit):
        def part_keypoints(self, index: int) -> np.ndarray | None:
            return keypoints if index == 0 else None

    split = KeypointSplit(np.zeros((2, 16, 16, 3), np.uint8), np.array([0, 1]), ["a", "b"])
    assert patch_metadata(split, (2, 2), 16)["part"].tolist() == [2, 0, 0, 9, -1, -1, -1, -1]
    assert patch_metadata(split, (2, 2))["part"].tolist() == [-1] * 8  # no image size: keypoints unused


# -- stale and damaged indexes --------------------------------------------------------------------------


def _record_weights(weights: Path) -> None:
    """Record the weights' new sha256 in model.json, as saving a changed member does."""
    meta_path = weights.with_name("model.json")
    meta = json.loads(meta_path.read_text())
    meta["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    meta_path.write_text(json.dumps(meta))


def test_stale_index_is_refused_and_rebuilt(run_copy: Path) -> None:
    weights = run_copy / "members" / "vgg" / "model.safetensors"
    state = load_tensors(weights)
    state["prototype_vectors"] = state["prototype_vectors"] + 0.01
    save_tensors(weights, state)
    _record_weights(weights)  # the member changed (as a re-save does): model.json records the new weights
    with pytest.raises(StaleIndexError, match=r"model\.safetensors") as exc:
        load_index(run_copy, "vgg", "train")
    assert "\n" not in str(exc.value)
    assert exc.value.remedy == Remedy("rebuild it", "index", str(run_copy))  # the CLI words it
    assert exc.value.exit_code == 2
    assert index_status(run_copy, "vgg", "test") == "stale"
    assert index_status(run_copy, "resnet", "train") == "fresh"
    table = index_run(load_run(run_copy), device="cpu")
    built = table[table.status == "built"]
    assert sorted(zip(built.member, built.split, strict=True)) == [("vgg", "test"), ("vgg", "train")]
    assert (table[table.member == "resnet"].status == "fresh").all()
    assert load_index(run_copy, "vgg", "train").ntotal == table[table.member == "vgg"].n_patches.iloc[0]


def test_missing_and_damaged_index(run_copy: Path) -> None:
    (run_copy / "members" / "resnet" / "patches_test.parquet").unlink()
    with pytest.raises(CheckpointError, match="no test patch index") as missing:
        load_index(run_copy, "resnet", "test")
    assert missing.value.remedy == Remedy("build it", "index", str(run_copy))
    (run_copy / "members" / "resnet" / "patches.faiss").write_bytes(b"not an index")
    with pytest.raises(StaleIndexError, match="interrupted build"):
        load_index(run_copy, "resnet", "train")
    with pytest.raises(InputError, match="no member 'nope'"):
        load_index(run_copy, "nope", "train")
    with pytest.raises(InputError, match="split must be one of"):
        load_index(run_copy, "resnet", "val")
    index_run(load_run(run_copy), ["resnet"], device="cpu")
    assert index_status(run_copy, "resnet", "test") == index_status(run_copy, "resnet", "train") == "fresh"


# -- queries -------------------------------------------------------------------------------------------


def test_query_images(tiny_run: Path, tmp_path: Path) -> None:
    from PIL import Image

    run = load_run(tiny_run)
    bundle = run.dataset()
    by_id = load_query_image(run, bundle.test.image_ids[3], bundle)
    assert by_id.split == "test"
    assert by_id.index == 3
    assert by_id.label == int(bundle.test.labels[3])
    assert torch.equal(by_id.pixels, bundle.test.batch([3])[0])
    array = (by_id.pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array).resize((50, 70)).save(tmp_path / "img.png")
    from_file = load_query_image(run, tmp_path / "img.png")
    assert from_file.pixels.shape == (3, 32, 32)
    assert from_file.label is None
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(InputError, match="cannot read image"):
        load_query_image(run, tmp_path / "bad.png")
    with pytest.raises(InputError, match="neither a file nor an image id"):
        load_query_image(run, tmp_path / "missing.png", bundle)


def test_query_tables(tiny_run: Path) -> None:
    run = load_run(tiny_run)
    bundle = run.dataset()
    image_id = bundle.test.image_ids[0]
    table = nearest_patches_to_prototype(run, "vgg", 2, k=4, split="test")
    assert list(table["rank"]) == [1, 2, 3, 4]
    assert table["image_id"].is_unique
    assert table["distance"].is_monotonic_increasing
    every = nearest_patches_to_prototype(run, "vgg", 2, k=4, per_image=False)
    proto = run.prototypes("vgg").iloc[2]
    # after push the prototype is one of its source image's patches: distance 0 at the source
    assert every["image_id"].iloc[0] == proto["source_image"]
    assert every["distance"].iloc[0] < 1e-5
    assert (every["h"].iloc[0], every["w"].iloc[0]) == (proto["h"], proto["w"])
    with pytest.raises(InputError, match="prototypes 0…11"):
        nearest_patches_to_prototype(run, "vgg", 12)

    patches = nearest_patches_to_image(run, image_id, "resnet", k=2)
    assert len(patches) == 16 * 2
    assert set(patches["query_h"]) == {0, 1, 2, 3}

    protos = nearest_prototypes_to_image(run, image_id, k=2)
    assert set(protos["member"]) == {"vgg", "resnet"}
    assert len(protos) == 2 * 16 * 2
    query = load_query_image(run, image_id, bundle)
    for member in ("vgg", "resnet"):
        with torch.no_grad():
            _, min_distances = run.member(member)(query.pixels[None])
        mine = protos[protos.member == member]
        # each prototype's best patch: the smallest distance in the table is the model's smallest min distance
        assert mine["distance"].min() == pytest.approx(float(min_distances.min()), abs=1e-5)
        best = mine[mine["rank"] == 1]
        assert (
            mine.groupby(["h", "w"])["distance"].min().values
            == best.sort_values(["h", "w"])["distance"].values
        ).all()


def test_build_faiss_index_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="flat' or 'ivf"):
        build_faiss_index(np.zeros((4, 2), np.float32), "hnsw")


def test_index_and_query_commands(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from .conftest import run_cli

    run_dir = tmp_path / "tiny"
    shutil.copytree(tiny_run, run_dir)
    code, out, _ = run_cli(["index", str(run_dir), "--json"], capsys)
    assert code == 0
    assert {r["status"] for r in json.loads(out)["indexes"]} == {"fresh"}
    code, out, _ = run_cli(
        ["nearest-patches", str(run_dir), "-m", "vgg", "-p", "1", "--k", "3", "--json"], capsys
    )
    assert code == 0
    rows = json.loads(out)["rows"]
    assert [r["rank"] for r in rows] == [1, 2, 3]
    assert len({r["image_id"] for r in rows}) == 3
    code, out, err = run_cli(
        [
            "nearest-patches",
            str(run_dir),
            "-m",
            "vgg",
            "-p",
            "1",
            "--k",
            "3",
            "--all-patches",
            "--split",
            "test",
        ],
        capsys,
    )
    assert code == 0
    # off a terminal: the title on stderr, the table on stdout as tab-separated lines, every value in full
    assert "nearest test patches to prototype 1 of vgg" in err
    lines = out.splitlines()
    header = lines[0].split("\t")
    assert {"rank", "image_id", "distance"} <= set(header)
    assert len(lines) == 4
    assert all(len(line.split("\t")) == len(header) for line in lines)
    ids = [line.split("\t")[header.index("image_id")] for line in lines[1:]]
    assert all(re.fullmatch(r"test/\d{6}", i) for i in ids), ids  # never cut to "test/00…"
    assert "…" not in out
    code, _, err = run_cli(["nearest-patches", str(run_dir), "-m", "vgg"], capsys)
    assert code == 2
    assert "exactly one query" in err
    code, out, _ = run_cli(["nearest-prototypes", str(run_dir), "test/000050", "--k", "2", "--json"], capsys)
    assert code == 0
    assert len(json.loads(out)["rows"]) == 2 * 16 * 2
    weights = run_dir / "members" / "vgg" / "model.safetensors"
    state = load_tensors(weights)
    state["last_layer.weight"] = state["last_layer.weight"] * 2
    save_tensors(weights, state)
    _record_weights(weights)
    code, out, err = run_cli(["nearest-patches", str(run_dir), "-m", "vgg", "--image", "test/000050"], capsys)
    assert code == 2
    assert out == ""
    assert f"rebuild it with: protoaudit index {run_dir}" in err
    code, out, _ = run_cli(["index", str(run_dir), "--split", "train", "--json"], capsys)
    assert code == 0
    built = [(r["member"], r["split"]) for r in json.loads(out)["indexes"] if r["status"] == "built"]
    assert built == [("vgg", "train")]
