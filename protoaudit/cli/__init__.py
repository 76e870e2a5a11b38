"""The ``protoaudit`` command line: thin commands that parse, call one library function, and render.

stdout carries data (a table, or one JSON document with ``--json``); stderr carries logs and progress.
Known problems print one line and exit with the code documented in :mod:`protoaudit.errors`; set
``PROTOAUDIT_DEBUG=1`` for a traceback.
"""

from __future__ import annotations

import os
import sys

import typer

from protoaudit import __version__
from protoaudit.cli.common import err_console, plain_help

plain_help()

app = typer.Typer(
    name="protoaudit",
    help="Train, ensemble, prune and audit ProtoPNets ('This Looks Like That', Chen et al. 2019).",
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"protoaudit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Train, ensemble, prune and audit ProtoPNets ('This Looks Like That', Chen et al. 2019).

    Example: [bold]protoaudit train-ensemble recipes/quickstart.toml[/bold]
    """


from protoaudit.cli import train as _train  # noqa: E402  (registers its commands)

_train.register(app)

from protoaudit.cli import prune as _prune  # noqa: E402

_prune.register(app)

from protoaudit.cli import report as _report  # noqa: E402

_report.register(app)

from protoaudit.cli import data as _data  # noqa: E402

_data.register(app)

from protoaudit.cli import importer as _importer  # noqa: E402

_importer.register(app)

from protoaudit.cli import index as _index  # noqa: E402

_index.register(app)


def error_line(exc: BaseException) -> str:
    """The one line an error is reported as: its message, then the command that fixes it when it names one."""
    text = str(exc)
    remedy = getattr(exc, "remedy", None)
    if remedy is not None:
        text += f"; {remedy.action} with: protoaudit {remedy.verb} {remedy.target}"
    return text


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app, map known exceptions to one line and an exit code."""
    from protoaudit.cli.common import quiet_mode
    from protoaudit.errors import ProtoauditError

    debug = os.environ.get("PROTOAUDIT_DEBUG", "") not in ("", "0")
    quiet_mode(False)  # a command with --quiet turns it on for itself
    try:
        app(args=argv)  # standalone: usage errors exit 2, Ctrl-C exits 130
    except KeyboardInterrupt:  # an interruption that reached past the command's own handling
        sys.exit(130)
    except ProtoauditError as exc:
        if debug:
            raise
        from rich.markup import escape  # messages hold key paths like members[0] and "[and 2 more …]"

        err_console.print(f"[red]error:[/red] {escape(error_line(exc))}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except Exception as exc:
        if debug:
            raise
        from rich.markup import escape

        err_console.print(
            f"[red]internal error:[/red] {type(exc).__name__}: {escape(str(exc))} (PROTOAUDIT_DEBUG=1 shows the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)
