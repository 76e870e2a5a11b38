"""Drawing a reasoning sheet (paper Fig. 3): one PNG, or an escaped HTML fragment with its images inlined.

The sheet's numbers come from :func:`protoaudit.engine.explain.explain_image`; this module only draws them.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from protoaudit.engine.explain import BOX_NOTE, MemberEvidence, PrototypeEvidence, ReasoningSheet
from protoaudit.engine.run import PRUNED_SUFFIX
from protoaudit.report.images import crop, data_uri, draw_boxes, overlay


def _thumbnails(sheet: ReasoningSheet, row: PrototypeEvidence) -> dict[str, np.ndarray]:
    source = row.source_pixels if row.source_pixels is not None else np.zeros_like(sheet.image)
    return {
        "image": draw_boxes(sheet.image, row.box, row.cell),
        "prototype": crop(source, row.source_box),
        "source": draw_boxes(source, row.source_box),
        "activation": draw_boxes(overlay(sheet.image, row.activation)),
    }


def _shown(member: MemberEvidence, max_prototypes: int | None) -> tuple[list[PrototypeEvidence], int, float]:
    """The prototypes shown, how many own-class ones are left out, and their points."""
    shown = member.prototypes if max_prototypes is None else member.prototypes[:max_prototypes]
    rest = member.prototypes[len(shown) :]
    return shown, len(rest), sum(r.points for r in rest)


def _summary(member: MemberEvidence, max_prototypes: int | None) -> str:
    """How a member's points for a class add up: "11.793 shown (3 prototypes) + 11.037 from 2 more own-class
    prototypes − 21.971 from other classes' prototypes = 0.859 points"."""
    shown, left_out, rest = _shown(member, max_prototypes)
    terms = [(sum(r.points for r in shown), f"shown ({len(shown)} prototypes)")]
    if left_out:
        terms.append((rest, f"from {left_out} more own-class prototypes"))
    terms.append((member.other_points, "from other classes' prototypes"))
    text = f"{terms[0][0]:.3f} {terms[0][1]}"
    for value, what in terms[1:]:
        text += f" {'−' if value < 0 else '+'} {abs(value):.3f} {what}"
    return text + f" = {member.points:.3f} points"


def _title(sheet: ReasoningSheet) -> str:
    truth = "unknown" if sheet.label is None else sheet.class_names[sheet.label]
    return (
        f"{sheet.image_id} — true class: {truth} — ensemble predicts: {sheet.class_names[sheet.predicted]} "
        f"({len(sheet.member_logits)} members: {', '.join(sheet.member_logits)}; "
        f"{_which(list(sheet.member_logits))})"
    )


def _which(names: list[str]) -> str:
    """Whether a sheet shows the members as trained or their pruned versions."""
    pruned = [n.endswith(PRUNED_SUFFIX) for n in names]
    if all(pruned):
        return "pruned models, prototypes renumbered"
    if not any(pruned):
        return "as trained, before pruning"
    return "some pruned"


