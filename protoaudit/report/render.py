"""Render a :class:`~protoaudit.report.build.Report` as one self-contained HTML page or as Markdown, and write
``report.html`` / ``report.md`` / ``report.json`` atomically.

HTML: jinja2 templates shipped in the package, ``autoescape=True``; CSS and the small sorting/filtering script
are inlined, images are ``data:`` URIs, and a Content-Security-Policy forbids every network request and every
script but the report's own (pinned by its sha256).
"""

from __future__ import annotations

import base64
import hashlib
import math
import os
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup, escape

from protoaudit.engine.io import write_text
from protoaudit.report.build import Report, dumps_report

NA = Markup('<span class="na">—</span>')


def _static(name: str) -> str:
    return resources.files("protoaudit.report").joinpath("templates", name).read_text(encoding="utf-8")


def _format(value: Any, digits: int | str | None) -> str | None:
    """ints as they are; floats with ``digits`` decimals (4 by default), or in ``"g"`` (shortest) form."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        if digits == "g":
            return f"{value:g}"
        return f"{value:.{4 if digits is None else digits}f}"
    return None


def plain(value: Any, digits: int | str | None = None) -> str | Markup:
    """A number as plain text (ints as they are, floats to ``digits``), for the long tables whose markup must
    stay lean; report.json holds it all the same. A string is escaped; anything else is the missing mark."""
    text = _format(value, digits)
    if text is None:
        return escape(value) if isinstance(value, str) else NA
    return text


def num(value: Any, digits: int | str | None = None) -> Markup:
    """A number from the report as ``<span class="n">…</span>`` (as :func:`plain` writes it)."""
    text = plain(value, digits)
    return text if isinstance(text, Markup) else Markup('<span class="n">{}</span>').format(text)


def sortkey(value: Any) -> str:
    """A ``data-sort`` key: the number to 6 significant digits (finer than the text shows), '' when missing."""
    text = _format(value, "g") if isinstance(value, float) else _format(value, None)
    return "" if text is None else text


def pct(value: Any, digits: int = 1) -> Markup:
    """A fraction from the report shown as a percentage: ``<span class="n pct">…</span>`` holds 100 × value."""
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        return NA
    return Markup('<span class="n pct">{}</span>').format(f"{100 * value:.{digits}f}")


def columns(rows: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    for row in rows:
        out += [k for k in row if k not in out]
    return out


def _environment(autoescape: bool) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("protoaudit.report", "templates"),
        autoescape=autoescape,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["columns"] = columns
    env.filters["dropkey"] = lambda mapping, key: {k: v for k, v in mapping.items() if k != key}
    return env


def section_partials(data: dict[str, Any]) -> list[str]:
    """The partials ``templates/sections/<topic>.html.j2`` whose ``<topic>`` is a key of the report, sorted:
    each builder module adds its key and its partial, and the page includes it."""
    folder = resources.files("protoaudit.report").joinpath("templates", "sections")
    if not folder.is_dir():
        return []
    names = sorted(entry.name for entry in folder.iterdir() if entry.name.endswith(".html.j2"))
    return [f"sections/{name}" for name in names if name.removesuffix(".html.j2") in data]


def csp_hash(script: str) -> str:
    """The Content-Security-Policy source that allows exactly this inline script."""
    return "sha256-" + base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")


def render_html(report: Report) -> str:
    """One self-contained HTML page: no network request, everything from data escaped."""
    env = _environment(autoescape=True)
    env.filters["num"] = num
    env.filters["pct"] = pct
    env.filters["plain"] = plain
    env.filters["sortkey"] = sortkey
    script = _static("report.js")
    if "</" in script:  # the script is inlined verbatim; it must not be able to close its own element
        raise ValueError("report.js must not contain '</'")

    first_use: dict[str, str] = {}  # asset key → the id of the one <img> that inlines it

    def image(key: str | None, cls: str, alt: str) -> Markup | None:
        """The <img> of an asset: its data inlined at its first use only; later uses name that element
        (``data-same``) and report.js copies its source, so a thumbnail shown in the table and the gallery
        weighs once."""
        uri = None if key is None else report.assets.get(key)
        if key is None or uri is None:
            return None
        if key in first_use:
            return Markup('<img class="{}" data-same="{}" alt="{}">').format(cls, first_use[key], alt)
        first_use[key] = f"img-{len(first_use)}"
        return Markup('<img class="{}" id="{}" src="{}" alt="{}">').format(cls, first_use[key], uri, alt)

    def fragment(key: str) -> Markup:
        # reasoning sheets of protoaudit.explain: HTML fragments that escape their own data
        return Markup(report.fragments.get(key, ""))

    from protoaudit.report.definitions import definition_text

    template = env.get_template("report.html.j2")
    return template.render(
        report=report.data,
        sections=section_partials(report.data),
        definition=definition_text,
        image=image,
        fragment=fragment,
        css=Markup(_static("report.css")),
        script=Markup(script),
        script_hash=csp_hash(script),
    )


def md_text(value: Any) -> str:
    """Text from data made inert in Markdown: HTML characters escaped, table pipes and emphasis escaped."""
    if value is None:
        return "—"
    text = str(value).replace("\r", " ").replace("\n", " ")
    text = str(escape(text))
    for ch in ("\\", "|", "*", "_", "`", "[", "]"):
        text = text.replace(ch, "\\" + ch)
    return text


def md_num(value: Any, digits: int | str | None = None) -> str:
    text = _format(value, digits)
    return "—" if text is None else text


def md_pct(value: Any, digits: int = 1) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        return "—"
    return f"{100 * value:.{digits}f}"


def render_markdown(report: Report) -> str:
    """A text version of the report (no images), for terminals, pull requests and diffs."""
    env = _environment(autoescape=False)
    env.filters["t"] = md_text
    env.filters["num"] = md_num
    env.filters["pct"] = md_pct
    return env.get_template("report.md.j2").render(report=report.data)


def write_report(
    report: Report, out_dir: str | os.PathLike[str], html: bool = True, markdown: bool = False
) -> dict[str, Path]:
    """Write ``report.json`` and the asked renderings into ``out_dir``; returns {kind: path}."""
    out = Path(out_dir)
    written: dict[str, Path] = {}
    rendered = {}
    if html:
        rendered["html"] = (out / "report.html", render_html(report))
    if markdown:
        rendered["markdown"] = (out / "report.md", render_markdown(report))
    write_text(out / "report.json", dumps_report(report.data))
    written["json"] = out / "report.json"
    for kind, (path, text) in rendered.items():
        write_text(path, text)
        written[kind] = path
    return written
