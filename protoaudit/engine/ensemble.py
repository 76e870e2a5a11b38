"""``train-ensemble``: train every member of a recipe, then the logit-summed ensemble (paper §2.5)."""

from __future__ import annotations

import contextlib
import errno
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from protoaudit.core.metrics import ensemble_logits, top1
from protoaudit.core.model import ProtoPNet
from protoaudit.core.stats import top1_interval
from protoaudit.engine.checkpoint import MemberCheckpoint
from protoaudit.engine.data import DatasetBundle, build_dataset
from protoaudit.engine.distributed import (
    SINGLE,
    DistInfo,
    all_ok,
    barrier,
    device_for,
    from_env,
    threads_per_rank,
)
from protoaudit.engine.faithfulness import record_faithfulness
from protoaudit.engine.progress import NULL_REPORTER, Reporter
from protoaudit.engine.recipe import Recipe
from protoaudit.engine.run import (
    RunWriter,
    accuracy_frame,
    accuracy_row,
    load_logits,
    load_member,
    member_path,
    save_logits,
    save_member,
    save_test_distances,
    trained_meta,
    versions,
    write_csv,
    writing,
)
from protoaudit.engine.train import (
    compare_last_layers,
    predict,
    predict_with_latents,
    resolve_device,
    train_member,
)
from protoaudit.errors import CheckpointError, InputError, OutputError


@dataclass
class EnsembleResult:
    run_dir: Path
    accuracy: pd.DataFrame
    seconds: float
    already_complete: bool = False  # --resume on a run that had finished: nothing was trained


def check_run_dir(run_dir: Path, force: bool) -> None:
    """Refuse (before anything is written) to mix two runs in one folder: a foreign non-empty folder always,
    an existing run unless ``force``."""
    from protoaudit.engine.run import LOCK_FILE, WRITER_FILE, is_run_dir

    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(f"output {run_dir} exists and is not a directory")
    lock_only = {LOCK_FILE, WRITER_FILE}  # a run that a writer created and then left with nothing in it
    if run_dir.is_dir() and any(p.name not in lock_only for p in run_dir.iterdir()):
        if not is_run_dir(run_dir):
            raise InputError(
                f"output {run_dir} is a non-empty folder that is not a protoaudit run; choose another --out"
            )
        if not force:
            raise InputError(
                f"run directory {run_dir} already exists; pass --force to replace it or --out to write elsewhere"
            )


def prepare_run_dir(run_dir: Path, force: bool) -> None:
    """Empty ``run_dir`` for a new run (with ``force``, an earlier run's files go). Call it holding the run's
    lock (:func:`protoaudit.run.writing`, which creates the folder): the lock's own files stay."""
    from protoaudit.engine.run import LOCK_FILE, WRITER_FILE

    check_run_dir(run_dir, force)
    for entry in list(run_dir.iterdir()) if run_dir.is_dir() else []:
        if entry.name in (LOCK_FILE, WRITER_FILE):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError as exc:
            kind = OutputError if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM) else InputError
            raise kind(f"cannot replace run directory {run_dir}: {exc.strerror or exc}") from None


def configure_threads(threads: int | None) -> int:
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def check_inputs(recipe: Recipe, reporter: Reporter = NULL_REPORTER) -> None:
    """Fail before any work or write: pretrained weights must be reachable (ImageNet weights are downloaded
    into torch's cache now) and a file-backed dataset must pass the checks of the data check."""
    for member in recipe.members:
        if member.weights not in ("none", "imagenet") and not Path(member.weights).expanduser().is_file():
            raise InputError(f"members.{member.name}.weights: file {member.weights} does not exist")
        if member.weights == "imagenet":
            from protoaudit.core.trunks import fetch_imagenet_weights

            fetch_imagenet_weights(member.trunk)
    if recipe.data.kind != "parts":
        from protoaudit.engine.data.check import check_data

        reporter.log("checking the dataset (every image is decoded once)")
        check_data(recipe.data, recipe.seed).raise_for_problems()