def render_sheet_png(
    sheet: ReasoningSheet, path: str | os.PathLike[str], max_prototypes: int | None = 3
) -> Path:
    """Write the sheet as one PNG (written atomically); at most ``max_prototypes`` rows per class and member,
    the rest summed in the text so that every total adds up."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from protoaudit.engine.io import write_bytes

    layout: list[tuple[str, Any]] = [("head", None)]
    for cls in sheet.classes:
        layout.append(("class", cls))
        layout.append(("columns", None))
        for member in cls.members:
            shown, _, _ = _shown(member, max_prototypes)
            layout += [("row", (member, row)) for row in shown]
            layout.append(("member", (cls, member)))
        layout.append(("total", cls))
    heights = {"head": 2.2, "class": 0.45, "columns": 0.3, "row": 1.45, "member": 0.4, "total": 0.5}
    ratios = [heights[kind] for kind, _ in layout]
    fig = plt.figure(figsize=(12.5, sum(ratios) + 0.3), dpi=100)
    grid = fig.add_gridspec(len(layout), 5, height_ratios=ratios, width_ratios=[1, 1, 1, 1, 2.6], hspace=0.12)

    def picture(r: int, col: int, image: np.ndarray) -> None:
        ax = fig.add_subplot(grid[r, col])
        ax.imshow(image, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])

    def text(r: int, body: str, size: float = 9, cols: slice = slice(0, 5), **kw: Any) -> None:
        ax = fig.add_subplot(grid[r, cols])
        ax.axis("off")
        ax.text(0.0, 0.5, body, fontsize=size, va="center", ha="left", transform=ax.transAxes, **kw)

    headers = [
        "test image + box",
        "prototype",
        "its training image",
        "activation map",
        "similarity × weight = points",
    ]
    for r, (kind, item) in enumerate(layout):
        if kind == "head":
            picture(r, 0, draw_boxes(sheet.image))
            lines = [_title(sheet), "", "ensemble points (logits) per class:"]
            ranked = np.argsort(-np.asarray(sheet.ensemble_logits), kind="stable")[:6]
            lines += [f"   {sheet.class_names[c]}: {sheet.ensemble_logits[c]:.3f}" for c in ranked]
            lines += ["", BOX_NOTE]
            text(r, "\n".join(lines), 9, slice(1, 5))
        elif kind == "class":
            text(r, f"Evidence for class {item.class_index}: {item.class_name}", 11, fontweight="bold")
        elif kind == "columns":
            for col, header in enumerate(headers):
                text(r, header, 8, slice(col, col + 1), color="0.3")
        elif kind == "row":
            member, row = item
            thumbs = _thumbnails(sheet, row)
            for col, key in enumerate(("image", "prototype", "source", "activation")):
                picture(r, col, thumbs[key])
            text(
                r,
                f"{member.member} · prototype {row.prototype} (from {row.source_image})\n"
                f"similarity {row.similarity:.3f} × weight {row.weight:.3f} = {row.points:.3f} points\n"
                f"(most activated patch h={row.h}, w={row.w}; distance {row.distance:.4f})",
                9,
                slice(4, 5),
            )
        elif kind == "member":
            _, member = item
            text(r, f"{member.member}: {_summary(member, max_prototypes)}", 9, style="italic")
        else:
            per = " + ".join(f"{m.member} {m.points:.3f}" for m in item.members)
            text(
                r,
                f"Total for {item.class_name}: {per} = {item.points:.3f} points (ensemble)",
                10,
                fontweight="bold",
            )
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    target = Path(path)
    write_bytes(target, buffer.getvalue())
    return target


_HTML = """\
<section class="protoaudit-sheet">
<h3>Reasoning sheet: {{ title }}</h3>
<p><img src="{{ image }}" alt="{{ image_id }}" width="{{ width }}"></p>
<p class="note">{{ note }}</p>
<table class="protoaudit-totals">
<thead><tr><th>class</th>{% for m in member_names %}<th>{{ m }}</th>{% endfor %}<th>ensemble</th></tr></thead>
<tbody>{% for c in classes %}<tr><td>{{ c.class_name }}</td>{% for m in c.members %}<td>{{ "%.3f"|format(m.points) }}</td>{% endfor %}<td><strong>{{ "%.3f"|format(c.points) }}</strong></td></tr>{% endfor %}</tbody>
</table>
{% for c in classes %}
<h4>Evidence for class {{ c.class_index }}: {{ c.class_name }}</h4>
<table class="protoaudit-evidence">
<thead><tr><th>member</th><th>prototype</th><th>test image + box</th><th>prototype</th><th>training image</th><th>activation map</th><th>similarity</th><th>weight</th><th>points</th></tr></thead>
<tbody>
{% for m in c.members %}{% for r in m.rows %}<tr><td>{{ m.member }}</td><td>{{ r.prototype }}<br><small>{{ r.source_image }}</small></td>
<td><img src="{{ r.image }}" alt="box"></td><td><img src="{{ r.prototype_img }}" alt="prototype"></td><td><img src="{{ r.source }}" alt="source"></td><td><img src="{{ r.activation }}" alt="activation"></td>
<td>{{ "%.3f"|format(r.similarity) }}</td><td>{{ "%.3f"|format(r.weight) }}</td><td>{{ "%.3f"|format(r.points) }}</td></tr>
{% endfor %}<tr class="subtotal"><td colspan="8">{{ m.member }}: {{ m.summary }}</td><td>{{ "%.3f"|format(m.points) }}</td></tr>
{% endfor %}<tr class="total"><td colspan="8"><strong>ensemble total for {{ c.class_name }}</strong></td><td><strong>{{ "%.3f"|format(c.points) }}</strong></td></tr>
</tbody>
</table>
{% endfor %}
</section>
"""


def render_sheet_html(sheet: ReasoningSheet, max_prototypes: int | None = 3) -> str:
    """An HTML fragment (``<section class="protoaudit-sheet">``; everything from data escaped) with the
    sheet's images inlined as ``data:image/png;base64`` URIs."""
    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    classes = []
    for cls in sheet.classes:
        members = []
        for member in cls.members:
            shown, _, _ = _shown(member, max_prototypes)
            rows = []
            for row in shown:
                thumbs = _thumbnails(sheet, row)
                rows.append(
                    {
                        "prototype": row.prototype,
                        "source_image": row.source_image,
                        "image": data_uri(thumbs["image"]),
                        "prototype_img": data_uri(thumbs["prototype"]),
                        "source": data_uri(thumbs["source"]),
                        "activation": data_uri(thumbs["activation"]),
                        "similarity": row.similarity,
                        "weight": row.weight,
                        "points": row.points,
                    }
                )
            summary = _summary(member, max_prototypes)
            members.append(
                {"member": member.member, "points": member.points, "rows": rows, "summary": summary}
            )
        classes.append(
            {
                "class_index": cls.class_index,
                "class_name": cls.class_name,
                "points": cls.points,
                "members": members,
            }
        )
    big = draw_boxes(sheet.image)
    return env.from_string(_HTML).render(
        title=_title(sheet),
        image=data_uri(big),
        image_id=sheet.image_id,
        width=big.shape[1],
        note=BOX_NOTE,
        member_names=list(sheet.member_logits),
        classes=classes,
    )


