"""Datasets as the engine sees them: splits of images in [0, 1] with labels and stable image ids.

``build_dataset(config, seed)`` turns a recipe's ``[data]`` table into a :class:`DatasetBundle` with four
splits: ``train`` (augmented when the recipe asks), ``push`` (the same training images, never augmented),
``val`` (carved from train for model selection, never the test split) and ``test``; the embedded dataset's
generator 2 adds a fifth, ``test_shifted`` (the test images with the shortcut marker moved to other classes).

Splits of the embedded dataset carry ``interventions`` (:class:`SplitInterventions`): each image's elements and
the image drawn again without one of them. Other datasets' splits have ``interventions = None``.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from protoaudit.engine.data.augment import Augment

if TYPE_CHECKING:
    from protoaudit.engine.data.files import FileSplit, Problem
    from protoaudit.engine.data.parts import PartsRenderer
    from protoaudit.engine.recipe import DataConfig, PartsDataConfig


class ImageSplit(Protocol):
    """What training, push and evaluation need of a split."""

    labels: np.ndarray  # (N,) int64
    image_ids: list[str]  # stable, human-readable ids (a file path, or "test/000012")
    interventions: Any  # SplitInterventions for the embedded dataset, else None

    def __len__(self) -> int: ...

    def batch(self, indices: Sequence[int], seeds: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, S, S) float32 in [0, 1] for the given indices; when the split augments and (B,) int64
        ``seeds`` are given, image i is augmented with a generator seeded with ``seeds[i]``."""
        ...

    def part_mask(self, index: int) -> np.ndarray | None:
        """(S, S) uint8 ground-truth part id per pixel (0 = background), or None when unknown."""
        ...


