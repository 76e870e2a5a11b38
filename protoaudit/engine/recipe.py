"""Recipes: one TOML file names the dataset, the schedule and every member of the ensemble.

A recipe is validated completely before any work starts (pydantic, unknown keys forbidden). Every error
names the key path, the bad value and what was expected. Each key is documented in ``docs/recipes.md``.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from protoaudit.errors import RecipeError

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
# Upper bounds: a recipe that would exhaust memory or run for years is refused with its key's name.
MAX_PER_CLASS = 100_000
MAX_GENERATED_BYTES = 16 << 30
MAX_EPOCHS = 100_000
MAX_BATCH = 65_536


class _Strict(BaseModel):
    # every float must be finite: inf and nan are refused with the key's name before any work starts
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class PartsDataConfig(_Strict):
    """The embedded dataset with known parts (generated, no download)."""

    kind: Literal["parts"] = "parts"
    n_classes: int = Field(6, ge=2, le=64)
    image_size: int = Field(64, ge=16, le=512)
    train_per_class: int = Field(60, ge=2, le=MAX_PER_CLASS)
    test_per_class: int = Field(30, ge=1, le=MAX_PER_CLASS)
    parts_per_class: int = Field(2, ge=1, le=4)
    shared_parts: int = Field(2, ge=0, le=4)
    clutter: int = Field(8, ge=0, le=64)
    part_min: int = Field(10, ge=3, le=512)
    part_max: int = Field(16, ge=3, le=512)
    drop_prob: float = Field(0.1, ge=0.0, lt=1.0)
    seed: int | None = None  # None: the recipe's seed
    val_fraction: float = Field(0.1, ge=0.0, lt=0.5)
    augment: bool = False
    # Generator 2: classes combine parts of a shared pool, a planted shortcut marker, a test_shifted split.
    # Unset keys keep generator 1 (the original drawing, bit for bit) and their generator-2 defaults.
    generator: Literal[1, 2] | None = None  # None: 1
    shortcut_classes: list[Annotated[int, Field(ge=0)]] | None = None  # None: [0]
    shortcut_rate: float | None = Field(None, ge=0.0, le=1.0)  # None: 0.9
    marker_size: int | None = Field(None, ge=3, le=16)  # None: 5

    @model_validator(mode="after")
    def _part_sizes(self) -> PartsDataConfig:
        if self.part_max < self.part_min:
            raise ValueError(f"part_max ({self.part_max}) must be >= part_min ({self.part_min})")
        n_bytes = self.n_classes * (self.train_per_class + self.test_per_class) * self.image_size**2 * 4
        if n_bytes > MAX_GENERATED_BYTES:  # images (3 bytes a pixel) and part masks (1 byte) in memory
            raise ValueError(
                f"the generated images would take {n_bytes / 2**30:.1f} GiB of memory "
                f"(n_classes × (train_per_class + test_per_class) × image_size² × 4 bytes); at most "
                f"{MAX_GENERATED_BYTES / 2**30:.0f} GiB: lower train_per_class, test_per_class or image_size"
            )
        return self

    @model_validator(mode="after")
    def _generator_keys(self) -> PartsDataConfig:
        v2_keys = ("shortcut_classes", "shortcut_rate", "marker_size")
        if self.generator != 2:
            given = [k for k in v2_keys if getattr(self, k) is not None]
            if given:
                raise ValueError(f"{given[0]} needs generator = 2 (the generator with a planted shortcut)")
            return self
        if not 2 <= self.parts_per_class < self.n_classes:
            raise ValueError(
                f"generator 2 needs 2 <= parts_per_class < n_classes ({self.n_classes}): every class combines"
                f" parts that other classes use too; got parts_per_class = {self.parts_per_class}"
            )
        classes = self.shortcut_classes_or_default
        if len(set(classes)) != len(classes) or any(c >= self.n_classes for c in classes):
            raise ValueError(
                f"shortcut_classes must be distinct classes below n_classes ({self.n_classes}), got {classes}"
            )
        if len(classes) >= self.n_classes:
            raise ValueError(
                f"shortcut_classes must leave at least one class without the marker, got {classes}"
            )
        if self.marker_size_or_default > self.part_min:
            raise ValueError(
                f"marker_size ({self.marker_size_or_default}) must be <= part_min ({self.part_min}): the marker is small"
            )
        return self

    @property
    def generator_or_default(self) -> int:
        return 1 if self.generator is None else self.generator

    @property
    def shortcut_classes_or_default(self) -> list[int]:
        return [0] if self.shortcut_classes is None else list(self.shortcut_classes)

    @property
    def shortcut_rate_or_default(self) -> float:
        return 0.9 if self.shortcut_rate is None else self.shortcut_rate

    @property
    def marker_size_or_default(self) -> int:
        return 5 if self.marker_size is None else self.marker_size


AugmentKind = Literal["none", "flip", "paper"]  # see protoaudit/data/augment.py


class _FileDataConfig(_Strict):
    """Keys shared by datasets read from files."""

    root: str
    image_size: int = Field(224, ge=16, le=1024)
    n_classes: int | None = Field(None, ge=2)  # expected class count; a mismatch stops the run
    val_fraction: float = Field(0.1, ge=0.0, lt=0.5)
    augment: AugmentKind = "paper"


class CubDataConfig(_FileDataConfig):
    """CUB-200-2011 from its own layout; ``bb`` crops to the bounding boxes, ``full`` keeps whole images."""

    kind: Literal["cub"] = "cub"
    root: str = "data/CUB_200_2011"
    variant: Literal["bb", "full"] = "bb"


class CarsDataConfig(_FileDataConfig):
    """Stanford Cars (devkit or cars_annos.mat layout); ``bb`` crops to the boxes, ``full`` keeps whole images."""

    kind: Literal["cars"] = "cars"
    root: str = "data/stanford_cars"
    variant: Literal["bb", "full"] = "bb"


class ImageFolderDataConfig(_FileDataConfig):
    """A class-per-folder tree; split by ``train_folder``/``test_folder`` or by ``test_fraction``."""

    kind: Literal["imagefolder"] = "imagefolder"
    train_folder: str | None = None
    test_folder: str | None = None
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)  # 0 would leave no test split to report on
    seed: int | None = None  # seed of the test_fraction split; None: the recipe's seed

    @model_validator(mode="after")
    def _both_folders(self) -> ImageFolderDataConfig:
        if (self.train_folder is None) != (self.test_folder is None):
            raise ValueError("give both train_folder and test_folder, or neither (then test_fraction splits)")
        return self


class FashionMnistDataConfig(_Strict):
    """Fashion-MNIST from IDX files (Debian package dataset-fashion-mnist), held in memory."""

    kind: Literal["fashion_mnist"] = "fashion_mnist"
    root: str = "/usr/share/datasets/fashion-mnist"
    image_size: int = Field(32, ge=16, le=256)
    n_classes: int | None = Field(10, ge=2)
    val_fraction: float = Field(0.1, ge=0.0, lt=0.5)
    augment: AugmentKind = "flip"
    max_train_per_class: int | None = Field(
        None, ge=2, le=6000
    )  # first n training images per class; None: all


DataConfig = Annotated[
    PartsDataConfig | CubDataConfig | CarsDataConfig | ImageFolderDataConfig | FashionMnistDataConfig,
    Field(discriminator="kind"),
]
DATA_KINDS = ("parts", "cub", "cars", "imagefolder", "fashion_mnist")


class LearningRates(_Strict):
    """Adam learning rates; the defaults are the original code's."""

    warm_add_on: float = Field(3e-3, gt=0)
    warm_prototypes: float = Field(3e-3, gt=0)
    trunk: float = Field(1e-4, gt=0)
    add_on: float = Field(3e-3, gt=0)
    prototypes: float = Field(3e-3, gt=0)
    last_layer: float = Field(1e-4, gt=0)
    joint_step_size: int = Field(5, ge=1)  # StepLR step, in joint epochs
    joint_gamma: float = Field(0.1, gt=0, le=1)
    weight_decay: float = Field(1e-3, ge=0)  # on trunk and add-on, as in the original


