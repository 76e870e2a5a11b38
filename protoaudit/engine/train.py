"""The four training stages of a member (paper §2.2): warm, joint, push, last layer.

Stage 1 *warm*: add-on layers and prototypes learn while the trunk's weights are frozen.
Stage 2 *joint*: trunk, add-on and prototypes learn with CE + cluster + separation; the last layer is fixed.
Stage 3 *push*: every prototype is projected onto its nearest same-class latent training patch.
Stage 4 *last layer*: only h learns, CE + λ·L1 on off-class weights, on the frozen latent space. The push
pass keeps the latent patches, so this stage needs no further forward pass over the images.
Push (followed by the last-layer stage) happens every ``push_every`` epochs and after the last epoch; the
member kept is the pushed state with the best accuracy on the validation split (never the test split).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from protoaudit.core.losses import off_class_l1, protopnet_loss
from protoaudit.core.metrics import top1
from protoaudit.core.model import MemberConfig, ProtoPNet, similarity, squared_distances
from protoaudit.engine.checkpoint import MemberCheckpoint, capture, restore
from protoaudit.engine.data import DatasetBundle, ImageSplit, iter_batches
from protoaudit.engine.distributed import SINGLE, DistInfo, all_gather_rows, shard, sync_buffers, unshard
from protoaudit.engine.progress import NULL_REPORTER, Reporter
from protoaudit.engine.push import PushResult, push_prototypes
from protoaudit.engine.recipe import MemberRecipe, Recipe, Schedule
from protoaudit.errors import ProtoauditError

if TYPE_CHECKING:
    from protoaudit.engine.recipe import Schedule

LATENT_CACHE_BYTES = 2 << 30  # keep the push pass's latents for the last-layer stage up to this size


class TrainingDivergedError(ProtoauditError):
    """The loss became NaN or infinite: the recipe's learning rates or loss coefficients are too large."""

    exit_code = 2


def augment_generator_for(seed: int) -> torch.Generator:
    """The member's augmentation stream: a generator of its own, seeded from the member's seed (distinct
    from the shuffling generator, which is seeded with ``seed`` itself) and checkpointed with it."""
    stream = np.random.SeedSequence([seed, 0xA06]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(stream))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        from protoaudit.errors import InputError

        raise InputError(
            f'device {name!r} requested but CUDA is not available here (use device = "cpu" or "auto")'
        )
    return torch.device(name)


def set_stage(model: ProtoPNet, stage: str) -> None:
    """Which parameters learn in each stage, and which modules run in train mode."""
    trainable = {
        "warm": {"add_on", "prototype_vectors"},
        "joint": {"trunk", "add_on", "prototype_vectors"},
        "last_layer": {"last_layer"},
    }[stage]
    for name, param in model.named_parameters():
        param.requires_grad_(name.split(".")[0] in trainable)
    # As in the original code, warm runs the trunk in train mode: its weights are frozen but batch norm uses
    # batch statistics. The last-layer stage runs everything else in eval mode: the latent space must not move.
    model.train(stage != "last_layer")


def _optimizers(model: ProtoPNet, recipe: Recipe) -> dict[str, torch.optim.Optimizer]:
    lr = recipe.lr
    warm = torch.optim.Adam(
        [
            {"params": model.add_on.parameters(), "lr": lr.warm_add_on, "weight_decay": lr.weight_decay},
            {"params": [model.prototype_vectors], "lr": lr.warm_prototypes},
        ]
    )
    joint = torch.optim.Adam(
        [
            {"params": model.trunk.parameters(), "lr": lr.trunk, "weight_decay": lr.weight_decay},
            {"params": model.add_on.parameters(), "lr": lr.add_on, "weight_decay": lr.weight_decay},
            {"params": [model.prototype_vectors], "lr": lr.prototypes},
        ]
    )
    last = torch.optim.Adam([{"params": model.last_layer.parameters(), "lr": lr.last_layer}])
    return {"warm": warm, "joint": joint, "last_layer": last}