def iter_batches(
    split: ImageSplit,
    order: torch.Tensor,
    batch_size: int,
    workers: int = 0,
    pin_memory: bool = False,
    augment_generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(indices (B,) int64, images (B, 3, S, S) float32)`` over ``order`` in chunks of ``batch_size``.

    Images are augmented only when the split augments and ``augment_generator`` is given: then every image
    gets its own seed, drawn here in order from that generator, so the draws do not depend on ``workers``.
    With ``workers > 0`` and a split that can load one image at a time (``item(i, seed)``), a DataLoader
    decodes images in worker processes; otherwise batches come straight from ``split.batch``. The loader
    gets its own generator, so it never draws from torch's global one (its workers draw nothing).
    """
    from protoaudit.engine.data.augment import draw_seeds

    chunks = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    augmenting = augment_generator is not None and getattr(split, "augment", None) is not None
    seeds: list[torch.Tensor | None] = [
        draw_seeds(augment_generator, len(c)) if augmenting and augment_generator is not None else None
        for c in chunks
    ]
    if workers > 0 and hasattr(split, "item"):
        loader = torch.utils.data.DataLoader(
            _ItemView(split),
            batch_sampler=[
                [(int(i), None if s is None else int(s[j])) for j, i in enumerate(c.tolist())]
                for c, s in zip(chunks, seeds, strict=True)
            ],
            num_workers=workers,
            pin_memory=pin_memory,
            generator=torch.Generator().manual_seed(0),
        )
        for chunk, images in zip(chunks, loader, strict=True):
            yield chunk, images
        return
    for chunk, chunk_seeds in zip(chunks, seeds, strict=True):
        yield chunk, split.batch(chunk.tolist(), chunk_seeds)


class _ItemView(torch.utils.data.Dataset[torch.Tensor]):
    def __init__(self, split: Any) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: tuple[int, int | None]) -> torch.Tensor:
        index, seed = key
        return self.split.item(index, seed)


class SplitInterventions:
    """Element removal on the images of one split of the embedded dataset (FunnyBirds-style interventions,
    Hesse et al., ICCV 2023).

    ``renderer`` is a :class:`protoaudit.engine.data.parts.PartsRenderer`; ``rows`` (N,) int64 maps the split's image
    i to its row of the generated dataset.
    """

    def __init__(self, renderer: PartsRenderer, rows: np.ndarray) -> None:
        self.renderer = renderer
        self.rows = np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def elements(self, i: int) -> list[tuple[str, str]]:
        """(name, kind) of every element in image i, kind in ``("discriminative", "shared", "shortcut")``; names
        are unique within the image, e.g. ``("part 3: red disc", "discriminative")``, ``("marker", "shortcut")``.
        """
        return self.renderer.elements(int(self.rows[i]))

    def render(self, i: int, remove: str | Collection[str] | None = None) -> torch.Tensor:
        """Image i as (3, S, S) float32 in [0, 1], exactly as the split serves it before augmentation (equal to
        the push, val and test splits' ``batch([i])[0]`` bit for bit) when ``remove`` is None; else drawn again
        with the element named ``remove`` left out, or every element of a collection of names (their pixels
        show the background beneath, same noise).

        Raises:
            ValueError: a name in ``remove`` is not one of ``elements(i)``.
        """
        image, _ = self.renderer.render(int(self.rows[i]), remove)
        return _to_float(image)

    def part_mask(self, i: int, remove: str | None = None) -> np.ndarray:
        """(S, S) uint8 part ids of image i (with ``remove`` left out)."""
        _, mask = self.renderer.render(int(self.rows[i]), remove)
        return mask

    def kind_mask(self, i: int, remove: str | None = None) -> np.ndarray:
        """(S, S) uint8 kind codes of image i (with ``remove`` left out): 0 background, 1 shared,
        2 discriminative, 3 shortcut (``protoaudit.engine.data.parts.MASK_KINDS``)."""
        from protoaudit.engine.data.parts import MASK_KINDS

        lut = np.asarray(
            [MASK_KINDS.index("background")] + [MASK_KINDS.index(d.kind) for d in self.renderer.defs]
        )
        return lut.astype(np.uint8)[self.part_mask(i, remove)]

    def subset(self, indices: np.ndarray) -> SplitInterventions:
        return SplitInterventions(self.renderer, self.rows[np.asarray(indices, dtype=np.int64)])


def _to_float(image: np.ndarray) -> torch.Tensor:
    """(S, S, 3) uint8 → (3, S, S) float32 in [0, 1], the same operations as :meth:`TensorSplit.batch`."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous().float().div_(255.0)


@dataclass
class TensorSplit:
    """A split held in memory: images (N, S, S, 3) uint8, labels (N,) int64, optional masks (N, S, S) uint8,
    optional interventions (:class:`SplitInterventions`, embedded dataset)."""

    images: np.ndarray
    labels: np.ndarray
    image_ids: list[str]
    masks: np.ndarray | None = None
    augment: Augment | None = None
    interventions: SplitInterventions | None = None
    _tensor: torch.Tensor | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.labels)

    def _all(self) -> torch.Tensor:
        if self._tensor is None:
            self._tensor = (
                torch.from_numpy(np.ascontiguousarray(self.images)).permute(0, 3, 1, 2).contiguous()
            )
        return self._tensor

    def batch(self, indices: Sequence[int], seeds: torch.Tensor | None = None) -> torch.Tensor:
        x = self._all()[torch.as_tensor(list(indices), dtype=torch.long)].float().div_(255.0)
        if self.augment is None or seeds is None:
            return x
        from protoaudit.engine.data.augment import augment_batch

        return augment_batch(x, self.augment, seeds)

    def part_mask(self, index: int) -> np.ndarray | None:
        return None if self.masks is None else self.masks[index]

    def subset(self, indices: np.ndarray, augment: Augment | None = None) -> TensorSplit:
        return TensorSplit(
            self.images[indices],
            self.labels[indices],
            [self.image_ids[i] for i in indices],
            None if self.masks is None else self.masks[indices],
            augment,
            None if self.interventions is None else self.interventions.subset(indices),
        )


@dataclass
class DatasetBundle:
    train: ImageSplit
    push: ImageSplit
    val: ImageSplit
    test: ImageSplit
    class_names: list[str]
    image_size: int
    fingerprint: str
    summary: dict[str, Any]
    part_names: list[str] | None = None  # index = part id; [0] = background
    part_kinds: list[str] | None = None  # "background" | "discriminative" | "shared" | "shortcut"
    test_shifted: ImageSplit | None = None  # the test images with the shortcut moved (embedded generator 2)

    @property
    def n_classes(self) -> int:
        return len(self.class_names)


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (keep, held_out), taking round(fraction · n_k) of each class k (at least one
    image stays in keep). Deterministic for a seed."""
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    held: list[int] = []
    for k in np.unique(labels):
        idx = np.flatnonzero(labels == k)
        rng.shuffle(idx)
        n_held = min(round(fraction * len(idx)), len(idx) - 1)
        held += idx[:n_held].tolist()
        keep += idx[n_held:].tolist()
    return np.sort(np.array(keep, dtype=np.int64)), np.sort(np.array(held, dtype=np.int64))


def four_splits(
    everything: TensorSplit | FileSplit,
    labels: np.ndarray,
    is_train: np.ndarray,
    val_fraction: float,
    seed: int,
    augment: Augment | None,
) -> dict[str, Any]:
    """train (augmented), push (the same images, never augmented), val (carved from train) and test, from a
    split of every image with its labels and train/test flags; ``everything`` has ``subset(indices, augment)``."""
    train_idx = np.flatnonzero(is_train)
    test_idx = np.flatnonzero(~np.asarray(is_train))
    keep, val = stratified_holdout(labels[train_idx], val_fraction, seed)
    return {
        "train": everything.subset(train_idx[keep], augment),
        "push": everything.subset(train_idx[keep]),
        "val": everything.subset(train_idx[val]),
        "test": everything.subset(test_idx),
    }


def build_dataset(config: DataConfig, seed: int) -> DatasetBundle:
    """Build the splits the recipe's ``[data]`` table describes."""
    if config.kind == "parts":
        return _build_parts(config, seed)
    if config.kind == "fashion_mnist":
        from protoaudit.engine.data.augment import image_augment
        from protoaudit.engine.data.fashion_mnist import build_fashion_mnist

        bundle = build_fashion_mnist(
            config.root,
            config.image_size,
            config.val_fraction,
            image_augment(config.augment),
            seed,
            config.max_train_per_class,
        )
        _check_class_count(config, bundle.class_names)
        return bundle
    if config.kind in ("cub", "cars", "imagefolder"):
        from protoaudit.engine.data.augment import image_augment
        from protoaudit.engine.data.check import list_dataset, raise_for_problems
        from protoaudit.engine.data.files import bundle_from_listing

        listing = list_dataset(config, seed)
        raise_for_problems([*listing.problems, *class_count_problems(config, listing.class_names)])
        return bundle_from_listing(
            listing,
            config.image_size,
            config.val_fraction,
            image_augment(config.augment),
            seed,
            (config.kind, getattr(config, "variant", None)),
        )
    raise ValueError(f"unknown data kind {config.kind!r}")


def class_count_problems(config: DataConfig, class_names: list[str]) -> list[Problem]:
    """An error when the recipe's ``data.n_classes`` differs from the classes the dataset holds."""
    from protoaudit.engine.data.files import Problem

    expected = getattr(config, "n_classes", None)
    if config.kind == "parts" or expected is None or expected == len(class_names):
        return []
    return [
        Problem(
            "error",
            "class_count",
            f"the recipe expects {expected} classes (data.n_classes) but the dataset has {len(class_names)}",
        )
    ]


def _check_class_count(config: DataConfig, class_names: list[str]) -> None:
    from protoaudit.engine.data.check import raise_for_problems

    raise_for_problems(class_count_problems(config, class_names))


def _build_parts(config: PartsDataConfig, seed: int) -> DatasetBundle:
    from protoaudit.engine.data.parts import PartsRenderer, PartsSpec, load_parts

    fields = {
        k: getattr(config, k)
        for k in (
            "n_classes",
            "image_size",
            "train_per_class",
            "test_per_class",
            "parts_per_class",
            "shared_parts",
            "clutter",
            "part_min",
            "part_max",
            "drop_prob",
        )
    }
    if config.generator_or_default != 1:
        fields.update(
            generator=config.generator_or_default,
            shortcut_classes=tuple(config.shortcut_classes_or_default),
            shortcut_rate=config.shortcut_rate_or_default,
            marker_size=config.marker_size_or_default,
        )
    spec = PartsSpec(**fields, seed=seed if config.seed is None else config.seed)
    try:
        spec.validate()
    except ValueError as exc:
        from protoaudit.errors import RecipeError

        raise RecipeError(f"data: {exc}") from None
    data = load_parts(spec)
    ids = [
        f"{'train' if t else 'test_shifted' if sh else 'test'}/{i:06d}"
        for i, (t, sh) in enumerate(zip(data.is_train, data.is_shifted, strict=True))
    ]
    interventions = SplitInterventions(PartsRenderer(spec), np.arange(len(data.labels)))
    everything = TensorSplit(data.images, data.labels, ids, data.masks, interventions=interventions)
    augment = _flip_augment() if config.augment else None
    shifted = np.flatnonzero(data.is_shifted)
    base = everything
    if len(shifted):
        base = everything.subset(np.flatnonzero(~data.is_shifted))
    labels, is_train = data.labels[~data.is_shifted], data.is_train[~data.is_shifted]
    return DatasetBundle(
        **four_splits(base, labels, is_train, config.val_fraction, seed, augment),
        class_names=list(data.class_names),
        image_size=spec.image_size,
        fingerprint=data.fingerprint,
        summary=data.summary(),
        part_names=list(data.part_names),
        part_kinds=list(data.part_kinds),
        test_shifted=everything.subset(shifted) if spec.generator >= 2 else None,
    )


def _flip_augment() -> Augment:
    """The embedded dataset's augmentation: a left-right flip with p = 0.5, drawn from the generator the
    caller gives (the member's augmentation stream, see :func:`iter_batches`), never from a closure."""
    from protoaudit.engine.data.augment import flip

    return flip