class LossCoefficients(_Strict):
    """loss = cross_entropy·CE + cluster·Clst + separation·Sep + l1·L1 (Sep: distance to other classes)."""

    cross_entropy: float = 1.0
    cluster: float = 0.8
    separation: float = -0.08
    l1: float = Field(1e-4, ge=0)


class Schedule(_Strict):
    """Epoch counts. Push happens after epoch e when e >= push_start and (e - push_start) % push_every == 0,
    and always after the last epoch; each push is followed by the last-layer stage."""

    epochs: int = Field(10, ge=1, le=MAX_EPOCHS)  # warm + joint epochs
    warm_epochs: int = Field(5, ge=0, le=MAX_EPOCHS)
    push_start: int = Field(10, ge=1, le=MAX_EPOCHS)
    push_every: int = Field(10, ge=1, le=MAX_EPOCHS)
    last_layer_epochs: int = Field(
        20, ge=0, le=MAX_EPOCHS
    )  # Adam epochs of the last-layer stage (solver "adam")
    # stage 4: "adam" runs the original code's last_layer_epochs Adam epochs at lr.last_layer after each push;
    # "fista" does the same in the cycles, then solves the paper's convex problem to last_layer_tol (exact zeros)
    # once, for the selected push; "fista_each_push" solves it after every push (the joint epochs that follow then
    # train under the solved layer)
    last_layer_solver: Literal["fista", "fista_each_push", "adam"] = "fista"
    last_layer_tol: float = Field(1e-5, gt=0)  # FISTA stops when the L1 optimality residual is at most this
    last_layer_max_iter: int = Field(5000, ge=1, le=10_000_000)  # FISTA's iteration guard
    # "fista": augmented views of the training images added to the push split's similarities in the final convex
    # solve, one forward pass each (the original's stage 3 runs on the augmented training set); needs
    # data.augment; None: one view where the recipe augments, none where it does not (see Recipe.final_solve_views)
    last_layer_views: int | None = Field(None, ge=0, le=100)
    batch_size: int = Field(64, ge=1, le=MAX_BATCH)
    eval_batch_size: int = Field(256, ge=1, le=MAX_BATCH)
    workers: int = Field(0, ge=0, le=256)  # DataLoader workers for file-backed datasets
    amp: Literal["none", "bf16"] = "none"  # bf16 autocast of the trunk and add-on in SGD epochs (GPU)
    channels_last: bool = False  # channels-last memory format for the trunk (GPU)

    @model_validator(mode="after")
    def _warm_fits(self) -> Schedule:
        if self.warm_epochs > self.epochs:
            raise ValueError(f"warm_epochs ({self.warm_epochs}) must be <= epochs ({self.epochs})")
        if self.last_layer_views and self.last_layer_solver != "fista":
            raise ValueError(
                f'last_layer_views = {self.last_layer_views} needs last_layer_solver = "fista" '
                f"(the views enter its final convex solve; {self.last_layer_solver!r} has none)"
            )
        return self