def _sgd_epoch(
    model: ProtoPNet,
    split: ImageSplit,
    optimizer: torch.optim.Optimizer,
    coefs: dict[str, float],
    batch_size: int,
    generator: torch.Generator,
    device: torch.device,
    advance: Callable[[int], None],
    workers: int = 0,
    dist: DistInfo = SINGLE,
    forward: torch.nn.Module | None = None,
    amp: str = "none",
    channels_last: bool = False,
    augment_generator: torch.Generator | None = None,
) -> dict[str, float]:
    """One epoch of SGD over ``split``. Under torchrun each rank takes its share of every batch (``forward``
    is then the DistributedDataParallel wrapper, which averages the gradients). ``amp = "bf16"`` runs the
    trunk and add-on under bfloat16 autocast (distances, similarities and losses stay float32). Training
    images are augmented (when the split augments) with draws from ``augment_generator``."""
    labels = torch.as_tensor(np.asarray(split.labels), dtype=torch.long)
    identity = model.class_identity()
    order = torch.randperm(len(split), generator=generator)
    if dist.enabled:
        order, batch_size = _shard_epoch(order, batch_size, dist)
    elif len(order) % batch_size == 1:  # batch norm cannot learn from a batch of one image
        order = order[:-1]
    net = forward if forward is not None else model
    sums = {"loss": 0.0, "cross_entropy": 0.0, "cluster": 0.0, "separation": 0.0, "l1": 0.0}
    correct = seen = 0
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    batches = iter_batches(split, order, batch_size, workers, device.type == "cuda", augment_generator)
    for idx, images in batches:
        x = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        y = labels[idx].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
            logits, min_distances = net(x)
        logits = logits.float()
        terms = protopnet_loss(logits, min_distances, y, identity, model.last_layer.weight, coefs)
        if not torch.isfinite(terms.total):
            raise TrainingDivergedError(
                f"the loss became {terms.total.item()} (try lower learning rates in [lr] or smaller "
                "coefficients in [loss])"
            )
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        optimizer.step()
        n = len(idx)
        sums["loss"] += terms.total.item() * n
        for key in ("cross_entropy", "cluster", "separation", "l1"):
            sums[key] += getattr(terms, key).item() * n
        correct += int((logits.argmax(1) == y).sum())
        seen += n
        advance(n)
    out = {k: v / max(seen, 1) for k, v in sums.items()}
    out["train_top1"] = correct / max(seen, 1)
    return out


def _shard_epoch(order: torch.Tensor, batch_size: int, dist: DistInfo) -> tuple[torch.Tensor, int]:
    """This rank's images of an epoch: every global batch (same order on every rank) split evenly among the
    ranks; the last batch is trimmed to a multiple of the world size (dropped below two images per rank)."""
    if batch_size % dist.world:
        from protoaudit.errors import InputError

        raise InputError(
            f"schedule.batch_size ({batch_size}) must be divisible by the number of processes ({dist.world})"
        )
    full = len(order) - len(order) % batch_size
    tail = order[full:]
    tail = tail[: len(tail) - len(tail) % dist.world] if len(tail) >= 2 * dist.world else tail[:0]
    chunks = [order[s : s + batch_size] for s in range(0, full, batch_size)] + ([tail] if len(tail) else [])
    local = [shard(c, dist) for c in chunks]
    return (torch.cat(local) if local else order[:0]), batch_size // dist.world


def min_distances_from_latents(
    latents: torch.Tensor, prototypes: torch.Tensor, chunk: int = 256
) -> torch.Tensor:
    """(N, D, H, W) latents, (m, D) prototypes → (N, m) smallest squared distance per image."""
    parts = [
        squared_distances(latents[s : s + chunk], prototypes).amin(dim=(2, 3))
        for s in range(0, len(latents), chunk)
    ]
    return torch.cat(parts)


@torch.no_grad()
def predict(
    model: ProtoPNet,
    split: ImageSplit,
    batch_size: int,
    device: torch.device,
    workers: int = 0,
    dist: DistInfo = SINGLE,
) -> torch.Tensor:
    """(N, K) float32 logits of the member on every image of the split (eval mode). Under torchrun each rank
    evaluates its share and every rank receives all N rows."""
    model.eval()
    order = shard(torch.arange(len(split)), dist)
    batches = iter_batches(split, order, batch_size, workers, device.type == "cuda")
    out = [model(x.to(device))[0].cpu() for _, x in batches]
    local = torch.cat(out) if out else torch.zeros(0, model.n_classes)
    return unshard(all_gather_rows(local, dist), len(split)) if dist.enabled else local


class TestPass(NamedTuple):
    """What one evaluation pass over a split keeps (all on the CPU): the (N, K) float32 logits, the
    (N, D, H, W) latents (the split's patch index is built from them, no second pass), and the (N, m) float32
    min distances the logits were computed from: every image's smallest squared distance to every prototype."""

    logits: torch.Tensor
    latents: torch.Tensor
    min_distances: torch.Tensor


