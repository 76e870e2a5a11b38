"""The report's section on compactness, uncertainty, calibration and push's effect on predictions.

Reads audit.json's ``compactness``, ``uncertainty``, ``calibration`` and ``push_effect`` (written by
``protoaudit prune``); for a run not pruned yet, the report computes them itself with the same engine function
(:func:`protoaudit.engine.evaluation.evaluate`) and says so.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from protoaudit.engine.run import Run

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from protoaudit.engine.data import DatasetBundle

KEYS = ("compactness", "uncertainty", "calibration", "push_effect")

THEOREM_2_1 = (
    "Paper Theorem 2.1: if push moves each prototype only a little (conditions A1-A3) and the last layer "
    "connects each class to its own prototypes with weight 1 and to the others with weight 0 (A4), then the "
    "logit of a correctly classified image's class drops by at most Δmax = m′·log((1 + δ)(2 − δ)) and every "
    "other logit rises by at most Δmax, so push does not change the prediction of an image whose top two "
    "logits are at least 2·Δmax apart. The table shows what push actually changed, per push: with the last "
    "layer as it was before push (the theorem's setting, though its A4 holds only for a sparse last layer), "
    "and after the last-layer stage that follows."
)


def _read_audit(run: Run) -> dict[str, Any] | None:
    path = run.path / "audit.json"
    if not path.is_file():
        return None
    from protoaudit.engine.io import read_json

    data = read_json(path)
    return data if isinstance(data, dict) else None


def section(run: Run, data: dict[str, Any], bundle: DatasetBundle | None = None) -> dict[str, Any]:
    """``{"available", "note", "source", "uncertainty", "mcnemar", "compactness", "calibration",
    "per_class", "reliability", "push_effect", "last_layer_stages", "theorem"}`` for the template."""
    audit = _read_audit(run) or {}
    source = "audit.json"
    sections = {k: audit[k] for k in KEYS if isinstance(audit.get(k), dict)}
    if len(sections) < len(KEYS):
        if bundle is None:
            return {
                "available": False,
                "note": "the dataset could not be rebuilt, and audit.json holds no compactness, uncertainty "
                "and calibration yet — run `protoaudit prune`",
            }
        from protoaudit.engine.evaluation import evaluate

        sections = evaluate(run, bundle)
        source = "computed by the report (not in audit.json yet: `protoaudit prune` stores them)"
    class_names = list(data.get("class_names") or [])
    return {
        "available": True,
        "note": None,
        "source": source,
        **_uncertainty(sections["uncertainty"]),
        "compactness": _compactness(sections["compactness"]),
        "tolerance": sections["compactness"].get("tolerance"),
        **_calibration(sections["calibration"], class_names),
        "push_effect": _push_rows(sections["push_effect"]),
        "last_layer_stages": last_layer_stages(run),
        "dense_vs_solved": dense_vs_solved(run),
        "theorem": THEOREM_2_1,
    }


def _uncertainty(u: dict[str, Any]) -> dict[str, Any]:
    rows = [
        {"model": name, "top1": v.get("top1"), "top1_low": v.get("top1_low"), "top1_high": v.get("top1_high")}
        for name, v in (u.get("intervals") or {}).items()
    ]
    return {
        "uncertainty": {
            "level": u.get("level"),
            "resamples": u.get("resamples"),
            "seed": u.get("seed"),
            "n_test": u.get("n_test"),
            "rows": rows,
        },
        "mcnemar": list(u.get("mcnemar") or []),
    }


def _compactness(c: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "model": name,
            "n_prototypes": v.get("n_prototypes"),
            "sparsity": v.get("sparsity"),
            "off_class_sparsity": v.get("off_class_sparsity"),
            "global_size": v.get("global_size"),
            "local_size": v.get("local_size"),
            "local_size_all_classes": v.get("local_size_all_classes"),
        }
        for name, v in (c.get("models") or {}).items()
    ]


def _calibration(c: dict[str, Any], class_names: list[str]) -> dict[str, Any]:
    rows, per_class, reliability = [], [], []
    for name, v in (c.get("models") or {}).items():
        scores = v.get("per_class") or {}
        row = {
            "model": name,
            "ece": v.get("ece"),
            "macro_precision": scores.get("macro_precision"),
            "macro_recall": scores.get("macro_recall"),
            "macro_f1": scores.get("macro_f1"),
        }
        if "sensitivity" in scores:
            row["sensitivity"] = scores.get("sensitivity")
            row["specificity"] = scores.get("specificity")
        rows.append(row)
        classes = [
            {
                "class": k,
                "class_name": class_names[k] if k < len(class_names) else str(k),
                "precision": p,
                "recall": r,
                "f1": f,
                "support": s,
            }
            for k, (p, r, f, s) in enumerate(
                zip(
                    scores.get("precision") or [],
                    scores.get("recall") or [],
                    scores.get("f1") or [],
                    scores.get("support") or [],
                    strict=True,
                )
            )
        ]
        per_class.append({"model": name, "classes": classes})
        reliability.append(
            {
                "model": name,
                "edges": v.get("edges"),
                "count": v.get("count"),
                "accuracy": v.get("accuracy"),
                "confidence": v.get("confidence"),
                "ece": v.get("ece"),
            }
        )
    return {
        "calibration": {"n_bins": c.get("n_bins"), "rows": rows},
        "per_class": per_class,
        "reliability": reliability,
    }


def _push_rows(p: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"member": member, **row} for member, rows in (p.get("members") or {}).items() for row in rows or []
    ]


def last_layer_stages(run: Run) -> list[dict[str, Any]]:
    """Per member and push, the last-layer stage as recorded in model.json's history: solver, iterations,
    whether FISTA reached its tolerance, its residual, seconds, and the training objective."""
    rows = []
    for name in run.member_names:
        for entry in run.member_meta(name).get("history") or []:
            if entry.get("stage") not in ("last_layer", "last_layer_final"):
                continue
            final = entry.get("stage") == "last_layer_final"
            rows.append(
                {
                    "member": name,
                    "epoch": entry.get("epoch"),
                    "solver": entry.get("solver", "adam") + (" (final, selected push)" if final else ""),
                    "iterations": entry.get("iterations"),
                    "converged": entry.get("converged"),
                    "residual": entry.get("residual"),
                    "seconds": entry.get("seconds"),
                    "objective": entry.get("loss"),
                    "train_top1": entry.get("train_top1"),
                    "val_top1": entry.get("val_top1"),
                }
            )
    return rows


def dense_vs_solved(run: Run) -> list[dict[str, Any]]:
    """Per member trained with ``last_layer_solver = "fista"``: the dense last layer (the original's Adam
    schedule) against the convex solution that replaced it, on the test split (model.json ``last_layer``)."""
    rows = []
    for name in run.member_names:
        compared = run.member_meta(name).get("last_layer")
        if not isinstance(compared, dict):
            continue
        test = compared.get("mcnemar") or {}
        for layer in ("dense", "solved"):
            v = compared.get(layer) or {}
            rows.append(
                {
                    "member": name,
                    "layer": "dense (Adam)" if layer == "dense" else "solved (FISTA)",
                    **{
                        k: v.get(k)
                        for k in (
                            "top1",
                            "top1_low",
                            "top1_high",
                            "off_class_sparsity",
                            "sparsity",
                            "global_size",
                            "local_size",
                        )
                    },
                    "seconds": compared.get("solve_seconds") if layer == "solved" else None,
                    "p_value": test.get("p_value") if layer == "solved" else None,
                    "discordant": f"{test.get('a_only')} / {test.get('b_only')}" if layer == "solved" else "",
                }
            )
    return rows


def reliability_diagram(data: dict[str, Any]) -> Figure | None:
    """Per model: accuracy against mean confidence in each of the 15 confidence bins (bars; width: the bin),
    the diagonal a perfectly calibrated model follows, and the ECE in the title."""
    section_data = data.get("evaluation") or {}
    models = [m for m in section_data.get("reliability") or [] if m.get("edges")]
    if not models:
        return None
    from protoaudit.report.figures import _figure

    cols = min(4, len(models))
    rows = (len(models) + cols - 1) // cols
    fig = _figure(3.0 * cols, 3.0 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax, m in zip(axes, models, strict=False):
        edges = np.asarray(m["edges"], dtype=float)
        acc = np.array([np.nan if a is None else a for a in m["accuracy"]], dtype=float)
        width = np.diff(edges)
        ax.bar(edges[:-1], np.nan_to_num(acc), width=width, align="edge", color="#4C72B0", edgecolor="white")
        ax.plot([0, 1], [0, 1], ls="--", color="#8C8C8C", lw=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ece = m.get("ece")
        ax.set_title(f"{m['model']}" + (f" — ECE {ece:.3f}" if isinstance(ece, int | float) else ""))
    for ax in axes[len(models) :]:
        ax.set_visible(False)
    return fig
