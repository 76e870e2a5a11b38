"""Time the report of a run (the quick start by default) against its budget: written in ≤ 5 s, its page
≤ 10 MB at CUB-200's size (3 members × 2000 prototypes) with the default thumbnail budget.

    .venv/bin/python bench/bench_report.py [RUN] [--out DIR] [--threads 1] [--repeat 1] [--screenshot PNG]

Prints one line per measure: value, budget and value / budget (≤ 1 meets the budget). The wall time depends on
what else runs on the machine; the process's CPU time beside it does not (much). The time is what
``protoaudit report RUN --html`` spends after start-up: opening the run, rebuilding its dataset, reloading the
members, predicting the test split, thumbnails, deletion curves, figures, rendering and writing the files.
With ``--screenshot`` the page is also rendered in headless Chromium (Debian's ``chromium``) to a PNG.

The CUB-scale page: the run's report with its members' prototype rows repeated to 3 members × 2000 prototypes,
each repeat with thumbnails of its own (distinct images, so that none is inlined for free) for as many prototypes
as the report's budget gives them (``ReportOptions.max_thumbnails`` per member and ``thumbnail_bytes`` of
distinct images in all), numbers only for the rest, as the report does; rendered, its bytes counted. The
quick start's thumbnails are small generated images: photographs weigh more each, but the byte budget caps them.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BUDGET_SECONDS = 5.0
BUDGET_BYTES = 10 * 1000 * 1000  # at CUB-200's size
CUB_MEMBERS, CUB_PROTOTYPES = 3, 2000


def cub_scale_page_bytes(report: Any) -> tuple[int, int, int]:
    """(HTML bytes, prototypes with thumbnails, thumbnail bytes) of ``report`` scaled to CUB's size."""
    import copy

    from protoaudit.report import ReportOptions
    from protoaudit.report.build import Report
    from protoaudit.report.render import render_html

    options = ReportOptions()
    data = copy.deepcopy(report.data)
    assets = dict(report.assets)
    spent, shown, members = 0, 0, []
    for i in range(CUB_MEMBERS):
        source = report.data["members"][i % len(report.data["members"])]
        member = copy.deepcopy(source)
        member["name"] = f"{source['name']}-{i}"
        member["n_prototypes"] = CUB_PROTOTYPES
        rows = []
        for j in range(CUB_PROTOTYPES):
            row = copy.deepcopy(source["prototypes"][j % len(source["prototypes"])])
            row["prototype"] = j
            keys = [row.get("thumb")] + [n.get("thumb") for n in row.get("nearest") or []]
            if j < options.max_thumbnails and spent < options.thumbnail_bytes and row.get("thumb"):
                for n, key in enumerate(keys):
                    if key in assets:
                        new = f"{key}#cub-{i}-{j}"
                        assets[new] = assets[key]
                        spent += len(assets[key])
                        if n == 0:
                            row["thumb"] = new
                        else:
                            row["nearest"][n - 1]["thumb"] = new
                shown += 1
            else:  # as the report does beyond its budget: the nearest patches listed, without thumbnails
                row["thumb"] = None
                for entry in row.get("nearest") or []:
                    entry["thumb"] = None
            rows.append(row)
        member["prototypes"] = rows
        members.append(member)
    data["members"] = members
    html = render_html(Report(data, assets, report.fragments))
    return len(html.encode("utf-8")), shown, spent


def screenshot(html: Path, png: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1000",
        f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(html.resolve().as_uri())
        height = int(driver.execute_script("return document.documentElement.scrollHeight"))
        width = int(driver.execute_script("return document.documentElement.scrollWidth"))
        shot = driver.execute_cdp_cmd(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
            },
        )
        png.write_bytes(base64.b64decode(shot["data"]))
    finally:
        driver.quit()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", default="reports/quickstart", help="run directory")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--screenshot", type=Path, default=None)
    args = parser.parse_args()

    started = time.perf_counter()
    import torch

    from protoaudit.engine.run import load_run
    from protoaudit.report import build_report, write_report

    torch.set_num_threads(args.threads)
    imports = time.perf_counter() - started
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-report-"))
    totals, builds, writes, cpus = [], [], [], []
    written: dict[str, Path] = {}
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        c0 = time.process_time()
        run = load_run(args.run)
        report = build_report(run)
        t1 = time.perf_counter()
        written = write_report(report, out, html=True, markdown=True)
        t2 = time.perf_counter()
        builds.append(t1 - t0)
        writes.append(t2 - t1)
        totals.append(t2 - t0)
        cpus.append(time.process_time() - c0)
    total = statistics.median(totals)
    html_bytes = written["html"].stat().st_size
    data = json.loads(written["json"].read_text(encoding="utf-8"))
    print(
        f"run: {args.run}  ({len(data['members'])} members, "
        f"{sum(len(m['prototypes']) for m in data['members'])} prototypes; threads {args.threads}; "
        f"median of {args.repeat})"
    )
    print(f"{'measure':<34}{'value':>14}{'budget':>14}{'ratio':>8}")
    print(f"{'report written (s)':<34}{total:>14.2f}{BUDGET_SECONDS:>14.1f}{total / BUDGET_SECONDS:>8.2f}")
    print(f"{'  of which build (s)':<34}{statistics.median(builds):>14.2f}")
    print(f"{'  of which render + write (s)':<34}{statistics.median(writes):>14.2f}")
    print(f"{'  CPU time of this process (s)':<34}{statistics.median(cpus):>14.2f}")
    print(f"{'  + imports (s, not in budget)':<34}{imports:>14.2f}")
    print(f"{'report.html (MB)':<34}{html_bytes / 1e6:>14.2f}")
    cub_bytes, shown, thumbs = cub_scale_page_bytes(report)
    print(
        f"{'report.html at CUB size (MB)':<34}{cub_bytes / 1e6:>14.2f}{BUDGET_BYTES / 1e6:>14.1f}"
        f"{cub_bytes / BUDGET_BYTES:>8.2f}"
    )
    print(
        f"{'':<34}({CUB_MEMBERS} × {CUB_PROTOTYPES} prototypes, {shown} with thumbnails, "
        f"{thumbs / 1e6:.1f} MB of them)"
    )
    print(f"{'report.json (MB)':<34}{written['json'].stat().st_size / 2**20:>14.2f}")
    print(f"{'report.md (KB)':<34}{written['markdown'].stat().st_size / 2**10:>14.1f}")
    print(f"files in {out}")
    if args.screenshot is not None:
        screenshot(written["html"], args.screenshot)
        print(f"screenshot: {args.screenshot}")
    return 0 if total <= BUDGET_SECONDS and cub_bytes <= BUDGET_BYTES else 1


if __name__ == "__main__":
    sys.exit(main())