@torch.no_grad()
def predict_with_latents(
    model: ProtoPNet, split: ImageSplit, batch_size: int, device: torch.device, workers: int = 0
) -> TestPass:
    """One pass over every image of the split: its logits, latents and min distances (:class:`TestPass`)."""
    model.eval()
    batches = iter_batches(split, torch.arange(len(split)), batch_size, workers, device.type == "cuda")
    logits, latents, minima = [], [], []
    for _, x in batches:
        z = model.latent(x.to(device))
        min_distances = model.distances(z).amin(dim=(2, 3))
        logits.append(model.head(min_distances).cpu())
        latents.append(z.cpu())
        minima.append(min_distances.cpu())
    if not logits:
        return TestPass(torch.zeros(0, model.n_classes), torch.zeros(0), torch.zeros(0, model.n_prototypes))
    return TestPass(torch.cat(logits), torch.cat(latents), torch.cat(minima))


def last_layer_stage(
    model: ProtoPNet,
    min_distances: torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    l1: float,
    batch_size: int,
    generator: torch.Generator,
) -> dict[str, float]:
    """Train only h on fixed similarities: CE + l1·Σ|off-class weights| (convex). Returns final metrics."""
    set_stage(model, "last_layer")
    from protoaudit.core.model import similarity

    sims = similarity(min_distances).detach()
    identity = model.class_identity()
    loss = ce = torch.tensor(float("nan"))
    for _ in range(epochs):
        order = torch.randperm(len(sims), generator=generator)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size].to(sims.device)
            logits = model.last_layer(sims[idx])
            ce = F.cross_entropy(logits, labels[idx])
            loss = ce + l1 * off_class_l1(model.last_layer.weight, identity)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        logits = model.last_layer(sims)
        acc = float((logits.argmax(1) == labels).float().mean())
    return {"loss": loss.detach().item(), "cross_entropy": ce.detach().item(), "train_top1": acc}


def convex_last_layer_stage(
    model: ProtoPNet,
    min_distances: torch.Tensor,
    labels: torch.Tensor,
    l1: float,
    tol: float,
    max_iter: int,
) -> dict[str, Any]:
    """Stage 4 as the paper's convex problem: h ← argmin mean CE + l1·Σ|off-class weights| on the fixed
    similarities of ``min_distances`` (N, m), solved by FISTA from the current h until the L1 optimality
    residual is at most ``tol`` (:func:`protoaudit.core.lastlayer.solve_last_layer`). Returns its metrics."""
    from protoaudit.core.lastlayer import solve_last_layer

    set_stage(model, "last_layer")
    sims = similarity(min_distances).detach()
    off_class = (1 - model.class_identity().t()).bool()
    weight = model.last_layer.weight
    solution = solve_last_layer(sims, labels, off_class, l1, init=weight.detach(), tol=tol, max_iter=max_iter)
    with torch.no_grad():
        weight.copy_(solution.weight.to(weight.dtype))
        acc = float((model.last_layer(sims).argmax(1) == labels).float().mean()) if len(sims) else math.nan
    return {
        "loss": solution.objective,
        "cross_entropy": solution.cross_entropy,
        "train_top1": acc,
        "solver": "fista",
        "iterations": solution.iterations,
        "converged": solution.converged,
        "residual": solution.residual,
    }


def fit_last_layer(
    model: ProtoPNet,
    min_distances: torch.Tensor,
    labels: torch.Tensor,
    recipe: Recipe,
    optimizer: torch.optim.Optimizer | None,
    generator: torch.Generator,
    epochs: int | None = None,
    solver: Literal["fista", "adam"] | None = None,
) -> dict[str, Any]:
    """Stage 4 on fixed similarities: ``solver = "fista"`` solves the convex problem to
    ``schedule.last_layer_tol``; ``"adam"`` runs the original code's ``epochs`` Adam epochs (by default
    ``schedule.last_layer_epochs``) with ``optimizer`` (a fresh Adam at ``lr.last_layer`` when None). None: the
    recipe's solver (FISTA for ``"fista"`` and ``"fista_each_push"``), as the retune after pruning uses it."""
    sched = recipe.schedule
    if solver is None:
        solver = "adam" if sched.last_layer_solver == "adam" else "fista"
    if solver == "fista":
        return convex_last_layer_stage(
            model, min_distances, labels, recipe.loss.l1, sched.last_layer_tol, sched.last_layer_max_iter
        )
    if optimizer is None:
        optimizer = torch.optim.Adam(model.last_layer.parameters(), lr=recipe.lr.last_layer)
    metrics = last_layer_stage(
        model,
        min_distances,
        labels,
        optimizer,
        sched.last_layer_epochs if epochs is None else epochs,
        recipe.loss.l1,
        sched.batch_size,
        generator,
    )
    return {**metrics, "solver": "adam"}