class IndexConfig(_Strict):
    """The patch index over every latent patch (push and test splits), built at the end of training.

    ``flat`` is exact (faiss IndexFlatL2). ``ivf`` (faiss IndexIVFFlat) is approximate and faster for very
    large sets: ``nlist`` clusters (at most one per 39 patches), ``nprobe`` of them visited per query.
    """

    build: bool = True
    kind: Literal["flat", "ivf"] = "flat"
    nlist: int = Field(1024, ge=1, le=1 << 20)
    nprobe: int = Field(16, ge=1, le=1 << 20)


class MemberRecipe(_Strict):
    name: str = Field(pattern=NAME_PATTERN, max_length=64)
    kind: Literal["protopnet", "baseline"] = "protopnet"  # baseline: the trunk with a plain linear head
    trunk: str
    weights: str = "none"  # "none", "imagenet", or a path to a torchvision state dict
    prototypes_per_class: int = Field(10, ge=1, le=1000)
    prototype_dim: int = Field(128, ge=1, le=4096)
    add_on: Literal["bottleneck", "regular"] = "bottleneck"

    @field_validator("trunk")
    @classmethod
    def _known_trunk(cls, value: str) -> str:
        from protoaudit.core.trunks import list_trunks

        if value not in list_trunks():
            raise ValueError(f"unknown trunk {value!r}; known: {', '.join(list_trunks())}")
        return value


