"""Procedural image-classification dataset "with known parts".

Every image is drawn from a seed, and every pixel's ground-truth part is known,
which makes the dataset usable for quick starts, tests and ground-truth audits
of ProtoPNet prototypes (does a prototype sit on a class-discriminative part,
on a shared distractor part, or on background?).

Construction (generator 1, the default)
---------------------------------------
* ``K = n_classes`` classes. Class ``k`` owns ``parts_per_class``
  *discriminative* parts that no other class has. A part is a
  (shape, colour, texture) triple: 8 shapes (disc, square, triangle, cross,
  ring, diamond, bar, star), 8 saturated well-separated colours and 2 textures
  (solid, striped), i.e. 128 distinct discriminative parts. Parts are assigned
  so that the first part of every class has a colour of its own whenever
  ``n_classes <= 8``.
* ``shared_parts`` *shared* distractor parts (white or black, solid) appear in
  every image of every class and carry no class information.
* Background: a smooth two-colour gradient in muted, low-saturation colours,
  ``clutter`` small random strokes/dots in muted colours (background: mask 0)
  and low-amplitude integer noise over the whole image. All background colours
  stay far (L-inf > 30 per channel, noise included) from every part colour.
* Every part is placed at a random position (non-overlapping bounding boxes,
  fully inside the image) with a random size in ``[part_min, part_max]``
  pixels. Each discriminative part of the image's class is present with
  probability ``1 - drop_prob``; at least one always is. Shared parts are
  always present.

Part ids: 0 is background, ``1 + k * parts_per_class + i`` is the ``i``-th
discriminative part of class ``k``, and the shared parts follow.

Generator 2 (``PartsSpec.generator = 2``)
-----------------------------------------
Fine-grained classes and a planted shortcut; the drawing above otherwise.

* A shared *pool* of ``P = n_classes`` discriminative parts. Class ``k`` is
  the combination of pool parts ``k, k + 1, ..., k + parts_per_class - 1``
  (mod ``P``), so every part belongs to ``parts_per_class >= 2`` classes and
  no single part gives the class away. Pool parts share colours and shapes
  too (part ``p`` has colour ``p // 2`` and shape ``(p + 1) // 2`` mod
  ``ceil(P / 2)`` of :data:`POOL_SHAPES`, for ``P <= 16``), as bird species
  share colours and shapes. A
  dropped part (``drop_prob``) can leave an image that two classes explain.
* A *marker*, a small pink-and-white checkered square of ``marker_size``
  pixels near a random corner of the image (at most ``image_size // 8``
  pixels from both edges), the shortcut: on images of the
  ``shortcut_classes`` it is present with probability ``shortcut_rate`` in
  the training and test splits, and never on the other classes.
* A third split, ``test_shifted``: the test images again, each drawn from
  the same seed (same parts, places, clutter and noise), with the marker
  moved: absent from the shortcut classes and present, with the same draw
  and rate, on the other classes.
* Part ids: 0 background, ``1 + p`` pool part ``p``, the shared parts, and
  last the marker (kind ``"shortcut"``).

Every image can be drawn again with one element left out
(:meth:`PartsRenderer.render`): all random draws happen whatever is left
out, so the other elements, the background beneath and the noise are the
same to the bit.

Determinism: image ``n`` is drawn with its own generator seeded from
``np.random.SeedSequence(spec.seed).spawn(N)[n]`` (``N``: the train and test
images; a test_shifted image reuses its test image's seed), and drawing uses only
integer draws and correctly rounded float arithmetic (+, -, *, /, sqrt), so the
same spec gives bit-identical arrays on every machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import numbers
import os
import tempfile
import warnings
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "ELEMENT_KINDS",
    "GENERATOR_VERSION",
    "GENERATOR_VERSIONS",
    "MASK_KINDS",
    "PartDef",
    "PartsData",
    "PartsRenderer",
    "PartsSpec",
    "cache_path",
    "class_parts",
    "default_cache_dir",
    "element_name",
    "generate_parts",
    "load_parts",
    "part_defs",
]

GENERATOR_VERSION: int = 2
"""The newest generator. A spec names its own (:attr:`PartsSpec.generator`),
which is part of :meth:`PartsSpec.key` and of the fingerprint: add a new
version whenever the drawing changes, and keep the old ones drawing as they
did."""
GENERATOR_VERSIONS: tuple[int, ...] = (1, 2)

#: Kinds of the elements an image is drawn from (everything else, gradient,
#: clutter and noise, is background).
ELEMENT_KINDS: tuple[str, ...] = ("discriminative", "shared", "shortcut")
#: Per-pixel kind codes of :attr:`PartsData.kind_masks`: index = code.
MASK_KINDS: tuple[str, ...] = ("background", "shared", "discriminative", "shortcut")

# --------------------------------------------------------------------------- #
# Catalogue of shapes, colours and textures
# --------------------------------------------------------------------------- #

SHAPES: tuple[str, ...] = (
    "disc",
    "square",
    "triangle",
    "cross",
    "ring",
    "diamond",
    "bar",
    "star",
)
TEXTURES: tuple[str, ...] = ("solid", "striped")

#: Saturated colours of the discriminative parts: each has one channel >= 220
#: and one channel <= 30, and they are pairwise >= 80 apart (L2, RGB). All part
#: channels lie in [8, 247] so that the noise never clips them: the mean colour
#: of a solid part's pixels is its palette colour.
PART_COLOURS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (230, 20, 20)),
    ("green", (25, 200, 40)),
    ("blue", (30, 70, 240)),
    ("yellow", (235, 225, 15)),
    ("magenta", (220, 30, 220)),
    ("cyan", (20, 210, 220)),
    ("orange", (245, 125, 8)),
    ("violet", (120, 20, 245)),
)

#: Achromatic colours reserved for the shared distractor parts.
SHARED_COLOURS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("white", (240, 240, 240)),
    ("black", (15, 15, 15)),
)
#: Shape order of the shared parts (white ring, black bar, white cross, ...).
SHARED_SHAPES: tuple[str, ...] = (
    "ring",
    "bar",
    "cross",
    "diamond",
    "disc",
    "square",
    "triangle",
    "star",
)

#: The shortcut marker: a checkerboard of these two colours (generator 2).
MARKER_RGB: tuple[int, int, int] = (240, 90, 170)  # pink: no part or background is near it
MARKER_LIGHT_RGB: tuple[int, int, int] = (240, 240, 240)
MARKER_NAME: str = "marker"

#: Shape order of the generator 2 pool: the most distinct silhouettes first
#: (a disc and a square of 10 px differ in a few corner pixels only).
POOL_SHAPES: tuple[str, ...] = ("disc", "cross", "triangle", "star", "diamond", "square", "ring", "bar")

#: Striped parts alternate the colour with this darker shade of it.
STRIPE_SHADE: float = 0.45
#: Stripe period in pixels (diagonal stripes, half on, half off).
STRIPE_PERIOD: int = 4
#: Uniform integer noise in [-NOISE_AMPLITUDE, NOISE_AMPLITUDE] on every channel.
NOISE_AMPLITUDE: int = 6
#: Minimum free pixels between the bounding boxes of two parts.
PART_GAP: int = 2

# Muted colours: grey level +- a per-channel tint (channel range in comments).
_BG_GREY = (80.0, 170.0)  # gradient ends: channels in [65, 185]
_BG_TINT = 15.0
_CLUTTER_GREY = (70.0, 180.0)  # clutter: channels in [52, 198]
_CLUTTER_TINT = 18.0

N_DISCRIMINATIVE_AVAILABLE: int = len(SHAPES) * len(PART_COLOURS) * len(TEXTURES)
N_SHARED_AVAILABLE: int = len(SHARED_SHAPES) * len(SHARED_COLOURS)

PartKind = Literal["background", "discriminative", "shared", "shortcut"]

U8Array = npt.NDArray[np.uint8]
I64Array = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
F64Array = npt.NDArray[np.float64]


# --------------------------------------------------------------------------- #
# Spec
# --------------------------------------------------------------------------- #


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class PartsSpec:
    """Everything that determines a parts dataset.

    Attributes:
        n_classes: number of classes ``K`` (>= 2).
        image_size: side ``S`` of the square RGB images, in pixels.
        train_per_class: training images per class (>= 1).
        test_per_class: test images per class (>= 0).
        parts_per_class: discriminative parts of each class (>= 1): owned by
            it (generator 1), or combined from the shared pool (generator 2,
            ``2 <= parts_per_class < n_classes``).
        shared_parts: distractor parts present in every image (>= 0).
        clutter: random background strokes/dots per image (>= 0).
        part_min: smallest part size (bounding-box side, pixels).
        part_max: largest part size (bounding-box side, pixels).
        drop_prob: probability that a discriminative part is left out of an
            image (at least one part of the class is always kept).
        seed: non-negative integer seed.
        generator: the drawing, one of :data:`GENERATOR_VERSIONS`.
        shortcut_classes: classes that carry the marker (generator 2).
        shortcut_rate: probability of the marker on an image of a shortcut
            class in train and test, and on an image of any other class in
            ``test_shifted`` (generator 2).
        marker_size: side of the marker in pixels, ``3..part_min``
            (generator 2).

    The last three keep their defaults under generator 1, which draws exactly
    as it always did.
    """

    n_classes: int = 6
    image_size: int = 64
    train_per_class: int = 60
    test_per_class: int = 30
    parts_per_class: int = 2
    shared_parts: int = 2
    clutter: int = 8
    part_min: int = 10
    part_max: int = 16
    drop_prob: float = 0.1
    seed: int = 0
    generator: int = 1
    shortcut_classes: tuple[int, ...] = (0,)
    shortcut_rate: float = 0.9
    marker_size: int = 5

    def validate(self) -> None:
        """Check every field.

        Raises:
            ValueError: one line naming the field, the bad value and what is
                expected, e.g. ``"n_classes must be >= 2, got 1"``.
        """
        if not _is_int(self.generator) or self.generator not in GENERATOR_VERSIONS:
            raise ValueError(f"generator must be one of {list(GENERATOR_VERSIONS)}, got {self.generator!r}")
        minimums = {
            "n_classes": 2,
            "image_size": 8,
            "train_per_class": 1,
            "test_per_class": 0,
            "parts_per_class": 1,
            "shared_parts": 0,
            "clutter": 0,
            "part_min": 6,
            "seed": 0,
        }
        for name, low in minimums.items():
            value = getattr(self, name)
            if not _is_int(value):
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if not _is_int(self.part_max):
            raise ValueError(
                f"part_max must be an integer >= part_min ({self.part_min}), got {self.part_max!r}"
            )
        if self.part_max < self.part_min:
            raise ValueError(f"part_max must be >= part_min ({self.part_min}), got {self.part_max}")
        if not _is_real(self.drop_prob) or not 0.0 <= float(self.drop_prob) <= 1.0:
            raise ValueError(f"drop_prob must be in [0, 1], got {self.drop_prob!r}")
        if self.generator == 1:
            self._validate_v1()
        else:
            self._validate_v2()

    def _validate_v1(self) -> None:
        defaults = PartsSpec()
        for name in _V2_FIELDS:
            if getattr(self, name) != getattr(defaults, name):
                raise ValueError(f"{name} needs generator 2, got {getattr(self, name)!r} with generator 1")
        n_disc = self.n_classes * self.parts_per_class
        if n_disc > N_DISCRIMINATIVE_AVAILABLE:
            raise ValueError(
                f"n_classes * parts_per_class must be <= {N_DISCRIMINATIVE_AVAILABLE} "
                f"(distinct discriminative parts available), got "
                f"{self.n_classes} * {self.parts_per_class} = {n_disc}"
            )
        self._validate_fit(self.parts_per_class + self.shared_parts, "parts_per_class + shared_parts")

    def _validate_v2(self) -> None:
        if self.n_classes > N_DISCRIMINATIVE_AVAILABLE:
            raise ValueError(
                f"n_classes must be <= {N_DISCRIMINATIVE_AVAILABLE} with generator 2"
                f" (distinct pool parts available), got {self.n_classes}"
            )
        if not 2 <= self.parts_per_class < self.n_classes:
            raise ValueError(
                f"parts_per_class must be >= 2 and < n_classes ({self.n_classes}) with generator 2"
                " (every class combines parts that other classes use too), got"
                f" {self.parts_per_class}"
            )
        classes = self.shortcut_classes
        if not isinstance(classes, tuple) or not all(_is_int(c) for c in classes):
            raise ValueError(f"shortcut_classes must be a tuple of class indices, got {classes!r}")
        if any(not 0 <= c < self.n_classes for c in classes) or len(set(classes)) != len(classes):
            raise ValueError(
                f"shortcut_classes must be distinct classes in [0, {self.n_classes}), got {list(classes)}"
            )
        if len(classes) >= self.n_classes:
            raise ValueError(
                f"shortcut_classes must leave at least one class without the marker, got {list(classes)}"
            )
        if not _is_real(self.shortcut_rate) or not 0.0 <= float(self.shortcut_rate) <= 1.0:
            raise ValueError(f"shortcut_rate must be in [0, 1], got {self.shortcut_rate!r}")
        if not _is_int(self.marker_size) or not 3 <= self.marker_size <= self.part_min:
            raise ValueError(
                f"marker_size must be an integer in [3, part_min ({self.part_min})], got {self.marker_size!r}"
            )
        self._validate_fit(
            self.parts_per_class + self.shared_parts + 1, "parts_per_class + shared_parts + the marker"
        )

    def _validate_fit(self, per_image: int, what: str) -> None:
        if self.shared_parts > N_SHARED_AVAILABLE:
            raise ValueError(
                f"shared_parts must be <= {N_SHARED_AVAILABLE} "
                f"(distinct shared parts available), got {self.shared_parts}"
            )
        # Parts must fit on a grid of cells of side part_max + PART_GAP: this
        # guarantees that non-overlapping placement always succeeds.
        fit = _largest_fitting_part(self.image_size, per_image)
        if self.part_max > fit:
            raise ValueError(
                f"part_max must be <= {fit} so that {what}"
                f" = {per_image} parts fit without overlap in a {self.image_size} px"
                f" image, got {self.part_max}"
            )

    @property
    def n_base(self) -> int:
        """Images drawn from their own seed: ``n_classes * (train_per_class +
        test_per_class)`` (``test_shifted`` redraws the test images)."""
        return self.n_classes * (self.train_per_class + self.test_per_class)

    @property
    def n_images(self) -> int:
        """Rows of the dataset: train, test and, under generator 2, test_shifted."""
        extra = self.n_classes * self.test_per_class if self.generator >= 2 else 0
        return self.n_base + extra

    def key(self) -> str:
        """sha256 hex digest of the spec fields and the generator version
        (the cache key). Generator 1 hashes the fields it reads only, as it
        always did."""
        payload = _spec_fields(self)
        payload.pop("generator", None)
        payload["generator_version"] = self.generator
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


#: Fields that only generator 2 reads.
_V2_FIELDS: tuple[str, ...] = ("shortcut_classes", "shortcut_rate", "marker_size")


def _spec_fields(spec: PartsSpec) -> dict[str, Any]:
    """The spec as JSON-able fields: generator 1 without the fields it does
    not read (as it was recorded before generator 2 existed)."""
    fields = dataclasses.asdict(spec)
    if spec.generator == 1:
        for name in ("generator", *_V2_FIELDS):
            fields.pop(name)
    else:
        fields["shortcut_classes"] = list(spec.shortcut_classes)
    return fields


def _largest_fitting_part(image_size: int, n_parts: int) -> int:
    """Largest part size such that ``n_parts`` grid cells of side
    ``size + PART_GAP`` fit in the image (``0`` if none does)."""
    side = 1
    while side * side < n_parts:
        side += 1
    return image_size // side - PART_GAP


# --------------------------------------------------------------------------- #
# Part catalogue
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class PartDef:
    """One non-background part of a dataset.

    Attributes:
        pid: part id, as stored in the masks (>= 1).
        name: human-readable name, e.g. ``"red striped disc"``.
        kind: ``"discriminative"``, ``"shared"`` or ``"shortcut"`` (the
            marker of generator 2).
        shape: one of :data:`SHAPES`.
        colour: colour name.
        texture: ``"solid"`` or ``"striped"``.
        rgb: the part's colour.
        stripe_rgb: the colour of the dark stripes (== ``rgb`` if solid).
        owner: owning class of a discriminative part of generator 1, -1 for
            every other part (the pool parts of generator 2 belong to several
            classes: :func:`class_parts`).
    """

    pid: int
    name: str
    kind: PartKind
    shape: str
    colour: str
    texture: str
    rgb: tuple[int, int, int]
    stripe_rgb: tuple[int, int, int]
    owner: int


def _discriminative_combo(j: int) -> tuple[int, int, int]:
    """(colour, shape, texture) indices of the ``j``-th discriminative combo.

    Consecutive combos cycle through all colours first; each round of
    ``len(PART_COLOURS)`` combos uses one texture and a shape shift, so the
    map ``j -> combo`` is injective on ``range(N_DISCRIMINATIVE_AVAILABLE)``.
    """
    n_col, n_shape, n_tex = len(PART_COLOURS), len(SHAPES), len(TEXTURES)
    rnd, colour = divmod(j, n_col)
    texture = rnd % n_tex
    shift = (rnd // n_tex + texture) % n_shape
    return colour, (colour + shift) % n_shape, texture


def _shade(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    r, g, b = (round(c * STRIPE_SHADE) for c in rgb)
    return (r, g, b)


def _pool_combo(p: int, n_pool: int) -> tuple[int, int, int]:
    """(colour, shape, texture) indices of pool part ``p`` of ``n_pool``
    (generator 2).

    Up to 16 parts: colour ``p // 2`` and shape ``(p + 1) // 2`` of
    :data:`POOL_SHAPES` (mod the number of colours used), so parts ``2c`` and ``2c + 1`` share a colour
    and parts ``2c - 1`` and ``2c`` a shape; all solid. Larger pools use the
    generator 1 combos, which share colours and shapes anyway.
    """
    if n_pool > 2 * len(PART_COLOURS):
        return _discriminative_combo(p)
    half = (n_pool + 1) // 2
    return p // 2, SHAPES.index(POOL_SHAPES[((p + 1) // 2) % half]), 0


def _part_name(colour: str, shape: str, texture: str) -> str:
    return f"{colour} {shape}" if texture == "solid" else f"{colour} {texture} {shape}"


def _shared_defs(spec: PartsSpec, first_pid: int) -> list[PartDef]:
    defs: list[PartDef] = []
    n_sh = len(SHARED_SHAPES)
    for i in range(spec.shared_parts):
        shape = SHARED_SHAPES[i % n_sh]
        colour, rgb = SHARED_COLOURS[(i + i // n_sh) % len(SHARED_COLOURS)]
        defs.append(
            PartDef(
                pid=first_pid + i,
                name=f"{colour} {shape}",
                kind="shared",
                shape=shape,
                colour=colour,
                texture="solid",
                rgb=rgb,
                stripe_rgb=rgb,
                owner=-1,
            )
        )
    return defs


def part_defs(spec: PartsSpec) -> list[PartDef]:
    """The non-background parts of ``spec``, in part-id order (ids 1..P-1).

    Generator 1: discriminative part ``i`` of class ``k`` has id ``1 + k *
    parts_per_class + i`` and uses combo ``i * n_classes + k``, so the first
    part of every class gets a distinct colour when ``n_classes <=
    len(PART_COLOURS)``; the shared parts follow.

    Generator 2: pool part ``p`` has id ``1 + p`` (owner -1: no class owns
    it, see :func:`class_parts`), the shared parts follow, and the marker
    (kind ``"shortcut"``, shape ``"checker"``) comes last.
    """
    spec.validate()
    defs: list[PartDef] = []
    if spec.generator == 1:
        for k in range(spec.n_classes):
            for i in range(spec.parts_per_class):
                ci, si, ti = _discriminative_combo(i * spec.n_classes + k)
                colour, rgb = PART_COLOURS[ci]
                shape, texture = SHAPES[si], TEXTURES[ti]
                defs.append(
                    PartDef(
                        pid=len(defs) + 1,
                        name=_part_name(colour, shape, texture),
                        kind="discriminative",
                        shape=shape,
                        colour=colour,
                        texture=texture,
                        rgb=rgb,
                        stripe_rgb=_shade(rgb) if texture == "striped" else rgb,
                        owner=k,
                    )
                )
        return defs + _shared_defs(spec, len(defs) + 1)
    for p in range(spec.n_classes):
        ci, si, ti = _pool_combo(p, spec.n_classes)
        colour, rgb = PART_COLOURS[ci]
        shape, texture = SHAPES[si], TEXTURES[ti]
        defs.append(
            PartDef(
                pid=p + 1,
                name=_part_name(colour, shape, texture),
                kind="discriminative",
                shape=shape,
                colour=colour,
                texture=texture,
                rgb=rgb,
                stripe_rgb=_shade(rgb) if texture == "striped" else rgb,
                owner=-1,
            )
        )
    defs += _shared_defs(spec, len(defs) + 1)
    defs.append(
        PartDef(
            pid=len(defs) + 1,
            name=MARKER_NAME,
            kind="shortcut",
            shape="checker",
            colour="pink",
            texture="checkered",
            rgb=MARKER_RGB,
            stripe_rgb=MARKER_LIGHT_RGB,
            owner=-1,
        )
    )
    return defs


def class_parts(spec: PartsSpec) -> I64Array:
    """``(K, parts_per_class)`` int64: the part ids that make up each class.

    Generator 1: the class's own parts. Generator 2: pool parts ``k, ...,
    k + parts_per_class - 1`` (mod ``K``), id ``1 + p``.
    """
    spec.validate()
    k, c = spec.n_classes, spec.parts_per_class
    rows = np.arange(k, dtype=np.int64)[:, None]
    cols = np.arange(c, dtype=np.int64)[None, :]
    if spec.generator == 1:
        return 1 + rows * c + cols
    return 1 + (rows + cols) % k


def element_name(part: PartDef, n_discriminative: int) -> str:
    """The element's name in :meth:`PartsRenderer.elements`: ``"part 3: red
    disc"`` (3 = ``pid - 1``), ``"shared 0: white ring"`` or ``"marker"``."""
    if part.kind == "discriminative":
        return f"part {part.pid - 1}: {part.name}"
    if part.kind == "shared":
        return f"shared {part.pid - 1 - n_discriminative}: {part.name}"
    return MARKER_NAME


