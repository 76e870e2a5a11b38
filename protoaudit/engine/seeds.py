"""The ensemble trained once per seed, and the spread of every model's top-1 over the seeds (paper Table 1).

``seeds = [0, 1, 2]`` in a recipe (or ``train-ensemble --seeds 0,1,2``) trains the whole recipe once per seed,
each a complete run of its own (``<out>/<name>/<name>-seed<s>/``, with its own recipe.toml whose ``seed`` is s,
so every other command — prune, report, ``--resume`` — takes it as any run), with one ensemble per seed. The
folder above them holds the summary:

* ``seeds.csv`` — one row per seed and model: the run's accuracy.csv rows with a ``seed`` column;
* ``seeds_summary.csv`` — per model (member, ensemble, baseline): the number of seeds, the mean and the standard
  deviation of its test top-1 (sample standard deviation, n − 1 in the denominator), min and max;
* ``seeds.json`` — the same summary, the runs' folders, and per seed the exact McNemar test of the ensemble
  against its best member on that seed's test images (from the saved logits).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from protoaudit.engine.io import write_json
from protoaudit.engine.progress import NULL_REPORTER, Reporter
from protoaudit.engine.recipe import Recipe
from protoaudit.engine.run import is_run_dir, load_logits, write_csv
from protoaudit.errors import InputError

SEEDS_CSV = "seeds.csv"
SUMMARY_CSV = "seeds_summary.csv"
SEEDS_JSON = "seeds.json"
SUMMARY_COLUMNS = ["model", "kind", "backbone", "n_seeds", "top1_mean", "top1_std", "top1_min", "top1_max"]


@dataclass
class SeedsResult:
    root: Path
    runs: dict[int, Path]
    per_seed: pd.DataFrame
    summary: pd.DataFrame
    mcnemar: list[dict[str, Any]]
    seconds: float


def seed_recipe(recipe: Recipe, seed: int) -> Recipe:
    """The recipe of one seed's run: ``seed`` set, ``seeds`` cleared, written under ``<out>/<name>/``. The data
    keep the recipe's own draw (``data.seed``, or the recipe's ``seed``) on every seed, so the spread over seeds
    is the training's (initialisation, shuffles, augmentation), on the same images, as in the paper's Table 1."""
    data = recipe.data
    if getattr(data, "seed", 0) is None:
        data = data.model_copy(update={"seed": recipe.seed})
    update = {
        "seed": seed,
        "seeds": None,
        "name": f"{recipe.name}-seed{seed}",
        "out": str(recipe.run_dir()),
        "data": data,
    }
    return recipe.model_copy(update=update)


def _check_root(root: Path, recipe: Recipe) -> None:
    if root.exists() and not root.is_dir():
        raise InputError(f"output {root} exists and is not a directory")
    if is_run_dir(root):
        raise InputError(
            f"{root} holds a single-seed run of {recipe.name}; the seeds' runs go into that folder — "
            "move it away or choose another --out"
        )
    ours = {SEEDS_CSV, SUMMARY_CSV, SEEDS_JSON}
    for entry in root.iterdir() if root.is_dir() else []:
        if entry.name in ours or (entry.is_dir() and entry.name.startswith(f"{recipe.name}-seed")):
            continue
        raise InputError(
            f"output {root} holds {entry.name}, which is not one of this recipe's seed runs; choose another --out"
        )


def summarise(per_seed: pd.DataFrame) -> pd.DataFrame:
    """Per model, the mean, sample standard deviation (n − 1), min and max of top-1 over the seeds.

    per_seed: accuracy rows with a ``seed`` column (one row per seed and model, the pruned ones excluded)."""
    rows = []
    for (model, kind, backbone), group in per_seed.groupby(["model", "kind", "backbone"], sort=False):
        values = group["top1"].to_numpy(dtype=float)
        rows.append(
            {
                "model": model,
                "kind": kind,
                "backbone": backbone,
                "n_seeds": len(values),
                "top1_mean": float(values.mean()),
                "top1_std": float(values.std(ddof=1)) if len(values) > 1 else float("nan"),
                "top1_min": float(values.min()),
                "top1_max": float(values.max()),
            }
        )
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def ensemble_vs_best_member(run_dir: Path, accuracy: pd.DataFrame) -> dict[str, Any] | None:
    """The exact McNemar test of one run's ensemble against its most accurate member on the test split, from
    the members' saved logits (None for a run without them)."""
    from protoaudit.core.metrics import ensemble_logits
    from protoaudit.core.stats import mcnemar_exact

    members = accuracy[accuracy["kind"] == "member"]
    saved = {name: load_logits(run_dir, name) for name in members["model"]}
    if not saved or any(v is None for v in saved.values()):
        return None
    labels = saved[next(iter(saved))]["labels.test"].numpy()  # type: ignore[index]
    logits = {name: v["test"] for name, v in saved.items() if v is not None}
    best = str(members.sort_values(["top1", "model"], ascending=[False, True]).iloc[0]["model"])
    combined = ensemble_logits(list(logits.values())).numpy()
    result = mcnemar_exact(logits[best].numpy().argmax(1) == labels, combined.argmax(1) == labels)
    return {"best_member": best, **result}


def train_seeds(
    recipe: Recipe, reporter: Reporter = NULL_REPORTER, force: bool = False, resume: bool = False
) -> SeedsResult:
    """Train ``recipe`` once per seed of ``recipe.seeds`` and write the summary files (module docstring)."""
    from protoaudit.engine.ensemble import train_ensemble

    if not recipe.seeds:
        raise InputError("the recipe names no seeds (set seeds = [0, 1, 2] or pass --seeds 0,1,2)")
    started = time.perf_counter()
    root = recipe.run_dir()
    _check_root(root, recipe)
    runs: dict[int, Path] = {}
    frames = []
    tests = []
    for i, seed in enumerate(recipe.seeds):
        reporter.log(f"seed {seed} ({i + 1}/{len(recipe.seeds)})")
        result = train_ensemble(seed_recipe(recipe, seed), reporter=reporter, force=force, resume=resume)
        runs[seed] = result.run_dir
        frame = result.accuracy.copy()
        frame.insert(0, "seed", seed)
        frames.append(frame)
        test = ensemble_vs_best_member(result.run_dir, result.accuracy)
        if test is not None:
            tests.append({"seed": seed, **test})
    per_seed = pd.concat(frames, ignore_index=True)
    unpruned = per_seed[~per_seed["pruned"].astype(bool)]
    summary = summarise(unpruned)
    write_csv(root / SEEDS_CSV, per_seed)
    write_csv(root / SUMMARY_CSV, summary)
    write_json(
        root / SEEDS_JSON,
        {
            "recipe": recipe.name,
            "seeds": list(recipe.seeds),
            "runs": {str(s): str(p) for s, p in runs.items()},
            "std": "sample standard deviation (n - 1) of top-1 over the seeds",
            "summary": summary.to_dict(orient="records"),
            "mcnemar_ensemble_vs_best_member": tests,
        },
        strict=True,
    )
    return SeedsResult(root, runs, per_seed, summary, tests, time.perf_counter() - started)


def mean_std_text(summary: pd.DataFrame) -> list[str]:
    """``"<model>: 91.1 ± 1.2 (n = 3)"`` per model, in percent."""
    out = []
    for row in summary.itertuples():
        std = "" if np.isnan(row.top1_std) else f" ± {100 * row.top1_std:.1f}"
        out.append(f"{row.model}: {100 * row.top1_mean:.1f}{std} (n = {row.n_seeds})")
    return out
