"""Developer tasks. ``nox -s tests`` runs the suite; ``nox -s quickstart`` the main job on the embedded dataset.

Every session shares one environment, ``.venv/`` in the repository (the one the README's commands without nox
use too): the first session that runs creates it and installs the project with the extras it needs; a later
session — ``nox -s tests`` after ``nox -s quickstart`` — only adds what is missing. pip reads its usual
configuration (index, find-links, constraint files), so a local torch build or a pinned constraint keeps
applying. Sessions use the Python that runs nox (3.11 or newer). ``nox --install-only`` sets the environment
up and stops.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import nox

nox.options.sessions = ["lint", "tests"]

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"


def _env(session: nox.Session, extras: str | None = None) -> Path:
    """The shared environment's bin/ folder, with the project installed editable (``.[extras]``). pip runs
    only when the environment lacks these extras or pyproject.toml changed since it ran."""
    bin_dir = VENV / ("Scripts" if sys.platform == "win32" else "bin")
    python = bin_dir / ("python.exe" if sys.platform == "win32" else "python")
    if not python.exists():
        session.run_install(sys.executable, "-m", "venv", str(VENV), external=True)
    target = "." if extras is None else f".[{extras}]"
    stamp = VENV / f".protoaudit-installed-{extras or 'base'}"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if not stamp.is_file() or stamp.read_text() != digest:
        session.run_install(str(python), "-m", "pip", "install", "-e", target, external=True)
        stamp.write_text(digest)
    session.env["PATH"] = f"{bin_dir}{':' if sys.platform != 'win32' else ';'}{session.env.get('PATH') or ''}"
    session.env["VIRTUAL_ENV"] = str(VENV)
    return bin_dir


def _run(session: nox.Session, bin_dir: Path, program: str, *args: str) -> None:
    session.run(str(bin_dir / program), *args, external=True)


@nox.session(venv_backend="none")
def tests(session: nox.Session) -> None:
    """Run the test suite (pass pytest arguments after --)."""
    bin_dir = _env(session, "test")
    args = session.posargs or ["-n", "2"]
    _run(session, bin_dir, "pytest", *args)


@nox.session(venv_backend="none")
def lint(session: nox.Session) -> None:
    """ruff (lint and format check) and mypy."""
    bin_dir = _env(session, "lint")
    _run(session, bin_dir, "ruff", "check", "protoaudit", "tests", "noxfile.py", "bench")
    _run(session, bin_dir, "ruff", "format", "--check", "protoaudit", "tests", "noxfile.py", "bench")
    _run(session, bin_dir, "mypy")


@nox.session(venv_backend="none")
def quickstart(session: nox.Session) -> None:
    """The main job on the embedded dataset: train the quick-start ensemble, prune it, write its report
    (reports/quickstart/report.html)."""
    bin_dir = _env(session)
    _run(
        session,
        bin_dir,
        "protoaudit",
        "train-ensemble",
        "recipes/quickstart.toml",
        "--force",
        *session.posargs,
    )
    _run(session, bin_dir, "protoaudit", "prune", "reports/quickstart")
    _run(session, bin_dir, "protoaudit", "report", "reports/quickstart", "--html")


@nox.session(venv_backend="none", default=False)
def bench(session: nox.Session) -> None:
    """Speed checks P1-P6, each printed as ratios measured side by side (minutes on 2 cores)."""
    bin_dir = _env(session)
    _run(session, bin_dir, "python", "bench/bench_stages.py", *session.posargs)  # P1, P2, P6
    _run(session, bin_dir, "python", "bench/bench_prune.py")  # P3
    _run(session, bin_dir, "python", "bench/bench_index.py")  # P4
    _run(session, bin_dir, "python", "bench/bench_quickstart.py")  # P5
    _run(
        session, bin_dir, "python", "bench/bench_cub_scale.py", "--small"
    )  # the CUB-scale audit, as a smoke run
    # the prepared GPU measurement, as a smoke run on the CPU (GPU figures come from a machine with one)
    _run(
        session,
        bin_dir,
        "python",
        "bench/gpu_check.py",
        "--device",
        "cpu",
        "--images",
        "32",
        "--size",
        "64",
        "--batch",
        "16",
        "--classes",
        "8",
        "--trunks",
        "resnet34",
    )


@nox.session(venv_backend="none", default=False)
def cub_scale(session: nox.Session) -> None:
    """The audit at CUB-200-2011's size from synthetic latents: each stage against the bare FAISS searches,
    peak memory, the report's size (a few minutes on 2 cores; ``-- --small`` for a smoke run)."""
    bin_dir = _env(session)
    _run(session, bin_dir, "python", "bench/bench_cub_scale.py", *session.posargs)