# --------------------------------------------------------------------------- #
# Dataset container
# --------------------------------------------------------------------------- #


@dataclass
class PartsData:
    """A generated parts dataset.

    Attributes:
        spec: the spec it was generated from.
        images: ``(N, S, S, 3)`` uint8 RGB images.
        masks: ``(N, S, S)`` uint8 part ids; 0 = background (clutter included).
        labels: ``(N,)`` int64 class labels in ``[0, K)``.
        is_train: ``(N,)`` bool, True for the training split.
        class_names: ``K`` names, e.g. ``"class_0_red-disc+orange-bar"``.
        part_names: ``P`` names indexed by part id; ``part_names[0] ==
            "background"``, e.g. ``"red striped disc"``.
        part_kinds: ``P`` kinds: ``"background"``, ``"discriminative"``,
            ``"shared"`` or ``"shortcut"``.
        part_class: ``(P,)`` int64 owning class of each discriminative part
            of generator 1, -1 for every other part.
        is_shifted: ``(N,)`` bool, True for the ``test_shifted`` split
            (generator 2; all False otherwise).
        has_marker: ``(N,)`` bool, True where the image carries the marker.
        class_parts: ``(K, parts_per_class)`` int64 part ids of each class
            (:func:`class_parts`).

    Images are ordered train first, then test, then test_shifted (same order
    as test); within a split by class, then by index.
    """

    spec: PartsSpec
    images: U8Array
    masks: U8Array
    labels: I64Array
    is_train: BoolArray
    class_names: list[str]
    part_names: list[str]
    part_kinds: list[str]
    part_class: I64Array
    is_shifted: BoolArray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.bool_))
    has_marker: BoolArray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.bool_))
    class_parts: I64Array = dataclasses.field(default_factory=lambda: np.zeros((0, 0), dtype=np.int64))

    def __post_init__(self) -> None:
        n = len(self.labels)
        if len(self.is_shifted) != n:
            self.is_shifted = np.zeros(n, dtype=np.bool_)
        if len(self.has_marker) != n:
            self.has_marker = np.zeros(n, dtype=np.bool_)
        if self.class_parts.size == 0:
            self.class_parts = class_parts(self.spec)

    @property
    def is_test(self) -> BoolArray:
        """``(N,)`` bool, True for the ordinary test split."""
        return ~np.asarray(self.is_train, dtype=bool) & ~np.asarray(self.is_shifted, dtype=bool)

    @property
    def kind_masks(self) -> U8Array:
        """``(N, S, S)`` uint8 kind codes per pixel, index into
        :data:`MASK_KINDS`: 0 background, 1 shared, 2 discriminative,
        3 shortcut."""
        lut = np.asarray([MASK_KINDS.index(k) for k in self.part_kinds], dtype=np.uint8)
        out: U8Array = lut[np.asarray(self.masks)]
        return out

    @property
    def fingerprint(self) -> str:
        """sha256 hex digest over the shapes, dtypes and bytes of ``images``,
        ``masks``, ``labels`` and ``is_train`` (a content fingerprint); from
        generator 2 on, also over the generator version, ``is_shifted``,
        ``has_marker`` and ``class_parts``."""
        h = hashlib.sha256()
        arrays = [
            ("images", np.asarray(self.images, dtype=np.uint8)),
            ("masks", np.asarray(self.masks, dtype=np.uint8)),
            ("labels", np.asarray(self.labels, dtype="<i8")),
            ("is_train", np.asarray(self.is_train, dtype=np.bool_)),
        ]
        if self.spec.generator >= 2:
            h.update(f"generator:{self.spec.generator};".encode("ascii"))
            arrays += [
                ("is_shifted", np.asarray(self.is_shifted, dtype=np.bool_)),
                ("has_marker", np.asarray(self.has_marker, dtype=np.bool_)),
                ("class_parts", np.asarray(self.class_parts, dtype="<i8")),
            ]
        for name, arr in arrays:
            h.update(f"{name}:{arr.dtype.str}:{arr.shape};".encode("ascii"))
            h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()

    def summary(self) -> dict[str, Any]:
        """JSON-able description: spec fields (under ``"spec"``), generator
        version, cache key, fingerprint, image size, class/part names and
        image counts per split and class; under generator 2 also the parts of
        each class and the shortcut (classes, rate, marked images per split
        and class)."""
        labels = np.asarray(self.labels)
        is_train = np.asarray(self.is_train, dtype=bool)
        k = len(self.class_names)

        def counts(sel: BoolArray) -> dict[str, Any]:
            per_class = np.bincount(labels[sel], minlength=k)
            return {"n_images": int(sel.sum()), "per_class": [int(c) for c in per_class]}

        out: dict[str, Any] = {
            "spec": _spec_fields(self.spec),
            "generator_version": self.spec.generator,
            "key": self.spec.key(),
            "fingerprint": self.fingerprint,
            "n_images": int(labels.shape[0]),
            "image_shape": [int(d) for d in np.asarray(self.images).shape[1:]],
            "class_names": list(self.class_names),
            "part_names": list(self.part_names),
            "part_kinds": list(self.part_kinds),
            "splits": {"train": counts(is_train), "test": counts(self.is_test)},
        }
        if self.spec.generator >= 2:
            out["splits"]["test_shifted"] = counts(np.asarray(self.is_shifted, dtype=bool))
            marked = np.asarray(self.has_marker, dtype=bool)
            out["class_parts"] = [[self.part_names[int(p)] for p in row] for row in self.class_parts]
            out["shortcut"] = {
                "classes": list(self.spec.shortcut_classes),
                "rate": float(self.spec.shortcut_rate),
                "marked": {
                    name: counts(marked & sel)
                    for name, sel in (
                        ("train", is_train),
                        ("test", self.is_test),
                        ("test_shifted", np.asarray(self.is_shifted, dtype=bool)),
                    )
                },
            }
        return out