@torch.no_grad()
def compare_last_layers(
    model: ProtoPNet,
    dense: torch.Tensor,
    split: ImageSplit,
    batch_size: int,
    device: torch.device,
    workers: int = 0,
    dist: DistInfo = SINGLE,
) -> dict[str, Any]:
    """The member's solved (sparse) last layer against the dense one it replaced, on one split (the test
    split), from one pass: per layer top-1 with its 95 % bootstrap interval and PIP-Net's compactness
    (sparsity, off-class sparsity, global and local size), and the exact McNemar test of the two layers'
    decisions on the same images (``dense`` is a, the solved layer b).

    model: the member with its solved layer; dense: (K, m) the layer before the final convex solve."""
    from protoaudit.core.stats import compactness, mcnemar_exact, top1_interval

    sims = similarity(_min_distances_pass(model, split, batch_size, device, workers, dist)).cpu()
    if dist.enabled:
        sims = unshard(all_gather_rows(sims, dist), len(split))
    labels = np.asarray(split.labels)
    off_class = (1 - model.class_identity().t()).bool().cpu().numpy()
    layers = {"dense": dense.detach().cpu(), "solved": model.last_layer.weight.detach().cpu()}
    out: dict[str, Any] = {"split": "test", "n_images": len(labels)}
    correct = {}
    for name, weight in layers.items():
        logits = F.linear(sims.to(weight.dtype), weight)
        pred = logits.argmax(1).numpy()
        correct[name] = pred == labels
        out[name] = {
            "top1": top1(logits, labels),
            **top1_interval(logits, labels),
            **compactness(weight.numpy(), sims.numpy(), pred, off_class),
        }
    out["mcnemar"] = mcnemar_exact(correct["dense"], correct["solved"])
    return out


class _EffectProbe:
    """Logits of one split for the current prototypes and last layer, to measure what push changes.

    Push and the last-layer stage leave the latent space alone, so the split's latents (kept once, within
    ``budget`` bytes, in a single process) give its logits before push, after push and after the last-layer
    stage without another pass; otherwise (too large, or under torchrun) each call is a prediction pass.
    """

    def __init__(
        self,
        model: ProtoPNet,
        split: ImageSplit,
        batch_size: int,
        device: torch.device,
        workers: int,
        dist: DistInfo,
        budget: int,
    ) -> None:
        self.model, self.split, self.batch_size = model, split, batch_size
        self.device, self.workers, self.dist = device, workers, dist
        self.latents: torch.Tensor | None = None
        if not dist.enabled and len(split):
            model.eval()
            with torch.no_grad():
                z = model.latent(split.batch([0]).to(device))
            if z.numel() * z.element_size() * len(split) <= budget:
                self.latents = predict_with_latents(model, split, batch_size, device, workers).latents

    @torch.no_grad()
    def logits(self) -> torch.Tensor:
        """(N, K) float32 on the CPU."""
        if not len(self.split):
            return torch.zeros(0, self.model.n_classes)
        if self.latents is None:
            return predict(self.model, self.split, self.batch_size, self.device, self.workers, self.dist)
        prototypes = self.model.prototype_vectors.detach().cpu()
        head = self.model.last_layer.weight.detach().cpu()
        return similarity(min_distances_from_latents(self.latents, prototypes)) @ head.t()


class _PushEffect:
    """Push's effect on predictions (paper Theorem 2.1): the val and test logits (and the push split's own,
    from its latents) before push, right after it with the last layer unchanged, and after stage 4."""

    def __init__(
        self, model: ProtoPNet, bundle: DatasetBundle, sched: Schedule, device: torch.device, dist: DistInfo
    ) -> None:
        self.model, self.bundle = model, bundle
        self.splits = {"val": bundle.val, "test": bundle.test}
        self.probes = {
            name: _EffectProbe(
                model, split, sched.eval_batch_size, device, sched.workers, dist, LATENT_CACHE_BYTES // 4
            )
            for name, split in self.splits.items()
        }
        self.before = {name: probe.logits() for name, probe in self.probes.items()}
        self.old_prototypes = model.prototype_vectors.detach().clone()
        self.after_push: dict[str, torch.Tensor] = {}
        self.push: tuple[torch.Tensor, torch.Tensor] | None = None

    @torch.no_grad()
    def pushed(self, latents: torch.Tensor | None, min_distances: torch.Tensor) -> None:
        """After push: ``latents`` (N, D, H, W) of the push split (None when not kept, or sharded) and its
        (N, m) min distances to the pushed prototypes."""
        self.after_push = {name: probe.logits() for name, probe in self.probes.items()}
        if latents is not None:
            before = self.model.head(min_distances_from_latents(latents, self.old_prototypes)).cpu()
            self.push = (before, self.model.head(min_distances).cpu())

    @torch.no_grad()
    def finish(self, min_distances: torch.Tensor) -> tuple[dict[str, Any], torch.Tensor]:
        """After stage 4: the changes per split and the val logits (model selection's)."""
        final = {name: probe.logits() for name, probe in self.probes.items()}
        changes = {
            name: _effect(self.before[name], self.after_push[name], final[name], split.labels)
            for name, split in self.splits.items()
        }
        if self.push is not None:
            final_push = self.model.head(min_distances).cpu()
            changes["push"] = _effect(*self.push, final_push, self.bundle.push.labels)
        return changes, final["val"]


