"""``protoaudit data check``: verify the dataset a recipe names, without training."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from protoaudit.cli.common import JsonOpt, err_console, print_json, print_table

EXAMPLES = """
[bold]Examples[/bold]

  protoaudit data check recipes/quickstart.toml
  protoaudit data check recipes/cub_bb.toml \\
      --set data.root=/data/CUB_200_2011 --json
  protoaudit data check recipes/fashion_mnist.toml --no-decode
"""

data_app = typer.Typer(
    help="Inspect the dataset a recipe names.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


@data_app.command("check", epilog=EXAMPLES)
def check_command(
    recipe: Annotated[
        Path, typer.Argument(help="Recipe TOML file (see docs/recipes.md).", show_default=False)
    ],
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Override any recipe key, e.g. --set data.root=/data/CUB_200_2011 (repeatable).",
            metavar="KEY=VALUE",
        ),
    ] = None,
    decode: Annotated[
        bool, typer.Option("--decode/--no-decode", help="Decode every image to find unreadable ones.")
    ] = True,
    json_: JsonOpt = False,
) -> None:
    """Count images per class and split, list missing or unreadable images by path, name classes without
    images, and compare the class count with the recipe's data.n_classes. Exits 2 when a problem would stop
    training (the same checks run before train-ensemble starts)."""
    import pandas as pd
    from rich.markup import escape

    from protoaudit.engine.data.check import check_data
    from protoaudit.engine.recipe import load_recipe

    loaded = load_recipe(recipe, overrides=set_)
    result = check_data(loaded.data, loaded.seed, verify=decode)
    if json_:
        print_json(result.to_dict())
    else:
        document = result.to_dict()
        splits = list(result.counts)
        rows = [
            {"class": row["class"], "name": row["name"], **{s: row[s] for s in splits}}
            for row in document["classes"]
        ]
        if rows:
            rows.append({"class": "", "name": "total", **{s: document["totals"][s] for s in splits}})
        if result.class_names:  # a dataset that could not be listed has no table, only its problem
            print_table(
                pd.DataFrame(rows, columns=["class", "name", *splits]),
                title=f"{result.kind} dataset — {result.root or 'generated'} — {len(result.class_names)} classes",
            )
    if not json_:
        # stderr only: the first error is the final line (the exit's message); the others come before it
        errors = [p for p in result.problems if p.severity == "error"]
        for problem in result.problems:
            if errors and problem is errors[0]:
                continue
            colour = "red" if problem.severity == "error" else "yellow"
            where = f" ({problem.path})" if problem.path else ""
            err_console.print(
                f"[{colour}]{problem.severity}:[/{colour}] {escape(problem.message + where)}", highlight=False
            )
        if result.ok:
            err_console.print(
                f"ok: {result.images_verified} images {'decoded' if decode else 'listed'}, no problem that stops training",
                highlight=False,
            )
    result.raise_for_problems()


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