IMAGE_SUFFIX = re.compile(r"\.(png|jpe?g|bmp|gif|webp|tiff?)$", re.IGNORECASE)


def sheet_basename(image_id: str) -> str:
    """A file name for an image id or file: ``test/000612`` → ``test_000612``, ``crop.jpg`` → ``crop`` (the
    sheet's own extension is added by the caller)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", IMAGE_SUFFIX.sub("", image_id)).strip("._") or "image"


SHEET_CSS = """
body { margin: 0; padding: 16px 24px; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto,
  "DejaVu Sans", sans-serif; color: #1d1f23; }
.protoaudit-sheet h3 { font-size: 18px; margin: 0 0 8px; }
.protoaudit-sheet h4 { font-size: 15px; margin: 16px 0 6px; }
.protoaudit-sheet .note { background: #fff6dd; border-left: 4px solid #e8c766; padding: 6px 10px; }
.protoaudit-sheet table { border-collapse: collapse; margin: 6px 0 12px; }
.protoaudit-sheet th, .protoaudit-sheet td { border: 1px solid #d9dde3; padding: 3px 7px; text-align: left;
  vertical-align: middle; }
.protoaudit-sheet th { background: #f4f6f8; font-weight: 600; }
.protoaudit-sheet td img { image-rendering: pixelated; display: block; }
.protoaudit-sheet tr.subtotal td { background: #f4f6f8; }
.protoaudit-sheet tr.total td { background: #e8eef7; }
"""


def render_sheet_document(sheet: ReasoningSheet, max_prototypes: int | None = 3) -> str:
    """The sheet as a page of its own (what ``protoaudit explain`` writes): the fragment of
    :func:`render_sheet_html` with a title, its style inlined, and a policy that forbids every request."""
    from markupsafe import Markup, escape

    fragment = Markup(render_sheet_html(sheet, max_prototypes))
    return (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; '
        "style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'\">\n"
        f"<title>{escape(_title(sheet))}</title>\n<style>{SHEET_CSS}</style>\n</head>\n<body>\n"
        f"{fragment}</body>\n</html>\n"
    )
