"""Import a ProtoPNet trained with the original code (cfchen-duke/ProtoPNet) as a protoaudit run.

The original ``PPNet`` module's state dict holds::

    features.*            the trunk, with the original's module names (see below)
    add_on_layers.*       1×1 convs (bottleneck or regular), the last one followed by a sigmoid
    prototype_vectors     (m, D, 1, 1) float32
    ones                  (m, D, 1, 1) float32, all ones (a convolution helper, not a learned weight)
    last_layer.weight     (K, m) float32

Trunk names in the original: VGG and DenseNet keep torchvision's ``features`` Sequential inside a wrapper
(``features.features.<i>.*`` / ``features.features.denseblock1.denselayer1.norm1.*``); ResNet keeps torchvision's
top-level names (``features.conv1``, ``features.bn1``, ``features.layer1.0.conv1``, …). They map onto
protoaudit's trunk modules (:mod:`protoaudit.trunks`) one to one; nothing is re-initialised or changed.

Files are read with ``torch.load(weights_only=True)`` only: a file that needs arbitrary unpickling (such as a
whole ``PPNet`` object, which the original ``save.py`` writes by default) is refused, never executed.
The original's input normalisation (ImageNet mean and std) is what protoaudit's torchvision trunks apply, so an
imported member takes images in [0, 1] like any other.

The prototypes are not changed by the import. ``prototypes.csv`` records, for each prototype, its nearest latent
patch among the push images of its own class (the original push's search, without the projection): after the
original's push on the same data that distance is 0; a larger one says the prototypes were last pushed on other
images (or not pushed at all).
"""

from __future__ import annotations

import copy
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from protoaudit.core.model import AddOnKind, MemberConfig, ProtoPNet, build_add_on, similarity
from protoaudit.core.trunks import list_trunks, trunk_info, weights_only_refusal
from protoaudit.engine.progress import NULL_REPORTER, Reporter
from protoaudit.engine.recipe import Recipe, recipe_from_dict
from protoaudit.errors import CheckpointError, InputError

if TYPE_CHECKING:
    from collections.abc import Callable

    from protoaudit.engine.data import DatasetBundle
    from protoaudit.engine.push import PushResult

FAMILIES = ("vgg", "resnet", "densenet")
ORIGINAL_FORMAT = "cfchen-duke/ProtoPNet PPNet.state_dict()"


def original_architectures() -> list[str]:
    """The ``base_architecture`` names of the original code (they are also protoaudit trunk names)."""
    return [
        name for name in list_trunks() if not name.startswith("tiny_") and trunk_info(name).family in FAMILIES
    ]


