"""``protoaudit index``, ``nearest-patches``, ``nearest-prototypes``, ``explain`` and ``global-analysis``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from protoaudit.cli.common import (
    JsonOpt,
    QuietOpt,
    RootOpt,
    RunArg,
    ThreadsOpt,
    err_console,
    info_console,
    print_json,
    print_table,
    quiet_mode,
    writing_into,
)

if TYPE_CHECKING:
    import pandas as pd

    from protoaudit.engine.run import Run

INDEX_EXAMPLES = """
[bold]Examples[/bold]

  # the most recent run: build the missing or stale indexes
  protoaudit index
  # rebuild every index
  protoaudit index reports/quickstart --force
  protoaudit index reports/quickstart --member vgg --split train --json
"""

NEAREST_PATCHES_EXAMPLES = """
[bold]Examples[/bold]

  # the 5 nearest training images to prototype 7 (one patch each)
  protoaudit nearest-patches --member vgg --prototype 7
  protoaudit nearest-patches reports/quickstart --member vgg --prototype 7 \\
      --split test --k 10 --all-patches
  # for every patch of a test image (quick-start test ids: test/000600 on)
  protoaudit nearest-patches --member resnet --image test/000612 --k 3
  # an image file of yours (PNG or JPEG)
  protoaudit nearest-patches --member resnet --image bird.jpg --json
"""

NEAREST_PROTOTYPES_EXAMPLES = """
[bold]Examples[/bold]

  # every patch's 3 nearest prototypes, of each member
  protoaudit nearest-prototypes test/000612
  protoaudit nearest-prototypes reports/quickstart bird.png --k 1 \\
      --member vgg --json
"""

EXPLAIN_EXAMPLES = """
[bold]Examples[/bold]

  # the reasoning sheet → <run>/explain/test_000612.png and .html
  protoaudit explain test/000612
  protoaudit explain reports/quickstart bird.jpg --top-classes 2 \\
      --prototypes 5 --out /tmp/sheets
  protoaudit explain test/000612 --json
"""

ANALYSIS_EXAMPLES = """
[bold]Examples[/bold]

  # k = 5 nearest training and test images per prototype
  protoaudit global-analysis
  protoaudit global-analysis reports/quickstart --k 10 --no-thumbnails --json
