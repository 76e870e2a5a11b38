"""Collect a run's files into one report: a JSON-ready dict (``report.json``) and the images it shows.

Both renderers (HTML and Markdown) read only this dict, so every number either of them shows is a number of
``report.json``. Images (thumbnails, figures) live beside the dict in :attr:`Report.assets`, keyed by the
names the dict uses, and are inlined into the HTML as ``data:`` URIs.

Files written by other steps are read when they exist and reported as "not computed yet" when they do not:
``purity.csv``, ``audit.json``, ``duplicates.csv`` (``protoaudit prune``), ``members/<m>/nearest_train.csv``
(the patch index), ``members/<m>/faithfulness.json`` (training), and the reasoning sheets of
:mod:`protoaudit.engine.explain`.

Each section is built by a module of its own, in this order (the sampled sections draw from one generator,
so the order is part of the report's reproducibility):

- :mod:`~protoaudit.report.context`: what is loaded once (the run, its dataset, the options) and shared;
- :mod:`~protoaudit.report.summary`: run summary, class names, accuracy before/after pruning, purity rule;
- :mod:`~protoaudit.report.members`: each member's prototypes, and every checkpoint's last layer;
- :mod:`~protoaudit.report.predictions`: confusion matrices and reasoning samples (with sheets);
- :mod:`~protoaudit.report.faithfulness`: deletion curves;
- :mod:`~protoaudit.report.audit`, :mod:`~protoaudit.report.detectors`, :mod:`~protoaudit.report.evaluation`:
  what ``protoaudit prune`` measured;
- :mod:`~protoaudit.report.glance`: the first screen, from the sections above;
- :mod:`~protoaudit.report.figures`: the figures, from the finished dict.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from protoaudit.engine.io import jsonable
from protoaudit.engine.progress import NULL_REPORTER, Reporter
from protoaudit.engine.run import Run
from protoaudit.report import members as member_sections
from protoaudit.report import summary
from protoaudit.report.audit import audit_section, duplicates_section
from protoaudit.report.context import INDEX_HINT, PRUNE_HINT, ReportOptions, open_context
from protoaudit.report.definitions import BOX_CAVEAT, DEFINITIONS
from protoaudit.report.detectors import section as detectors_section
from protoaudit.report.faithfulness import faithfulness_section
from protoaudit.report.glance import glance
from protoaudit.report.predictions import SHEET_PROTOTYPES, predictions
from protoaudit.report.tables import read_csv

__all__ = [
    "INDEX_HINT",
    "PRUNE_HINT",
    "REPORT_FORMAT",
    "REPORT_FORMAT_VERSION",
    "SHEET_PROTOTYPES",
    "Report",
    "ReportOptions",
    "build_report",
    "dumps_report",
]

REPORT_FORMAT = "protoaudit-report"
REPORT_FORMAT_VERSION = 1


@dataclass
class Report:
    """``data`` is report.json; ``assets`` maps image keys used in ``data`` to ``data:image/png`` URIs;
    ``fragments`` maps keys to trusted, already-escaped HTML fragments (reasoning sheets of
    :mod:`protoaudit.engine.explain`)."""

    data: dict[str, Any]
    assets: dict[str, str] = field(default_factory=dict)
    fragments: dict[str, str] = field(default_factory=dict)


def dumps_report(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=1, ensure_ascii=False, allow_nan=False) + "\n"


def build_report(
    run: Run, options: ReportOptions | None = None, reporter: Reporter = NULL_REPORTER
) -> Report:
    """Read every file of ``run`` the report shows, recompute what must be recomputed (the ensemble's test
    logits where none were saved, the thumbnails, the deletion curves where training recorded none) and
    return the report; nothing is written."""
    started = time.perf_counter()
    ctx = open_context(run, options or ReportOptions(), reporter)
    run_summary = summary.run_summary(ctx)
    accuracy = summary.accuracy(ctx)
    class_names = summary.class_names(ctx)
    purity_frame = read_csv(run.path / "purity.csv")
    members = [member_sections.member_section(ctx, name, purity_frame) for name in run.member_names]
    pruned = summary.pruned_checkpoints(ctx)
    sparsity = [member_sections.last_layer(ctx, m) for m in run.member_names]
    sparsity += [member_sections.last_layer(ctx, name, pruned=True) for name in pruned]
    predicted = predictions(ctx, accuracy["rows"], pruned, class_names)
    faithfulness = faithfulness_section(ctx, members)
    data: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "format_version": REPORT_FORMAT_VERSION,
        "generated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run": run_summary,
        "class_names": class_names,
        "classes": [{"class": k, "class_name": name} for k, name in enumerate(class_names)],
        "accuracy": accuracy,
        "purity": summary.purity_summary(ctx, purity_frame),
        "members": members,
        "last_layer": {"threshold": ctx.options.sparsity_threshold, "checkpoints": sparsity},
        "confusion": predicted["confusion"],
        "reasoning": predicted["reasoning"],
        "faithfulness": faithfulness,
        "audit": audit_section(ctx),
        "detectors": detectors_section(run),
        "duplicates": duplicates_section(ctx),
        "box_caveat": BOX_CAVEAT,
        "definitions": DEFINITIONS,
        "notes": ctx.notes,
    }
    from protoaudit.report.evaluation import section as evaluation_section

    data["evaluation"] = evaluation_section(run, data, ctx.bundle)
    data["glance"] = glance(ctx, data)
    data = jsonable(data)
    from protoaudit.report.figures import add_figures

    add_figures(data, ctx.assets)
    data["build_seconds"] = round(time.perf_counter() - started, 3)
    return Report(jsonable(data), ctx.assets, ctx.fragments)