# -- reading ---------------------------------------------------------------------------------------------


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict saved by the original code: name → tensor (CPU).

    Accepts ``torch.save(ppnet.state_dict())`` files (also wrapped as ``{"state_dict": …}`` or with the
    ``module.`` prefix of DataParallel) and ``.safetensors`` files. Never unpickles anything but tensors.
    """
    p = Path(path)
    if p.is_dir():
        raise InputError(f"state dict {p} is a directory, expected a file saved with torch.save")
    if not p.is_file():
        raise InputError(f"state dict {p} does not exist")
    if p.suffix == ".safetensors":
        from protoaudit.engine.io import load_tensors

        obj: Any = load_tensors(p)
    else:
        try:
            with warnings.catch_warnings():  # torch warns about pickle protocols; the error says enough
                warnings.simplefilter("ignore")
                obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, … by file damage
            refused = weights_only_refusal(exc)
            if refused is not None:
                raise CheckpointError(
                    f"{p} is not a state dict saved with weights only: it holds pickled Python objects "
                    f"({refused}); refused without running them (a whole PPNet saved by the original save.py: "
                    "run torch.save(torch.load(f).state_dict(), 'state_dict.pth') where that code is installed, "
                    "and import state_dict.pth)"
                ) from None
            raise CheckpointError(
                f"{p} is not a readable torch checkpoint (damaged, truncated or another format: "
                f"{_first_line(exc)})"
            ) from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{p} holds a {type(obj).__name__}, expected a state dict (name → tensor)")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{p}: not every entry is a named tensor; expected a state dict")
    if all(k.startswith("module.") for k in obj):
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return dict(obj)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


# -- converting ----------------------------------------------------------------------------------------------


@dataclass
class ConvertedMember:
    """An original state dict in protoaudit's terms."""

    arch: str
    n_classes: int  # K
    n_prototypes: int  # m
    prototype_dim: int  # D
    add_on: AddOnKind
    prototype_class: list[int]  # (m,) class of each prototype
    prototype_class_source: str  # how the classes were found
    state: dict[str, torch.Tensor]  # keys of protoaudit's ProtoPNet

    @property
    def prototypes_per_class(self) -> int:
        return max(1, self.n_prototypes // self.n_classes)


_RESNET_TOP = {"conv1": 0, "bn1": 1, "layer1": 4, "layer2": 5, "layer3": 6, "layer4": 7}


def trunk_key(original: str, family: str) -> str | None:
    """``features.…`` key of the original → protoaudit's ``trunk.…`` key (None when it has no counterpart)."""
    rest = original.removeprefix("features.")
    if family in ("vgg", "densenet"):
        return f"trunk.features.{rest.removeprefix('features.')}" if rest.startswith("features.") else None
    head, _, tail = rest.partition(".")
    if head in _RESNET_TOP and tail:
        return f"trunk.body.{_RESNET_TOP[head]}.{tail}"
    return None


def convert_state_dict(
    original: dict[str, torch.Tensor], arch: str, source: str = "state dict"
) -> ConvertedMember:
    """Check an original state dict against ``arch`` and rename its keys; raises CheckpointError naming the
    first key or shape that does not fit."""
    if arch not in original_architectures():
        raise InputError(
            f"--arch {arch!r} is not an architecture of the original code; known: {', '.join(original_architectures())}"
        )
    family = trunk_info(arch).family
    for key in ("prototype_vectors", "last_layer.weight"):
        if key not in original:
            shown = ", ".join(sorted(original)[:4])
            raise CheckpointError(
                f"{source}: no {key!r} entry, so not a state dict of the original ProtoPNet (it has {shown}, …)"
            )
    protos = original["prototype_vectors"]
    if protos.ndim != 4 or tuple(protos.shape[2:]) != (1, 1):
        raise CheckpointError(
            f"{source}: prototype_vectors has shape {tuple(protos.shape)}; only (m, D, 1, 1) prototypes (the paper's) can be imported"
        )
    m, dim = int(protos.shape[0]), int(protos.shape[1])
    weight = original["last_layer.weight"]
    if weight.ndim != 2 or int(weight.shape[1]) != m:
        raise CheckpointError(
            f"{source}: last_layer.weight has shape {tuple(weight.shape)}, expected (K, {m}) for {m} prototypes"
        )
    n_classes = int(weight.shape[0])
    ones = original.get("ones")
    if ones is not None and (tuple(ones.shape) != tuple(protos.shape) or not bool((ones == 1).all())):
        raise CheckpointError(f"{source}: 'ones' is not an all-ones tensor shaped like prototype_vectors")

    state: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in original.items():
        if key.startswith("features."):
            new = trunk_key(key, family)
            if new is None:
                unknown.append(key)
            else:
                state[new] = value
        elif key.startswith("add_on_layers."):
            state["add_on." + key.removeprefix("add_on_layers.")] = value
        elif key not in ("prototype_vectors", "last_layer.weight", "ones"):
            unknown.append(key)
    if unknown:
        raise CheckpointError(
            f"{source}: key {unknown[0]!r} has no place in a {arch} ProtoPNet "
            f"({len(unknown)} such keys; is --arch right?)"
        )
    state["prototype_vectors"] = protos.reshape(m, dim).clone()
    state["last_layer.weight"] = weight.clone()

    from protoaudit.core.trunks import create_trunk

    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        trunk = create_trunk(arch, None)
    expected_trunk = {f"trunk.{k}": v for k, v in trunk.state_dict().items()}
    for key, value in expected_trunk.items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros(
                value.shape, dtype=value.dtype
            )  # older torch did not save it; unused in eval mode
    _check_fit(state, expected_trunk, "trunk.", arch, source)
    channels = trunk_info(arch).out_channels
    add_on = _infer_add_on(state, channels, dim, arch, source)

    classes, how = _prototype_classes(weight, n_classes)
    return ConvertedMember(arch, n_classes, m, dim, add_on, classes, how, state)


def _check_fit(
    state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], prefix: str, arch: str, source: str
) -> None:
    have = {k for k in state if k.startswith(prefix)}
    missing = sorted(set(expected) - have)
    extra = sorted(have - set(expected))
    if missing or extra:
        what = (
            f"missing {_original_name(missing[0])!r}"
            if missing
            else f"unexpected {_original_name(extra[0])!r}"
        )
        raise CheckpointError(
            f"{source} does not fit a {arch} trunk ({what}; {len(missing)} missing, {len(extra)} unexpected); is --arch right?"
        )
    for key, value in expected.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise CheckpointError(
                f"{source} does not fit a {arch} trunk: {_original_name(key)!r} has shape "
                f"{tuple(state[key].shape)}, {arch} needs {tuple(value.shape)}; is --arch right?"
            )


