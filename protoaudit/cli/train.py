"""``protoaudit train-ensemble``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from protoaudit.cli.common import (
    JsonOpt,
    QuietOpt,
    ThreadsOpt,
    err_console,
    info_console,
    print_json,
    print_table,
    quiet_mode,
)

if TYPE_CHECKING:
    from protoaudit.engine.progress import Reporter
    from protoaudit.engine.recipe import Recipe

EXAMPLES = """
[bold]Examples[/bold]

  protoaudit train-ensemble recipes/quickstart.toml
  protoaudit train-ensemble recipes/quickstart.toml --seed 1 --out /tmp/runs \\
      --force
  protoaudit train-ensemble recipes/quickstart.toml --resume
  protoaudit train-ensemble recipes/quickstart.toml --seeds 0,1,2 \\
      --out /tmp/seeds
  protoaudit train-ensemble reports/quickstart/recipe.toml --resume
  torchrun --nproc-per-node 2 -m protoaudit train-ensemble \\
      recipes/quickstart.toml --force
  protoaudit train-ensemble recipes/cub_bb.toml --set schedule.epochs=5 \\
      --set members.vgg19.prototype_dim=64
"""


def train_ensemble_command(
    recipe: Annotated[
        Path, typer.Argument(help="Recipe TOML file (see docs/recipes.md).", show_default=False)
    ],
    seed: Annotated[int | None, typer.Option(help="Override the recipe's seed.")] = None,
    seeds: Annotated[
        str | None,
        typer.Option(
            help="Train the whole recipe once per seed, e.g. 0,1,2: one run per seed under OUT/<name>/, and "
            "the mean ± std of every model's top-1 in OUT/<name>/seeds_summary.csv (overrides the recipe's seeds).",
            metavar="S,S,...",
        ),
    ] = None,
    device: Annotated[str | None, typer.Option(help="Override the device: auto, cpu, cuda, cuda:N.")] = None,
    out: Annotated[
        Path | None, typer.Option(help="Override the output root; the run goes to OUT/<recipe name>/.")
    ] = None,
    threads: ThreadsOpt = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Override any recipe key, e.g. --set schedule.epochs=3 (repeatable).",
            metavar="KEY=VALUE",
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing run directory of the same name.")
    ] = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue an interrupted run of this recipe from its checkpoints (same recipe required).",
        ),
    ] = False,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train every member of RECIPE through warm, joint, push and last-layer stages, then their ensemble."""
    quiet_mode(quiet)
    from protoaudit.engine.ensemble import train_ensemble
    from protoaudit.engine.progress import Reporter
    from protoaudit.engine.recipe import load_recipe

    loaded = load_recipe(
        recipe,
        overrides=set_,
        seed=seed,
        seeds=parse_seeds(seeds),
        device=device,
        out=str(out) if out is not None else None,
        threads=threads,
    )
    import os

    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 reports
    with Reporter(err_console, quiet=quiet or not main_rank) as reporter:
        reporter.log(f"run directory: {loaded.run_dir()}")
        if loaded.seeds:
            _train_seeds(loaded, reporter, force, resume, json_)
            return
        try:
            result = train_ensemble(loaded, reporter=reporter, force=force, resume=resume)
        except KeyboardInterrupt:
            if main_rank:
                err_console.print(
                    f"interrupted: every file in {loaded.run_dir()} is whole and run.json says so; "
                    f"continue with: protoaudit train-ensemble {loaded.run_dir() / 'recipe.toml'} --resume",
                    highlight=False,
                    soft_wrap=True,
                )
            raise
    if not main_rank:
        return
    if result.already_complete:
        info_console.print(
            f"run {result.run_dir} is already complete; nothing to resume", highlight=False, soft_wrap=True
        )
    if json_:
        print_json(
            {
                "run_dir": str(result.run_dir),
                "seconds": result.seconds,
                "accuracy": result.accuracy.to_dict(orient="records"),
            }
        )
    else:
        print_table(result.accuracy, title=f"test top-1 — {result.run_dir}")
        if not result.already_complete:
            info_console.print(f"done in {result.seconds:.1f} s", highlight=False)


def parse_seeds(text: str | None) -> list[int] | None:
    """``"0,1,2"`` → [0, 1, 2]; None stays None."""
    if text is None:
        return None
    from protoaudit.errors import InputError

    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InputError(
            f"--seeds: expected integers separated by commas, e.g. 0,1,2; got {text!r}"
        ) from None


def _train_seeds(loaded: Recipe, reporter: Reporter, force: bool, resume: bool, json_: bool) -> None:
    from protoaudit.engine.seeds import SUMMARY_CSV, mean_std_text, train_seeds

    result = train_seeds(loaded, reporter=reporter, force=force, resume=resume)
    if json_:
        print_json(
            {
                "root": str(result.root),
                "runs": {str(s): str(p) for s, p in result.runs.items()},
                "seconds": result.seconds,
                "summary": result.summary.to_dict(orient="records"),
                "mcnemar_ensemble_vs_best_member": result.mcnemar,
            }
        )
        return
    print_table(result.summary, title=f"test top-1 over seeds {loaded.seeds} — {result.root / SUMMARY_CSV}")
    for line in mean_std_text(result.summary):
        info_console.print(line, highlight=False)
    for test in result.mcnemar:
        info_console.print(
            f"seed {test['seed']}: ensemble vs best member {test['best_member']}: McNemar exact p = "
            f"{test['p_value']:.3g} ({test['a_only']} / {test['b_only']} discordant images)",
            highlight=False,
        )
    info_console.print(f"done in {result.seconds:.1f} s", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("train-ensemble", epilog=EXAMPLES)(train_ensemble_command)
