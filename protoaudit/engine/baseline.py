"""The baseline of the paper's Table 1: the same trunk with a plain linear head, trained on the same data.

A baseline member is selected in a recipe with ``kind = "baseline"``. Its network is the trunk f, global
average pooling and one linear layer (K outputs, with bias); no prototypes, so it is *not* part of the
logit-summed ensemble. It trains on the same (augmented) training split with the same schedule as a
ProtoPNet: ``warm_epochs`` with the trunk's weights frozen (only the head learns, at the add-on rate), then
joint epochs (trunk at the trunk rate, head at the add-on rate, the same step decay), cross-entropy only.
The state kept is the one with the best validation top-1 at the epochs where a ProtoPNet would push.

Files: ``baselines/<name>/model.safetensors`` + ``model.json`` (``"kind": "baseline"``), beside ``members/``
so that tools which read ProtoPNet members never meet one; ``accuracy.csv`` gets a row with kind
``baseline``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from protoaudit.core.metrics import top1
from protoaudit.core.stats import top1_interval
from protoaudit.core.trunks import create_trunk, trunk_info
from protoaudit.engine.data import DatasetBundle, ImageSplit, iter_batches
from protoaudit.engine.progress import NULL_REPORTER, Reporter
from protoaudit.engine.recipe import MemberRecipe, Recipe
from protoaudit.engine.run import accuracy_row, save_logits, trained_meta
from protoaudit.errors import CheckpointError

if TYPE_CHECKING:
    from protoaudit.engine.run import RunWriter

BASELINE_DIR = "baselines"  # baselines/<name>/: model.safetensors, model.json, logits.safetensors


@dataclass
class BaselineConfig:
    trunk: str
    n_classes: int
    image_size: int = 224
    class_names: list[str] = field(default_factory=list)


class BaselineNet(nn.Module):
    """``forward(x)``: (N, 3, S, S) images in [0, 1] → (N, K) logits. Normalises with its trunk's mean/std."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, config: BaselineConfig, weights: str | None = None) -> None:
        super().__init__()
        self.config = config
        info = trunk_info(config.trunk)
        self.trunk = create_trunk(config.trunk, weights)
        self.head = nn.Linear(info.out_channels, config.n_classes)
        self.register_buffer("mean", torch.tensor(info.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(info.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.trunk((x - self.mean) / self.std)
        return self.head(features.mean(dim=(2, 3)))


@dataclass
class TrainedBaseline:
    name: str
    recipe: MemberRecipe
    model: BaselineNet
    history: list[dict[str, Any]]
    val_top1: float
    selected_epoch: int
    seconds: dict[str, float]


@torch.no_grad()
def predict_baseline(
    model: BaselineNet, split: ImageSplit, batch_size: int, device: torch.device, workers: int = 0
) -> torch.Tensor:
    """(N, K) float32 logits on every image of the split (eval mode)."""
    model.eval()
    batches = iter_batches(split, torch.arange(len(split)), batch_size, workers, device.type == "cuda")
    out = [model(x.to(device)).cpu() for _, x in batches]
    return torch.cat(out) if out else torch.zeros(0, model.config.n_classes)


def train_baseline(
    member: MemberRecipe,
    recipe: Recipe,
    bundle: DatasetBundle,
    device: torch.device,
    seed: int,
    reporter: Reporter = NULL_REPORTER,
) -> TrainedBaseline:
    """Train a baseline through warm and joint epochs; returns the state with the best validation top-1."""
    from protoaudit.engine.train import augment_generator_for, push_epochs

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    augment_generator = augment_generator_for(seed)  # as a ProtoPNet member's: its own, seeded stream
    config = BaselineConfig(member.trunk, bundle.n_classes, bundle.image_size, list(bundle.class_names))
    model = BaselineNet(config, weights=member.weights).to(device)
    lr, sched = recipe.lr, recipe.schedule
    warm = torch.optim.Adam([{"params": model.head.parameters(), "lr": lr.warm_add_on}])
    joint = torch.optim.Adam(
        [
            {"params": model.trunk.parameters(), "lr": lr.trunk, "weight_decay": lr.weight_decay},
            {"params": model.head.parameters(), "lr": lr.add_on},
        ]
    )
    scheduler = torch.optim.lr_scheduler.StepLR(joint, step_size=lr.joint_step_size, gamma=lr.joint_gamma)
    labels = torch.as_tensor(np.asarray(bundle.train.labels), dtype=torch.long)
    selection = set(push_epochs(sched))
    history: list[dict[str, Any]] = []
    seconds = {"warm": 0.0, "joint": 0.0, "eval": 0.0}
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    for epoch in range(1, sched.epochs + 1):
        stage = "warm" if epoch <= sched.warm_epochs else "joint"
        for p in model.trunk.parameters():
            p.requires_grad_(stage == "joint")
        model.train()
        optimizer = warm if stage == "warm" else joint
        t0 = time.perf_counter()
        order = torch.randperm(len(bundle.train), generator=generator)
        if len(order) % sched.batch_size == 1:  # batch norm cannot learn from a batch of one image
            order = order[:-1]
        loss_sum = 0.0
        correct = seen = 0
        with reporter.task(f"{member.name} {stage} {epoch}/{sched.epochs}", len(order)) as advance:
            for idx, images in iter_batches(
                bundle.train, order, sched.batch_size, sched.workers, device.type == "cuda", augment_generator
            ):
                x, y = images.to(device, non_blocking=True), labels[idx].to(device)
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.item() * len(idx)
                correct += int((logits.argmax(1) == y).sum())
                seen += len(idx)
                advance(len(idx))
        if stage == "joint":
            scheduler.step()
        seconds[stage] += time.perf_counter() - t0
        row: dict[str, Any] = {
            "stage": stage,
            "epoch": epoch,
            "seconds": time.perf_counter() - t0,
            "cross_entropy": loss_sum / max(seen, 1),
            "train_top1": correct / max(seen, 1),
        }
        if epoch in selection:
            t0 = time.perf_counter()
            val = (
                top1(
                    predict_baseline(model, bundle.val, sched.eval_batch_size, device, sched.workers),
                    bundle.val.labels,
                )
                if len(bundle.val)
                else float("nan")
            )
            seconds["eval"] += time.perf_counter() - t0
            row["val_top1"] = val
            score = -1.0 if math.isnan(val) else val
            if best is None or score >= best[0]:
                best = (score, epoch, {k: v.detach().clone() for k, v in model.state_dict().items()})
        history.append(row)
        reporter.log(
            f"[bold]{member.name}[/bold] {stage:<5} {epoch:>3}/{sched.epochs}  ce {row['cross_entropy']:.3f}  "
            f"train top-1 {row['train_top1']:.3f}"
            + (f"  val top-1 {row['val_top1']:.3f}" if "val_top1" in row else "")
        )
    assert best is not None  # the last epoch is always a selection point
    score, selected_epoch, state = best
    model.load_state_dict(state)
    model.eval()
    return TrainedBaseline(member.name, member, model, history, score, selected_epoch, seconds)


def save_baseline(directory: Path, model: BaselineNet, meta: dict[str, Any]) -> None:
    """Write ``model.safetensors`` then ``model.json`` (with the weights' sha256), atomically."""
    from protoaudit.engine.io import save_tensors, write_json
    from protoaudit.engine.run import FORMAT_VERSION, model_document

    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / "model.safetensors"
    save_tensors(
        weights, dict(model.state_dict()), metadata={"format": f"protoaudit-baseline/{FORMAT_VERSION}"}
    )
    write_json(directory / "model.json", model_document("baseline", meta, asdict(model.config), weights))


def load_baseline(
    directory: str | Path, device: str | torch.device = "cpu"
) -> tuple[BaselineNet, dict[str, Any]]:
    """Rebuild a baseline from ``model.json`` + ``model.safetensors``; raises CheckpointError on a mismatch."""
    from protoaudit.engine.io import load_tensors, read_json
    from protoaudit.engine.run import check_format, recorded_weights_sha256

    d = Path(directory)
    meta = read_json(d / "model.json")
    if not isinstance(meta, dict) or meta.get("kind") != "baseline":
        raise CheckpointError(f"{d / 'model.json'}: not a protoaudit baseline")
    check_format(meta, d / "model.json")
    try:
        config = BaselineConfig(**meta["config"])
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{d / 'model.json'}: bad or missing architecture ({exc})") from None
    model = BaselineNet(config)
    try:
        state = load_tensors(d / "model.safetensors", recorded_weights_sha256(meta, d), "model.json")
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{d / 'model.safetensors'} does not fit the architecture in model.json"
        ) from exc
    return model.to(device).eval(), meta


def train_baselines(
    recipe: Recipe,
    bundle: DatasetBundle,
    device: torch.device,
    reporter: Reporter,
    run_dir: Path,
    writer: RunWriter,
    resume: bool = False,
) -> list[dict[str, Any]]:
    """Train every ``kind = "baseline"`` member of the recipe into ``baselines/<name>/``; their
    ``accuracy.csv`` rows (kind ``baseline``). With ``resume``, a finished baseline is reloaded."""
    rows: list[dict[str, Any]] = []
    for i, member in enumerate(recipe.members):
        if member.kind != "baseline":
            continue
        directory = run_dir / BASELINE_DIR / member.name
        sched = recipe.schedule
        if resume and (directory / "model.json").is_file():
            model, _ = load_baseline(directory, device)
            test_logits = predict_baseline(model, bundle.test, sched.eval_batch_size, device, sched.workers)
            test_top1 = top1(test_logits, bundle.test.labels)
            reporter.log(f"[bold]{member.name}[/bold]: finished before the interruption; reloaded")
        else:
            reporter.log(f"[bold]{member.name}[/bold]: baseline, {member.trunk} trunk with a linear head")
            trained = train_baseline(member, recipe, bundle, device, recipe.seed + i, reporter)
            t0 = time.perf_counter()
            test_logits = predict_baseline(
                trained.model, bundle.test, sched.eval_batch_size, device, sched.workers
            )
            test_top1 = top1(test_logits, bundle.test.labels)
            trained.seconds["eval"] += time.perf_counter() - t0
            save_baseline(
                directory,
                trained.model.cpu(),
                trained_meta(
                    member,
                    trained.history,
                    trained.selected_epoch,
                    trained.val_top1,
                    test_top1,
                    trained.seconds,
                ),
            )
            save_logits(directory, {"test": test_logits}, {"test": bundle.test.labels})
            writer.update(timings={**writer.document["timings"], member.name: trained.seconds})
        rows.append(
            accuracy_row(
                member.name,
                "baseline",
                member.trunk,
                test_top1,
                0,
                len(bundle.test),
                interval=top1_interval(test_logits, bundle.test.labels),
            )
        )
        reporter.log(f"[bold]{member.name}[/bold]: baseline test top-1 {test_top1:.4f}")
    return rows
