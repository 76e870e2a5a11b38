"""Progress bars and log lines on stderr. Bars switch off when stderr is not a terminal."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class Reporter:
    """Hands out progress tasks and writes log lines; silent when ``quiet``."""

    def __init__(self, console: Console | None = None, quiet: bool = False, bars: bool | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.quiet = quiet
        show = self.console.is_terminal if bars is None else bars
        self._progress: Progress | None = None
        if show and not quiet:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )

    def __enter__(self) -> Reporter:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    @contextlib.contextmanager
    def task(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        if self._progress is None:
            yield lambda _n: None
            return
        task_id = self._progress.add_task(description, total=total)
        try:
            yield lambda n: self._progress.advance(task_id, n) if self._progress is not None else None
        finally:
            self._progress.remove_task(task_id)

    def log(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message, highlight=False)


NULL_REPORTER = Reporter(Console(stderr=True, quiet=True), quiet=True, bars=False)
