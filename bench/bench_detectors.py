"""Detectors of bad prototypes against causal labels: detector × seed → precision, recall, F1.

Trains the recipe once per seed (one run at a time), prunes it (every detector is run and scored by
``protoaudit prune``), and reads ``audit.json``'s ``detectors`` (pooled over the members) and ``shortcut``.
With ``--cub`` it does the same on a CUB-format directory generated like the tests' (location labels: there are
no interventions on files).

    python bench/bench_detectors.py                                 # recipes/quickstart.toml, seeds 0 1 2
    python bench/bench_detectors.py --seeds 0 --set data.generator=2
    python bench/bench_detectors.py --cub --seeds 0 1 2
    python bench/bench_detectors.py --runs reports/quickstart/quickstart-seed{0,1,2}   # trained runs: prune + score

Prints the table (and the mean over seeds) as Markdown; ``--json FILE`` writes every number.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CUB_RECIPE = """
name = "cub_detectors"
seed = 0
device = "cpu"
threads = 1

[data]
kind = "cub"
root = "{root}"
variant = "full"
image_size = 32
n_classes = 3
val_fraction = 0.25
augment = "none"

[schedule]
epochs = 6
warm_epochs = 1
push_start = 3
push_every = 3
last_layer_epochs = 20
batch_size = 8
eval_batch_size = 16
workers = 0

[[members]]
name = "vgg"
trunk = "tiny_vgg"
weights = "none"
prototypes_per_class = 4
prototype_dim = 16