class _LatentKeeper:
    """Push-pass consumer: keeps every batch's latents (up to ``budget`` bytes) for the last-layer stage
    (and the patch index)."""

    def __init__(self, budget: int) -> None:
        self.parts: list[torch.Tensor] | None = []
        self.left = budget

    def __call__(self, z: torch.Tensor, _indices: torch.Tensor) -> None:
        if self.parts is None:
            return
        self.left -= z.numel() * z.element_size()
        self.parts = None if self.left < 0 else [*self.parts, z]

    def take(self) -> torch.Tensor | None:
        """(N, D, H, W) latents of the whole push set, or None when they did not fit the budget."""
        parts, self.parts = self.parts, []
        return torch.cat(parts) if parts else None


@dataclass
class TrainedMember:
    name: str
    recipe: MemberRecipe
    model: ProtoPNet
    push: PushResult
    history: list[dict[str, Any]]
    val_top1: float
    selected_epoch: int
    stage_seconds: dict[str, float] = field(default_factory=dict)
    push_latents: torch.Tensor | None = None  # (N, D, H, W) of the selected push pass (for the patch index)
    dense_last_layer: torch.Tensor | None = None  # (K, m) the Adam layer the final convex solve replaced


def push_epochs(schedule: Schedule) -> list[int]:
    """The epochs (1-based, after which) push and the last-layer stage run."""
    due = [
        e
        for e in range(1, schedule.epochs + 1)
        if e >= schedule.push_start and (e - schedule.push_start) % schedule.push_every == 0
    ]
    if schedule.epochs not in due:
        due.append(schedule.epochs)
    return due


def build_member(member: MemberRecipe, bundle: DatasetBundle) -> ProtoPNet:
    config = MemberConfig(
        trunk=member.trunk,
        n_classes=bundle.n_classes,
        prototypes_per_class=member.prototypes_per_class,
        prototype_dim=member.prototype_dim,
        add_on=member.add_on,
        image_size=bundle.image_size,
        class_names=list(bundle.class_names),
    )
    return ProtoPNet(config, weights=member.weights)


