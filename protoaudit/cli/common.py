"""Options shared by every command, the consoles, and how a table is printed.

stdout carries data. On a terminal a table is drawn with rich; anywhere else (a pipe, a file) it is printed as
tab-separated text — one header line, then one line per row, every value in full — so that ``cut``, ``awk``
or pandas read it and nothing is cut to the terminal's width. stderr carries logs, never wrapped mid-value.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    import pandas as pd

    from protoaudit.engine.run import Run

out_console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)  # errors: always printed
info_console = Console(stderr=True, soft_wrap=True)  # log lines, notes and timings: silenced by --quiet


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


def _cell(value: Any, floats: str | None) -> str:
    """One table cell: missing values empty, integral floats as integers, other floats with ``floats``
    (or in full, the shortest text that reads back as the same float, when ``floats`` is None)."""
    if hasattr(value, "item") and not isinstance(value, str):
        value = value.item()
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return repr(value) if floats is None else floats.format(value)
    return str(value)


def frame_table(frame: pd.DataFrame, title: str | None = None, floats: str = "{:.4f}") -> Table:
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
        table.add_row(*[_cell(v, floats) for v in row])
    return table


def plain_table(frame: pd.DataFrame) -> str:
    """The frame as tab-separated text: a header line and one line per row, full values, no truncation
    (tabs and newlines inside a value become spaces)."""

    def clean(text: str) -> str:
        return text.replace("\t", " ").replace("\r", " ").replace("\n", " ")

    lines = ["\t".join(clean(str(c)) for c in frame.columns)]
    for row in frame.itertuples(index=False):
        lines.append("\t".join(clean(_cell(v, None)) for v in row))
    return "\n".join(lines)


def print_table(frame: pd.DataFrame, title: str | None = None, floats: str = "{:.4f}") -> None:
    """A table on stdout: drawn with rich on a terminal; tab-separated with full values elsewhere, its title
    then going to stderr so that stdout holds the table alone."""
    if out_console.is_terminal:
        out_console.print(frame_table(frame, title=title, floats=floats))
        return
    if title:
        info_console.print(title, highlight=False, markup=False)  # silenced by --quiet
    typer.echo(plain_table(frame))


def resolve_run(run: Path | None, root: Path) -> Run:
    from protoaudit.engine.run import load_run

    loaded = load_run(run, root=root)
    if run is None:
        info_console.print(f"using the most recent run: {loaded.path}", highlight=False)
    return loaded


def writing_into(run_dir: Path, folder: Path, command: str) -> AbstractContextManager[None]:
    """The run's single-writer lock (see :func:`protoaudit.engine.run.writing`) when ``folder`` lies inside
    the run directory, else nothing to hold: a command that writes elsewhere does not touch the run."""
    import contextlib

    from protoaudit.engine.run import writing

    inside = folder.resolve().is_relative_to(run_dir.resolve())
    return writing(run_dir, command) if inside else contextlib.nullcontext()


def plain_help() -> None:
    """Help pages name a required argument RECIPE rather than ``{recipe}`` and give flags no ``<bool>`` type:
    the shapes a user types."""
    from typer import core

    def usage_name(self: Any) -> str:
        name = str(self.metavar if self.metavar is not None else self.name).upper()
        if not self.required:
            name = f"[{name}]"
        return name + ("..." if self.nargs != 1 else "")

    original = core.TyperOption.display_type_rich

    def option_type(self: Any, ctx: Any) -> str | None:
        if getattr(self, "is_flag", False) and self.metavar is None:
            return None
        return original(self, ctx)

    if hasattr(core, "TyperArgument") and hasattr(core.TyperArgument, "_usage_display_name"):
        core.TyperArgument._usage_display_name = usage_name  # type: ignore[method-assign]
    if hasattr(core, "TyperOption"):
        core.TyperOption.display_type_rich = option_type  # type: ignore[method-assign]