[[members]]
name = "resnet"
trunk = "tiny_resnet"
weights = "none"
prototypes_per_class = 4
prototype_dim = 16
"""


def run_seed(recipe_path: Path, seed: int, overrides: list[str], out: Path, threads: int) -> dict[str, Any]:
    from protoaudit.engine.ensemble import train_ensemble
    from protoaudit.engine.recipe import load_recipe

    started = time.perf_counter()
    recipe = load_recipe(
        recipe_path, overrides=overrides, seed=seed, out=str(out / f"seed{seed}"), threads=threads
    )
    run_dir = train_ensemble(recipe).run_dir
    return score_run(run_dir, seed, time.perf_counter() - started)


def score_run(run_dir: Path, seed: int, train_seconds: float = float("nan")) -> dict[str, Any]:
    """Prune a trained run (every detector is run and scored) and collect what the table needs."""
    from protoaudit.engine.prune import prune_run
    from protoaudit.engine.run import load_run

    trained = time.perf_counter()
    result = prune_run(load_run(run_dir))
    done = time.perf_counter()
    audit = result.audit
    return {
        "seed": seed,
        "run_dir": str(run_dir),
        "joint_checked": joint_checked_scores(run_dir),
        "train_seconds": train_seconds,
        "prune_seconds": done - trained,
        "labels": audit["detectors"]["labels"],
        "pooled": audit["detectors"]["pooled"],
        "members": audit["detectors"]["members"],
        "causal_counts": {
            m: (e or {}).get("counts") for m, e in (audit.get("causal", {}).get("members") or {}).items()
        },
        "background_carried_by_elements": {
            m: (e or {}).get("background_carried_by_elements")
            for m, e in (audit.get("causal", {}).get("members") or {}).items()
        },
        "shortcut": audit.get("shortcut", {}).get("rows", []),
        "accuracy": result.accuracy.to_dict(orient="records"),
    }


def element_kind(name: str) -> str:
    """The kind of an element of the embedded dataset from its name ("part 3: …", "shared 0: …", "marker")."""
    if name.startswith("part "):
        return "discriminative"
    if name.startswith("shared "):
        return "shared"
    if name == "marker":
        return "shortcut"
    raise ValueError(f"unknown element {name!r}")


def joint_checked_scores(run_dir: Path) -> dict[str, Any] | None:
    """A sensitivity analysis of the labels, not a label of protoaudit's: every detector scored again after the
    prototypes labelled background that removing every element silences (``causal_drop_all`` above the label's
    one half) take the kind of the element whose single removal drops them most. None without causal labels."""
    import numpy as np
    import pandas as pd

    from protoaudit.core.causal import MIN_DROP
    from protoaudit.core.detectors import detection_scores

    table = pd.read_csv(run_dir / "purity.csv", keep_default_na=False)
    if "causal_drop_all" not in table:
        return None
    kinds = table["concept_kind"].astype(str).tolist()
    moved = 0
    for i, row in enumerate(table.itertuples()):
        if kinds[i] != "background" or not float(row.causal_drop_all) > MIN_DROP:
            continue
        drops = [p.rsplit("=", 1) for p in str(row.causal_drops).split(";") if p]
        if drops:
            name, _ = max(drops, key=lambda d: float(d[1]))
            kinds[i] = element_kind(name)
            moved += 1
    scores = {}
    for column in [c for c in table.columns if c.startswith("flag_")]:
        flags = table[column].astype(str).str.lower().eq("true").to_numpy()
        scores[column.removeprefix("flag_")] = detection_scores(np.asarray(flags), kinds)
    return {"relabelled": moved, "pooled": scores}


def fmt(x: Any) -> str:
    return "—" if x is None else f"{x:.3f}"


def table(results: list[dict[str, Any]], title: str) -> str:
    names = [d for d in results[0]["pooled"]] if results else []
    lines = [
        f"### {title}",
        "",
        "| detector | seed | precision | recall | F1 | flagged | bad | labelled | unknown |",
    ]
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for name in names:
        for r in results:
            s = r["pooled"].get(name)
            if s is None:
                continue
            lines.append(
                f"| {name} | {r['seed']} | {fmt(s['precision'])} | {fmt(s['recall'])} | {fmt(s['f1'])} | "
                f"{s['n_flagged']} | {s['n_positive']} | {s['n_labelled']} | {s['n_unknown']} |"
            )
        values = [r["pooled"][name] for r in results if name in r["pooled"]]
        mean = {}
        for key in ("precision", "recall", "f1"):
            got = [v[key] for v in values if v[key] is not None]
            mean[key] = sum(got) / len(got) if got else None
        lines.append(
            f"| **{name}** | mean | {fmt(mean['precision'])} | {fmt(mean['recall'])} | {fmt(mean['f1'])} | | | | |"
        )
    checked = [r for r in results if r.get("joint_checked")]
    if checked:
        lines += [
            "",
            "label sensitivity: the same flags against the labels with each background prototype that removing every "
            "element silences given the kind of its largest single drop (not protoaudit's label; "
            "bench/bench_detectors.py joint_checked_scores)",
            "",
            "| detector | seed | precision | recall | F1 | bad | relabelled |",
            "|---|---|---|---|---|---|---|",
        ]
        for name in names:
            for r in checked:
                s = r["joint_checked"]["pooled"].get(name)
                if s is not None:
                    lines.append(
                        f"| {name} | {r['seed']} | {fmt(s['precision'])} | {fmt(s['recall'])} | {fmt(s['f1'])} | "
                        f"{s['n_positive']} | {r['joint_checked']['relabelled']} |"
                    )
    counts = [r for r in results if any((r.get("causal_counts") or {}).values())]  # causal labels exist
    if counts:
        lines += [
            "",
            "causal labels pooled over members (background*: of the background, silenced by removing every "
            "element at once)",
            "",
            "| seed | discriminative | shared | shortcut | background | background* |",
            "|---|---|---|---|---|---|",
        ]
        for r in counts:
            total = {k: sum((c or {}).get(k, 0) for c in r["causal_counts"].values()) for k in KINDS}
            joint = sum(v or 0 for v in r.get("background_carried_by_elements", {}).values())
            lines.append(f"| {r['seed']} | " + " | ".join(str(total[k]) for k in KINDS) + f" | {joint} |")
    return "\n".join(lines)


KINDS = ("discriminative", "shared", "shortcut", "background")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "quickstart.toml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--cub", action="store_true", help="a generated CUB-format directory instead")
    parser.add_argument(
        "--out", type=Path, default=None, help="where the runs go (default: a temporary folder)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--runs",
        type=Path,
        nargs="+",
        default=None,
        help="score these trained runs instead of training (e.g. the runs of train-ensemble --seeds 0,1,2)",
    )
    args = parser.parse_args()
    if args.runs:
        import torch

        from protoaudit.engine.run import load_run

        torch.set_num_threads(args.threads)
        results = [score_run(run, load_run(run).meta.get("seed", i)) for i, run in enumerate(args.runs)]
        print(table(results, f"detectors against the {results[0]['labels']} labels ({len(results)} runs)"))
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
        return

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        recipe = args.recipe
        if args.cub:
            from tests.test_data_cub import make_cub

            data = out / "cub_data"
            if not data.exists():
                make_cub(data, train_per_class=12, test_per_class=4)
            recipe = out / "cub_detectors.toml"
            recipe.write_text(CUB_RECIPE.format(root=data))
        results = []
        for seed in args.seeds:
            r = run_seed(recipe, seed, args.overrides, out, args.threads)
            print(
                f"seed {seed}: trained in {r['train_seconds']:.0f} s, pruned in {r['prune_seconds']:.0f} s",
                file=sys.stderr,
            )
            results.append(r)
        label = results[0]["labels"] if results else "causal"
        print(
            table(
                results, f"{'CUB-format' if args.cub else recipe.name}: detectors against the {label} labels"
            )
        )
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
