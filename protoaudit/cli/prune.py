"""``protoaudit prune`` and ``protoaudit audit``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from protoaudit.cli.common import (
    JsonOpt,
    QuietOpt,
    RootOpt,
    RunArg,
    err_console,
    info_console,
    print_json,
    print_table,
    quiet_mode,
)

PRUNE_EXAMPLES = """
[bold]Examples[/bold]

  # the most recent run, k = 6, τ = 3 (the paper's)
  protoaudit prune
  protoaudit prune reports/quickstart --k 6 --threshold 3 --finetune-epochs 20
  protoaudit prune reports/quickstart --json
  # prune what another detector flags
  protoaudit prune --detector class_information
  # a reviewer's own decisions, logged in decisions.jsonl
  protoaudit prune --remove vgg:2,5 --reason "both sit on the scanner tag"
  protoaudit prune --keep resnet:3 --reason "the beak: checked by hand"
"""

AUDIT_EXAMPLES = """
[bold]Examples[/bold]

  protoaudit audit reports/quickstart
  protoaudit audit --fail-under pruning_precision=0.9 \\
      --fail-under ensemble.top1_pruned=0.95
  protoaudit audit --json
"""


def prune_command(
    run: RunArg = None,
    k: Annotated[
        int, typer.Option("--k", help="Nearest training images per prototype (one patch per image).")
    ] = 6,
    threshold: Annotated[
        int,
        typer.Option(
            "--threshold", help="Prune a prototype when fewer than this many of its k are of its class."
        ),
    ] = 3,
    finetune_epochs: Annotated[
        int | None,
        typer.Option(
            "--finetune-epochs",
            help="Retune of the last layer after pruning, with the recipe's last_layer_solver: Adam epochs for "
            '"adam" (default: the recipe\'s last_layer_epochs); FISTA runs to its tolerance; 0 skips the retune.',
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="Device for the evaluation passes.")] = "cpu",
    detector: Annotated[
        str,
        typer.Option(
            "--detector",
            help="Which detector's flags are pruned: knn_purity (the paper's, default), class_information, "
            "shift_sensitivity, class_information_or_shift. Every detector is run and scored either way.",
        ),
    ] = "knn_purity",
    remove: Annotated[
        list[str] | None,
        typer.Option(
            "--remove",
            help="MEMBER:P[,P...]: prune these prototypes whatever the detector says (repeatable; needs --reason).",
            metavar="MEMBER:PROTOTYPES",
        ),
    ] = None,
    keep: Annotated[
        list[str] | None,
        typer.Option(
            "--keep",
            help="MEMBER:P[,P...]: never prune these prototypes (repeatable; needs --reason).",
            metavar="MEMBER:PROTOTYPES",
        ),
    ] = None,
    reason: Annotated[
        str | None,
        typer.Option("--reason", help="Why: recorded with --remove/--keep in the run's decisions.jsonl."),
    ] = None,
    root: RootOpt = Path("reports"),
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Prune bad prototypes (default: k-NN class purity, paper §2.6), retrain the last layer, evaluate again;
    label every prototype causally where the dataset can be re-rendered, and score every detector."""
    quiet_mode(quiet)
    from protoaudit.cli.common import resolve_run
    from protoaudit.engine.progress import Reporter
    from protoaudit.engine.prune import prune_run

    loaded = resolve_run(run, root)
    with Reporter(err_console, quiet=quiet) as reporter:
        result = prune_run(
            loaded,
            k=k,
            threshold=threshold,
            finetune_epochs=finetune_epochs,
            device=device,
            reporter=reporter,
            detector=detector,
            remove=remove,
            keep=keep,
            reason=reason,
        )
    summary = result.purity.groupby("member").agg(
        prototypes=("prototype", "size"), pruned=("pruned", "sum"), mean_purity=("purity", "mean")
    )
    if json_:
        print_json(
            {
                "run_dir": str(loaded.path),
                "seconds": result.seconds,
                "accuracy": result.accuracy.to_dict(orient="records"),
                "pruned": summary.reset_index().to_dict(orient="records"),
                "audit": result.audit,
            }
        )
        _stale_report_note(loaded.path)
        return
    print_table(summary.reset_index(), title=f"pruning ({detector})")
    scores = result.audit.get("detectors", {}).get("pooled", {})
    if scores:
        import pandas as pd

        labels = result.audit["detectors"].get("labels")
        frame = pd.DataFrame([{"detector": d, **v} for d, v in scores.items()])
        print_table(frame, title=f"detectors against the {labels} labels (all members)")
    print_table(result.accuracy, title=f"test top-1 before and after pruning — {loaded.path}")
    info_console.print(
        f"wrote purity.csv, audit.json, duplicates.csv and members/*-pruned/ in {result.seconds:.1f} s",
        highlight=False,
    )
    info_console.print(
        "the pruned members' prototypes are renumbered 0, 1, …; column parent_prototype of "
        "members/<m>-pruned/prototypes.csv gives each one's number in its member",
        highlight=False,
        markup=False,
    )
    _stale_report_note(loaded.path)


