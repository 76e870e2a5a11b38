"""The report a reviewer reads: one self-contained ``report.html`` and the same data in ``report.json``.

::

    from protoaudit.report import build_report, write_report
    report = build_report(load_run("reports/quickstart"))   # a dict (report.json) + its images
    write_report(report, "reports/quickstart", html=True, markdown=True)

:func:`build_report` reads the run and recomputes what the report shows (ensemble test logits, thumbnails,
deletion curves); the renderers read only the resulting dict, so every number on the page is in report.json.
"""

from __future__ import annotations

from protoaudit.report.build import Report, ReportOptions, build_report, dumps_report
from protoaudit.report.render import render_html, render_markdown, write_report

__all__ = [
    "Report",
    "ReportOptions",
    "build_report",
    "dumps_report",
    "render_html",
    "render_markdown",
    "write_report",
]
