"""Tests of the embedded dataset with known parts (protoaudit.data.parts)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from protoaudit.engine.data import parts
from protoaudit.engine.data.parts import (
    NOISE_AMPLITUDE,
    PartsData,
    PartsSpec,
    generate_parts,
    load_parts,
    part_defs,
)

SMALL = PartsSpec(
    n_classes=3,
    image_size=40,
    train_per_class=6,
    test_per_class=3,
    parts_per_class=3,  # 9 discriminative parts: the 9th is striped
    shared_parts=2,
    clutter=6,
    part_min=7,
    part_max=10,
    drop_prob=0.3,
    seed=1,
)


@pytest.fixture(scope="module")
def small() -> PartsData:
    return generate_parts(SMALL)


def _same(a: PartsData, b: PartsData) -> bool:
    return (
        np.array_equal(a.images, b.images)
        and np.array_equal(a.masks, b.masks)
        and np.array_equal(a.labels, b.labels)
        and np.array_equal(a.is_train, b.is_train)
        and np.array_equal(a.part_class, b.part_class)
        and a.class_names == b.class_names
        and a.part_names == b.part_names
        and a.part_kinds == b.part_kinds
    )


# --------------------------------------------------------------------------- #
# Determinism
# --------------------------------------------------------------------------- #


def test_same_seed_gives_identical_data(small: PartsData) -> None:
    again = generate_parts(dataclasses.replace(SMALL))
    assert _same(small, again)
    assert small.fingerprint == again.fingerprint
    assert len(small.fingerprint) == 64


def test_different_seed_gives_different_data(small: PartsData) -> None:
    other = generate_parts(dataclasses.replace(SMALL, seed=2))
    assert not np.array_equal(small.images, other.images)
    assert not np.array_equal(small.masks, other.masks)
    assert small.fingerprint != other.fingerprint
    # Same spec otherwise: the part catalogue does not depend on the seed.
    assert small.part_names == other.part_names


def test_fingerprint_pinned() -> None:
    """Generator 1 draws as it always did: a change to its drawing must be a new generator version instead."""
    tiny = PartsSpec(
        n_classes=3,
        image_size=24,
        train_per_class=2,
        test_per_class=1,
        parts_per_class=3,
        shared_parts=1,
        clutter=3,
        part_min=6,
        part_max=8,
        seed=3,
    )
    assert tiny.generator == 1
    assert generate_parts(tiny).fingerprint == PINNED_FINGERPRINT
    assert tiny.key() == PINNED_KEY


PINNED_FINGERPRINT = "41620ccc0fa808a57584f58a5a14e20df824096f3f6b63b61bdc75feefa2ffec"
PINNED_KEY = (
    "6bdaee0c20af2cb2ef8ef79c96a4c4d29485ff7074853b82a4c13a7cde5d3ab5"  # the cache name of old v1 files
)


def test_fingerprint_sees_every_array(small: PartsData) -> None:
    base = small.fingerprint
    for name in ("images", "masks", "labels", "is_train"):
        arr = getattr(small, name).copy()
        flat = arr.reshape(-1)
        flat[0] = not flat[0] if arr.dtype == np.bool_ else flat[0] ^ 1
        assert dataclasses.replace(small, **{name: arr}).fingerprint != base, name


V1_FIELDS = [
    f.name
    for f in dataclasses.fields(PartsSpec)
    if f.name not in ("generator", "shortcut_classes", "shortcut_rate", "marker_size")
]


def test_key_depends_on_every_field() -> None:
    keys = {SMALL.key()}
    for name in V1_FIELDS:
        value = getattr(SMALL, name)
        bumped: Any = value + 0.05 if isinstance(value, float) else value + 1
        keys.add(dataclasses.replace(SMALL, **{name: bumped}).key())
    assert len(keys) == 1 + len(V1_FIELDS)
    assert SMALL.key() == dataclasses.replace(SMALL).key()
    assert len(SMALL.key()) == 64


# --------------------------------------------------------------------------- #
# Structure
# --------------------------------------------------------------------------- #


def test_shapes_and_dtypes(small: PartsData) -> None:
    k, s = SMALL.n_classes, SMALL.image_size
    n = k * (SMALL.train_per_class + SMALL.test_per_class)
    p = 1 + k * SMALL.parts_per_class + SMALL.shared_parts
    assert small.images.shape == (n, s, s, 3)
    assert small.images.dtype == np.uint8
    assert small.masks.shape == (n, s, s)
    assert small.masks.dtype == np.uint8
    assert small.labels.shape == (n,)
    assert small.labels.dtype == np.int64
    assert small.is_train.shape == (n,)
    assert small.is_train.dtype == np.bool_
    assert small.part_class.shape == (p,)
    assert small.part_class.dtype == np.int64
    assert len(small.part_names) == len(small.part_kinds) == p
    assert len(small.class_names) == k
    assert small.labels.min() == 0
    assert small.labels.max() == k - 1
    assert int(small.masks.max()) < p


def test_part_catalogue(small: PartsData) -> None:
    ppc = SMALL.parts_per_class
    assert small.part_names[0] == "background"
    assert small.part_kinds[0] == "background"
    kinds = small.part_kinds
    assert kinds.count("discriminative") == SMALL.n_classes * ppc
    assert kinds.count("shared") == SMALL.shared_parts
    for pid, kind in enumerate(kinds):
        if kind == "discriminative":
            assert small.part_class[pid] == (pid - 1) // ppc
        else:
            assert small.part_class[pid] == -1
    assert len(set(small.part_names)) == len(small.part_names)
    for c, name in enumerate(small.class_names):
        assert name.startswith(f"class_{c}_")
        for q in np.flatnonzero(small.part_class == c):
            assert small.part_names[q].replace(" ", "-") in name


def test_discriminative_parts_are_all_distinct() -> None:
    big = PartsSpec(n_classes=64, parts_per_class=2)  # all 128 combos
    defs = part_defs(big)
    disc = [(d.shape, d.colour, d.texture) for d in defs if d.kind == "discriminative"]
    assert len(disc) == 128
    assert len(set(disc)) == 128
    shared = [
        (d.shape, d.colour) for d in part_defs(PartsSpec(shared_parts=16, part_max=10)) if d.kind == "shared"
    ]
    assert len(set(shared)) == 16
    # Shared parts never reuse a discriminative colour.
    assert not {c for _, c in shared} & {c for _, c, _ in disc}
    # The first part of each class has a colour of its own (K <= 8).
    firsts = [
        d.colour
        for d in part_defs(PartsSpec(n_classes=8))
        if d.kind == "discriminative" and (d.pid - 1) % 2 == 0
    ]
    assert len(set(firsts)) == 8


def test_split_counts_and_summary(small: PartsData) -> None:
    k = SMALL.n_classes
    tr, te = small.labels[small.is_train], small.labels[~small.is_train]
    assert np.array_equal(np.bincount(tr, minlength=k), [SMALL.train_per_class] * k)
    assert np.array_equal(np.bincount(te, minlength=k), [SMALL.test_per_class] * k)
    summary = json.loads(json.dumps(small.summary()))
    # Generator 1 records the fields it reads, as before generator 2 existed.
    assert summary["spec"] == {name: getattr(SMALL, name) for name in V1_FIELDS}
    assert summary["generator_version"] == 1
    assert summary["fingerprint"] == small.fingerprint
    assert summary["splits"]["train"] == {
        "n_images": k * SMALL.train_per_class,
        "per_class": [SMALL.train_per_class] * k,
    }
    assert summary["splits"]["test"] == {
        "n_images": k * SMALL.test_per_class,
        "per_class": [SMALL.test_per_class] * k,
    }


# --------------------------------------------------------------------------- #
# Ground truth
# --------------------------------------------------------------------------- #


def test_masks_hold_own_class_parts_only(small: PartsData) -> None:
    disc = np.array([k == "discriminative" for k in small.part_kinds])
    for mask, label in zip(small.masks, small.labels, strict=True):
        present = np.unique(mask)
        present = present[present > 0]
        own = [p for p in present if disc[p]]
        assert own, "no discriminative part of the image's class"
        assert all(small.part_class[p] == label for p in own)


def test_every_shared_part_in_every_image(small: PartsData) -> None:
    shared = [p for p, k in enumerate(small.part_kinds) if k == "shared"]
    assert len(shared) == SMALL.shared_parts
    for mask in small.masks:
        assert set(shared) <= set(np.unique(mask).tolist())


def test_drop_prob_extremes() -> None:
    spec = dataclasses.replace(SMALL, parts_per_class=3, shared_parts=1, train_per_class=4, test_per_class=0)
    for drop, expected in ((0.0, {3}), (1.0, {1})):
        data = generate_parts(dataclasses.replace(spec, drop_prob=drop))
        disc = np.array([k == "discriminative" for k in data.part_kinds])
        counts = {int(disc[np.unique(m)].sum()) for m in data.masks}
        assert counts == expected, drop


def test_parts_sizes_inside_image_and_range(small: PartsData) -> None:
    for mask in small.masks:
        for pid in np.unique(mask)[1:]:
            ys, xs = np.nonzero(mask == pid)
            h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
            # Every shape spans its (part_min..part_max)-sized box along at least one axis.
            assert max(h, w) <= SMALL.part_max
            assert max(h, w) >= SMALL.part_min


def test_part_pixels_carry_part_colour(small: PartsData) -> None:
    defs = {d.pid: d for d in part_defs(SMALL)}
    tol = NOISE_AMPLITUDE  # part colours never clip, dark stripes only towards 0
    seen = set()
    for img, mask in zip(small.images.astype(np.int64), small.masks, strict=True):
        for pid in np.unique(mask)[1:]:
            d = defs[int(pid)]
            px = img[mask == pid]  # (n, 3)
            near_main = np.abs(px - np.array(d.rgb)).max(axis=1) <= tol
            near_stripe = np.abs(px - np.array(d.stripe_rgb)).max(axis=1) <= tol
            assert np.all(near_main | near_stripe), d.name
            if d.texture == "solid":
                # Uniform integer noise of std ~3.7: 5 standard errors of the mean.
                tol_mean = 5 * 3.75 / np.sqrt(len(px))
                assert np.abs(px.mean(axis=0) - np.array(d.rgb)).max() <= tol_mean, d.name
            else:
                assert 0.25 <= near_main.mean() <= 0.75, d.name
            seen.add(d.texture)
    assert seen == {"solid", "striped"}


def test_background_not_confusable_with_parts(small: PartsData) -> None:
    defs = part_defs(SMALL)
    colours = np.array([d.rgb for d in defs] + [d.stripe_rgb for d in defs])  # (C, 3)
    bg = small.images[small.masks == 0].astype(np.int64)  # (n, 3)
    dist = np.abs(bg[:, None, :] - colours[None, :, :]).max(axis=2)
    assert dist.min() >= 25
    # The clutter is really there: background is not just a smooth gradient.
    assert bg.std(axis=0).min() > 5


# --------------------------------------------------------------------------- #
# Cache
# --------------------------------------------------------------------------- #


def _forbid_generation(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(spec: PartsSpec) -> PartsData:
        raise AssertionError("generate_parts called: cache not used")

    monkeypatch.setattr(parts, "generate_parts", boom)


def test_cache_round_trip(small: PartsData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = load_parts(SMALL, tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [f"parts-{SMALL.key()[:16]}.npz"]
    assert _same(first, small)
    _forbid_generation(monkeypatch)
    second = load_parts(SMALL, str(tmp_path))
    assert _same(second, first)
    assert second.fingerprint == first.fingerprint
    assert second.spec == SMALL


def test_cache_default_dir_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROTOAUDIT_CACHE", str(tmp_path / "env-cache"))
    load_parts(SMALL)
    assert [p.name for p in (tmp_path / "env-cache").iterdir()] == [f"parts-{SMALL.key()[:16]}.npz"]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "tampered", "other_spec"])
def test_corrupt_cache_is_regenerated(
    damage: str, small: PartsData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = parts.cache_path(SMALL, tmp_path)
    load_parts(SMALL, tmp_path)
    if damage == "garbage":
        path.write_bytes(b"not an npz file")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "tampered":  # valid npz, but the images no longer match the stored fingerprint
        with np.load(path, allow_pickle=False) as z:
            arrays: dict[str, Any] = {k: z[k] for k in z.files}
        arrays["images"] = arrays["images"].copy()
        arrays["images"][0, 0, 0, 0] ^= 0xFF
        with open(path, "wb") as f:
            np.savez(f, **arrays)
    else:  # an intact cache file of another spec (same shapes) under this spec's name
        other = dataclasses.replace(SMALL, seed=SMALL.seed + 1)
        other_path = parts.cache_path(other, tmp_path)
        load_parts(other, tmp_path)
        os.replace(other_path, path)
    data = load_parts(SMALL, tmp_path)
    assert _same(data, small)
    # The cache file was rewritten with good data: next read needs no generation.
    _forbid_generation(monkeypatch)
    assert _same(load_parts(SMALL, tmp_path), small)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_cache_write_failure_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_savez(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(np, "savez", failing_savez)
    with pytest.raises(RuntimeError, match="disk on fire"):
        load_parts(SMALL, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_cache_never_pickles(tmp_path: Path) -> None:
    load_parts(SMALL, tmp_path)
    with np.load(parts.cache_path(SMALL, tmp_path), allow_pickle=False) as z:
        assert all(z[k].dtype != object for k in z.files)


# --------------------------------------------------------------------------- #
# Validation
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("n_classes", 1, "n_classes must be >= 2, got 1"),
        ("image_size", 4, "image_size must be >= 8, got 4"),
        ("train_per_class", 0, "train_per_class must be >= 1, got 0"),
        ("test_per_class", -1, "test_per_class must be >= 0, got -1"),
        ("parts_per_class", 0, "parts_per_class must be >= 1, got 0"),
        ("shared_parts", -2, "shared_parts must be >= 0, got -2"),
        ("shared_parts", 17, "shared_parts must be <= 16"),
        ("clutter", -1, "clutter must be >= 0, got -1"),
        ("part_min", 3, "part_min must be >= 6, got 3"),
        ("part_max", 9, "part_max must be >= part_min (10), got 9"),
        ("part_max", 40, "part_max must be <= 30"),
        ("drop_prob", 1.5, "drop_prob must be in [0, 1], got 1.5"),
        ("seed", -1, "seed must be >= 0, got -1"),
        ("n_classes", 2.5, "n_classes must be an integer"),
        ("clutter", True, "clutter must be an integer"),
        ("parts_per_class", 30, "n_classes * parts_per_class must be <= 128"),
    ],
)
def test_validate_rejects(field: str, value: Any, fragment: str) -> None:
    spec = dataclasses.replace(PartsSpec(), **{field: value})
    with pytest.raises(ValueError, match=re.escape(fragment)) as info:
        spec.validate()
    message = str(info.value)
    assert field in message
    assert "\n" not in message
    with pytest.raises(ValueError, match=re.escape(fragment)):
        generate_parts(spec)
    with pytest.raises(ValueError, match=re.escape(fragment)):
        load_parts(spec, os.devnull)


def test_validate_accepts_defaults_and_tight_fit() -> None:
    PartsSpec().validate()
    # 64 px, 4 parts per image: a 2x2 grid of 32 px cells holds parts up to 30 px.
    dataclasses.replace(PartsSpec(), part_min=28, part_max=30).validate()
    data = generate_parts(
        PartsSpec(n_classes=2, train_per_class=3, test_per_class=0, part_min=28, part_max=30, drop_prob=0.0)
    )
    assert all(len(np.unique(m)) == 5 for m in data.masks)
