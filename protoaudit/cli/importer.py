"""``protoaudit import-protopnet``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from protoaudit.cli.common import (
    JsonOpt,
    QuietOpt,
    ThreadsOpt,
    err_console,
    print_json,
    print_table,
    quiet_mode,
)

EXAMPLES = """
[bold]Examples[/bold]

  protoaudit import-protopnet saved_models/vgg19/003/10push0.7822.pth \\
      --arch vgg19 --recipe recipes/cub_bb.toml --name cub-vgg19-original
  protoaudit import-protopnet model.pth --arch resnet34 \\
      --recipe recipes/cub_bb.toml --set data.root=/data/CUB_200_2011
  protoaudit import-protopnet model.pth --arch densenet121 \\
      --recipe my_cub.toml --member densenet --out /tmp/runs --json

The file must be a state dict ([bold]torch.save(ppnet.state_dict(), f)[/bold]).
The original save.py pickles the whole model; convert such a file once where
the original code is installed:
[bold]torch.save(torch.load(f).state_dict(), 'state_dict.pth')[/bold].
"""


def import_protopnet_command(
    state_dict: Annotated[
        Path,
        typer.Argument(
            help="State dict saved by the original ProtoPNet code (.pth, or .safetensors).",
            show_default=False,
        ),
    ],
    arch: Annotated[
        str,
        typer.Option(
            "--arch",
            help="The original's base_architecture: vgg11…vgg19_bn, resnet18…resnet152, densenet121…densenet201.",
            show_default=False,
        ),
    ],
    recipe: Annotated[
        Path,
        typer.Option(
            "--recipe",
            help="Recipe whose \\[data] table names the dataset the model was trained on (its members are replaced).",
            show_default=False,
        ),
    ],
    activation: Annotated[
        str,
        typer.Option(
            "--activation",
            help="The original's prototype_activation_function (not stored in a state dict): only 'log', "
            "the paper's similarity, is imported; 'linear' is refused.",
        ),
    ] = "log",
    member: Annotated[str | None, typer.Option(help="Member name in the run (default: the arch).")] = None,
    name: Annotated[str | None, typer.Option(help="Run name (default: the recipe's name).")] = None,
    out: Annotated[Path | None, typer.Option(help="Output root; the run goes to OUT/<name>/.")] = None,
    seed: Annotated[int | None, typer.Option(help="Override the recipe's seed (splits).")] = None,
    device: Annotated[str | None, typer.Option(help="Device: auto, cpu, cuda, cuda:N.")] = None,
    threads: ThreadsOpt = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Override a recipe key, e.g. --set data.root=/data/CUB (repeatable).",
            metavar="KEY=VALUE",
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing run directory of that name.")
    ] = False,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Import a ProtoPNet trained with the original code as a run that index, prune, explain and report work on."""
    quiet_mode(quiet)
    from protoaudit.engine.importer import import_protopnet
    from protoaudit.engine.progress import Reporter
    from protoaudit.engine.recipe import load_recipe

    loaded = load_recipe(
        recipe,
        overrides=set_,
        seed=seed,
        device=device,
        out=str(out) if out is not None else None,
        threads=threads,
        name=name,
    )
    with Reporter(err_console, quiet=quiet) as reporter:
        result = import_protopnet(
            state_dict,
            arch,
            loaded,
            member_name=member,
            force=force,
            reporter=reporter,
            activation=activation,
        )
    if json_:
        print_json(
            {
                "run_dir": str(result.run_dir),
                "member": result.member,
                "arch": result.converted.arch,
                "n_classes": result.converted.n_classes,
                "n_prototypes": result.converted.n_prototypes,
                "prototype_dim": result.converted.prototype_dim,
                "add_on": result.converted.add_on,
                "prototype_class": result.converted.prototype_class_source,
                "max_nearest_patch_distance": float(result.prototypes["distance"].max()),
                "accuracy": result.accuracy.to_dict(orient="records"),
            }
        )
    else:
        print_table(result.accuracy, title=f"imported — {result.run_dir}")


def register(app: typer.Typer) -> None:
    app.command("import-protopnet", epilog=EXAMPLES)(import_protopnet_command)