def train_ensemble(
    recipe: Recipe, reporter: Reporter = NULL_REPORTER, force: bool = False, resume: bool = False
) -> EnsembleResult:
    """Train all members of ``recipe`` into ``<out>/<name>/`` and evaluate them and their ensemble on test.

    With ``resume``, continue the interrupted run in that directory: finished members are reloaded, the
    interrupted member continues from its last checkpoint, the rest are trained.
    """
    if recipe.seeds:
        raise InputError(
            f"recipe {recipe.name} names seeds {recipe.seeds}: train it with protoaudit.engine.seeds.train_seeds"
        )
    started = time.perf_counter()
    info = from_env()  # under torchrun: this process's rank; otherwise a single process
    device = device_for(info, resolve_device(recipe.device))
    threads = configure_threads(threads_per_rank(info, recipe.threads))
    if not info.is_main:
        reporter = NULL_REPORTER  # rank 0 reports and writes; the other ranks only compute
    check_inputs(recipe, reporter)
    run_dir = recipe.run_dir()
    previous = resumable_run(run_dir, recipe, force, reporter) if resume else None  # read only
    if previous is not None and previous.get("status") == "complete":
        if not (run_dir / "accuracy.csv").is_file():
            raise CheckpointError(f"run {run_dir} says it is complete but has no accuracy.csv")
        return EnsembleResult(run_dir, pd.read_csv(run_dir / "accuracy.csv"), 0.0, already_complete=True)
    if not resume:
        check_run_dir(run_dir, force)  # refusals before anything is written
    t0 = time.perf_counter()
    bundle = build_dataset(recipe.data, recipe.seed)
    data_seconds = time.perf_counter() - t0
    command = "train-ensemble" + (" --resume" if resume else " --force" if force else "")
    with writing(run_dir, command) if info.is_main else contextlib.nullcontext():
        return _train_ensemble_locked(
            recipe,
            reporter,
            force,
            previous,
            resume,
            info,
            device,
            threads,
            run_dir,
            bundle,
            data_seconds,
            started,
        )


def _train_ensemble_locked(
    recipe: Recipe,
    reporter: Reporter,
    force: bool,
    previous: dict[str, Any] | None,
    resume: bool,
    info: DistInfo,
    device: torch.device,
    threads: int,
    run_dir: Path,
    bundle: DatasetBundle,
    data_seconds: float,
    started: float,
) -> EnsembleResult:
    """train_ensemble's work once rank 0 holds the run's lock."""
    problem: Exception | None = None
    if info.is_main:
        try:
            if resume:  # again, now that no other writer can change it
                previous = resumable_run(run_dir, recipe, force)
            if previous is not None and previous.get("status") == "complete":  # finished meanwhile
                return EnsembleResult(run_dir, pd.read_csv(run_dir / "accuracy.csv"), 0.0, True)
            if previous is None:  # a new run, or one interrupted before its first run.json
                prepare_run_dir(run_dir, force or resume)
                write_text_recipe(run_dir, recipe)
        except Exception as exc:
            problem = exc
    if not all_ok(problem is None, info):
        raise problem if problem is not None else InputError("rank 0 could not prepare the run directory")
    document = {
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
    }
    if previous is not None:
        document = resumed_document(previous, document, run_dir, reporter)
    writer = RunWriter(run_dir, document, enabled=info.is_main)
    if previous is not None:
        writer.update(started=previous.get("started"))
    with writer:  # records interrupted / failed when an exception ends the run
        rows, logits = _train_members(recipe, bundle, device, reporter, run_dir, writer, resume, info)
        combined = ensemble_logits(logits)
        rows.append(
            accuracy_row(
                "ensemble",
                "ensemble",
                "+".join(m.trunk for m in recipe.members if m.kind == "protopnet"),
                top1(combined, bundle.test.labels),
                sum(int(r["n_prototypes"]) for r in rows),
                len(bundle.test),
                interval=top1_interval(combined, bundle.test.labels),
            )
        )
        from protoaudit.engine.baseline import train_baselines  # not part of the ensemble (paper Table 1)

        if info.is_main:  # baselines are trained by rank 0 alone
            rows += train_baselines(recipe, bundle, device, reporter, run_dir, writer, resume)
        accuracy = accuracy_frame(rows)
        if info.is_main:
            write_csv(run_dir / "accuracy.csv", accuracy)
        barrier(info)
        seconds = time.perf_counter() - started
        writer.finish("complete", seconds=seconds)
    return EnsembleResult(run_dir, accuracy, seconds)


def write_text_recipe(run_dir: Path, recipe: Recipe) -> None:
    from protoaudit.engine.io import write_text

    write_text(run_dir / "recipe.toml", recipe.to_toml())


