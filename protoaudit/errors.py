"""Exceptions that the command line maps to one line and a documented exit code.

Library code raises; only :mod:`protoaudit.cli` catches and prints.

===========  =====================================================================
exit code    meaning
===========  =====================================================================
0            success
1            unexpected internal error (re-run with ``PROTOAUDIT_DEBUG=1`` for a traceback)
2            bad input: recipe, command-line value, dataset, image, checkpoint or run directory
3            an audit threshold given with ``--fail-under`` was not met
4            output could not be written (read-only or full disk)
130          interrupted (Ctrl-C); nothing half-written is left behind
===========  =====================================================================
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Remedy:
    """The protoaudit step that fixes a problem, e.g. ``Remedy("rebuild it", "index", "reports/quickstart")``.

    Library code names the step; the command line words it ("…; rebuild it with: protoaudit index RUN")."""

    action: str
    verb: str
    target: str


class ProtoauditError(Exception):
    """Base class: a problem the user can fix, reported as one line."""

    exit_code = 1

    def __init__(self, message: str = "", *, remedy: Remedy | None = None) -> None:
        super().__init__(message)
        self.remedy = remedy


class InputError(ProtoauditError):
    """Bad input from the user: a value, a file, a dataset."""

    exit_code = 2


class RecipeError(InputError):
    """A recipe that fails validation; the message names the key path."""


class DatasetError(InputError):
    """A dataset that is missing, unreadable, or inconsistent with the recipe."""


class CheckpointError(InputError):
    """A checkpoint or run directory that cannot be trusted or read."""


class WeightsUnavailableError(InputError):
    """Pretrained trunk weights that cannot be downloaded or read."""


class StaleIndexError(InputError):
    """A patch index built from another checkpoint than the one queried."""


class AuditFailedError(ProtoauditError):
    """An audit metric fell short of a ``--fail-under`` threshold."""

    exit_code = 3


class OutputError(ProtoauditError):
    """The output location cannot be written."""

    exit_code = 4
