"""Options shared by every command, and the consoles."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

out_console = Console(soft_wrap=True)
err_console = Console(stderr=True)  # errors: always printed
info_console = Console(stderr=True)  # log lines, notes and timings: silenced by --quiet


def quiet_mode(quiet: bool) -> None:
    """With ``--quiet`` a command prints nothing but its data (stdout) and, on failure, its error line."""
    info_console.quiet = quiet


JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print one JSON document on stdout instead of a table.")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or log lines on stderr.")]
RunArg = Annotated[
    Path | None,
    typer.Argument(help="Run directory (default: the most recent run under reports/).", show_default=False),
]
RootOpt = Annotated[Path, typer.Option("--root", help="Output root searched for the most recent run.")]


def _positive_threads(value: int | None) -> int | None:
    from protoaudit.errors import InputError

    if value is not None and value < 1:
        raise InputError(f"--threads: expected a positive number of CPU threads, got {value}")
    return value


ThreadsOpt = Annotated[
    int | None,
    typer.Option("--threads", help="CPU threads torch (and faiss) use.", callback=_positive_threads),
]


def print_json(document: Any) -> None:
    typer.echo(json.dumps(document, indent=2, default=_default))


def _default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def frame_table(frame: Any, title: str | None = None, floats: str = "{:.4f}") -> Table:
    if {"top1_low", "top1_high"} <= set(frame.columns):  # one column for accuracy.csv's interval
        frame = frame.copy()
        frame["95% interval"] = [
            f"{lo:.3f}–{hi:.3f}" if lo == lo and hi == hi else "—"
            for lo, hi in zip(frame.pop("top1_low"), frame.pop("top1_high"), strict=True)
        ]
    table = Table(title=title, title_justify="left")
    for column in frame.columns:
        table.add_column(str(column), justify="right" if frame[column].dtype.kind in "fiu" else "left")
    for row in frame.itertuples(index=False):
        table.add_row(*[floats.format(v) if isinstance(v, float) else str(v) for v in row])
    return table


def resolve_run(run: Path | None, root: Path) -> Any:
    from protoaudit.engine.run import load_run

    loaded = load_run(run, root=root)
    if run is None:
        info_console.print(f"using the most recent run: {loaded.path}", highlight=False)
    return loaded


def writing_into(run_dir: Path, folder: Path, command: str) -> Any:
    """The run's single-writer lock (see :func:`protoaudit.engine.run.writing`) when ``folder`` lies inside
    the run directory, else nothing to hold: a command that writes elsewhere does not touch the run."""
    import contextlib

    from protoaudit.engine.run import writing

    inside = folder.resolve().is_relative_to(run_dir.resolve())
    return writing(run_dir, command) if inside else contextlib.nullcontext()
