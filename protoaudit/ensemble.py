"""``train-ensemble``: train every member of a recipe, then the logit-summed ensemble (paper §2.5)."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from protoaudit.data import DatasetBundle, build_dataset
from protoaudit.errors import InputError
from protoaudit.progress import NULL_REPORTER, Reporter
from protoaudit.recipe import Recipe
from protoaudit.run import ACCURACY_COLUMNS, RunWriter, save_member, versions, write_csv
from protoaudit.train import predict, predict_with_latents, resolve_device, top1, train_member
from protoaudit.trunks import trunk_info


def ensemble_logits(member_logits: list[torch.Tensor]) -> torch.Tensor:
    """Sum of the members' (N, K) logits (the original combine step)."""
    return torch.stack(member_logits).sum(dim=0)


@dataclass
class EnsembleResult:
    run_dir: Path
    accuracy: pd.DataFrame
    seconds: float


def prepare_run_dir(run_dir: Path, force: bool) -> None:
    """Refuse to mix two runs in one folder; with ``force`` replace an earlier protoaudit run."""
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(f"output {run_dir} exists and is not a directory")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not (run_dir / "run.json").is_file():
            raise InputError(
                f"output {run_dir} is a non-empty folder that is not a protoaudit run; choose another --out"
            )
        if not force:
            raise InputError(
                f"run directory {run_dir} already exists; pass --force to replace it or --out to write elsewhere"
            )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def configure_threads(threads: int | None) -> int:
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def train_ensemble(recipe: Recipe, reporter: Reporter = NULL_REPORTER, force: bool = False) -> EnsembleResult:
    """Train all members of ``recipe`` into ``<out>/<name>/`` and evaluate them and their ensemble on test."""
    started = time.perf_counter()
    device = resolve_device(recipe.device)
    threads = configure_threads(recipe.threads)
    for member in recipe.members:  # fail before any work: pretrained weights must be reachable
        if member.weights not in ("none", "imagenet") and not Path(member.weights).expanduser().is_file():
            raise InputError(f"members.{member.name}.weights: file {member.weights} does not exist")
    if recipe.data.kind != "parts":  # fail fast, before anything is written: the checks of `data check`
        from protoaudit.data.check import check_data

        reporter.log("checking the dataset (every image is decoded once)")
        check_data(recipe.data, recipe.seed).raise_for_problems()
    t0 = time.perf_counter()
    bundle = build_dataset(recipe.data, recipe.seed)
    data_seconds = time.perf_counter() - t0
    run_dir = recipe.run_dir()
    prepare_run_dir(run_dir, force)
    write_text_recipe(run_dir, recipe)
    writer = RunWriter(
        run_dir,
        {
            "name": recipe.name,
            "versions": versions(),
            "seed": recipe.seed,
            "threads": threads,
            "device": str(device),
            "recipe_sha256": recipe.sha256(),
            "dataset": {
                "fingerprint": bundle.fingerprint,
                "summary": bundle.summary,
                "n_classes": bundle.n_classes,
                "splits": {s: len(getattr(bundle, s)) for s in ("train", "push", "val", "test")},
            },
            "members": [m.name for m in recipe.members if m.kind == "protopnet"],
            "baselines": [m.name for m in recipe.members if m.kind == "baseline"],
            "timings": {"dataset": data_seconds},
        },
    )
    try:
        rows, logits = _train_members(recipe, bundle, device, reporter, run_dir, writer)
        combined = ensemble_logits(logits)
        rows.append(
            {
                "model": "ensemble",
                "kind": "ensemble",
                "backbone": "+".join(m.trunk for m in recipe.members if m.kind == "protopnet"),
                "pruned": False,
                "top1": top1(combined, bundle.test.labels),
                "n_prototypes": sum(int(r["n_prototypes"]) for r in rows),
                "n_test": len(bundle.test),
            }
        )
        from protoaudit.baseline import train_baselines  # not part of the ensemble (paper Table 1)

        rows += train_baselines(recipe, bundle, device, reporter, run_dir, writer)
        accuracy = pd.DataFrame(rows, columns=ACCURACY_COLUMNS)
        write_csv(run_dir / "accuracy.csv", accuracy)
        seconds = time.perf_counter() - started
        writer.finish("complete", seconds=seconds)
    except KeyboardInterrupt:
        writer.finish("interrupted")
        raise
    except BaseException as exc:
        writer.finish("failed", error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise
    return EnsembleResult(run_dir, accuracy, seconds)


def write_text_recipe(run_dir: Path, recipe: Recipe) -> None:
    from protoaudit.io import write_text

    write_text(run_dir / "recipe.toml", recipe.to_toml())


def _train_members(
    recipe: Recipe,
    bundle: DatasetBundle,
    device: torch.device,
    reporter: Reporter,
    run_dir: Path,
    writer: RunWriter,
) -> tuple[list[dict[str, Any]], list[torch.Tensor]]:
    rows: list[dict[str, Any]] = []
    logits: list[torch.Tensor] = []
    timings: dict[str, Any] = dict(writer.document["timings"])
    for i, member in enumerate(recipe.members):
        if member.kind == "baseline":  # trained after the ensemble by protoaudit.baseline
            continue
        reporter.log(
            f"[bold]{member.name}[/bold]: {member.trunk} trunk, {member.prototypes_per_class} prototypes per class, D = {member.prototype_dim}"
        )
        trained = train_member(
            member,
            recipe,
            bundle,
            device,
            seed=recipe.seed + i,
            reporter=reporter,
            keep_push_latents=recipe.index.build,
        )
        t0 = time.perf_counter()
        test_latents = None  # kept for the test split's patch index: no second pass over the test images
        if recipe.index.build:
            test_logits, test_latents = predict_with_latents(
                trained.model, bundle.test, recipe.schedule.eval_batch_size, device, recipe.schedule.workers
            )
        else:
            test_logits = predict(
                trained.model, bundle.test, recipe.schedule.eval_batch_size, device, recipe.schedule.workers
            )
        test_top1 = top1(test_logits, bundle.test.labels)
        trained.stage_seconds["eval"] += time.perf_counter() - t0
        prototypes = pd.DataFrame(
            trained.push.rows(bundle.push, trained.model.config.prototype_class, bundle.class_names)
        )
        save_member(
            run_dir / "members" / member.name,
            trained.model.cpu(),
            {
                "name": member.name,
                "recipe": member.model_dump(mode="json"),
                "history": trained.history,
                "selected_epoch": trained.selected_epoch,
                "metrics": {"val_top1": trained.val_top1, "test_top1": test_top1},
                "stage_seconds": trained.stage_seconds,
                "trunk_family": trunk_info(member.trunk).family,
            },
            prototypes,
        )
        trained.model.to(device)
        if recipe.index.build:  # from the selected push pass's and the test pass's latents
            from protoaudit.index import build_member_indexes

            t0 = time.perf_counter()
            build_member_indexes(
                run_dir / "members" / member.name,
                trained.model,
                bundle,
                recipe.index,
                device,
                recipe.schedule.eval_batch_size,
                recipe.schedule.workers,
                latents={"train": trained.push_latents, "test": test_latents},
                reporter=reporter,
            )
            trained.stage_seconds["index"] = time.perf_counter() - t0
            trained.push_latents = test_latents = None
        logits.append(test_logits)
        rows.append(
            {
                "model": member.name,
                "kind": "member",
                "backbone": member.trunk,
                "pruned": False,
                "top1": test_top1,
                "n_prototypes": trained.model.n_prototypes,
                "n_test": len(bundle.test),
            }
        )
        timings[member.name] = trained.stage_seconds
        writer.update(timings=timings)
        reporter.log(
            f"[bold]{member.name}[/bold]: test top-1 {test_top1:.4f} (selected after epoch {trained.selected_epoch}, val top-1 {trained.val_top1:.4f})"
        )
    return rows, logits
