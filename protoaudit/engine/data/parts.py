"""Procedural image-classification dataset "with known parts".

Every image is drawn from a seed, and every pixel's ground-truth part is known,
which makes the dataset usable for quick starts, tests and ground-truth audits
of ProtoPNet prototypes (does a prototype sit on a class-discriminative part,
on a shared distractor part, or on background?).

Construction
------------
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

Determinism: image ``n`` is drawn with its own generator seeded from
``np.random.SeedSequence(spec.seed).spawn(N)[n]``, and drawing uses only
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "GENERATOR_VERSION",
    "PartDef",
    "PartsData",
    "PartsSpec",
    "cache_path",
    "default_cache_dir",
    "generate_parts",
    "load_parts",
    "part_defs",
]

GENERATOR_VERSION: int = 1
"""Bump whenever the drawing changes: it is part of :meth:`PartsSpec.key`."""

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

PartKind = Literal["background", "discriminative", "shared"]

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
    """Everything that determines a parts dataset (together with
    :data:`GENERATOR_VERSION`).

    Attributes:
        n_classes: number of classes ``K`` (>= 2).
        image_size: side ``S`` of the square RGB images, in pixels.
        train_per_class: training images per class (>= 1).
        test_per_class: test images per class (>= 0).
        parts_per_class: discriminative parts owned by each class (>= 1).
        shared_parts: distractor parts present in every image (>= 0).
        clutter: random background strokes/dots per image (>= 0).
        part_min: smallest part size (bounding-box side, pixels).
        part_max: largest part size (bounding-box side, pixels).
        drop_prob: probability that a discriminative part is left out of an
            image (at least one part of the class is always kept).
        seed: non-negative integer seed.
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

    def validate(self) -> None:
        """Check every field.

        Raises:
            ValueError: one line naming the field, the bad value and what is
                expected, e.g. ``"n_classes must be >= 2, got 1"``.
        """
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
        n_disc = self.n_classes * self.parts_per_class
        if n_disc > N_DISCRIMINATIVE_AVAILABLE:
            raise ValueError(
                f"n_classes * parts_per_class must be <= {N_DISCRIMINATIVE_AVAILABLE} "
                f"(distinct discriminative parts available), got "
                f"{self.n_classes} * {self.parts_per_class} = {n_disc}"
            )
        if self.shared_parts > N_SHARED_AVAILABLE:
            raise ValueError(
                f"shared_parts must be <= {N_SHARED_AVAILABLE} "
                f"(distinct shared parts available), got {self.shared_parts}"
            )
        per_image = self.parts_per_class + self.shared_parts
        # Parts must fit on a grid of cells of side part_max + PART_GAP: this
        # guarantees that non-overlapping placement always succeeds.
        fit = _largest_fitting_part(self.image_size, per_image)
        if self.part_max > fit:
            raise ValueError(
                f"part_max must be <= {fit} so that parts_per_class + shared_parts"
                f" = {per_image} parts fit without overlap in a {self.image_size} px"
                f" image, got {self.part_max}"
            )

    def key(self) -> str:
        """sha256 hex digest of the spec fields and :data:`GENERATOR_VERSION`
        (the cache key)."""
        payload = dataclasses.asdict(self)
        payload["generator_version"] = GENERATOR_VERSION
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


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
        kind: ``"discriminative"`` or ``"shared"``.
        shape: one of :data:`SHAPES`.
        colour: colour name.
        texture: ``"solid"`` or ``"striped"``.
        rgb: the part's colour.
        stripe_rgb: the colour of the dark stripes (== ``rgb`` if solid).
        owner: owning class of a discriminative part, -1 for shared parts.
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