def _original_name(key: str) -> str:
    """protoaudit key → the original's, for messages."""
    if key.startswith("trunk.features."):
        return "features.features." + key.removeprefix("trunk.features.")
    match = re.match(r"trunk\.body\.(\d+)\.(.*)", key)
    if match:
        names = {v: k for k, v in _RESNET_TOP.items()}
        return f"features.{names.get(int(match.group(1)), match.group(1))}.{match.group(2)}"
    return key.replace("add_on.", "add_on_layers.", 1)


def _infer_add_on(
    state: dict[str, torch.Tensor], channels: int, dim: int, arch: str, source: str
) -> AddOnKind:
    """Which add-on layout (bottleneck or regular) the add_on_layers.* entries are."""
    have = {k: tuple(v.shape) for k, v in state.items() if k.startswith("add_on.")}
    if not have:
        raise CheckpointError(
            f"{source}: no add_on_layers.* entries; not a state dict of the original ProtoPNet"
        )
    kinds: tuple[AddOnKind, ...] = ("bottleneck", "regular")
    for kind in kinds:  # identical layouts when channels <= 2·D: the original's default wins
        layers = build_add_on(kind, channels, dim)
        expected = {f"add_on.{k}": tuple(v.shape) for k, v in layers.state_dict().items()}
        if expected == have:
            return kind
    first = sorted(have)[0]
    raise CheckpointError(
        f"{source}: add_on_layers do not fit a {arch} trunk ({channels} channels) and D = {dim} "
        f"({_original_name(first)!r} has shape {have[first]}); is --arch right?"
    )


