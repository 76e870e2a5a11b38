"""Tests of the embedded dataset's generator 2: fine-grained classes, the planted shortcut, test_shifted and
the element interventions."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from protoaudit.engine.data import DatasetBundle, build_dataset
from protoaudit.engine.data import parts as parts_module
from protoaudit.engine.data.parts import (
    ELEMENT_KINDS,
    MARKER_LIGHT_RGB,
    MARKER_RGB,
    MASK_KINDS,
    NOISE_AMPLITUDE,
    PartsData,
    PartsRenderer,
    PartsSpec,
    class_parts,
    generate_parts,
    load_parts,
    part_defs,
)
from protoaudit.engine.recipe import PartsDataConfig
from protoaudit.errors import RecipeError

SPEC = PartsSpec(
    generator=2,
    n_classes=5,
    image_size=40,
    train_per_class=12,
    test_per_class=6,
    parts_per_class=2,
    shared_parts=2,
    clutter=6,
    part_min=7,
    part_max=10,
    drop_prob=0.2,
    shortcut_classes=(0, 3),
    shortcut_rate=0.75,
    marker_size=4,
    seed=4,
)


@pytest.fixture(scope="module")
def data() -> PartsData:
    return generate_parts(SPEC)


@pytest.fixture(scope="module")
def renderer() -> PartsRenderer:
    return PartsRenderer(SPEC)


def _marker_pid(data: PartsData) -> int:
    return data.part_kinds.index("shortcut")


# --------------------------------------------------------------------------- #
# Fine-grained classes
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(("k", "c"), [(3, 2), (6, 2), (6, 3), (7, 4), (16, 3), (40, 2)])
def test_every_part_belongs_to_two_classes_and_classes_differ(k: int, c: int) -> None:
    spec = PartsSpec(generator=2, n_classes=k, parts_per_class=c, shared_parts=0, part_min=6, part_max=8)
    combos = class_parts(spec)
    assert combos.shape == (k, c)
    defs = part_defs(spec)
    pool = [d.pid for d in defs if d.kind == "discriminative"]
    assert len(pool) == k
    users = {p: sum(p in row for row in combos.tolist()) for p in pool}
    assert min(users.values()) >= 2, users
    assert len({frozenset(row) for row in combos.tolist()}) == k  # every class its own combination
    assert all(len(set(row)) == c for row in combos.tolist())
    assert len({(d.shape, d.colour, d.texture) for d in defs}) == len(defs)  # parts look different


def test_small_pools_share_colours_and_shapes() -> None:
    defs = [d for d in part_defs(PartsSpec(generator=2, n_classes=6)) if d.kind == "discriminative"]
    colours = [d.colour for d in defs]
    shapes = [d.shape for d in defs]
    assert all(colours.count(x) == 2 for x in colours)
    assert all(shapes.count(x) == 2 for x in shapes)


def test_no_single_part_determines_the_class(data: PartsData) -> None:
    disc = [p for p, kind in enumerate(data.part_kinds) if kind == "discriminative"]
    train = data.is_train
    for p in disc:
        with_part = np.array([(m == p).any() for m in data.masks[train]])
        classes = np.bincount(data.labels[train][with_part], minlength=SPEC.n_classes)
        assert (classes > 0).sum() >= 2, (p, classes)
        # The most frequent class among the images that show the part is at most about half of them.
        assert classes.max() / classes.sum() <= 0.7, (p, classes)


def test_images_show_parts_of_their_class_only(data: PartsData) -> None:
    kinds = np.array(data.part_kinds)
    for mask, label in zip(data.masks, data.labels, strict=True):
        present = {int(p) for p in np.unique(mask) if kinds[p] == "discriminative"}
        assert present, "no part of the class"
        assert present <= set(data.class_parts[label].tolist())
        shared = {int(p) for p in np.unique(mask) if kinds[p] == "shared"}
        assert len(shared) == SPEC.shared_parts


# --------------------------------------------------------------------------- #
# The shortcut
# --------------------------------------------------------------------------- #


def test_shortcut_rate_in_train_matches_the_recipe() -> None:
    spec = dataclasses.replace(
        SPEC,
        n_classes=4,
        image_size=32,
        part_min=6,
        part_max=8,
        clutter=0,
        train_per_class=200,
        test_per_class=0,
    )
    data = generate_parts(spec)
    marked = data.has_marker
    for classes in ((0, 3),):
        on = np.isin(data.labels, classes) & data.is_train
        rate = marked[on].mean()
        n = int(on.sum())
        sd = np.sqrt(spec.shortcut_rate * (1 - spec.shortcut_rate) / n)
        assert abs(rate - spec.shortcut_rate) <= 4 * sd, (rate, n)
    assert not marked[~np.isin(data.labels, spec.shortcut_classes)].any()
    # has_marker says what the masks show.
    pid = _marker_pid(data)
    assert np.array_equal(marked, (data.masks == pid).any(axis=(1, 2)))


def test_test_follows_training_and_test_shifted_moves_the_marker(data: PartsData) -> None:
    shortcut = np.isin(data.labels, SPEC.shortcut_classes)
    test, shifted = data.is_test, data.is_shifted
    assert test.sum() == shifted.sum() == SPEC.n_classes * SPEC.test_per_class
    assert not (test & shifted).any()
    assert not (data.is_train & shifted).any()
    assert data.has_marker[test & shortcut].any()
    assert not data.has_marker[test & ~shortcut].any()
    assert not data.has_marker[shifted & shortcut].any()  # absent from its classes
    assert data.has_marker[shifted & ~shortcut].any()  # present on the others
    on_others = data.has_marker[shifted & ~shortcut].mean()
    assert 0.4 <= on_others <= 0.95


def test_test_shifted_is_the_test_images_with_the_marker_moved(data: PartsData) -> None:
    pid = _marker_pid(data)
    test, shifted = np.flatnonzero(data.is_test), np.flatnonzero(data.is_shifted)
    assert np.array_equal(data.labels[test], data.labels[shifted])
    moved = 0
    for a, b in zip(test, shifted, strict=True):
        marker = (data.masks[a] == pid) | (data.masks[b] == pid)
        differs = (data.images[a] != data.images[b]).any(axis=2) | (data.masks[a] != data.masks[b])
        assert np.array_equal(differs, marker)  # the marker's pixels, and nothing else
        moved += int(marker.any())
    assert moved > 0


def test_marker_is_small_checkered_pink_near_a_corner(data: PartsData) -> None:
    pid = _marker_pid(data)
    s, reach = SPEC.image_size, SPEC.image_size // 8
    for img, mask in zip(data.images.astype(np.int64), data.masks, strict=True):
        ys, xs = np.nonzero(mask == pid)
        if len(ys) == 0:
            continue
        assert len(ys) == SPEC.marker_size**2
        y0, x0 = ys.min(), xs.min()
        assert min(y0, s - SPEC.marker_size - y0) <= reach
        assert min(x0, s - SPEC.marker_size - x0) <= reach
        px = img[mask == pid]
        near = [
            np.abs(px - np.array(c)).max(axis=1) <= NOISE_AMPLITUDE for c in (MARKER_RGB, MARKER_LIGHT_RGB)
        ]
        assert np.all(near[0] | near[1])
        assert abs(near[0].mean() - 0.5) <= 0.1


def test_tight_fit_places_every_element_without_overlap() -> None:
    # 2 parts + 1 shared + the marker in 40 px: a 2 x 2 grid of 20 px cells holds parts up to 18 px.
    spec = dataclasses.replace(
        SPEC, shared_parts=1, part_min=16, part_max=18, marker_size=5, train_per_class=20, test_per_class=0
    )
    spec.validate()
    with pytest.raises(ValueError, match=re.escape("part_max must be <= 18")):
        dataclasses.replace(spec, part_max=19).validate()
    data = generate_parts(spec)
    pid = _marker_pid(data)
    for mask, marked in zip(data.masks, data.has_marker, strict=True):
        assert int((mask == pid).sum()) == (spec.marker_size**2 if marked else 0)


# --------------------------------------------------------------------------- #
# Masks and interventions
# --------------------------------------------------------------------------- #


def test_elements_are_named_uniquely_with_their_kinds(data: PartsData, renderer: PartsRenderer) -> None:
    for row in range(len(data.labels)):
        elements = renderer.elements(row)
        names = [n for n, _ in elements]
        assert len(set(names)) == len(names)
        assert {k for _, k in elements} <= set(ELEMENT_KINDS)
        assert (("marker", "shortcut") in elements) == bool(data.has_marker[row])
        ids = {int(p) for p in np.unique(data.masks[row]) if p}
        assert len(ids) == len(elements)
        for name, kind in elements:
            if kind == "discriminative":
                pid = int(re.match(r"part (\d+): ", name).group(1)) + 1  # type: ignore[union-attr]
                assert name.endswith(data.part_names[pid])
                assert pid in ids


def test_render_without_removal_is_the_image(data: PartsData, renderer: PartsRenderer) -> None:
    for row in range(len(data.labels)):
        image, mask = renderer.render(row, None)
        assert np.array_equal(image, data.images[row])
        assert np.array_equal(mask, data.masks[row])


def test_removal_changes_exactly_that_element_and_mask_codes_cover_its_pixels(
    data: PartsData, renderer: PartsRenderer
) -> None:
    kind_masks = data.kind_masks
    defs = {d.pid: d for d in part_defs(SPEC)}
    part_colours = np.array([d.rgb for d in defs.values()] + [d.stripe_rgb for d in defs.values()])
    seen: set[str] = set()
    rows = list(range(0, len(data.labels), 3))
    for row in rows:
        by_kind = np.zeros((len(MASK_KINDS), *data.masks[row].shape), dtype=bool)
        for name, kind in renderer.elements(row):
            image, mask = renderer.render(row, name)
            changed = (image != data.images[row]).any(axis=2)
            pid = int(np.unique(data.masks[row][changed])[0]) if changed.any() else -1
            assert defs[pid].kind == kind
            # The element's pixels change, every one of them, and nothing else does.
            assert np.array_equal(changed, data.masks[row] == pid), (row, name)
            assert np.array_equal(mask, np.where(data.masks[row] == pid, 0, data.masks[row]))
            # Beneath: background colours, far from every part colour.
            beneath = image[changed].astype(np.int64)
            assert np.abs(beneath[:, None, :] - part_colours[None]).max(axis=2).min() >= 25
            by_kind[MASK_KINDS.index(kind)] |= changed
            seen.add(kind)
        by_kind[0] = ~by_kind[1:].any(axis=0)
        assert np.array_equal(np.argmax(by_kind, axis=0), kind_masks[row])
    assert seen == set(ELEMENT_KINDS)


def test_removing_several_elements_changes_exactly_their_pixels(
    data: PartsData, renderer: PartsRenderer
) -> None:
    for row in range(0, len(data.labels), 5):
        names = [name for name, _ in renderer.elements(row)]
        for chosen in (names[:2], names):
            image, mask = renderer.render(row, chosen)
            union = np.zeros(data.masks[row].shape, dtype=bool)
            for name in chosen:
                single, _ = renderer.render(row, name)
                union |= (single != data.images[row]).any(axis=2)
            assert np.array_equal((image != data.images[row]).any(axis=2), union), (row, chosen)
            assert np.array_equal(mask, np.where(union, 0, data.masks[row]))
        _, mask = renderer.render(row, names)
        assert not mask.any()  # nothing but background left
        assert np.array_equal(renderer.render(row, [])[0], data.images[row])
    with pytest.raises(ValueError, match="no element 'tail'"):
        renderer.render(0, [renderer.elements(0)[0][0], "tail"])


def test_kind_masks_codes(data: PartsData) -> None:
    assert MASK_KINDS == ("background", "shared", "discriminative", "shortcut")
    km = data.kind_masks
    assert km.dtype == np.uint8
    assert km.shape == data.masks.shape
    for code, kind in enumerate(MASK_KINDS):
        ids = [p for p, k in enumerate(data.part_kinds) if k == kind]
        assert np.array_equal(km == code, np.isin(data.masks, ids)), kind


def test_render_rejects_an_unknown_element(renderer: PartsRenderer) -> None:
    with pytest.raises(ValueError, match=re.escape("no element 'tail' in image 0; its elements: ")):
        renderer.render(0, "tail")
    with pytest.raises(IndexError):
        renderer.render(len(renderer), None)


def test_generator_1_supports_interventions_too() -> None:
    spec = PartsSpec(n_classes=3, image_size=32, train_per_class=3, test_per_class=2, part_min=6, part_max=9)
    data, renderer = generate_parts(spec), PartsRenderer(spec)
    for row in range(len(data.labels)):
        assert np.array_equal(renderer.render(row)[0], data.images[row])
        for name, kind in renderer.elements(row):
            assert kind in ("discriminative", "shared")
            image, _ = renderer.render(row, name)
            changed = (image != data.images[row]).any(axis=2)
            assert changed.any()
            assert len(np.unique(data.masks[row][changed])) == 1


# --------------------------------------------------------------------------- #
# Determinism, fingerprint, cache
# --------------------------------------------------------------------------- #


def test_same_spec_same_bytes(data: PartsData) -> None:
    again = generate_parts(dataclasses.replace(SPEC))
    for name in ("images", "masks", "labels", "is_train", "is_shifted", "has_marker", "class_parts"):
        assert np.array_equal(getattr(again, name), getattr(data, name)), name
    assert again.fingerprint == data.fingerprint
    other = generate_parts(dataclasses.replace(SPEC, seed=SPEC.seed + 1))
    assert not np.array_equal(other.images, data.images)
    assert other.fingerprint != data.fingerprint


def test_fingerprint_pinned_v2() -> None:
    """Generator 2 draws as it does now from here on: a change to its drawing must be a new generator version."""
    spec = PartsSpec(
        generator=2,
        n_classes=3,
        image_size=24,
        train_per_class=2,
        test_per_class=1,
        part_min=6,
        part_max=6,
        seed=3,
    )
    assert generate_parts(spec).fingerprint == PINNED_V2


PINNED_V2 = "f55103e72c9a490ea3654224746e0db42e2faf664abc527e825b841fd7265168"


def test_fingerprint_sees_the_generator_and_the_new_arrays(data: PartsData) -> None:
    base = data.fingerprint
    for name in ("is_shifted", "has_marker", "class_parts"):
        arr = getattr(data, name).copy()
        flat = arr.reshape(-1)
        flat[0] = not flat[0] if arr.dtype == np.bool_ else flat[0] ^ 1
        assert dataclasses.replace(data, **{name: arr}).fingerprint != base, name
    # The same arrays read as generator 1 hash differently: the version is in the fingerprint.
    as_v1 = dataclasses.replace(data, spec=PartsSpec(**{**dataclasses.asdict(SPEC), "generator": 1}))
    assert as_v1.fingerprint != base


def test_key_depends_on_every_field() -> None:
    keys = {SPEC.key()}
    changes: dict[str, Any] = {"generator": 1, "shortcut_classes": (0,)}
    for f in dataclasses.fields(PartsSpec):
        value = getattr(SPEC, f.name)
        bumped = changes.get(f.name, value + 0.05 if isinstance(value, float) else value)
        if f.name not in changes and not isinstance(value, float):
            bumped = value + 1
        keys.add(dataclasses.replace(SPEC, **{f.name: bumped}).key())
    assert len(keys) == 1 + len(dataclasses.fields(PartsSpec))


def test_cache_round_trip_v2(data: PartsData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = load_parts(SPEC, tmp_path)
    assert first.fingerprint == data.fingerprint

    def boom(spec: PartsSpec) -> PartsData:
        raise AssertionError("generate_parts called: cache not used")

    monkeypatch.setattr(parts_module, "generate_parts", boom)
    second = load_parts(SPEC, tmp_path)
    assert second.fingerprint == data.fingerprint
    assert np.array_equal(second.has_marker, data.has_marker)
    assert np.array_equal(second.is_shifted, data.is_shifted)


def test_summary_reports_the_shortcut(data: PartsData) -> None:
    summary = data.summary()
    assert summary["generator_version"] == 2
    assert summary["spec"]["shortcut_classes"] == [0, 3]
    marked = summary["shortcut"]["marked"]
    assert marked["train"]["n_images"] == int(data.has_marker[data.is_train].sum())
    assert marked["test_shifted"]["per_class"][0] == 0
    assert summary["splits"]["test_shifted"]["n_images"] == SPEC.n_classes * SPEC.test_per_class
    assert summary["class_parts"][1] == [data.part_names[int(p)] for p in data.class_parts[1]]


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("parts_per_class", 1, "parts_per_class must be >= 2 and < n_classes (5)"),
        ("parts_per_class", 5, "parts_per_class must be >= 2 and < n_classes (5)"),
        ("shortcut_classes", (0, 5), "shortcut_classes must be distinct classes in [0, 5)"),
        ("shortcut_classes", (1, 1), "shortcut_classes must be distinct classes in [0, 5)"),
        ("shortcut_classes", (0, 1, 2, 3, 4), "shortcut_classes must leave at least one class"),
        ("shortcut_rate", 1.5, "shortcut_rate must be in [0, 1]"),
        ("marker_size", 2, "marker_size must be an integer in [3, part_min (7)]"),
        ("marker_size", 8, "marker_size must be an integer in [3, part_min (7)]"),
        ("generator", 3, "generator must be one of [1, 2]"),
    ],
)
def test_validate_rejects_v2(field: str, value: Any, fragment: str) -> None:
    with pytest.raises(ValueError, match=re.escape(fragment)):
        dataclasses.replace(SPEC, **{field: value}).validate()


def test_generator_1_rejects_generator_2_fields() -> None:
    with pytest.raises(ValueError, match=re.escape("shortcut_rate needs generator 2")):
        PartsSpec(shortcut_rate=0.5).validate()


# --------------------------------------------------------------------------- #
# The bundle and the recipe keys
# --------------------------------------------------------------------------- #

CONFIG = PartsDataConfig(
    generator=2,
    n_classes=4,
    image_size=32,
    train_per_class=10,
    test_per_class=4,
    part_min=6,
    part_max=8,
    clutter=3,
    shortcut_classes=[1],
    val_fraction=0.2,
    augment=True,
)


@pytest.fixture(scope="module")
def bundle() -> DatasetBundle:
    return build_dataset(CONFIG, 0)


def test_bundle_has_test_shifted_and_interventions(bundle: DatasetBundle) -> None:
    assert bundle.test_shifted is not None
    assert len(bundle.test_shifted) == len(bundle.test) == 16
    assert np.array_equal(bundle.test_shifted.labels, bundle.test.labels)
    assert all(i.startswith("test_shifted/") for i in bundle.test_shifted.image_ids)
    assert len(set(bundle.test_shifted.image_ids) & set(bundle.test.image_ids)) == 0
    assert "shortcut" in (bundle.part_kinds or [])
    for name in ("push", "val", "test", "test_shifted"):
        split = getattr(bundle, name)
        assert split.interventions is not None
        assert len(split.interventions) == len(split)
        for i in range(len(split)):
            assert torch.equal(split.interventions.render(i), split.batch([i])[0]), (name, i)
    # The augmented train split serves the push images, flipped or not.
    train = bundle.train
    for i in range(len(train)):
        x, r = train.batch([i])[0], train.interventions.render(i)
        assert torch.equal(x, r) or torch.equal(x, r.flip(-1))


def test_split_interventions_remove_and_kind_mask(bundle: DatasetBundle) -> None:
    test = bundle.test
    assert test.interventions is not None
    marked = [i for i in range(len(test)) if ("marker", "shortcut") in test.interventions.elements(i)]
    assert marked
    assert all(int(test.labels[i]) == 1 for i in marked)
    i = marked[0]
    kind = test.interventions.kind_mask(i)
    assert (kind == MASK_KINDS.index("shortcut")).sum() == 25
    without = test.interventions.render(i, "marker")
    changed = (without != test.batch([i])[0]).any(dim=0).numpy()
    assert np.array_equal(changed, kind == MASK_KINDS.index("shortcut"))
    assert (test.interventions.kind_mask(i, "marker") == MASK_KINDS.index("shortcut")).sum() == 0
    shifted = bundle.test_shifted
    assert shifted is not None
    assert shifted.interventions is not None
    assert not any(("marker", "shortcut") in shifted.interventions.elements(j) for j in marked)


def test_a_recipe_without_the_new_keys_is_generator_1() -> None:
    config = PartsDataConfig(
        n_classes=3, image_size=32, train_per_class=4, test_per_class=2, part_min=6, part_max=9
    )
    bundle = build_dataset(config, 0)
    spec = PartsSpec(
        n_classes=3, image_size=32, train_per_class=4, test_per_class=2, part_min=6, part_max=9, seed=0
    )
    assert bundle.fingerprint == generate_parts(spec).fingerprint
    assert bundle.test_shifted is None
    assert "generator" not in config.model_dump(exclude_none=True)
    assert bundle.test.interventions is not None  # generator 1 images can be re-rendered too


@pytest.mark.parametrize(
    ("keys", "fragment"),
    [
        ({"shortcut_rate": 0.5}, "shortcut_rate needs generator = 2"),
        ({"generator": 1, "marker_size": 4}, "marker_size needs generator = 2"),
        ({"generator": 2, "parts_per_class": 1}, "generator 2 needs 2 <= parts_per_class < n_classes (6)"),
        (
            {"generator": 2, "shortcut_classes": [6]},
            "shortcut_classes must be distinct classes below n_classes (6)",
        ),
        ({"generator": 2, "marker_size": 12}, "marker_size (12) must be <= part_min (10)"),
        ({"generator": 2, "shortcut_rate": 1.2}, "less than or equal to 1"),
        ({"generator": 3}, "Input should be 1 or 2"),
    ],
)
def test_recipe_rejects(keys: dict[str, Any], fragment: str) -> None:
    from protoaudit.engine.recipe import recipe_from_dict

    with pytest.raises(RecipeError, match=re.escape(fragment)) as info:
        recipe_from_dict(
            {"name": "x", "data": {"kind": "parts", **keys}, "members": [{"name": "m", "trunk": "tiny_vgg"}]}
        )
    assert "data" in str(info.value)
    assert "\n" not in str(info.value)


def test_tiny_recipe_runs_generator_2_with_smaller_parts() -> None:
    """The test recipe stays generator 1; its generator 2 variant needs parts that leave room for the marker."""
    from protoaudit.engine.recipe import load_recipe

    recipe = load_recipe("recipes/tiny.toml")
    assert recipe.data.kind == "parts"
    assert recipe.data.generator is None
    with pytest.raises(RecipeError, match=re.escape("part_max must be <= 8")):
        build_dataset(load_recipe("recipes/tiny.toml", ["data.generator=2"]).data, 0)
    bundle = build_dataset(load_recipe("recipes/tiny.toml", ["data.generator=2", "data.part_max=8"]).data, 0)
    assert bundle.test_shifted is not None
    assert len(bundle.test_shifted) == len(bundle.test)


def test_data_check_counts_test_shifted() -> None:
    from protoaudit.engine.data.check import check_data

    result = check_data(CONFIG, 0)
    assert list(result.counts) == ["train", "val", "test", "test_shifted"]
    assert result.counts["test_shifted"] == [4, 4, 4, 4]
    plain = check_data(PartsDataConfig(n_classes=3, image_size=32, part_min=6, part_max=9), 0)
    assert list(plain.counts) == ["train", "val", "test"]
