"""Cost of the end-of-epoch / end-of-stage training checkpoints, side by side with the epochs they follow.

Trains a recipe (default: the tiny one) and prints, per member, the mean SGD epoch, the mean checkpoint write
and their ratio, from the timings the run records in members/<m>/model.json. Checkpoints are written after
every SGD epoch and after every push + last-layer stage.

    .venv/bin/python bench/checkpoint_cost.py [RECIPE] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> None:
    recipe = argv[0] if argv and not argv[0].startswith("--") else str(ROOT / "recipes" / "tiny.toml")
    extra = argv[1:] if argv and not argv[0].startswith("--") else argv
    with tempfile.TemporaryDirectory() as out:
        command = [
            sys.executable,
            "-m",
            "protoaudit",
            "train-ensemble",
            recipe,
            "--out",
            out,
            "--quiet",
            "--json",
        ]
        command += ["--threads", "1", "--set", "index.build=false", *extra]
        doc = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
        run_dir = Path(doc["run_dir"])
        print(f"{'member':<10} {'epochs':>6} {'epoch s':>9} {'writes':>6} {'write s':>9} {'write/epoch':>11}")
        for member_dir in sorted((run_dir / "members").iterdir()):
            meta = json.loads((member_dir / "model.json").read_text())
            history, seconds = meta["history"], meta["stage_seconds"]
            sgd = [h for h in history if h["stage"] in ("warm", "joint")]
            writes = len(sgd) + sum(1 for h in history if h["stage"] == "last_layer")
            epoch = sum(h["seconds"] for h in sgd) / len(sgd)
            write = seconds.get("checkpoint", 0.0) / writes
            print(
                f"{member_dir.name:<10} {len(sgd):>6} {epoch:>9.4f} {writes:>6} {write:>9.4f} {write / epoch:>11.1%}"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