def _prototype_classes(weight: torch.Tensor, n_classes: int) -> tuple[list[int], str]:
    """The original assigns prototype j to class j // (m / K); after its pruning that rule no longer holds and
    the class is the one its last-layer column connects to most strongly (weight 1 vs −0.5 at init)."""
    m = int(weight.shape[1])
    if m % n_classes == 0:
        per = m // n_classes
        return [j // per for j in range(m)], "j // (m / K), as the original allocates them"
    return [
        int(k) for k in weight.argmax(dim=0)
    ], "the class of the largest last-layer weight (m is not a multiple of K: pruned)"


# -- the run -----------------------------------------------------------------------------------------------------


@dataclass
class ImportResult:
    run_dir: Path
    member: str
    accuracy: pd.DataFrame
    prototypes: pd.DataFrame
    converted: ConvertedMember
    seconds: float


def import_protopnet(
    path: str | Path,
    arch: str,
    recipe: Recipe,
    member_name: str | None = None,
    force: bool = False,
    reporter: Reporter = NULL_REPORTER,
    activation: str = "log",
) -> ImportResult:
    """Make ``<recipe.out>/<recipe.name>/`` a run holding one member imported from an original state dict.

    The recipe supplies the dataset (``[data]``), seed, device and output; its members are replaced by the
    imported one. The run directory follows the same contract as a trained run (recipe.toml, run.json,
    accuracy.csv, members/<m>/model.safetensors + model.json + prototypes.csv, patch indexes when the recipe's
    ``index.build`` is on).
    """
    from protoaudit.core.metrics import ensemble_logits, top1
    from protoaudit.core.stats import top1_interval
    from protoaudit.engine.data import build_dataset
    from protoaudit.engine.ensemble import (
        check_run_dir,
        configure_threads,
        prepare_run_dir,
        write_text_recipe,
    )
    from protoaudit.engine.io import sha256_file
    from protoaudit.engine.run import (
        RunWriter,
        accuracy_frame,
        accuracy_row,
        member_path,
        save_logits,
        save_member,
        trained_meta,
        versions,
        write_csv,
        writing,
    )
    from protoaudit.engine.train import predict, predict_with_latents, resolve_device

    if activation != "log":  # the state dict does not record it; the user states the original's setting
        raise InputError(
            f"prototype_activation_function {activation!r} is not imported: protoaudit's similarity is the "
            "paper's log((d + 1)/(d + 1e-4)), so a model built with another activation would give other logits"
        )
    started = time.perf_counter()
    source = Path(path)
    original = read_state_dict(source)
    converted = convert_state_dict(original, arch, str(source))
    name = member_name or arch
    run_recipe = recipe_from_dict(
        {
            **recipe.model_dump(mode="json", exclude_none=True),
            "members": [
                {
                    "name": name,
                    "trunk": arch,
                    "prototypes_per_class": converted.prototypes_per_class,
                    "prototype_dim": converted.prototype_dim,
                    "add_on": converted.add_on,
                }
            ],
        },
        source="import-protopnet",
    )
    device = resolve_device(run_recipe.device)
    threads = configure_threads(run_recipe.threads)
    bundle = build_dataset(run_recipe.data, run_recipe.seed)
    if bundle.n_classes != converted.n_classes:
        raise InputError(
            f"{source} classifies {converted.n_classes} classes but the recipe's dataset has {bundle.n_classes}; "
            "give the recipe of the dataset the model was trained on"
        )
    config = MemberConfig(
        trunk=arch,
        n_classes=converted.n_classes,
        prototypes_per_class=converted.prototypes_per_class,
        prototype_dim=converted.prototype_dim,
        add_on=converted.add_on,
        image_size=bundle.image_size,
        class_names=list(bundle.class_names),
        prototype_class=list(converted.prototype_class),
    )
    model = ProtoPNet(config)
    model.load_state_dict(converted.state, strict=True)
    model.to(device).eval()
    reporter.log(
        f"imported {arch} ProtoPNet: K = {converted.n_classes} classes, m = {converted.n_prototypes} prototypes, "
        f"D = {converted.prototype_dim}, {converted.add_on} add-on; prototype classes: {converted.prototype_class_source}"
    )

    run_dir = run_recipe.run_dir()
    check_run_dir(run_dir, force)  # refusals before anything is written
    with writing(run_dir, "import-protopnet" + (" --force" if force else "")):
        prepare_run_dir(run_dir, force)
        write_text_recipe(run_dir, run_recipe)
        writer = RunWriter(
            run_dir,
            {
                "name": run_recipe.name,
                "versions": versions(),
                "seed": run_recipe.seed,
                "threads": threads,
                "device": str(device),
                "recipe_sha256": run_recipe.sha256(),
                "dataset": {
                    "fingerprint": bundle.fingerprint,
                    "summary": bundle.summary,
                    "n_classes": bundle.n_classes,
                    "splits": {s: len(getattr(bundle, s)) for s in ("train", "push", "val", "test")},
                },
                "members": [name],
                "origin": {
                    "kind": "import-protopnet",
                    "format": ORIGINAL_FORMAT,
                    "file": str(source.resolve()),
                    "sha256": sha256_file(source),
                    "arch": arch,
                    "prototype_class": converted.prototype_class_source,
                },
                "timings": {},
            },
        )
        sched = run_recipe.schedule
        seconds: dict[str, float] = {}
        with writer:  # records interrupted / failed when an exception ends the run
            t0 = time.perf_counter()
            with reporter.task(f"{name} nearest push patches", len(bundle.push)) as advance:
                nearest, push_latents = nearest_push_patches(
                    model,
                    bundle,
                    sched.eval_batch_size,
                    device,
                    sched.workers,
                    run_recipe.index.build,
                    advance,
                )
            seconds["nearest_patches"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            test_latents = None
            if run_recipe.index.build:
                test_logits, test_latents = predict_with_latents(
                    model, bundle.test, sched.eval_batch_size, device, sched.workers
                )[:2]
            else:
                test_logits = predict(model, bundle.test, sched.eval_batch_size, device, sched.workers)
            test_top1 = top1(test_logits, bundle.test.labels)
            val_top1 = (
                top1(
                    predict(model, bundle.val, sched.eval_batch_size, device, sched.workers),
                    bundle.val.labels,
                )
                if len(bundle.val)
                else float("nan")
            )
            seconds["eval"] = time.perf_counter() - t0
            prototypes = pd.DataFrame(nearest.rows(bundle.push, config.prototype_class, bundle.class_names))
            member_dir = member_path(run_dir, name)
            save_member(
                member_dir,
                model.cpu(),
                trained_meta(
                    run_recipe.members[0],
                    [],
                    None,
                    val_top1,
                    test_top1,
                    seconds,
                    imported={
                        "format": ORIGINAL_FORMAT,
                        "file": str(source.resolve()),
                        "sha256": sha256_file(source),
                        "prototype_class": converted.prototype_class_source,
                        "prototypes_csv": "nearest own-class push patch of each unchanged prototype "
                        "(distance = how far a push would move it)",
                    },
                ),
                prototypes,
            )
            save_logits(member_dir, {"test": test_logits}, {"test": bundle.test.labels})
            model.to(device)
            if run_recipe.index.build:
                from protoaudit.engine.index.build import build_member_indexes

                t0 = time.perf_counter()
                build_member_indexes(
                    member_dir,
                    model,
                    bundle,
                    run_recipe.index,
                    device,
                    sched.eval_batch_size,
                    sched.workers,
                    latents={"train": push_latents, "test": test_latents},
                    reporter=reporter,
                )
                seconds["index"] = time.perf_counter() - t0
            rows = [
                accuracy_row(
                    name,
                    "member",
                    arch,
                    test_top1,
                    model.n_prototypes,
                    len(bundle.test),
                    interval=top1_interval(test_logits, bundle.test.labels),
                ),
                accuracy_row(
                    "ensemble",
                    "ensemble",
                    arch,
                    top1(ensemble_logits([test_logits]), bundle.test.labels),
                    model.n_prototypes,
                    len(bundle.test),
                    interval=top1_interval(ensemble_logits([test_logits]), bundle.test.labels),
                ),
            ]
            accuracy = accuracy_frame(rows)
            write_csv(run_dir / "accuracy.csv", accuracy)
            elapsed = time.perf_counter() - started
            writer.finish("complete", seconds=elapsed, timings={name: seconds})
    far = float(nearest.distance.max()) if len(nearest.distance) else 0.0
    reporter.log(
        f"{name}: test top-1 {test_top1:.4f}; largest distance from a prototype to its nearest own-class push patch "
        f"{far:.4g} (0 after the original's push on these images)"
    )
    return ImportResult(run_dir, name, accuracy, prototypes, converted, elapsed)


@torch.no_grad()
def nearest_push_patches(
    model: ProtoPNet,
    bundle: DatasetBundle,
    batch_size: int,
    device: torch.device,
    workers: int = 0,
    keep_latents: bool = False,
    advance: Callable[[int], None] | None = None,
) -> tuple[PushResult, torch.Tensor | None]:
    """For each prototype, its nearest latent patch among push images of its own class, WITHOUT moving it.

    Returns a :class:`protoaudit.push.PushResult` (distance = squared distance to that patch; the activation
    map and 95th-percentile box are those of the unchanged prototype on its source image) and, with
    ``keep_latents``, the push split's (N, D, H, W) float32 latents on the CPU (for the patch index).
    """
    from protoaudit.core.geometry import percentile_boxes
    from protoaudit.engine.push import push_prototypes

    kept: list[torch.Tensor] = []

    def keep(z: torch.Tensor, _indices: torch.Tensor) -> None:
        if keep_latents:
            kept.append(z.cpu())

    shadow = copy.deepcopy(model)  # push projects in place: search on a copy, keep the original prototypes
    found = push_prototypes(
        shadow, bundle.push, batch_size, device, bundle.image_size, keep, advance, workers
    )
    del shadow
    protos = model.prototype_vectors.detach()
    sources = found.image_index.tolist()
    maps = torch.zeros_like(found.activation_maps)
    unique = sorted(set(sources))
    for start in range(0, len(unique), batch_size):
        chunk = unique[start : start + batch_size]
        z = model.latent(bundle.push.batch(chunk).to(device))
        row = {img: i for i, img in enumerate(chunk)}
        for j, img in enumerate(sources):
            if img in row:
                diff = z[row[img]] - protos[j][:, None, None]
                maps[j] = similarity((diff * diff).sum(dim=0)).cpu()
    found.activation_maps = maps
    found.boxes = percentile_boxes(maps, bundle.image_size)
    return found, (torch.cat(kept) if kept else None)
