"""The report's figures (seaborn on matplotlib's Agg canvas → PNG → ``data:`` URI).

Every figure is drawn from the report dict alone (what ``report.json`` holds), never from the run, so a figure
and the numbers beside it cannot disagree. No pyplot state is used: each figure is its own ``Figure``.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from protoaudit.report.images import png_data_uri

if TYPE_CHECKING:
    from matplotlib.figure import Figure

BEFORE, AFTER = "before pruning", "after pruning"
PALETTE = {
    BEFORE: "#4C72B0",
    AFTER: "#DD8452",
    "kept": "#4C72B0",
    "pruned": "#C44E52",
    "not pruned yet": "#8C8C8C",
}


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return png_data_uri(buffer.getvalue())


def _short(name: str, limit: int = 18) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def add_figures(data: dict[str, Any], assets: dict[str, str]) -> None:
    """Draw every figure the data allows into ``assets['fig/<name>']`` and list them in ``data['figures']``.

    Legends go to a fixed corner: matplotlib's "best" searches for a place, takes seconds on large figures and
    then warns that it was slow, so the report's output would depend on the machine's load."""
    import matplotlib

    with matplotlib.rc_context({"legend.loc": "upper right"}):
        _add_figures(data, assets)


def _add_figures(data: dict[str, Any], assets: dict[str, str]) -> None:
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper")
    from protoaudit.report.evaluation import reliability_diagram

    makers: list[tuple[str, str, str, Callable[[dict[str, Any]], Any]]] = [
        (
            "purity",
            "k-NN class purity per member",
            "Histogram of the prototypes' k-NN class purity (purity.csv), pruned prototypes stacked in red; "
            "the dashed line is the pruning threshold τ.",
            purity_histogram,
        ),
        (
            "accuracy",
            "Top-1 accuracy before and after pruning",
            "Test top-1 of every model in accuracy.csv, before and after pruning (orange), with 95 % intervals "
            "where accuracy.csv has them. The axis is fitted to the values (its range is on the axis label), "
            "not drawn from 0, so that differences of a point are visible.",
            accuracy_bars,
        ),
        (
            "sparsity",
            "Last-layer weights: own class vs off-class",
            "Histogram of last-layer weights per checkpoint (log counts). Off-class weights near 0 mean each "
            "class is decided by its own prototypes; the fraction below the threshold is the sparsity.",
            sparsity_histogram,
        ),
        (
            "confusion",
            "Ensemble confusion matrix (test)",
            "Rows: true class; columns: predicted class; recomputed from the saved members.",
            confusion_heatmap,
        ),
        (
            "reliability",
            "Reliability diagrams (test)",
            "Per model: the share of right predictions in each of 15 equal-width confidence bins (bars) "
            "against the diagonal of a perfectly calibrated model; the gap, weighted by the bins' images, "
            "is the expected calibration error (Guo et al. 2017).",
            reliability_diagram,
        ),
        (
            "deletion",
            "Deletion curves of a sample of prototypes",
            "Prototype score (divided by its score on the intact image) as pixels are occluded most-activated "
            "first (blue) or in random order (grey, mean of the random orders); thin lines: prototypes, thick: mean.",
            deletion_lines,
        ),
    ]
    figures = []
    for key, title, caption, make in makers:
        fig = make(data)
        if fig is None:
            continue
        assets[f"fig/{key}"] = _png(fig)
        figures.append({"key": f"fig/{key}", "name": key, "title": title, "caption": caption})
    data["figures"] = figures


def purity_histogram(data: dict[str, Any]) -> Figure | None:
    import seaborn as sns

    if not data["purity"]["available"]:
        return None
    members = [m for m in data["members"] if any(r["purity"] is not None for r in m["prototypes"])]
    if not members:
        return None
    fig = _figure(3.2 * len(members), 2.6)
    axes = np.atleast_1d(fig.subplots(1, len(members), sharey=True))
    k = data["purity"]["k"] or 6
    count = data["purity"]["scale"] == "count"
    top = k if count else 1.0
    edges = np.linspace(-0.5 * top / k, top + 0.5 * top / k, k + 2)
    threshold = data["purity"]["threshold"]
    for ax, member in zip(axes, members, strict=True):
        rows = [r for r in member["prototypes"] if r["purity"] is not None]
        frame = pd.DataFrame(
            {
                "purity": [r["purity"] for r in rows],
                "prototypes": ["pruned" if r["pruned"] else "kept" for r in rows],
            }
        )
        sns.histplot(
            data=frame,
            x="purity",
            hue="prototypes",
            hue_order=["kept", "pruned"],
            palette=PALETTE,
            bins=edges.tolist(),
            multiple="stack",
            ax=ax,
        )
        ax.set_title(member["name"])
        ax.set_xlim(edges[0], edges[-1])
        ax.set_xlabel(f"purity (of k = {k})" if count else "purity")
        if threshold is not None:
            ax.axvline(
                (threshold - 0.5) if count else (threshold - 0.5) / k,
                color="#C44E52",
                linestyle="--",
                linewidth=1,
            )
    return fig


def accuracy_axis(values: list[float]) -> tuple[float, float]:
    """A top-1 axis fitted to the values (not 0–1, where 0.97 and 1.0 look alike): the range of the values
    widened by a third of it on each side (at least 1 point), clipped to [0, 1]."""
    low, high = min(values), max(values)
    pad = max(0.01, (high - low) / 3)
    return max(0.0, low - pad), min(1.0, high + pad)


def accuracy_bars(data: dict[str, Any]) -> Figure | None:
    rows = [r for r in data["accuracy"]["rows"] if r["top1"] is not None]
    if not rows:
        return None
    models = list(dict.fromkeys(r["model"].removesuffix("-pruned") for r in rows))
    fig = _figure(max(3.5, 1.1 * len(models) + 1.5), 2.8)
    ax = fig.subplots()
    low, high = accuracy_axis([r["top1"] for r in rows])
    for offset, pruned, label in ((-0.15, False, BEFORE), (0.15, True, AFTER)):
        chosen = [r for r in rows if bool(r["pruned"]) == pruned]
        if not chosen:
            continue
        xs = [models.index(r["model"].removesuffix("-pruned")) + offset for r in chosen]
        ys = [100 * r["top1"] for r in chosen]
        ax.scatter(xs, ys, s=36, color=PALETTE[label], label=label, zorder=3)
        for r, x, y in zip(chosen, xs, ys, strict=True):
            if r.get("top1_low") is not None and r.get("top1_high") is not None:
                ax.vlines(x, 100 * r["top1_low"], 100 * r["top1_high"], color="#888888", linewidth=1)
            ax.annotate(
                f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 5), ha="center", fontsize=7
            )
    ax.set_xticks(range(len(models)), models)
    ax.set_xlim(-0.6, len(models) - 0.4)
    ax.set_ylim(100 * low, 100 * high)
    ax.set_ylabel(f"top-1 (%), axis {100 * low:.1f}–{100 * high:.1f}")
    ax.grid(axis="y", linewidth=0.5, alpha=0.5)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize="small", frameon=False)
    return fig


def sparsity_histogram(data: dict[str, Any]) -> Figure | None:
    import seaborn as sns

    checkpoints = data["last_layer"]["checkpoints"]
    if not checkpoints:
        return None
    cols = min(4, len(checkpoints))
    rows_n = (len(checkpoints) + cols - 1) // cols
    fig = _figure(3.0 * cols, 2.4 * rows_n)
    axes = np.atleast_1d(fig.subplots(rows_n, cols, squeeze=False)).ravel()
    for ax, checkpoint in zip(axes, checkpoints, strict=False):
        hist = checkpoint["histogram"]
        edges = np.asarray(hist["edges"])
        centres = (edges[1:] + edges[:-1]) / 2
        frame = pd.DataFrame(
            {
                "weight": np.concatenate([centres, centres]),
                "count": np.concatenate([hist["own"], hist["off"]]),
                "connection": ["own class"] * len(centres) + ["off-class"] * len(centres),
            }
        )
        sns.histplot(
            data=frame,
            x="weight",
            weights="count",
            hue="connection",
            hue_order=["own class", "off-class"],
            palette={"own class": "#55A868", "off-class": "#8172B3"},
            bins=edges.tolist(),
            multiple="stack",
            ax=ax,
        )
        ax.set_yscale("symlog")
        ax.set_title(checkpoint["checkpoint"])
    for ax in axes[len(checkpoints) :]:
        ax.set_visible(False)
    return fig


def confusion_heatmap(data: dict[str, Any]) -> Figure | None:
    import seaborn as sns

    models = data["confusion"]["models"]
    if not models:
        return None
    names = [f"{i}" for i in range(len(data["class_names"]))]
    k = len(names)
    side = max(3.0, 0.45 * k + 1.5)
    fig = _figure(side * len(models), side)
    axes = np.atleast_1d(fig.subplots(1, len(models)))
    for ax, model in zip(axes, models, strict=True):
        sns.heatmap(
            np.asarray(model["matrix"]),
            annot=k <= 20,
            fmt="d",
            cmap="Blues",
            cbar=False,
            square=True,
            xticklabels=names,
            yticklabels=names,
            ax=ax,
        )
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title(f"ensemble, {AFTER if model['pruned'] else BEFORE}")
    return fig


def deletion_lines(data: dict[str, Any]) -> Figure | None:
    import seaborn as sns

    faith = data["faithfulness"]
    if not faith["available"] or not faith["prototypes"]:
        return None
    fractions = faith["fractions"]
    records = []
    for n, p in enumerate(faith["prototypes"]):
        for order, curve in (("activation order", p["activation"]), ("random order", p["random"])):
            records += [
                {"deleted fraction": f, "normalised score": s, "order": order, "prototype": n}
                for f, s in zip(fractions, curve, strict=True)
            ]
    frame = pd.DataFrame(records)
    fig = _figure(4.2, 2.8)
    ax = fig.subplots()
    palette = {"activation order": "#4C72B0", "random order": "#8C8C8C"}
    sns.lineplot(
        data=frame,
        x="deleted fraction",
        y="normalised score",
        hue="order",
        units="prototype",
        estimator=None,
        palette=palette,
        alpha=0.3,
        linewidth=0.8,
        legend=False,
        ax=ax,
    )
    sns.lineplot(
        data=frame,
        x="deleted fraction",
        y="normalised score",
        hue="order",
        palette=palette,
        errorbar=None,
        linewidth=2.2,
        ax=ax,
    )
    ax.legend(fontsize="small", loc="upper right")
    return fig