def _stale_report_note(run_dir: Path) -> None:
    """After pruning, a report written before it no longer shows the run: say so, with the command."""
    if (run_dir / "report.html").is_file() or (run_dir / "report.json").is_file():
        info_console.print(
            f"note: {run_dir / 'report.html'} predates this pruning and is stale; "
            f"rewrite it with: protoaudit report {run_dir} --html",
            highlight=False,
            markup=False,
        )


def audit_command(
    run: RunArg = None,
    fail_under: Annotated[
        list[str] | None,
        typer.Option(
            "--fail-under",
            help="KEY=VALUE: exit 3 when metric KEY is below VALUE (repeatable).",
            metavar="KEY=VALUE",
        ),
    ] = None,
    root: RootOpt = Path("reports"),
    json_: JsonOpt = False,
) -> None:
    """Print the audit metrics of a pruned run; with --fail-under, exit 3 when one falls short."""
    import pandas as pd

    from protoaudit.cli.common import resolve_run
    from protoaudit.engine.audit_file import flat_metrics, load_audit
    from protoaudit.errors import AuditFailedError, InputError

    loaded = resolve_run(run, root)
    metrics = flat_metrics(load_audit(loaded))
    thresholds: dict[str, float] = {}
    for text in fail_under or []:
        key, sep, value = text.partition("=")
        if not sep:
            raise InputError(f"--fail-under {text!r}: expected KEY=VALUE, e.g. pruning_precision=0.9")
        if key not in metrics:
            raise InputError(f"--fail-under: unknown metric {key!r}; known: {', '.join(sorted(metrics))}")
        try:
            thresholds[key] = float(value)
        except ValueError:
            raise InputError(f"--fail-under {text!r}: {value!r} is not a number") from None
    failed = {k: (metrics[k], v) for k, v in thresholds.items() if metrics[k] < v}
    if json_:
        print_json(
            {
                "run_dir": str(loaded.path),
                "metrics": metrics,
                "fail_under": thresholds,
                "failed": sorted(failed),
            }
        )
    else:
        frame = pd.DataFrame(
            [
                {"metric": k, "value": v, "fail_under": thresholds.get(k), "ok": k not in failed}
                for k, v in sorted(metrics.items())
            ]
        )
        print_table(frame, title=f"audit — {loaded.path}")
    if failed:
        detail = ", ".join(f"{k} = {v:.4f} < {t}" for k, (v, t) in sorted(failed.items()))
        raise AuditFailedError(f"audit failed: {detail}")


def register(app: typer.Typer) -> None:
    app.command("prune", epilog=PRUNE_EXAMPLES)(prune_command)
    app.command("audit", epilog=AUDIT_EXAMPLES)(audit_command)
