"""The figures a reviewer needs beside each top-1: compactness, uncertainty, calibration, push's effect.

Reads a run (its members, pruned members, baselines and their histories), predicts the test split once per
checkpoint, and returns the four audit.json sections (``compactness``, ``uncertainty``, ``calibration``,
``push_effect``); the math lives in :mod:`protoaudit.core.stats`.

Model names: a member ``m``, its pruned copy ``m-pruned``, ``ensemble`` (the members' logits summed) and
``ensemble-pruned``, and each baseline by its name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from protoaudit.core.model import similarity
from protoaudit.core.stats import (
    BOOTSTRAP_RESAMPLES,
    ZERO_WEIGHT,
    bootstrap_interval,
    compactness,
    confusion,
    ensemble_compactness,
    expected_calibration_error,
    mcnemar_exact,
    paired_bootstrap_difference,
    per_class_scores,
    softmax,
)
from protoaudit.engine.run import LOGITS_FILE, Run, member_path, pruned_name

if TYPE_CHECKING:
    from pathlib import Path

    from protoaudit.core.model import ProtoPNet
    from protoaudit.engine.data import DatasetBundle, ImageSplit

BOOTSTRAP_SEED = 0
ECE_BINS = 15


@dataclass
class CheckpointOutputs:
    """One checkpoint on the test split: (N, K) logits; for a ProtoPNet also (N, m) similarities, its last
    layer (K, m) and the off-class mask (K, m)."""

    logits: np.ndarray
    similarities: np.ndarray | None = None
    weight: np.ndarray | None = None
    off_class: np.ndarray | None = None


@torch.no_grad()
def _protopnet_outputs(model: ProtoPNet, split: ImageSplit, batch_size: int) -> CheckpointOutputs:
    model.eval()
    logits, sims = [], []
    for start in range(0, len(split), batch_size):
        x = split.batch(list(range(start, min(start + batch_size, len(split)))))
        lg, md = model(x)
        logits.append(lg)
        sims.append(similarity(md))
    return CheckpointOutputs(
        torch.cat(logits).double().numpy(),
        torch.cat(sims).double().numpy(),
        model.last_layer.weight.detach().double().numpy(),
        (1 - model.class_identity().t()).bool().numpy(),
    )


def _saved_test_logits(path: Path, n: int) -> np.ndarray | None:
    """The saved (N, K) test logits in ``path`` (a logits.safetensors), or None (absent, or another N)."""
    from protoaudit.engine.io import load_tensors

    if not path.is_file():
        return None
    saved = dict(load_tensors(path))
    test = saved.get("test")
    return None if test is None or len(test) != n else test.double().numpy()


def checkpoint_outputs(
    run: Run, bundle: DatasetBundle, batch_size: int = 128
) -> dict[str, CheckpointOutputs]:
    """Every checkpoint of the run on the test split, by model name (members, pruned members, baselines).

    The one place that obtains test predictions for these figures. Logits are the saved ones
    (``logits.safetensors``, the numbers accuracy.csv was computed from) where they exist; the similarities
    that compactness needs come from one forward pass of each ProtoPNet (saved logits do not hold them).
    """
    out: dict[str, CheckpointOutputs] = {}
    n = len(bundle.test)
    names = list(run.member_names)
    names += [
        pruned_name(m)
        for m in run.member_names
        if (member_path(run.path, pruned_name(m)) / "model.json").is_file()
    ]
    for name in names:
        o = _protopnet_outputs(run.member(name), bundle.test, batch_size)
        saved = _saved_test_logits(member_path(run.path, name) / LOGITS_FILE, n)
        out[name] = o if saved is None else CheckpointOutputs(saved, o.similarities, o.weight, o.off_class)
    from protoaudit.engine.baseline import BASELINE_DIR, load_baseline, predict_baseline

    for name in run.meta.get("baselines") or []:
        directory = run.path / BASELINE_DIR / str(name)
        if (directory / "model.json").is_file():
            logits = _saved_test_logits(directory / LOGITS_FILE, n)
            if logits is None:
                model, _ = load_baseline(directory, "cpu")
                logits = (
                    predict_baseline(model, bundle.test, batch_size, torch.device("cpu")).double().numpy()
                )
            out[str(name)] = CheckpointOutputs(logits)
    return out


def _ensembles(run: Run, outputs: dict[str, CheckpointOutputs]) -> dict[str, list[str]]:
    groups = {"ensemble": list(run.member_names)}
    pruned = [pruned_name(m) for m in run.member_names]
    if run.member_names and all(p in outputs for p in pruned):
        groups["ensemble-pruned"] = pruned
    return {k: v for k, v in groups.items() if v and all(n in outputs for n in v)}


def evaluate(
    run: Run,
    bundle: DatasetBundle,
    outputs: dict[str, CheckpointOutputs] | None = None,
    batch_size: int = 128,
) -> dict[str, Any]:
    """The audit.json sections ``compactness``, ``uncertainty``, ``calibration`` and ``push_effect``."""
    outputs = checkpoint_outputs(run, bundle, batch_size) if outputs is None else outputs
    labels = np.asarray(bundle.test.labels, dtype=np.int64)
    k = int(bundle.n_classes)
    groups = _ensembles(run, outputs)
    logits = {name: o.logits for name, o in outputs.items()}
    for group, names in groups.items():
        logits[group] = np.sum([outputs[n].logits for n in names], axis=0)
    return {
        "compactness": _compactness(outputs, groups, logits),
        "uncertainty": _uncertainty(run, logits, labels, groups),
        "calibration": _calibration(logits, labels, k),
        "push_effect": push_effect(run),
    }


def _compactness(
    outputs: dict[str, CheckpointOutputs], groups: dict[str, list[str]], logits: dict[str, np.ndarray]
) -> dict[str, Any]:
    models: dict[str, Any] = {}
    for name, o in outputs.items():
        if o.weight is None or o.similarities is None:
            continue
        models[name] = compactness(o.weight, o.similarities, o.logits.argmax(1), o.off_class)
    for group, names in groups.items():
        models[group] = ensemble_compactness(
            [outputs[n].weight for n in names],  # type: ignore[misc]
            [outputs[n].similarities for n in names],  # type: ignore[misc]
            logits[group].argmax(1),
            [outputs[n].off_class for n in names],  # type: ignore[misc]
        )
        models[group]["members"] = names
    return {"tolerance": ZERO_WEIGHT, "models": models}


def _best_member(run: Run, names: list[str], logits: dict[str, np.ndarray], labels: np.ndarray) -> str:
    """The member with the best validation top-1 (model.json), test top-1 breaking ties."""

    def key(name: str) -> tuple[float, float]:
        val = (run.member_meta(name).get("metrics") or {}).get("val_top1")
        val = float(val) if isinstance(val, int | float) and val == val else -1.0
        return (val, float((logits[name].argmax(1) == labels).mean()))

    return max(names, key=key)


def _comparison(
    a: str, b: str, logits: dict[str, np.ndarray], labels: np.ndarray, why: str
) -> dict[str, Any]:
    ca, cb = logits[a].argmax(1) == labels, logits[b].argmax(1) == labels
    test = mcnemar_exact(ca, cb)
    diff = paired_bootstrap_difference(ca, cb, seed=BOOTSTRAP_SEED)
    return {
        "a": a,
        "b": b,
        "comparison": why,
        "top1_a": float(ca.mean()),
        "top1_b": float(cb.mean()),
        "difference": diff.estimate,
        "difference_low": diff.low,
        "difference_high": diff.high,
        "a_only": test["a_only"],
        "b_only": test["b_only"],
        "p_value": test["p_value"],
    }


def _uncertainty(
    run: Run, logits: dict[str, np.ndarray], labels: np.ndarray, groups: dict[str, list[str]]
) -> dict[str, Any]:
    intervals = {}
    for name, z in logits.items():
        iv = bootstrap_interval(z.argmax(1) == labels, seed=BOOTSTRAP_SEED)
        intervals[name] = {"top1": iv.estimate, "top1_low": iv.low, "top1_high": iv.high}
    comparisons = []
    members = [m for m in run.member_names if m in logits]
    if "ensemble" in logits and members:
        best = _best_member(run, members, logits, labels)
        comparisons.append(
            _comparison("ensemble", best, logits, labels, "ensemble vs its best member (by val top-1)")
        )
    for m in members:
        if pruned_name(m) in logits:
            comparisons.append(_comparison(pruned_name(m), m, logits, labels, "pruned vs unpruned member"))
    if "ensemble-pruned" in groups and "ensemble" in logits:
        comparisons.append(
            _comparison("ensemble-pruned", "ensemble", logits, labels, "pruned vs unpruned ensemble")
        )
    return {
        "level": 0.95,
        "resamples": BOOTSTRAP_RESAMPLES,
        "seed": BOOTSTRAP_SEED,
        "n_test": len(labels),
        "intervals": intervals,
        "mcnemar": comparisons,
    }


def _calibration(logits: dict[str, np.ndarray], labels: np.ndarray, k: int) -> dict[str, Any]:
    models = {}
    for name, z in logits.items():
        probabilities = softmax(z)
        predicted = z.argmax(1)
        models[name] = {
            **expected_calibration_error(probabilities, labels, ECE_BINS),
            "per_class": per_class_scores(labels, predicted, k),
            "confusion": confusion(labels, predicted, k).tolist(),
        }
    return {"n_bins": ECE_BINS, "models": models}


def push_effect(run: Run) -> dict[str, Any]:
    """Per member and push (model.json history), the share of val, test and push-split predictions that
    push changed (last layer unchanged: Theorem 2.1's setting) and that push + stage 4 changed."""
    members: dict[str, list[dict[str, Any]]] = {}
    for name in run.member_names:
        rows = []
        for entry in run.member_meta(name).get("history") or []:
            effect = entry.get("push_effect") if entry.get("stage") == "last_layer" else None
            if not isinstance(effect, dict):
                continue
            for split, parts in effect.items():
                row: dict[str, Any] = {"epoch": entry.get("epoch"), "split": split}
                for step in ("push", "push_and_last_layer"):
                    values = (parts or {}).get(step) or {}
                    row[f"{step}_changed"] = values.get("changed")
                    row[f"{step}_correct_to_wrong"] = values.get("correct_to_wrong")
                    if step == "push":
                        row["top1_before"] = values.get("top1_before")
                        row["top1_after_push"] = values.get("top1_after")
                    else:
                        row["top1_after_last_layer"] = values.get("top1_after")
                row["n"] = ((parts or {}).get("push") or {}).get("n")
                rows.append(row)
        members[name] = rows
    return {"members": members}


def flat_metrics(sections: dict[str, Any]) -> dict[str, float]:
    """These sections as ``<model>.<metric>`` numbers for ``protoaudit audit --fail-under``:
    compactness (``sparsity``, ``off_class_sparsity``, ``global_size``, ``local_size``), ``top1_low`` /
    ``top1_high``, ``ece``, ``macro_f1``, and ``mcnemar.<a>_vs_<b>.p_value``."""
    out: dict[str, float] = {}
    for model, values in ((sections.get("compactness") or {}).get("models") or {}).items():
        for key in ("sparsity", "off_class_sparsity", "global_size", "local_size"):
            if isinstance(values.get(key), int | float):
                out[f"{model}.{key}"] = float(values[key])
    uncertainty = sections.get("uncertainty") or {}
    for model, values in (uncertainty.get("intervals") or {}).items():
        for key in ("top1_low", "top1_high"):
            if isinstance(values.get(key), int | float):
                out[f"{model}.{key}"] = float(values[key])
    for c in uncertainty.get("mcnemar") or []:
        if isinstance(c.get("p_value"), int | float):
            out[f"mcnemar.{c['a']}_vs_{c['b']}.p_value"] = float(c["p_value"])
    for model, values in ((sections.get("calibration") or {}).get("models") or {}).items():
        if isinstance(values.get("ece"), int | float):
            out[f"{model}.ece"] = float(values["ece"])
        macro = (values.get("per_class") or {}).get("macro_f1")
        if isinstance(macro, int | float):
            out[f"{model}.macro_f1"] = float(macro)
    return out