"""

MemberOpt = Annotated[str | None, typer.Option("--member", "-m", help="Member (default: the run's first).")]
ImageArgs = Annotated[
    list[str],
    typer.Argument(
        help="[RUN] IMAGE: an optional run directory, then an image file (PNG/JPEG) or a dataset image id "
        "such as test/000612 (the quick start's test ids start at test/000600).",
        metavar="[RUN] IMAGE",
        show_default=False,
    ),
]


def _threads(threads: int | None) -> None:
    if threads is not None:
        import faiss
        import torch

        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)


def _run_and_image(args: list[str], root: Path) -> tuple[Run, str]:
    from protoaudit.cli.common import resolve_run
    from protoaudit.errors import InputError

    if len(args) not in (1, 2):
        raise InputError(f"expected [RUN] IMAGE, got {len(args)} arguments")
    run = resolve_run(Path(args[0]) if len(args) == 2 else None, root)
    return run, args[-1]


def _member(run: Run, member: str | None) -> str:
    from protoaudit.errors import CheckpointError, InputError

    if member is None:
        if not run.member_names:
            raise InputError(f"run {run.path} has no members")
        member = str(run.member_names[0])
        info_console.print(f"member: {member} (choose with --member)", highlight=False)
    elif not (run.path / "members" / member / "model.json").is_file():
        if (run.path / "members" / member).is_dir():
            raise CheckpointError(
                f"{run.path / 'members' / member / 'model.json'} is missing: member {member}'s metadata is gone"
            )
        raise InputError(f"run {run.path} has no member {member!r} (members: {', '.join(run.member_names)})")
    return member


def index_command(
    run: RunArg = None,
    member: Annotated[
        list[str] | None, typer.Option("--member", "-m", help="Only this member (repeatable).")
    ] = None,
    split: Annotated[
        list[str] | None, typer.Option("--split", help="Only this split: train or test (repeatable).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild indexes that are up to date too.")] = False,
    device: Annotated[str, typer.Option(help="Device of the forward passes: auto, cpu, cuda.")] = "auto",
    threads: ThreadsOpt = None,
    root: RootOpt = Path("reports"),
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """(Re)build the patch index of every member: FAISS over every latent patch of the push and test splits."""
    quiet_mode(quiet)
    from protoaudit.cli.common import resolve_run
    from protoaudit.engine.index.build import index_run
    from protoaudit.engine.index.files import SPLITS
    from protoaudit.engine.progress import Reporter

    _threads(threads)
    loaded = resolve_run(run, root)
    with Reporter(err_console, quiet=quiet) as reporter:
        table = index_run(loaded, member, tuple(split or SPLITS), force, device, reporter)
    if json_:
        print_json({"run": str(loaded.path), "indexes": table.to_dict(orient="records")})
    else:
        print_table(table, title=f"patch indexes — {loaded.path}", floats="{:.2f}")


def nearest_patches_command(
    run: RunArg = None,
    member: MemberOpt = None,
    prototype: Annotated[
        int | None, typer.Option("--prototype", "-p", help="Query: this prototype of the member.")
    ] = None,
    image: Annotated[
        str | None,
        typer.Option("--image", "-i", help="Query: every patch of this image (file or dataset image id)."),
    ] = None,
    k: Annotated[int, typer.Option("--k", min=1, help="Neighbours per query.")] = 5,
    split: Annotated[
        str, typer.Option("--split", help="Search the train (push) or the test split.")
    ] = "train",
    all_patches: Annotated[
        bool,
        typer.Option(
            "--all-patches",
            help="Every patch may answer (default: prototype queries take one patch per image).",
        ),
    ] = False,
    threads: ThreadsOpt = None,
    root: RootOpt = Path("reports"),
    json_: JsonOpt = False,
) -> None:
    """The nearest latent patches of the training (or test) split to a prototype, or to each patch of an image."""
    from protoaudit.cli.common import resolve_run
    from protoaudit.engine.index.queries import nearest_patches_to_image, nearest_patches_to_prototype
    from protoaudit.errors import InputError

    if (prototype is None) == (image is None):
        raise InputError("give exactly one query: --prototype J or --image IMAGE")
    _threads(threads)
    loaded = resolve_run(run, root)
    name = _member(loaded, member)
    if prototype is not None:
        table = nearest_patches_to_prototype(loaded, name, prototype, k, split, per_image=not all_patches)
        query: dict[str, Any] = {"member": name, "prototype": prototype}
        title = f"nearest {split} patches to prototype {prototype} of {name}"
    else:
        assert image is not None
        table = nearest_patches_to_image(loaded, image, name, k, split, per_image=False)
        query = {"member": name, "image": image}
        title = f"nearest {split} patches of {name} to each patch of {image}"
    if json_:
        print_json(
            {
                "run": str(loaded.path),
                "query": query,
                "split": split,
                "k": k,
                "one_patch_per_image": prototype is not None and not all_patches,
                "rows": table.to_dict(orient="records"),
            }
        )
    else:
        print_table(table, title=title)


def nearest_prototypes_command(
    args: ImageArgs,
    k: Annotated[int, typer.Option("--k", min=1, help="Prototypes per patch and member.")] = 3,
    member: Annotated[
        list[str] | None, typer.Option("--member", "-m", help="Only this member (repeatable).")
    ] = None,
    threads: ThreadsOpt = None,
    root: RootOpt = Path("reports"),
    json_: JsonOpt = False,
) -> None:
    """The nearest prototypes of every member to each patch of an image (distances compare within a member)."""
    from protoaudit.engine.index.queries import nearest_prototypes_to_image

    _threads(threads)
    loaded, image = _run_and_image(args, root)
    names = [_member(loaded, m) for m in member] if member else None
    table = nearest_prototypes_to_image(loaded, image, k, names)
    if json_:
        print_json({"run": str(loaded.path), "image": image, "k": k, "rows": table.to_dict(orient="records")})
    else:
        print_table(table, title=f"nearest prototypes to each patch of {image}")


def explain_command(
    args: ImageArgs,
    top_classes: Annotated[int, typer.Option("--top-classes", min=1, help="Classes on the sheet.")] = 3,
    prototypes: Annotated[
        int,
        typer.Option("--prototypes", min=1, help="Prototype rows per class and member (the rest summed)."),
    ] = 3,
    out: Annotated[
        Path | None, typer.Option("--out", help="Folder for the PNG and HTML (default: <run>/explain/).")
    ] = None,
    threads: ThreadsOpt = None,
    root: RootOpt = Path("reports"),
    json_: JsonOpt = False,
) -> None:
    """The reasoning sheet for one image (paper Fig. 3): per top class, each prototype's similarity × weight =
    points, per member and for the ensemble; written as PNG and as an HTML fragment."""
    from protoaudit.engine.explain import explain_image
    from protoaudit.engine.io import write_text
    from protoaudit.report.sheet import render_sheet_document, render_sheet_png, sheet_basename

    _threads(threads)
    loaded, image = _run_and_image(args, root)
    sheet = explain_image(loaded, image, top_classes)
    folder = out if out is not None else loaded.path / "explain"
    base = sheet_basename(sheet.image_id)
    with writing_into(loaded.path, folder, "explain"):  # the run's lock while writing into it
        png = render_sheet_png(sheet, folder / f"{base}.png", prototypes)
        html = folder / f"{base}.html"
        write_text(html, render_sheet_document(sheet, prototypes))
    err_console.print(f"wrote {png} and {html}", highlight=False, soft_wrap=True)
    if json_:
        print_json({**sheet.to_dict(), "png": str(png), "html": str(html)})
        return
    import pandas as pd

    rows = []
    for cls in sheet.classes:
        row: dict[str, Any] = {"class": cls.class_index, "class_name": cls.class_name}
        row.update({m.member: m.points for m in cls.members})
        row["ensemble"] = cls.points
        rows.append(row)
    truth = "unknown" if sheet.label is None else sheet.class_names[sheet.label]
    print_table(
        pd.DataFrame(rows),
        title=f"points per class for {sheet.image_id} (true: {truth}; "
        f"predicted: {sheet.class_names[sheet.predicted]})",
    )


def global_analysis_command(
    run: RunArg = None,
    k: Annotated[int, typer.Option("--k", min=1, help="Nearest images per prototype and split.")] = 5,
    member: Annotated[
        list[str] | None, typer.Option("--member", "-m", help="Only this member (repeatable).")
    ] = None,
    thumbnails: Annotated[
        bool, typer.Option("--thumbnails/--no-thumbnails", help="Also write one PNG strip per prototype.")
    ] = True,
    threads: ThreadsOpt = None,
    root: RootOpt = Path("reports"),
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """For every prototype its k nearest training and test images, each by its closest patch (paper Fig. 5b):
    members/<m>/nearest_train.csv, nearest_test.csv and members/<m>/nearest/<split>/<prototype>.png."""
    quiet_mode(quiet)
    from protoaudit.cli.common import resolve_run
    from protoaudit.engine.analysis import global_analysis
    from protoaudit.engine.progress import Reporter

    _threads(threads)
    loaded = resolve_run(run, root)
    names = [_member(loaded, m) for m in member] if member else None
    with Reporter(err_console, quiet=quiet) as reporter:
        strips = None
        if thumbnails:
            from protoaudit.report.strips import write_strips

            bundle = loaded.dataset()

            def strips(member: str, split: str, table: pd.DataFrame) -> None:
                write_strips(loaded, member, split, table, bundle)

        from protoaudit.engine.run import writing

        with writing(loaded.path, "global-analysis"):
            table = global_analysis(loaded, k, names, reporter=reporter, on_table=strips)
    if json_:
        print_json({"run": str(loaded.path), "k": k, "files": table.to_dict(orient="records")})
    else:
        print_table(table, title=f"global analysis — {loaded.path}")


def register(app: typer.Typer) -> None:
    app.command("index", epilog=INDEX_EXAMPLES)(index_command)
    app.command("nearest-patches", epilog=NEAREST_PATCHES_EXAMPLES)(nearest_patches_command)
    app.command("nearest-prototypes", epilog=NEAREST_PROTOTYPES_EXAMPLES)(nearest_prototypes_command)
    app.command("explain", epilog=EXPLAIN_EXAMPLES)(explain_command)
    app.command("global-analysis", epilog=ANALYSIS_EXAMPLES)(global_analysis_command)