def part_defs(spec: PartsSpec) -> list[PartDef]:
    """The non-background parts of ``spec``, in part-id order (ids 1..P-1).

    Discriminative part ``i`` of class ``k`` has id ``1 + k * parts_per_class
    + i`` and uses combo ``i * n_classes + k``, so the first part of every
    class gets a distinct colour when ``n_classes <= len(PART_COLOURS)``.
    """
    spec.validate()
    defs: list[PartDef] = []
    for k in range(spec.n_classes):
        for i in range(spec.parts_per_class):
            ci, si, ti = _discriminative_combo(i * spec.n_classes + k)
            colour, rgb = PART_COLOURS[ci]
            shape, texture = SHAPES[si], TEXTURES[ti]
            name = f"{colour} {shape}" if texture == "solid" else f"{colour} {texture} {shape}"
            defs.append(
                PartDef(
                    pid=len(defs) + 1,
                    name=name,
                    kind="discriminative",
                    shape=shape,
                    colour=colour,
                    texture=texture,
                    rgb=rgb,
                    stripe_rgb=_shade(rgb) if texture == "striped" else rgb,
                    owner=k,
                )
            )
    n_sh = len(SHARED_SHAPES)
    for i in range(spec.shared_parts):
        shape = SHARED_SHAPES[i % n_sh]
        colour, rgb = SHARED_COLOURS[(i + i // n_sh) % len(SHARED_COLOURS)]
        defs.append(
            PartDef(
                pid=len(defs) + 1,
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
        part_kinds: ``P`` kinds: ``"background"``, ``"discriminative"`` or
            ``"shared"``.
        part_class: ``(P,)`` int64 owning class of each discriminative part,
            -1 for background and shared parts.

    Images are ordered train first, then test; within a split by class, then
    by index.
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

    @property
    def fingerprint(self) -> str:
        """sha256 hex digest over the shapes, dtypes and bytes of ``images``,
        ``masks``, ``labels`` and ``is_train`` (a content fingerprint)."""
        h = hashlib.sha256()
        arrays = (
            ("images", np.asarray(self.images, dtype=np.uint8)),
            ("masks", np.asarray(self.masks, dtype=np.uint8)),
            ("labels", np.asarray(self.labels, dtype="<i8")),
            ("is_train", np.asarray(self.is_train, dtype=np.bool_)),
        )
        for name, arr in arrays:
            h.update(f"{name}:{arr.dtype.str}:{arr.shape};".encode("ascii"))
            h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()

    def summary(self) -> dict[str, Any]:
        """JSON-able description: spec fields (under ``"spec"``), generator
        version, cache key, fingerprint, image size, class/part names and
        image counts per split and class."""
        labels = np.asarray(self.labels)
        is_train = np.asarray(self.is_train, dtype=bool)
        k = len(self.class_names)

        def counts(sel: BoolArray) -> dict[str, Any]:
            per_class = np.bincount(labels[sel], minlength=k)
            return {"n_images": int(sel.sum()), "per_class": [int(c) for c in per_class]}

        return {
            "spec": dataclasses.asdict(self.spec),
            "generator_version": GENERATOR_VERSION,
            "key": self.spec.key(),
            "fingerprint": self.fingerprint,
            "n_images": int(labels.shape[0]),
            "image_shape": [int(d) for d in np.asarray(self.images).shape[1:]],
            "class_names": list(self.class_names),
            "part_names": list(self.part_names),
            "part_kinds": list(self.part_kinds),
            "splits": {"train": counts(is_train), "test": counts(~is_train)},
        }


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
    order = np.argsort(-sizes, kind="stable")
    corners: list[tuple[int, int]] = [(0, 0)] * n
    placed: list[tuple[int, int, int]] = []  # (y, x, size)
    ok = True
    for idx in order:
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
            ok = False
            break
    if ok:
        return corners
    side = 1
    while side * side < n:
        side += 1
    cell = image_size // side
    cells = rng.permutation(side * side)[:n]
    for i in range(n):
        s = int(sizes[i])
        cy, cx = divmod(int(cells[i]), side)
        oy, ox = (int(v) for v in rng.integers(0, cell - s - PART_GAP + 1, size=2))
        corners[i] = (cy * cell + oy, cx * cell + ox)
    return corners


def _draw_image(
    rng: np.random.Generator,
    spec: PartsSpec,
    label: int,
    defs: list[PartDef],
    shapes: dict[tuple[str, int], BoolArray],
    stripes: dict[int, BoolArray],
    image: U8Array,
    mask: U8Array,
) -> None:
    """Draw one image of class ``label`` into ``image`` (S, S, 3) and
    ``mask`` (S, S) in place."""
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
        s = int(s_np)
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

    noise = rng.integers(-NOISE_AMPLITUDE, NOISE_AMPLITUDE + 1, size=canvas.shape)
    image[...] = np.clip(np.rint(canvas) + noise, 0, 255).astype(np.uint8)


def generate_parts(spec: PartsSpec) -> PartsData:
    """Generate the dataset described by ``spec`` (deterministic in the spec).

    Returns:
        A :class:`PartsData` with ``N = n_classes * (train_per_class +
        test_per_class)`` images, train first.

    Raises:
        ValueError: if ``spec.validate()`` does.
    """
    spec.validate()
    defs = part_defs(spec)
    k, size = spec.n_classes, spec.image_size
    labels_list: list[int] = []
    train_list: list[bool] = []
    for is_tr, per_class in ((True, spec.train_per_class), (False, spec.test_per_class)):
        for c in range(k):
            labels_list += [c] * per_class
            train_list += [is_tr] * per_class
    n = len(labels_list)
    labels = np.asarray(labels_list, dtype=np.int64)
    is_train = np.asarray(train_list, dtype=np.bool_)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    masks = np.zeros((n, size, size), dtype=np.uint8)

    shapes: dict[tuple[str, int], BoolArray] = {}
    stripes: dict[int, BoolArray] = {}
    seeds = np.random.SeedSequence(spec.seed).spawn(n)
    for i in range(n):
        rng = np.random.default_rng(seeds[i])
        _draw_image(rng, spec, int(labels[i]), defs, shapes, stripes, images[i], masks[i])

    class_names = []
    for c in range(k):
        own = [d for d in defs if d.owner == c]
        class_names.append(f"class_{c}_" + "+".join(d.name.replace(" ", "-") for d in own))
    return PartsData(
        spec=spec,
        images=images,
        masks=masks,
        labels=labels,
        is_train=is_train,
        class_names=class_names,
        part_names=["background"] + [d.name for d in defs],
        part_kinds=["background"] + [d.kind for d in defs],
        part_class=np.asarray([-1] + [d.owner for d in defs], dtype=np.int64),
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
        "generator_version": GENERATOR_VERSION,
        "spec": dataclasses.asdict(data.spec),
        "fingerprint": data.fingerprint,
        "class_names": data.class_names,
        "part_names": data.part_names,
        "part_kinds": data.part_kinds,
    }
    meta_bytes = json.dumps(meta, sort_keys=True).encode("utf-8")
    return {
        "images": data.images,
        "masks": data.masks,
        "labels": data.labels,
        "is_train": data.is_train,
        "part_class": data.part_class,
        "meta": np.frombuffer(meta_bytes, dtype=np.uint8),
    }


def _read_cache(path: Path, spec: PartsSpec) -> PartsData | None:
    """The cached dataset at ``path`` if it is intact and matches ``spec``,
    else None."""
    try:
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"].astype(np.uint8)).decode("utf-8"))
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
            )
    except Exception:  # unreadable / truncated / not an npz: regenerate
        return None
    n = spec.n_classes * (spec.train_per_class + spec.test_per_class)
    s = spec.image_size
    n_parts = 1 + spec.n_classes * spec.parts_per_class + spec.shared_parts
    checks = (
        meta.get("key") == spec.key(),
        meta.get("generator_version") == GENERATOR_VERSION,
        data.images.dtype == np.uint8 and data.images.shape == (n, s, s, 3),
        data.masks.dtype == np.uint8 and data.masks.shape == (n, s, s),
        data.labels.dtype == np.int64 and data.labels.shape == (n,),
        data.is_train.dtype == np.bool_ and data.is_train.shape == (n,),
        data.part_class.dtype == np.int64 and data.part_class.shape == (n_parts,),
        len(data.class_names) == spec.n_classes,
        len(data.part_names) == n_parts and len(data.part_kinds) == n_parts,
    )
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
