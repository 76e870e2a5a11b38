"""``protoaudit data check``: verify the dataset a recipe names, without training."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from protoaudit.cli.common import JsonOpt, err_console, out_console, print_json

EXAMPLES = """
[bold]Examples[/bold]

  protoaudit data check recipes/cub_bb.toml
  protoaudit data check recipes/cub_bb.toml --set data.root=/data/CUB_200_2011 --json
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
    from rich.table import Table

    from protoaudit.engine.data.check import check_data
    from protoaudit.engine.recipe import load_recipe

    loaded = load_recipe(recipe, overrides=set_)
    result = check_data(loaded.data, loaded.seed, verify=decode)
    if json_:
        print_json(result.to_dict())
    else:
        document = result.to_dict()
        splits = list(result.counts)
        table = Table(
            title=f"{result.kind} dataset — {result.root or 'generated'} — {len(result.class_names)} classes",
            title_justify="left",
        )
        table.add_column("class", justify="right")
        table.add_column("name")
        for split in splits:
            table.add_column(split, justify="right")
        for row in document["classes"]:
            table.add_row(str(row["class"]), row["name"], *[str(row[s]) for s in splits])
        if result.class_names:
            table.add_row("", "[bold]total[/bold]", *[str(document["totals"][s]) for s in splits])
        if result.class_names:  # a dataset that could not be listed has no table, only its problem
            out_console.print(table)
        for problem in result.problems:
            colour = "red" if problem.severity == "error" else "yellow"
            where = f" ({problem.path})" if problem.path else ""
            out_console.print(
                f"[{colour}]{problem.severity}:[/{colour}] {problem.message}{where}",
                highlight=False,
                markup=True,
            )
        if result.ok:
            err_console.print(
                f"ok: {result.images_verified} images {'decoded' if decode else 'listed'}, no problem that stops training",
                highlight=False,
            )
    result.raise_for_problems()


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