class Recipe(_Strict):
    name: str = Field(pattern=NAME_PATTERN, max_length=64)
    description: str = ""
    seed: int = Field(0, ge=0, le=2**62)
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    threads: int | None = Field(None, ge=1, le=4096)
    out: str = "reports"
    data: DataConfig = Field(default_factory=PartsDataConfig)
    schedule: Schedule = Field(default_factory=Schedule)
    lr: LearningRates = Field(default_factory=LearningRates)
    loss: LossCoefficients = Field(default_factory=LossCoefficients)
    index: IndexConfig = Field(default_factory=IndexConfig)
    members: list[MemberRecipe] = Field(min_length=1)
    # train the whole ensemble once per seed (paper Table 1: mean ± std over runs); None: once, with ``seed``
    seeds: list[int] | None = Field(None, min_length=1, max_length=100)

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int] | None) -> list[int] | None:
        if seeds is None:
            return None
        bad = [s for s in seeds if not 0 <= s <= 2**62]
        if bad:
            raise ValueError(f"seeds must be in [0, 2**62], got {bad[0]}")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct, got {seeds}")
        return seeds

    @model_validator(mode="after")
    def _views_need_augmentation(self) -> Recipe:
        augment = getattr(self.data, "augment", False)
        if self.schedule.last_layer_views and augment in (False, "none"):
            raise ValueError(
                f"schedule.last_layer_views = {self.schedule.last_layer_views} needs data.augment "
                "(views of un-augmented images are the push split again)"
            )
        return self

    @field_validator("members")
    @classmethod
    def _unique_names(cls, members: list[MemberRecipe]) -> list[MemberRecipe]:
        names = [m.name for m in members]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"member names must be unique; repeated: {', '.join(dupes)}")
        if all(m.kind == "baseline" for m in members):
            raise ValueError('at least one member must be a ProtoPNet (kind = "protopnet")')
        return members

    def final_solve_views(self) -> int:
        """Augmented views of the training images in the final convex solve: ``schedule.last_layer_views``, or
        where it is not set, one when the recipe augments and the solver is "fista", else none."""
        views = self.schedule.last_layer_views
        if views is not None:
            return views
        augments = getattr(self.data, "augment", False) not in (False, "none")
        return 1 if augments and self.schedule.last_layer_solver == "fista" else 0

    # -- serialisation ---------------------------------------------------------------------------------
    def to_toml(self) -> str:
        return tomli_w.dumps(self.model_dump(mode="json", exclude_none=True))

    def sha256(self) -> str:
        return hashlib.sha256(self.to_toml().encode()).hexdigest()

    def run_dir(self) -> Path:
        return Path(self.out) / self.name


def _key_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in DATA_KINDS and path.endswith("data"):
            continue  # the discriminated-union tag pydantic inserts
        else:
            path += ("." if path else "") + str(part)
    return path or "(top level)"


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line: ``source: key.path: what was wrong (got VALUE)``, plus a count of further errors."""
    errors = exc.errors()
    first = errors[0]
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key (check the spelling; see docs/recipes.md)"
    elif first["type"] == "missing":
        msg = "required key is missing"
    got = first.get("input")
    shown = (
        ""
        if first["type"] in {"missing", "extra_forbidden"} or isinstance(got, dict | list)
        else f" (got {got!r})"
    )
    more = f" [and {len(errors) - 1} more problem(s)]" if len(errors) > 1 else ""
    return f"{source}: {_key_path(tuple(first['loc']))}: {msg}{shown}{more}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"schedule.epochs=3"`` → (["schedule", "epochs"], 3). The value is read as TOML, else as a string."""
    if "=" not in text:
        raise RecipeError(f"override {text!r}: expected KEY.PATH=VALUE, e.g. schedule.epochs=3")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path or not all(re.fullmatch(r"[A-Za-z0-9_]+", p) for p in path):
        raise RecipeError(f"override {text!r}: bad key path {key!r}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return path, value


def _apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    node: Any = data
    for i, part in enumerate(path[:-1]):
        if isinstance(node, list):
            node = _member_by_name(node, part, path[: i + 1])
            continue
        node = node.setdefault(part, {})
        if not isinstance(node, dict | list):
            raise RecipeError(f"override {'.'.join(path)}: {'.'.join(path[: i + 1])} is not a table")
    if isinstance(node, list):
        raise RecipeError(f"override {'.'.join(path)}: name a member, e.g. members.NAME.prototype_dim=64")
    node[path[-1]] = value


def _member_by_name(members: list[Any], key: str, where: list[str]) -> dict[str, Any]:
    for member in members:
        if isinstance(member, dict) and member.get("name") == key:
            return member
    if key.isdigit() and int(key) < len(members):
        return members[int(key)]
    names = ", ".join(str(m.get("name")) for m in members if isinstance(m, dict))
    raise RecipeError(f"override {'.'.join(where)}: no member named {key!r} (members: {names})")


def load_recipe(path: str | Path, overrides: list[str] | None = None, **top: Any) -> Recipe:
    """Read, override and validate a recipe. ``top`` sets top-level keys (seed, device, out) when not None."""
    p = Path(path)
    if p.is_dir():
        raise RecipeError(f"recipe {p} is a directory, expected a .toml file")
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe {p} does not exist") from None
    except UnicodeDecodeError:
        raise RecipeError(f"recipe {p} is not UTF-8 text") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{p}: invalid TOML: {exc}") from None
    return recipe_from_dict(data, source=str(p), overrides=overrides, **top)


def recipe_from_dict(
    data: dict[str, Any], source: str = "recipe", overrides: list[str] | None = None, **top: Any
) -> Recipe:
    for text in overrides or []:
        key_path, value = parse_override(text)
        _apply_override(data, key_path, value)
    for key, value in top.items():
        if value is not None:
            data[key] = value
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, source)) from None