def _train_members(
    recipe: Recipe,
    bundle: DatasetBundle,
    device: torch.device,
    reporter: Reporter,
    run_dir: Path,
    writer: RunWriter,
    resume: bool = False,
    info: DistInfo = SINGLE,
) -> tuple[list[dict[str, Any]], list[torch.Tensor]]:
    rows: list[dict[str, Any]] = []
    logits: list[torch.Tensor] = []
    timings: dict[str, Any] = dict(writer.document["timings"])
    for i, member in enumerate(recipe.members):
        if member.kind == "baseline":  # trained after the ensemble by protoaudit.baseline
            continue
        checkpoint = MemberCheckpoint(
            member_path(run_dir, member.name) / "checkpoint",
            {"member": member.name, "training_sha256": training_sha256(recipe), "seed": recipe.seed + i},
        )
        if resume and (member_path(run_dir, member.name) / "model.json").is_file():
            row, test_logits = _reload_finished_member(
                member.name, member.trunk, recipe, bundle, device, run_dir
            )
            checkpoint.remove()  # left over if the crash came between model.json and its removal
            if (
                recipe.index.build and info.is_main
            ):  # the interruption may have come while its indexes were built
                from protoaudit.engine.index.build import index_run
                from protoaudit.engine.run import load_run

                index_run(load_run(run_dir), [member.name], device=str(device), reporter=reporter)
            rows.append(row)
            logits.append(test_logits)
            reporter.log(f"[bold]{member.name}[/bold]: finished before the interruption; reloaded")
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
            checkpoint=checkpoint,
            keep_push_latents=recipe.index.build,  # every rank takes part in gathering them
            dist=info,
        )
        t0 = time.perf_counter()
        test_latents = None  # kept for the test split's patch index: no second pass over the test images
        test_pass = None  # and its min distances, which prune reads instead of searching that index
        if recipe.index.build and not info.enabled:
            test_pass = predict_with_latents(
                trained.model, bundle.test, recipe.schedule.eval_batch_size, device, recipe.schedule.workers
            )
            test_logits, test_latents = test_pass.logits, test_pass.latents
        else:
            test_logits = predict(
                trained.model,
                bundle.test,
                recipe.schedule.eval_batch_size,
                device,
                recipe.schedule.workers,
                info,
            )
        test_top1 = top1(test_logits, bundle.test.labels)
        last_layer = None
        if trained.dense_last_layer is not None:  # the convex solve's effect, side by side (one more pass)
            last_layer = compare_last_layers(
                trained.model,
                trained.dense_last_layer,
                bundle.test,
                recipe.schedule.eval_batch_size,
                device,
                recipe.schedule.workers,
                info,
            )
            last_layer["solve_seconds"] = next(
                (e["seconds"] for e in trained.history if e.get("stage") == "last_layer_final"), None
            )
        trained.stage_seconds["eval"] += time.perf_counter() - t0
        prototypes = pd.DataFrame(
            trained.push.rows(bundle.push, trained.model.config.prototype_class, bundle.class_names)
        )
        row = accuracy_row(
            member.name,
            "member",
            member.trunk,
            test_top1,
            trained.model.n_prototypes,
            len(bundle.test),
            interval=top1_interval(test_logits, bundle.test.labels),
        )
        logits.append(test_logits)
        rows.append(row)
        if not info.is_main:  # the other ranks write nothing; they only take part in the collectives
            continue
        save_member(
            member_path(run_dir, member.name),
            trained.model.cpu(),
            trained_meta(
                member,
                trained.history,
                trained.selected_epoch,
                trained.val_top1,
                test_top1,
                trained.stage_seconds,
                last_layer,
            ),
            prototypes,
        )
        save_logits(member_path(run_dir, member.name), {"test": test_logits}, {"test": bundle.test.labels})
        if test_pass is not None:
            save_test_distances(member_path(run_dir, member.name), test_pass.min_distances)
            test_pass = None
        checkpoint.remove()  # the member is finished: model.json is the contract from here on
        trained.model.to(device)
        _record_faithfulness(member_path(run_dir, member.name), trained.model, bundle, reporter)
        if recipe.index.build:  # from the selected push pass's and the test pass's latents
            from protoaudit.engine.index.build import build_member_indexes

            t0 = time.perf_counter()
            build_member_indexes(
                member_path(run_dir, member.name),
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
        timings[member.name] = trained.stage_seconds
        writer.update(timings=timings)
        reporter.log(
            f"[bold]{member.name}[/bold]: test top-1 {test_top1:.4f} (selected after epoch {trained.selected_epoch}, val top-1 {trained.val_top1:.4f})"
        )
    return rows, logits


def _record_faithfulness(
    member_dir: Path, model: ProtoPNet, bundle: DatasetBundle, reporter: Reporter
) -> None:
    """The member's deletion curves for the report, on the training device; a failure costs only the record (the
    report then computes the curves itself and says so), never the trained member."""
    try:
        record_faithfulness(member_dir, model, bundle.push)
    except Exception as exc:  # an optional record: the member is already saved
        reporter.log(f"[yellow]warning[/yellow]: deletion curves not recorded for {member_dir.name} ({exc})")


def _reload_finished_member(
    name: str, trunk: str, recipe: Recipe, bundle: DatasetBundle, device: torch.device, run_dir: Path
) -> tuple[dict[str, Any], torch.Tensor]:
    """A member that finished before an interruption: its accuracy row and (N, K) test logits, read back (or
    recomputed when the interruption came before they were saved)."""
    model, _ = load_member(member_path(run_dir, name), device)
    saved = load_logits(run_dir, name)
    if saved is not None and "test" in saved and len(saved["test"]) == len(bundle.test):
        test_logits = saved["test"]
    else:
        test_logits = predict(
            model, bundle.test, recipe.schedule.eval_batch_size, device, recipe.schedule.workers
        )
    row = accuracy_row(
        name,
        "member",
        trunk,
        top1(test_logits, bundle.test.labels),
        model.n_prototypes,
        len(bundle.test),
        interval=top1_interval(test_logits, bundle.test.labels),
    )
    return row, test_logits


def resumable_run(
    run_dir: Path, recipe: Recipe, force: bool, reporter: Reporter = NULL_REPORTER
) -> dict[str, Any] | None:
    """The run.json of the run ``--resume`` continues; refuses a run of another recipe or format.

    None for a run directory interrupted before its first run.json was written (nothing was trained yet):
    the run starts there afresh.
    """
    from protoaudit.engine.io import read_json
    from protoaudit.engine.run import check_format, is_run_dir

    if force:
        raise InputError("--resume and --force contradict each other: --force starts the run anew")
    if not (run_dir / "run.json").is_file():
        if not is_run_dir(run_dir):
            raise InputError(
                f"nothing to resume: {run_dir} holds no run.json (start the run without --resume)"
            )
        if (run_dir / "recipe.toml").is_file():
            changes = recipe_differences(run_dir / "recipe.toml", recipe)
            if changes:
                raise InputError(
                    f"cannot resume {run_dir}: the recipe differs from the run's recipe.toml ({changes})"
                )
        reporter.log(f"{run_dir} was interrupted before training started: starting the run there")
        return None
    previous = read_json(run_dir / "run.json")
    if not isinstance(previous, dict):
        raise CheckpointError(f"{run_dir / 'run.json'}: expected a JSON object")
    check_format(previous, run_dir / "run.json")
    status = previous.get("status")
    if status not in ("running", "interrupted", "failed", "complete"):
        raise CheckpointError(f"{run_dir / 'run.json'}: unknown status {status!r}")
    if previous.get("recipe_sha256") != recipe.sha256():  # a moved run differs in `out` only: that is fine
        changes = recipe_differences(run_dir / "recipe.toml", recipe)
        if changes:
            raise InputError(
                f"cannot resume {run_dir}: the recipe differs from the run's recipe.toml ({changes}); "
                f"resume with the run's own recipe: protoaudit train-ensemble {run_dir / 'recipe.toml'} --resume"
            )
    return previous


def training_sha256(recipe: Recipe) -> str:
    """sha256 of the recipe without its output root: what a checkpoint must have been trained with."""
    return recipe.model_copy(update={"out": ""}).sha256()


def recipe_differences(recorded_path: Path, recipe: Recipe, limit: int = 3) -> str:
    """``"schedule.epochs: 3 → 40, seed: 0 → 1"``: the keys other than ``out`` where ``recipe`` differs from
    the recorded one; "" when there are none."""
    import tomllib

    try:
        recorded = tomllib.loads(recorded_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return f"{recorded_path} is unreadable"
    current = tomllib.loads(recipe.to_toml())
    flat_a, flat_b = _flatten(recorded), _flatten(current)
    keys = [k for k in sorted(set(flat_a) | set(flat_b)) if k != "out" and flat_a.get(k) != flat_b.get(k)]
    if not keys:
        return ""
    shown = ", ".join(
        f"{k}: {flat_a.get(k, '(unset)')!r} → {flat_b.get(k, '(unset)')!r}" for k in keys[:limit]
    )
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(tree, list) and tree and all(isinstance(v, dict) for v in tree):
        out = {}
        for i, value in enumerate(tree):
            label = value.get("name", i) if isinstance(value, dict) else i
            out.update(_flatten(value, f"{prefix}.{label}"))
        return out
    return {prefix: tree}


def resumed_document(
    previous: dict[str, Any], fresh: dict[str, Any], run_dir: Path, reporter: Reporter
) -> dict[str, Any]:
    """run.json for a resumed run: the recorded document, checked against what this process would write."""
    recorded = previous.get("dataset", {}).get("fingerprint")
    if recorded != fresh["dataset"]["fingerprint"]:
        raise InputError(
            f"cannot resume {run_dir}: its dataset changed since the run started "
            f"(fingerprint {str(recorded)[:12]} → {fresh['dataset']['fingerprint'][:12]})"
        )
    for key in ("versions", "threads", "device"):
        if previous.get(key) != fresh[key]:
            reporter.log(
                f"[yellow]warning:[/yellow] {key} differ from the interrupted run's "
                f"({previous.get(key)} → {fresh[key]}): the result may not be bit-identical to an uninterrupted run"
            )
    document = {
        k: v for k, v in previous.items() if k not in ("format_version", "status", "finished", "error")
    }
    document["resumed"] = [*previous.get("resumed", []), time.strftime("%Y-%m-%dT%H:%M:%S%z")]
    return document