# --------------------------------------------------------------------------- #
# Drawing
# --------------------------------------------------------------------------- #


def _shape_mask(shape: str, size: int) -> BoolArray:
    """``(size, size)`` bool mask of ``shape`` inscribed in its bounding box."""
    coords = np.arange(size, dtype=np.float64) + 0.5 - size / 2.0
    dy = coords[:, None]
    dx = coords[None, :]
    ax, ay = np.abs(dx), np.abs(dy)
    r = size / 2.0
    d2 = dx * dx + dy * dy
    m: BoolArray
    if shape == "disc":
        m = d2 <= r * r
    elif shape == "square":
        m = np.broadcast_to((ax <= r) & (ay <= r), (size, size))
    elif shape == "triangle":  # apex up, base at the bottom
        m = ax <= (dy + r) / 2.0
    elif shape == "cross":
        arm = r / 3.0
        m = ((ax <= arm) & (ay <= r)) | ((ay <= arm) & (ax <= r))
    elif shape == "ring":
        m = (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    elif shape == "diamond":
        m = ax + ay <= r
    elif shape == "bar":  # horizontal bar
        m = np.broadcast_to((ay <= 0.35 * r) & (ax <= r), (size, size))
    elif shape == "star":  # four-pointed star: arms taper from the centre to the box edges
        lo, hi = np.minimum(ax, ay), np.maximum(ax, ay)
        m = lo <= 0.5 + 0.35 * r * (1.0 - hi / r)
    else:  # pragma: no cover - catalogue is fixed
        raise ValueError(f"unknown shape {shape!r}")
    return np.ascontiguousarray(m)


def _texture_pattern(size: int) -> BoolArray:
    """``(size, size)`` bool, True on the dark stripes (diagonal)."""
    idx = np.arange(size)
    return ((idx[:, None] + idx[None, :]) % STRIPE_PERIOD) >= STRIPE_PERIOD // 2


def _muted_colour(rng: np.random.Generator, grey: tuple[float, float], tint: float) -> F64Array:
    """A low-saturation colour: a grey level plus a small per-channel tint."""
    level = rng.uniform(grey[0], grey[1])
    return level + rng.uniform(-tint, tint, size=3)


def _background(rng: np.random.Generator, size: int) -> F64Array:
    """``(size, size, 3)`` float64 smooth gradient between two muted colours."""
    a = _muted_colour(rng, _BG_GREY, _BG_TINT)
    b = _muted_colour(rng, _BG_GREY, _BG_TINT)
    d = rng.uniform(-1.0, 1.0, size=2)
    d = d / max(float(np.sqrt(d[0] * d[0] + d[1] * d[1])), 1e-6)
    coords = np.arange(size, dtype=np.float64)
    proj = d[0] * coords[:, None] + d[1] * coords[None, :]
    lo, hi = float(proj.min()), float(proj.max())
    t = (proj - lo) / max(hi - lo, 1e-6)
    out: F64Array = a + t[:, :, None] * (b - a)
    return out


def _draw_clutter(rng: np.random.Generator, canvas: F64Array, n: int, max_len: int) -> None:
    """Draw ``n`` small muted dots/strokes onto ``canvas`` in place."""
    size = canvas.shape[0]
    for _ in range(n):
        colour = _muted_colour(rng, _CLUTTER_GREY, _CLUTTER_TINT)
        y0, x0 = rng.uniform(0.0, size, size=2)
        if rng.random() < 0.4:  # dot
            y1, x1 = y0, x0
            half = rng.uniform(1.0, 2.5)
        else:  # stroke
            length = rng.uniform(4.0, max(4.0, float(max_len)))
            d = rng.uniform(-1.0, 1.0, size=2)
            d = d / max(float(np.sqrt(d[0] * d[0] + d[1] * d[1])), 1e-6)
            y1, x1 = y0 + length * d[0], x0 + length * d[1]
            half = rng.uniform(0.5, 1.0)
        top = max(int(min(y0, y1) - half) - 1, 0)
        bottom = min(int(max(y0, y1) + half) + 2, size)
        left = max(int(min(x0, x1) - half) - 1, 0)
        right = min(int(max(x0, x1) + half) + 2, size)
        if top >= bottom or left >= right:
            continue
        py = np.arange(top, bottom, dtype=np.float64)[:, None] + 0.5
        px = np.arange(left, right, dtype=np.float64)[None, :] + 0.5
        vy, vx = y1 - y0, x1 - x0
        vv = vy * vy + vx * vx
        if vv > 0.0:
            t = np.clip(((py - y0) * vy + (px - x0) * vx) / vv, 0.0, 1.0)
        else:
            t = np.zeros((bottom - top, right - left))
        ey = py - (y0 + t * vy)
        ex = px - (x0 + t * vx)
        hit = ey * ey + ex * ex <= half * half
        canvas[top:bottom, left:right][hit] = colour


def _place(rng: np.random.Generator, sizes: I64Array, image_size: int) -> list[tuple[int, int]]:
    """Top-left corners for parts of the given sizes: inside the image, with
    at least :data:`PART_GAP` free pixels between bounding boxes.

    Rejection sampling first (largest parts first); if that fails, a grid
    placement that :meth:`PartsSpec.validate` guarantees to succeed.
    """
    n = len(sizes)
    sampled = _sample_corners(rng, sizes, image_size, [])
    if sampled is not None:
        return sampled
    side = 1
    while side * side < n:
        side += 1
    return _grid_corners(rng, sizes, rng.permutation(side * side)[:n], side, image_size // side)


def _sample_corners(
    rng: np.random.Generator, sizes: I64Array, image_size: int, placed: list[tuple[int, int, int]]
) -> list[tuple[int, int]] | None:
    """Rejection sampling, largest parts first, clear of ``placed`` boxes (y, x, size) by :data:`PART_GAP`:
    the corners, or None when one part found no place in 100 draws."""
    corners: list[tuple[int, int]] = [(0, 0)] * len(sizes)
    placed = list(placed)
    for idx in np.argsort(-sizes, kind="stable"):
        s = int(sizes[idx])
        for _ in range(100):
            y, x = (int(v) for v in rng.integers(0, image_size - s + 1, size=2))
            if all(
                y + s + PART_GAP <= py
                or py + ps + PART_GAP <= y
                or x + s + PART_GAP <= px
                or px + ps + PART_GAP <= x
                for py, px, ps in placed
            ):
                placed.append((y, x, s))
                corners[int(idx)] = (y, x)
                break
        else:
            return None
    return corners


def _grid_corners(
    rng: np.random.Generator, sizes: I64Array, cells: I64Array, side: int, cell: int
) -> list[tuple[int, int]]:
    """Part i at a random offset inside grid cell ``cells[i]`` of a ``side`` × ``side`` grid of ``cell`` px."""
    corners: list[tuple[int, int]] = []
    for i in range(len(sizes)):
        s = int(sizes[i])
        cy, cx = divmod(int(cells[i]), side)
        oy, ox = (int(v) for v in rng.integers(0, cell - s - PART_GAP + 1, size=2))
        corners.append((cy * cell + oy, cx * cell + ox))
    return corners


def _draw_part(
    canvas: F64Array,
    mask: U8Array,
    part: PartDef,
    y: int,
    x: int,
    s: int,
    shapes: dict[tuple[str, int], BoolArray],
    stripes: dict[int, BoolArray],
) -> None:
    """Paint ``part`` with bounding box side ``s`` at ``(y, x)`` onto
    ``canvas`` and its id into ``mask``, in place."""
    key = (part.shape, s)
    shp = shapes.get(key)
    if shp is None:
        shp = shapes[key] = _shape_mask(part.shape, s)
    region = canvas[y : y + s, x : x + s]
    if part.texture == "striped":
        stripe = stripes.get(s)
        if stripe is None:
            stripe = stripes[s] = _texture_pattern(s)
        region[shp & ~stripe] = part.rgb
        region[shp & stripe] = part.stripe_rgb
    else:
        region[shp] = part.rgb
    mask[y : y + s, x : x + s][shp] = part.pid


def _draw_marker(canvas: F64Array, mask: U8Array, marker: PartDef, y: int, x: int, s: int) -> None:
    """Paint the checkered marker (side ``s``) at ``(y, x)``, in place."""
    idx = np.arange(s)
    dark = ((idx[:, None] + idx[None, :]) % 2) == 0
    region = canvas[y : y + s, x : x + s]
    region[dark] = marker.rgb
    region[~dark] = marker.stripe_rgb
    mask[y : y + s, x : x + s] = marker.pid


def _draw_image(
    rng: np.random.Generator,
    spec: PartsSpec,
    label: int,
    defs: list[PartDef],
    shapes: dict[tuple[str, int], BoolArray],
    stripes: dict[int, BoolArray],
    image: U8Array,
    mask: U8Array,
    skip: frozenset[int] = frozenset(),
) -> list[PartDef]:
    """Draw one image of class ``label`` into ``image`` (S, S, 3) and
    ``mask`` (S, S) in place (generator 1), leaving out the parts whose ids
    are in ``skip``; returns the parts present (skipped ones included).

    Leaving a part out changes no random draw."""
    size = spec.image_size
    canvas = _background(rng, size)
    _draw_clutter(rng, canvas, spec.clutter, spec.part_min)

    ppc = spec.parts_per_class
    own = defs[label * ppc : (label + 1) * ppc]
    keep = rng.random(ppc) >= spec.drop_prob
    if not keep.any():
        keep[int(rng.integers(0, ppc))] = True
    present = [d for d, k in zip(own, keep, strict=True) if k]
    present += [d for d in defs if d.kind == "shared"]

    sizes = rng.integers(spec.part_min, spec.part_max + 1, size=len(present))
    corners = _place(rng, sizes, size)
    for part, s_np, (y, x) in zip(present, sizes, corners, strict=True):
        if part.pid not in skip:
            _draw_part(canvas, mask, part, y, x, int(s_np), shapes, stripes)

    noise = rng.integers(-NOISE_AMPLITUDE, NOISE_AMPLITUDE + 1, size=canvas.shape)
    image[...] = np.clip(np.rint(canvas) + noise, 0, 255).astype(np.uint8)
    return present


def _place_with_marker(
    rng: np.random.Generator, sizes: I64Array, image_size: int, marker_size: int
) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """Top-left corners of the parts and of the marker (generator 2).

    The marker goes first, near a random corner (at most ``image_size // 8``
    pixels from both edges); the parts then by rejection sampling as in
    :func:`_place`, clear of the marker. If that fails, a grid of
    ``len(sizes) + 1`` cells that :meth:`PartsSpec.validate` guarantees:
    the marker in a random corner cell, the parts in random other cells.
    """
    n = len(sizes)
    ms = marker_size
    reach = max(image_size // 8, 1)
    corner = int(rng.integers(0, 4))
    oy, ox = (int(v) for v in rng.integers(0, reach + 1, size=2))
    my = oy if corner < 2 else image_size - ms - oy
    mx = ox if corner % 2 == 0 else image_size - ms - ox
    sampled = _sample_corners(rng, sizes, image_size, [(my, mx, ms)])
    if sampled is not None:
        return sampled, (my, mx)
    side = 1
    while side * side < n + 1:
        side += 1
    cell = image_size // side
    grid_corners = (0, side - 1, side * (side - 1), side * side - 1)
    marker_cell = grid_corners[corner]
    free = np.asarray([c for c in range(side * side) if c != marker_cell], dtype=np.int64)
    cells = rng.permutation(free)[:n]
    cy, cx = divmod(marker_cell, side)
    my = cy * cell + (0 if cy == 0 else cell - ms - PART_GAP)
    mx = cx * cell + (0 if cx == 0 else cell - ms - PART_GAP)
    return _grid_corners(rng, sizes, cells, side, cell), (my, mx)


def _draw_image_v2(
    rng: np.random.Generator,
    spec: PartsSpec,
    label: int,
    shifted: bool,
    defs: list[PartDef],
    own: I64Array,
    shapes: dict[tuple[str, int], BoolArray],
    stripes: dict[int, BoolArray],
    image: U8Array,
    mask: U8Array,
    skip: frozenset[int] = frozenset(),
) -> list[PartDef]:
    """Draw one image of class ``label`` (generator 2) into ``image`` and
    ``mask`` in place, leaving out the elements whose part ids are in
    ``skip``; returns the elements present (skipped ones included).

    ``own``: the class's part ids. ``shifted``: the ``test_shifted`` variant
    (marker on the other classes). Every random draw happens in the same
    order whatever ``shifted`` and ``skip`` are, so the variant and the
    left-out renderings differ from the image in those pixels only.
    """
    size = spec.image_size
    canvas = _background(rng, size)
    _draw_clutter(rng, canvas, spec.clutter, spec.part_min)

    ppc = spec.parts_per_class
    keep = rng.random(ppc) >= spec.drop_prob
    if not keep.any():
        keep[int(rng.integers(0, ppc))] = True
    marker_draw = float(rng.random())
    carries = (label in spec.shortcut_classes) != shifted
    has_marker = carries and marker_draw < spec.shortcut_rate

    present = [defs[int(p) - 1] for p, k in zip(own, keep, strict=True) if k]
    present += [d for d in defs if d.kind == "shared"]
    sizes = rng.integers(spec.part_min, spec.part_max + 1, size=len(present))
    corners, (my, mx) = _place_with_marker(rng, sizes, size, spec.marker_size)
    for part, s_np, (y, x) in zip(present, sizes, corners, strict=True):
        if part.pid not in skip:
            _draw_part(canvas, mask, part, y, x, int(s_np), shapes, stripes)
    marker = defs[-1]
    if has_marker:
        if marker.pid not in skip:
            _draw_marker(canvas, mask, marker, my, mx, spec.marker_size)
        present.append(marker)

    noise = rng.integers(-NOISE_AMPLITUDE, NOISE_AMPLITUDE + 1, size=canvas.shape)
    image[...] = np.clip(np.rint(canvas) + noise, 0, 255).astype(np.uint8)
    return present


def _labels_and_splits(spec: PartsSpec) -> tuple[I64Array, BoolArray, BoolArray]:
    """``(N,)`` labels, is_train and is_shifted of the rows of ``spec``."""
    labels_list: list[int] = []
    train_list: list[bool] = []
    shifted_list: list[bool] = []
    blocks = [(True, False, spec.train_per_class), (False, False, spec.test_per_class)]
    if spec.generator >= 2:
        blocks.append((False, True, spec.test_per_class))
    for is_tr, is_sh, per_class in blocks:
        for c in range(spec.n_classes):
            labels_list += [c] * per_class
            train_list += [is_tr] * per_class
            shifted_list += [is_sh] * per_class
    return (
        np.asarray(labels_list, dtype=np.int64),
        np.asarray(train_list, dtype=np.bool_),
        np.asarray(shifted_list, dtype=np.bool_),
    )


class PartsRenderer:
    """Draws any row of ``spec``'s dataset, whole or with one element left
    out: the generator behind :func:`generate_parts` and the intervention
    behind the causal audit of prototypes (FunnyBirds-style part removal,
    Hesse et al., ICCV 2023).

    Rows are numbered as in :class:`PartsData` (train, test, test_shifted).
    Row ``n`` of train or test is drawn from seed ``SeedSequence(spec.seed)
    .spawn(n_base)[n]``; a test_shifted row reuses its test row's seed.
    """

    def __init__(self, spec: PartsSpec) -> None:
        spec.validate()
        self.spec = spec
        self.defs = part_defs(spec)
        self.class_parts = class_parts(spec)
        self.labels, self.is_train, self.is_shifted = _labels_and_splits(spec)
        self._seeds = np.random.SeedSequence(spec.seed).spawn(spec.n_base)
        self._shapes: dict[tuple[str, int], BoolArray] = {}
        self._stripes: dict[int, BoolArray] = {}
        self._n_disc = sum(d.kind == "discriminative" for d in self.defs)
        self._shift = spec.n_classes * spec.test_per_class

    def __len__(self) -> int:
        return len(self.labels)

    def _draw(
        self, row: int, image: U8Array, mask: U8Array, skip: frozenset[int] = frozenset()
    ) -> list[PartDef]:
        if not 0 <= row < len(self.labels):
            raise IndexError(f"row {row} out of range for {len(self.labels)} images")
        shifted = bool(self.is_shifted[row])
        seed = self._seeds[row - self._shift if shifted else row]
        rng = np.random.default_rng(seed)
        label = int(self.labels[row])
        if self.spec.generator == 1:
            return _draw_image(
                rng, self.spec, label, self.defs, self._shapes, self._stripes, image, mask, skip
            )
        return _draw_image_v2(
            rng,
            self.spec,
            label,
            shifted,
            self.defs,
            self.class_parts[label],
            self._shapes,
            self._stripes,
            image,
            mask,
            skip,
        )

    def _present(self, row: int) -> list[PartDef]:
        s = self.spec.image_size
        return self._draw(row, np.empty((s, s, 3), np.uint8), np.zeros((s, s), np.uint8))

    def elements(self, row: int) -> list[tuple[str, str]]:
        """``(name, kind)`` of every element of row ``row``, kind in
        :data:`ELEMENT_KINDS`, e.g. ``("part 3: red disc",
        "discriminative")``, ``("shared 0: white ring", "shared")``,
        ``("marker", "shortcut")``. Names are unique within an image."""
        return [(element_name(d, self._n_disc), d.kind) for d in self._present(row)]

    def render(self, row: int, remove: str | Collection[str] | None = None) -> tuple[U8Array, U8Array]:
        """Row ``row`` as ``((S, S, 3) uint8 image, (S, S) uint8 part ids)``,
        with the element named ``remove`` left out, or every element of a
        collection of names (``None`` or empty: the image as generated, bit
        for bit). A left-out element's pixels show what lies beneath it:
        gradient and clutter, with the same noise.

        Raises:
            ValueError: a name in ``remove`` is not an element of the image.
        """
        s = self.spec.image_size
        image = np.empty((s, s, 3), np.uint8)
        mask = np.zeros((s, s), np.uint8)
        wanted = [remove] if isinstance(remove, str) else list(remove or ())
        skip: frozenset[int] = frozenset()
        if wanted:
            names = {element_name(d, self._n_disc): d.pid for d in self._present(row)}
            missing = [n for n in wanted if n not in names]
            if missing:
                raise ValueError(
                    f"no element {missing[0]!r} in image {row}; its elements: {', '.join(sorted(names))}"
                )
            skip = frozenset(names[n] for n in wanted)
        self._draw(row, image, mask, skip)
        return image, mask

    def has_marker(self, row: int) -> bool:
        """Whether row ``row`` carries the marker."""
        return any(d.kind == "shortcut" for d in self._present(row))


def generate_parts(spec: PartsSpec) -> PartsData:
    """Generate the dataset described by ``spec`` (deterministic in the spec).

    Returns:
        A :class:`PartsData` with ``N = spec.n_images`` images: ``n_classes *
        (train_per_class + test_per_class)``, train first, and under
        generator 2 the ``n_classes * test_per_class`` test_shifted images
        last.

    Raises:
        ValueError: if ``spec.validate()`` does.
    """
    renderer = PartsRenderer(spec)
    defs = renderer.defs
    n, size = len(renderer), spec.image_size
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    has_marker = np.zeros(n, dtype=np.bool_)
    for i in range(n):
        present = renderer._draw(i, images[i], masks[i])
        has_marker[i] = any(d.kind == "shortcut" for d in present)

    class_names = []
    for c in range(spec.n_classes):
        own = [defs[int(p) - 1] for p in renderer.class_parts[c]]
        class_names.append(f"class_{c}_" + "+".join(d.name.replace(" ", "-") for d in own))
    return PartsData(
        spec=spec,
        images=images,
        masks=masks,
        labels=renderer.labels,
        is_train=renderer.is_train,
        class_names=class_names,
        part_names=["background"] + [d.name for d in defs],
        part_kinds=["background"] + [d.kind for d in defs],
        part_class=np.asarray([-1] + [d.owner for d in defs], dtype=np.int64),
        is_shifted=renderer.is_shifted,
        has_marker=has_marker,
        class_parts=renderer.class_parts,
    )


# --------------------------------------------------------------------------- #
# Cache
# --------------------------------------------------------------------------- #


def default_cache_dir() -> Path:
    """``$PROTOAUDIT_CACHE`` if set (and non-empty), else ``~/.cache/protoaudit``."""
    env = os.environ.get("PROTOAUDIT_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "protoaudit"


def _to_npz_arrays(data: PartsData) -> dict[str, npt.NDArray[Any]]:
    meta = {
        "key": data.spec.key(),
        "generator_version": data.spec.generator,
        "spec": _spec_fields(data.spec),
        "fingerprint": data.fingerprint,
        "class_names": data.class_names,
        "part_names": data.part_names,
        "part_kinds": data.part_kinds,
    }
    meta_bytes = json.dumps(meta, sort_keys=True).encode("utf-8")
    arrays: dict[str, npt.NDArray[Any]] = {
        "images": data.images,
        "masks": data.masks,
        "labels": data.labels,
        "is_train": data.is_train,
        "part_class": data.part_class,
        "meta": np.frombuffer(meta_bytes, dtype=np.uint8),
    }
    if data.spec.generator >= 2:
        arrays.update(is_shifted=data.is_shifted, has_marker=data.has_marker, class_parts=data.class_parts)
    return arrays


def _read_cache(path: Path, spec: PartsSpec) -> PartsData | None:
    """The cached dataset at ``path`` if it is intact and matches ``spec``,
    else None."""
    v2 = spec.generator >= 2
    try:
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"].astype(np.uint8)).decode("utf-8"))
            extra: dict[str, Any] = {}
            if v2:
                extra = {name: np.asarray(z[name]) for name in ("is_shifted", "has_marker", "class_parts")}
            data = PartsData(
                spec=spec,
                images=np.asarray(z["images"]),
                masks=np.asarray(z["masks"]),
                labels=np.asarray(z["labels"]),
                is_train=np.asarray(z["is_train"]),
                class_names=[str(s) for s in meta["class_names"]],
                part_names=[str(s) for s in meta["part_names"]],
                part_kinds=[str(s) for s in meta["part_kinds"]],
                part_class=np.asarray(z["part_class"]),
                **extra,
            )
    except Exception:  # unreadable / truncated / not an npz: regenerate
        return None
    n = spec.n_images
    s = spec.image_size
    n_parts = 1 + len(part_defs(spec))
    checks = [
        meta.get("key") == spec.key(),
        meta.get("generator_version") == spec.generator,
        data.images.dtype == np.uint8 and data.images.shape == (n, s, s, 3),
        data.masks.dtype == np.uint8 and data.masks.shape == (n, s, s),
        data.labels.dtype == np.int64 and data.labels.shape == (n,),
        data.is_train.dtype == np.bool_ and data.is_train.shape == (n,),
        data.part_class.dtype == np.int64 and data.part_class.shape == (n_parts,),
        len(data.class_names) == spec.n_classes,
        len(data.part_names) == n_parts and len(data.part_kinds) == n_parts,
    ]
    if v2:
        checks += [
            data.is_shifted.dtype == np.bool_ and data.is_shifted.shape == (n,),
            data.has_marker.dtype == np.bool_ and data.has_marker.shape == (n,),
            data.class_parts.dtype == np.int64
            and data.class_parts.shape == (spec.n_classes, spec.parts_per_class),
        ]
    if not all(checks) or meta.get("fingerprint") != data.fingerprint:
        return None
    return data


def _write_cache(path: Path, data: PartsData) -> None:
    """Write atomically: temp file in the same folder, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **_to_npz_arrays(data))  # type: ignore[arg-type]
        os.chmod(tmp_name, 0o644)  # mkstemp creates 0600; a cache is meant to be shared
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise


def cache_path(spec: PartsSpec, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where :func:`load_parts` caches ``spec``: ``<cache_dir>/parts-<key[:16]>.npz``."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / f"parts-{spec.key()[:16]}.npz"


def load_parts(spec: PartsSpec, cache_dir: str | os.PathLike[str] | None = None) -> PartsData:
    """Load ``spec``'s dataset from the cache, generating and caching it first
    if needed.

    The cache file is ``<cache_dir>/parts-<key[:16]>.npz`` (``np.savez``,
    read with ``allow_pickle=False``; name lists are stored as a JSON string in
    a uint8 array). Default ``cache_dir``: ``$PROTOAUDIT_CACHE`` if set, else
    ``~/.cache/protoaudit``. A cache file that cannot be read, belongs to
    another spec/generator version or fails its stored fingerprint is
    regenerated and overwritten. If the cache cannot be written (OSError), a
    warning is issued and the freshly generated data is returned anyway.

    Raises:
        ValueError: if ``spec.validate()`` does.
    """
    spec.validate()
    path = cache_path(spec, cache_dir)
    if path.is_file():
        cached = _read_cache(path, spec)
        if cached is not None:
            return cached
    data = generate_parts(spec)
    try:
        _write_cache(path, data)
    except OSError as exc:
        warnings.warn(f"could not write parts cache {path}: {exc}", RuntimeWarning, stacklevel=2)
    return data
