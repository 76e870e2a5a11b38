"""Shared by the report tests: a tiny run with prune/audit files written by hand to their contracts, and an
HTML reader that traces every number shown back to report.json."""

from __future__ import annotations

import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

HOSTILE_CLASS = "<script>alert(1)</script>"
HOSTILE_ID = "train/\"quoted\" 'image' <b>&amp;</b>.png"


def copy_run(run_dir: Path, dest: Path) -> Path:
    target = dest / run_dir.name
    shutil.copytree(run_dir, target)
    return target


def write_contract_files(run_dir: Path, hostile: bool = False) -> None:
    """purity.csv, audit.json, duplicates.csv and members/vgg/nearest_train.csv, written to the team's file
    contracts from the run's own prototypes (values are arbitrary but consistent: purity < 3 → pruned)."""
    from protoaudit.engine.run import load_run

    run = load_run(run_dir)
    bundle = run.dataset()
    rng = np.random.default_rng(0)
    rows = []
    for member in run.member_names:
        protos = run.prototypes(member)
        if hostile and member == "vgg":
            protos.loc[0, "class_name"] = HOSTILE_CLASS
            protos.loc[0, "source_image"] = HOSTILE_ID
            protos.to_csv(run_dir / "members" / member / "prototypes.csv", index=False)
        for r in protos.to_dict(orient="records"):
            purity = int(rng.integers(0, 7))
            nearest = rng.integers(0, len(bundle.push), size=6)
            ids = [bundle.push.image_ids[i] for i in nearest]
            if hostile and r["prototype"] == 0:
                ids[0] = HOSTILE_ID
            rows.append(
                {
                    "member": member,
                    "prototype": r["prototype"],
                    "class": r["class"],
                    "class_name": r["class_name"],
                    "purity": purity,
                    "k": 6,
                    "nearest_image_ids": ";".join(ids),
                    "nearest_classes": ";".join(str(int(bundle.push.labels[i])) for i in nearest),
                    "nearest_distance": float(rng.random()),
                    "pruned": purity < 3,
                    "source_part": int(rng.integers(0, 3)),
                    "source_part_kind": "background",
                }
            )
        if member == "vgg":
            nearest_rows = []
            for r in protos.to_dict(orient="records"):
                for rank in range(1, 7):
                    i = int(rng.integers(0, len(bundle.push)))
                    nearest_rows.append(
                        {
                            "prototype": r["prototype"],
                            "rank": rank,
                            "image_index": i,
                            "image_id": bundle.push.image_ids[i],
                            "label": int(bundle.push.labels[i]),
                            "h": int(rng.integers(0, 2)),
                            "w": int(rng.integers(0, 2)),
                            "distance": float(rank) / 10,
                        }
                    )
            pd.DataFrame(nearest_rows).to_csv(run_dir / "members" / member / "nearest_train.csv", index=False)
    pd.DataFrame(rows).to_csv(run_dir / "purity.csv", index=False)
    audit: dict[str, Any] = {
        "k": 6,
        "threshold": 3,
        "members": {
            m: {"n_pruned": 2, "pruning_precision": 0.5, "pruning_recall": None} for m in run.member_names
        },
        "pruning_precision": 0.25,
    }
    if hostile:
        audit["members"]["vgg"][HOSTILE_CLASS] = HOSTILE_ID
    (run_dir / "audit.json").write_text(json.dumps(audit))
    duplicates = pd.DataFrame(
        [
            {
                "member_a": "vgg",
                "prototype_a": 0,
                "member_b": "vgg",
                "prototype_b": 1,
                "reason": HOSTILE_CLASS if hostile else "same source patch",
                "distance": 0.0,
            }
        ]
    )
    duplicates.to_csv(run_dir / "duplicates.csv", index=False)


class ReportReader(HTMLParser):
    """Collects the numbers of ``<span class="n">`` elements and every other visible text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.numbers: list[tuple[str, bool]] = []  # (text, is a percentage)
        self.texts: list[str] = []
        self.scripts: list[str] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self._stack: list[tuple[str, str]] = []  # (tag, kind) kind: "n", "pct", "script", "style", ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        if tag in ("img", "meta", "link", "input", "br", "hr"):
            return
        classes = (attributes.get("class") or "").split()
        kind = "pct" if "pct" in classes else ("n" if "n" in classes else "")
        if tag in ("script", "style"):
            kind = tag
        self._stack.append((tag, kind))

    def handle_endtag(self, tag: str) -> None:
        while self._stack:
            open_tag, _ = self._stack.pop()
            if open_tag == tag:
                break

    def handle_data(self, data: str) -> None:
        kinds = [k for _, k in self._stack]
        if "script" in kinds:
            self.scripts.append(data)
        elif "style" in kinds:
            return
        elif kinds and kinds[-1] in ("n", "pct"):
            self.numbers.append((data.strip(), kinds[-1] == "pct"))
        else:
            self.texts.append(data)


def read_html(html: str) -> ReportReader:
    reader = ReportReader()
    reader.feed(html)
    reader.close()
    return reader


def json_values(data: Any) -> tuple[list[float], list[str]]:
    """Every number and every string (keys included) of a JSON document."""
    numbers: list[float] = []
    strings: list[str] = []

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                strings.append(str(k))
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, bool) or x is None:
            return
        elif isinstance(x, int | float):
            numbers.append(x)
        elif isinstance(x, str):
            strings.append(x)

    walk(data)
    return numbers, strings


def formatted(numbers: list[float]) -> tuple[set[str], set[str]]:
    """How the report may show each JSON number: as it is (ints), with 0–6 decimals, in %g; and ×100 (pct).
    A magnitude written after its own sign ("− 23.676", as reasoning sheets do) counts as the number."""
    plain: set[str] = set()
    pct: set[str] = set()
    for v in [*numbers, *(abs(n) for n in numbers)]:
        if isinstance(v, int):
            plain.add(str(v))
        plain.add(f"{v:g}")
        for d in range(7):
            plain.add(f"{v:.{d}f}")
            pct.add(f"{100 * v:.{d}f}")
    return plain, pct


NUMBER = re.compile(r"^[-+−]?\d+(\.\d+)?$")


def untraced_numbers(html: str, data: dict[str, Any]) -> list[str]:
    """Numbers shown in the HTML that report.json does not hold (an empty list when all are traced)."""
    reader = read_html(html)
    numbers, strings = json_values(data)
    plain, pct = formatted(numbers)
    corpus = "\n".join(strings)
    bad = [text for text, is_pct in reader.numbers if text not in (pct if is_pct else plain)]
    for text in reader.texts:
        for token in re.findall(r"\S*\d\S*", text):
            token = token.strip(",;:()[]").rstrip(".")
            if not token or token in corpus:
                continue
            if NUMBER.match(token) and token.replace("−", "-").lstrip("+") in plain:
                continue
            bad.append(token)
    return bad
