"""Developer tasks. ``nox -s tests`` runs the suite; ``nox -s quickstart`` the main job on the embedded dataset.

nox's default virtualenv backend uses pip, which finds the torch build that lies on this project's machines.
Sessions use the Python that runs nox (3.11 or newer: protoaudit reads TOML with tomllib).
"""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite (pass pytest arguments after --)."""
    session.install("-e", ".[test]")
    args = session.posargs or ["-n", "2"]
    session.run("pytest", *args)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (lint and format check) and mypy."""
    session.install("-e", ".[lint]")
    session.run("ruff", "check", "protoaudit", "tests", "noxfile.py", "bench")
    session.run("ruff", "format", "--check", "protoaudit", "tests", "noxfile.py", "bench")
    session.run("mypy")


@nox.session
def quickstart(session: nox.Session) -> None:
    """The main job on the embedded dataset: train the quick-start ensemble, prune it, write its report
    (reports/quickstart/report.html)."""
    session.install("-e", ".")
    session.run("protoaudit", "train-ensemble", "recipes/quickstart.toml", "--force", *session.posargs)
    session.run("protoaudit", "prune", "reports/quickstart")
    session.run("protoaudit", "report", "reports/quickstart", "--html")


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """Speed checks P1-P6, each printed as ratios measured side by side (minutes on 2 cores)."""
    session.install("-e", ".")
    session.run("python", "bench/bench_stages.py", *session.posargs)  # P1, P2, P6
    session.run("python", "bench/bench_prune.py")  # P3
    session.run("python", "bench/bench_index.py")  # P4
    session.run("python", "bench/bench_quickstart.py")  # P5
    session.run("python", "bench/bench_cub_scale.py", "--small")  # the CUB-scale audit, as a smoke run
    # the prepared GPU measurement, as a smoke run on the CPU (GPU figures come from a machine with one)
    session.run(
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


@nox.session(default=False)
def cub_scale(session: nox.Session) -> None:
    """The audit at CUB-200-2011's size from synthetic latents: each stage against the bare FAISS searches,
    peak memory, the report's size (a few minutes on 2 cores; ``-- --small`` for a smoke run)."""
    session.install("-e", ".")
    session.run("python", "bench/bench_cub_scale.py", *session.posargs)
