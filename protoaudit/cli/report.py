"""``protoaudit report``: the self-contained HTML report (and report.json, and a Markdown version)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

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
    quiet_mode,
    resolve_run,
    writing_into,
)

EXAMPLES = """
[bold]Examples[/bold]

  # the most recent run under reports/
  protoaudit report --html
  protoaudit report reports/quickstart --html --open
  protoaudit report reports/quickstart --markdown --out /tmp/review
  protoaudit report --html --reasoning 10 --deletion 12 --json
  protoaudit report --html --thumbnail-mb 8
"""


def report_command(
    run: RunArg = None,
    html: Annotated[
        bool, typer.Option("--html", help="Write report.html (the default when no format is given).")
    ] = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="Write report.md, a text version.")] = False,
    open_: Annotated[bool, typer.Option("--open", help="Open report.html in the default browser.")] = False,
    out: Annotated[
        Path | None, typer.Option(help="Write the report files here instead of the run directory.")
    ] = None,
    reasoning: Annotated[
        int, typer.Option(min=0, help="Test images shown with their evidence, per kind (correct and wrong).")
    ] = 3,
    deletion: Annotated[
        int, typer.Option(min=0, help="Prototypes per member given a deletion curve (faithfulness check).")
    ] = 6,
    max_thumbnails: Annotated[
        int, typer.Option(min=0, help="Prototypes per member shown with thumbnails (the rest: numbers only).")
    ] = 400,
    thumbnail_mb: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="At most this many MiB of prototype-table thumbnails in all (the page's weight; the later "
            "prototypes: numbers only).",
        ),
    ] = 2.0,
    seed: Annotated[
        int, typer.Option(help="Seed of the samples (reasoning images, deletion prototypes).")
    ] = 0,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="Run every saved checkpoint over the test split again and compare its top-1 with accuracy.csv "
            "(default: recompute from the test logits saved beside each checkpoint).",
        ),
    ] = False,
    threads: ThreadsOpt = None,
    root: RootOpt = Path("reports"),
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write report.html (one self-contained page, no network requests) and report.json (the same data) for RUN."""
    quiet_mode(quiet)
    import time
    import webbrowser

    import torch

    from protoaudit.engine.progress import Reporter
    from protoaudit.report import ReportOptions, build_report, write_report

    if threads is not None:
        torch.set_num_threads(threads)
    if not html and not markdown:
        html = True
    if open_ and not html:
        raise typer.BadParameter("--open needs --html", param_hint="--open")
    started = time.perf_counter()
    loaded = resolve_run(run, root)
    options = ReportOptions(
        reasoning_correct=reasoning,
        reasoning_wrong=reasoning,
        faithfulness_per_member=deletion,
        max_thumbnails=max_thumbnails,
        thumbnail_bytes=int(thumbnail_mb * (1 << 20)),
        seed=seed,
        verify=verify,
    )
    with Reporter(err_console, quiet=quiet) as reporter:
        report = build_report(loaded, options, reporter)
    target = out if out is not None else loaded.path
    with writing_into(loaded.path, target, "report"):  # the run's lock while writing into it
        written = write_report(report, target, html=html, markdown=markdown)
    seconds = time.perf_counter() - started
    if open_:
        opened = webbrowser.open(written["html"].resolve().as_uri())
        if not opened and not quiet:
            err_console.print("no browser could be opened; open the file yourself", highlight=False)
    files = {kind: {"path": str(path), "bytes": path.stat().st_size} for kind, path in written.items()}
    if json_:
        print_json(
            {"run_dir": str(loaded.path), "seconds": seconds, "files": files, "notes": report.data["notes"]}
        )
        return
    for note in report.data["notes"]:
        info_console.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    for kind, info in files.items():
        typer.echo(f"{kind}\t{info['path']}\t{info['bytes']} bytes")
    info_console.print(f"report written in {seconds:.1f} s", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("report", epilog=EXAMPLES)(report_command)