def train_member(
    member: MemberRecipe,
    recipe: Recipe,
    bundle: DatasetBundle,
    device: torch.device,
    seed: int,
    reporter: Reporter = NULL_REPORTER,
    checkpoint: MemberCheckpoint | None = None,
    keep_push_latents: bool = False,
    dist: DistInfo = SINGLE,
) -> TrainedMember:
    """Train one member through all stages; returns the selected (pushed) state.

    With ``checkpoint``, the training state is saved after every SGD epoch and after every push + last-layer
    stage, and training resumes from the checkpoint when one exists (the result is bit-identical to an
    uninterrupted run on the same device with the same threads).
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)  # shuffles (SGD epochs and the last-layer stage)
    augment_generator = augment_generator_for(seed)  # augmentation of every training image
    model = build_member(member, bundle).to(device)
    if recipe.schedule.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizers = _optimizers(model, recipe)
    sched = recipe.schedule
    scheduler = torch.optim.lr_scheduler.StepLR(
        optimizers["joint"], step_size=recipe.lr.joint_step_size, gamma=recipe.lr.joint_gamma
    )
    coefs = recipe.loss.model_dump()
    pushes = set(push_epochs(sched))
    push_labels = torch.as_tensor(np.asarray(bundle.push.labels), dtype=torch.long, device=device)
    history: list[dict[str, Any]] = []
    seconds = {"warm": 0.0, "joint": 0.0, "push": 0.0, "last_layer": 0.0, "eval": 0.0}
    best: tuple[float, int, dict[str, torch.Tensor], PushResult] | None = None
    best_latents: torch.Tensor | None = None  # the selected push pass's latents, when kept (patch index)
    tag = f"[bold]{member.name}[/bold]"

    def save_checkpoint(epoch: int, phase: str) -> None:
        if checkpoint is not None and dist.is_main:
            t0 = time.perf_counter()
            checkpoint.save(
                capture(
                    epoch,
                    phase,
                    model,
                    optimizers,
                    scheduler,
                    generator,
                    history,
                    seconds,
                    best,
                    augment_generator=augment_generator,
                )
            )
            seconds["checkpoint"] = seconds.get("checkpoint", 0.0) + time.perf_counter() - t0

    first_epoch, push_pending = 1, False
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None and checkpoint is not None:
        best = restore(
            saved,
            model,
            optimizers,
            scheduler,
            generator,
            checkpoint.directory,
            augment_generator=augment_generator,
        )
        history, seconds = saved.history, {**seconds, **saved.seconds}
        push_pending = saved.phase == "sgd" and saved.epoch in pushes  # its push + last layer still to do
        first_epoch = saved.epoch if push_pending else saved.epoch + 1
        reporter.log(
            f"{tag} resuming from its checkpoint after epoch {saved.epoch}"
            + (" (before its push)" if push_pending else "")
        )

    wrapped: dict[str, torch.nn.Module] = {}  # under torchrun: one DistributedDataParallel wrapper per stage

    for epoch in range(first_epoch, sched.epochs + 1):
        if not (push_pending and epoch == first_epoch):
            stage = "warm" if epoch <= sched.warm_epochs else "joint"
            set_stage(model, stage)
            if dist.enabled and stage not in wrapped:
                wrapped[stage] = torch.nn.parallel.DistributedDataParallel(
                    model, device_ids=[device.index] if device.type == "cuda" else None
                )
            t0 = time.perf_counter()
            with reporter.task(f"{member.name} {stage} {epoch}/{sched.epochs}", len(bundle.train)) as advance:
                try:
                    metrics = _sgd_epoch(
                        model,
                        bundle.train,
                        optimizers[stage],
                        coefs,
                        sched.batch_size,
                        generator,
                        device,
                        advance,
                        sched.workers,
                        dist,
                        wrapped.get(stage),
                        sched.amp,
                        sched.channels_last,
                        augment_generator,
                    )
                except TrainingDivergedError as exc:
                    raise TrainingDivergedError(
                        f"member {member.name} diverged in its {stage} stage, epoch {epoch}/{sched.epochs}: {exc}"
                    ) from None
            sync_buffers(model, dist)  # one set of batch-norm statistics for push and evaluation
            if stage == "joint":
                scheduler.step()
            seconds[stage] += time.perf_counter() - t0
            history.append({"stage": stage, "epoch": epoch, "seconds": time.perf_counter() - t0, **metrics})
            reporter.log(
                f"{tag} {stage:<5} {epoch:>3}/{sched.epochs}  loss {metrics['loss']:.3f}  ce {metrics['cross_entropy']:.3f}  "
                f"clst {metrics['cluster']:.3f}  sep {metrics['separation']:.3f}  train top-1 {metrics['train_top1']:.3f}"
            )
            save_checkpoint(epoch, "sgd")
        if epoch not in pushes:
            continue

        t0 = time.perf_counter()
        effect = _PushEffect(model, bundle, sched, device, dist)  # paper Theorem 2.1: logits before push
        seconds["eval"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        keeper = _LatentKeeper(LATENT_CACHE_BYTES)
        with reporter.task(f"{member.name} push", len(bundle.push)) as advance:
            pushed = push_prototypes(
                model,
                bundle.push,
                sched.eval_batch_size,
                device,
                bundle.image_size,
                keeper,
                advance,
                sched.workers,
                dist,
            )
        seconds["push"] += time.perf_counter() - t0
        history.append(
            {
                "stage": "push",
                "epoch": epoch,
                "seconds": time.perf_counter() - t0,
                "mean_distance": float(pushed.distance.mean()),
            }
        )

        t0 = time.perf_counter()
        latents = keeper.take()
        if latents is not None:
            min_d = min_distances_from_latents(latents, model.prototype_vectors.detach())
        else:  # too large to keep: one more forward pass over the push set
            min_d = _min_distances_pass(
                model, bundle.push, sched.eval_batch_size, device, sched.workers, dist
            )
        if dist.enabled:  # every rank trains the last layer on the whole push set, identically
            min_d = unshard(all_gather_rows(min_d.cpu(), dist), len(bundle.push)).to(device)
            if latents is not None and keep_push_latents:
                latents = unshard(all_gather_rows(latents.cpu(), dist), len(bundle.push))
        kept = latents if keep_push_latents else None
        seconds["last_layer"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        effect.pushed(None if dist.enabled else latents, min_d)  # after push, the last layer unchanged
        del latents
        seconds["eval"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        last = fit_last_layer(
            model, min_d, push_labels, recipe, optimizers["last_layer"], generator, solver=cycle_solver(sched)
        )
        seconds["last_layer"] += time.perf_counter() - t0
        solver_seconds = time.perf_counter() - t0

        t0 = time.perf_counter()
        changes, val_logits = effect.finish(min_d)  # after stage 4
        del effect
        val = top1(val_logits, bundle.val.labels) if len(bundle.val) else float("nan")
        seconds["eval"] += time.perf_counter() - t0
        history.append(
            {
                "stage": "last_layer",
                "epoch": epoch,
                "seconds": solver_seconds,  # the last-layer stage itself (its evaluation is in stage_seconds)
                **last,
                "val_top1": val,
                "push_effect": changes,
            }
        )
        reporter.log(
            f"{tag} push + last layer after epoch {epoch}: mean push distance {float(pushed.distance.mean()):.4f}  "
            f"train top-1 {last['train_top1']:.3f}  val top-1 {val:.3f}"
        )
        score = -1.0 if math.isnan(val) else val
        if best is None or score >= best[0]:
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            best = (score, epoch, state, pushed)
            best_latents = kept.cpu() if kept is not None else None
        save_checkpoint(epoch, "push")

    assert best is not None  # the last epoch always pushes
    score, selected_epoch, state, pushed = best
    model.load_state_dict(state)
    model.eval()
    dense = (
        _final_solve(
            member.name,
            model,
            bundle,
            push_labels,
            recipe,
            device,
            dist,
            seed,
            selected_epoch,
            history,
            seconds,
            reporter,
        )
        if sched.last_layer_solver == "fista"
        else None
    )
    return TrainedMember(
        member.name, member, model, pushed, history, score, selected_epoch, seconds, best_latents, dense
    )


def cycle_solver(schedule: Schedule) -> Literal["fista", "adam"]:
    """The solver of the last-layer stage after each push: FISTA only for ``"fista_each_push"``."""
    return "fista" if schedule.last_layer_solver == "fista_each_push" else "adam"


def _final_solve(
    name: str,
    model: ProtoPNet,
    bundle: DatasetBundle,
    push_labels: torch.Tensor,
    recipe: Recipe,
    device: torch.device,
    dist: DistInfo,
    seed: int,
    selected_epoch: int,
    history: list[dict[str, Any]],
    seconds: dict[str, float],
    reporter: Reporter,
) -> torch.Tensor:
    """Run :func:`final_convex_last_layer` on the selected state, record it in ``history`` and ``seconds``;
    returns the dense (K, m) layer it replaced."""
    dense = model.last_layer.weight.detach().clone()
    t0 = time.perf_counter()
    entry = final_convex_last_layer(model, bundle, push_labels, recipe, device, dist, views_seed=seed)
    entry["epoch"] = selected_epoch
    history.append(entry)
    seconds["last_layer"] += entry["seconds"]
    seconds["eval"] += time.perf_counter() - t0 - entry["seconds"]
    reporter.log(
        f"[bold]{name}[/bold] convex last layer after epoch {selected_epoch}'s push: "
        f"{entry['iterations']} FISTA iterations, off-class sparsity {entry['off_class_sparsity']:.3f}, "
        f"val top-1 {entry['val_top1_dense']:.3f} (dense) → {entry['val_top1']:.3f}"
    )
    return dense


def final_convex_last_layer(
    model: ProtoPNet,
    bundle: DatasetBundle,
    push_labels: torch.Tensor,
    recipe: Recipe,
    device: torch.device,
    dist: DistInfo = SINGLE,
    views_seed: int = 0,
) -> dict[str, Any]:
    """``last_layer_solver = "fista"``: the selected push's last layer, trained by the original's Adam schedule,
    replaced by the solution of the paper's convex problem (FISTA from it, to ``last_layer_tol``) on the
    similarities of the whole push split, plus ``recipe.final_solve_views()`` augmented views of the training
    images (drawn from a stream seeded by ``views_seed``, the member's seed). The min distances come from one more
    pass (not from kept latents), so a resumed run computes the same bits. Returns the history entry (``"stage": "last_layer_final"``)
    with the solver's metrics, the off-class sparsity and the validation top-1 with the dense (Adam) and the solved
    layer."""
    from protoaudit.core.stats import ZERO_WEIGHT

    sched = recipe.schedule
    min_d = _min_distances_pass(model, bundle.push, sched.eval_batch_size, device, sched.workers, dist)
    if dist.enabled:
        min_d = unshard(all_gather_rows(min_d.cpu(), dist), len(bundle.push)).to(device)
    views = recipe.final_solve_views()
    if views:
        min_d, push_labels = _with_augmented_views(
            model, bundle, min_d, push_labels, views, views_seed, recipe, device, dist
        )
    has_val = len(bundle.val) > 0
    val_dense = (
        predict(model, bundle.val, sched.eval_batch_size, device, sched.workers, dist) if has_val else None
    )
    t0 = time.perf_counter()
    metrics = convex_last_layer_stage(
        model, min_d, push_labels, recipe.loss.l1, sched.last_layer_tol, sched.last_layer_max_iter
    )
    solve_seconds = time.perf_counter() - t0
    val_sparse = (
        predict(model, bundle.val, sched.eval_batch_size, device, sched.workers, dist) if has_val else None
    )
    off_class = (1 - model.class_identity().t()).bool()
    weight = model.last_layer.weight.detach()
    return {
        "stage": "last_layer_final",
        "seconds": solve_seconds,
        **metrics,
        "views": views,
        "n_examples": len(min_d),
        "off_class_sparsity": float((weight[off_class].abs() <= ZERO_WEIGHT).float().mean()),
        "val_top1_dense": top1(val_dense, bundle.val.labels) if val_dense is not None else float("nan"),
        "val_top1": top1(val_sparse, bundle.val.labels) if val_sparse is not None else float("nan"),
    }


def views_generator_for(seed: int) -> torch.Generator:
    """The stream of the final solve's augmented views: seeded from the member's seed, distinct from the
    training's augmentation stream, so adding views leaves the SGD epochs unchanged."""
    stream = np.random.SeedSequence([seed, 0x1A5]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(stream))


def _with_augmented_views(
    model: ProtoPNet,
    bundle: DatasetBundle,
    min_d: torch.Tensor,
    labels: torch.Tensor,
    views: int,
    seed: int,
    recipe: Recipe,
    device: torch.device,
    dist: DistInfo,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``min_d`` and ``labels`` of the push split followed by ``views`` augmented passes over the training
    images (one draw per image per view; the training split holds the push split's images)."""
    sched = recipe.schedule
    generator = views_generator_for(seed)
    train = bundle.train
    train_labels = torch.as_tensor(np.asarray(train.labels), dtype=labels.dtype, device=labels.device)
    parts, part_labels = [min_d], [labels]
    model.eval()
    with torch.no_grad():
        for _ in range(views):
            order = shard(torch.arange(len(train)), dist)
            batches = iter_batches(
                train, order, sched.eval_batch_size, sched.workers, device.type == "cuda", generator
            )
            view = torch.cat([model(x.to(device))[1] for _, x in batches])
            if dist.enabled:
                view = unshard(all_gather_rows(view.cpu(), dist), len(train)).to(device)
            parts.append(view)
            part_labels.append(train_labels)
    return torch.cat(parts), torch.cat(part_labels)


def _effect(
    before: torch.Tensor, after_push: torch.Tensor, final: torch.Tensor, labels: np.ndarray
) -> dict[str, Any]:
    """What push changed on one split: ``push`` (prototypes projected, the last layer unchanged: paper
    Theorem 2.1's setting) and ``push_and_last_layer`` (after stage 4 too)."""
    from protoaudit.core.stats import prediction_changes

    y = np.asarray(labels)
    return {
        "push": prediction_changes(before.numpy(), after_push.numpy(), y),
        "push_and_last_layer": prediction_changes(before.numpy(), final.numpy(), y),
    }


@torch.no_grad()
def _min_distances_pass(
    model: ProtoPNet,
    split: ImageSplit,
    batch_size: int,
    device: torch.device,
    workers: int = 0,
    dist: DistInfo = SINGLE,
) -> torch.Tensor:
    """(N_rank, m) min distances of this rank's share of ``split`` (all of it in a single process)."""
    model.eval()
    batches = iter_batches(
        split, shard(torch.arange(len(split)), dist), batch_size, workers, device.type == "cuda"
    )
    return torch.cat([model(x.to(device))[1] for _, x in batches])
