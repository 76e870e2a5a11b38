"""P5 — the quick start end to end: train-ensemble, prune, report (goal ≤ 5 minutes on 2 cores).

Runs the three commands as a user would, in a fresh output folder, and prints each one's wall time, the total
against the goal, and the accuracy table.

    python bench/bench_quickstart.py [--out DIR] [--threads 2]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
GOAL_S = 300.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="output root (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="protoaudit-p5-"))
    run_dir = out / "quickstart"
    cli = [sys.executable, "-m", "protoaudit"]
    steps = [
        (
            "train-ensemble",
            [
                *cli,
                "train-ensemble",
                str(ROOT / "recipes" / "quickstart.toml"),
                "--out",
                str(out),
                "--threads",
                str(args.threads),
                "--force",
                "--quiet",
            ],
        ),
        ("prune", [*cli, "prune", str(run_dir), "--quiet"]),
        ("report", [*cli, "report", str(run_dir), "--html", "--threads", str(args.threads)]),
    ]
    rows = []
    for name, cmd in steps:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"{name} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        rows.append({"step": name, "seconds": seconds})
    total = sum(r["seconds"] for r in rows)
    rows.append({"step": "total", "seconds": total})
    print(f"P5 quick start end to end, {args.threads} threads, run in {run_dir}")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.1f}"))
    print(f"goal <= {GOAL_S:.0f} s: {'met' if total <= GOAL_S else 'NOT met'} (ratio {total / GOAL_S:.2f})")
    print(pd.read_csv(run_dir / "accuracy.csv").to_string(index=False))


if __name__ == "__main__":
    main()
