"""Fashion-MNIST benchmark: the ProtoPNet members, their ensemble and the baseline of recipes/fashion_mnist.toml.

Not a test: it trains on the real dataset (Debian's dataset-fashion-mnist, read from its IDX files) and prints
the accuracy table, the wall time and the goal check (ProtoPNet test top-1 >= 90 %, within 2 points of the
baseline; Li et al. 2018 report 89.95 % for a prototype network).

    apt-get install -y dataset-fashion-mnist
    .venv/bin/python bench/fashion_mnist.py --threads 1   # on a busy machine one thread is far faster
    .venv/bin/python bench/fashion_mnist.py --threads 1 --set data.max_train_per_class=500 --set schedule.epochs=2
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
GOAL_TOP1 = 0.90
GOAL_GAP = 0.02


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "fashion_mnist.toml")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: best on a busy machine)")
    parser.add_argument("--out", default="reports/bench")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument(
        "--deadline-minutes",
        type=float,
        default=None,
        help="interrupt training after this long and report the models that finished (the CPU may be shared)",
    )
    args = parser.parse_args(argv)

    from protoaudit.cli.common import err_console
    from protoaudit.engine.ensemble import train_ensemble
    from protoaudit.engine.progress import Reporter
    from protoaudit.engine.recipe import load_recipe

    recipe = load_recipe(
        args.recipe, overrides=args.overrides, out=args.out, threads=args.threads, device="cpu"
    )
    started = time.perf_counter()
    if args.deadline_minutes is not None:
        signal.signal(signal.SIGALRM, _interrupt)
        signal.alarm(max(1, round(args.deadline_minutes * 60)))
    complete = True
    try:
        with Reporter(err_console, quiet=False) as reporter:
            table = train_ensemble(recipe, reporter=reporter, force=True).accuracy
    except KeyboardInterrupt:
        complete = False
        err_console.print(
            f"deadline reached after {time.perf_counter() - started:.0f} s: reporting what finished"
        )
        table = finished_models(recipe.run_dir())
    signal.alarm(0)
    wall = time.perf_counter() - started
    if not complete:
        print("INCOMPLETE RUN (deadline): rows for the models that finished only")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    protopnet = table[table["kind"].isin(["member", "ensemble"])]
    baseline = table[table["kind"] == "baseline"]
    best = float(protopnet["top1"].max()) if len(protopnet) else float("nan")
    members = table[table["kind"] == "member"]["top1"]
    ensemble = table[table["kind"] == "ensemble"]["top1"]
    base = float(baseline["top1"].max()) if len(baseline) else float("nan")
    load = os.getloadavg()
    print(
        f"\nwall time {wall:.0f} s with --threads {args.threads}; load average at the end "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min) on {os.cpu_count()} CPUs shared with other work"
    )
    print(
        f"best ProtoPNet member {float(members.max()) if len(members) else float('nan'):.4f}, "
        f"ensemble {float(ensemble.iloc[0]) if len(ensemble) else float('nan'):.4f}, baseline {base:.4f}"
    )
    goal = best >= GOAL_TOP1 and base - best <= GOAL_GAP
    print(
        f"goal (ProtoPNet >= {GOAL_TOP1:.0%} and within {GOAL_GAP * 100:.0f} points of the baseline): {'met' if goal else 'NOT met'}"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "wall_seconds": wall,
                    "threads": args.threads,
                    "overrides": args.overrides,
                    "accuracy": table.to_dict(orient="records"),
                    "goal_met": goal,
                    "complete": complete,
                },
                indent=2,
            )
        )
    return 0


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def finished_models(run_dir: Path) -> pd.DataFrame:
    """accuracy.csv rows for the members and baselines that finished before the deadline, and the ensemble
    of the finished ProtoPNet members (their test logits added)."""
    import torch

    from protoaudit.core.metrics import top1
    from protoaudit.engine.io import read_json
    from protoaudit.engine.run import ACCURACY_COLUMNS, load_run
    from protoaudit.engine.train import predict

    rows = []
    n_test = read_json(run_dir / "run.json").get("dataset", {}).get("splits", {}).get("test")
    for folder, kind in (("members", "member"), ("baselines", "baseline")):
        for meta_path in sorted((run_dir / folder).glob("*/model.json")):
            meta = read_json(meta_path)
            rows.append(
                {
                    "model": meta["name"],
                    "kind": kind,
                    "backbone": meta["recipe"]["trunk"],
                    "pruned": False,
                    "top1": meta["metrics"]["test_top1"],
                    "n_prototypes": len(meta["config"].get("prototype_class", [])),
                    "n_test": n_test,
                }
            )
    names = [r["model"] for r in rows if r["kind"] == "member"]
    if len(names) >= 2:
        run = load_run(run_dir)
        bundle = run.dataset()
        logits = [predict(run.member(n), bundle.test, 512, torch.device("cpu")) for n in names]
        rows.append(
            {
                "model": "ensemble",
                "kind": "ensemble",
                "backbone": "+".join(r["backbone"] for r in rows if r["kind"] == "member"),
                "pruned": False,
                "top1": top1(torch.stack(logits).sum(0), bundle.test.labels),
                "n_prototypes": sum(r["n_prototypes"] for r in rows if r["kind"] == "member"),
                "n_test": len(bundle.test),
            }
        )
    return pd.DataFrame(rows, columns=ACCURACY_COLUMNS)


if __name__ == "__main__":
    sys.exit(main())
