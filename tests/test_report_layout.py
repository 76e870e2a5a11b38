"""The report's layout in headless Chromium at 1400 px and 1920 px: no table is wider than its container or
the window, the purity table's evidence columns (source patch, nearest training patches, purity, state,
deletion) lie inside the viewport, its header sticks and explains itself; screenshots of the first screen,
the purity table and the audit section go to ``test-artifacts/``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from protoaudit.engine.run import load_run
from protoaudit.report import build_report, write_report

from .report_helpers import copy_run, write_contract_files
from .test_report_browser import ARTIFACTS, FAST, _open
from .test_report_browser import driver as driver

pytestmark = pytest.mark.browser

WIDTHS = (1400, 1920)
KEY_COLUMNS = ("source patch", "nearest training patches", "prototype", "purity", "state", "deletion AUC")

OVERFLOWS = """
const out = [];
for (const table of document.querySelectorAll("main table")) {
  if (!table.checkVisibility()) continue;  // not rendered (inside a closed <details>)
  const box = table.parentElement;
  const t = table.getBoundingClientRect(), b = box.getBoundingClientRect();
  if (t.width > box.clientWidth + 1 || box.scrollWidth > box.clientWidth + 1 || t.right > window.innerWidth + 1
      || b.right > window.innerWidth + 1) {
    out.push({id: table.id || table.className || "(table)", table: Math.round(t.width),
              container: box.clientWidth, window: window.innerWidth});
  }
}
return {tables: out, page: document.documentElement.scrollWidth, window: window.innerWidth};
"""

KEY_CELLS = """
const names = arguments[0], out = [];
for (const table of document.querySelectorAll("table.purity")) {
  const box = table.parentElement.getBoundingClientRect();
  const heads = Array.from(table.tHead.rows[0].cells);
  for (const name of names) {
    const th = heads.find(h => h.textContent.trim().replace(/[\\u2195\\u2191\\u2193]/g, "").trim().startsWith(name));
    if (!th) { out.push({table: table.id, column: name, problem: "missing"}); continue; }
    const r = th.getBoundingClientRect();
    if (r.left < -1 || r.right > window.innerWidth + 1 || r.right > box.right + 1) {
      out.push({table: table.id, column: name, left: Math.round(r.left), right: Math.round(r.right),
                container_right: Math.round(box.right), window: window.innerWidth});
    }
  }
}
return out;
"""


def _viewport(driver: Any, width: int, height: int = 1000) -> None:
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
    )


def _shot(driver: Any, name: str) -> Path:
    """What the window shows now, as a PNG under test-artifacts/."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    driver.save_screenshot(str(path))
    return path


@pytest.fixture(scope="module")
def report_page(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    run_dir = copy_run(tiny_run, tmp_path_factory.mktemp("layout"))
    write_contract_files(run_dir)
    torch.set_num_threads(1)
    write_report(build_report(load_run(run_dir), FAST), run_dir)
    return run_dir / "report.html"


@pytest.mark.parametrize("width", WIDTHS)
def test_tables_fit_and_evidence_is_in_view(driver: Any, report_page: Path, width: int) -> None:
    _viewport(driver, width)
    _open(driver, report_page)
    for state in ("closed", "open"):  # and with every <details> (reasoning sheets, purity details) open
        if state == "open":
            driver.execute_script("document.querySelectorAll('details').forEach(d => { d.open = true; })")
        measured = driver.execute_script(OVERFLOWS)
        assert measured["tables"] == [], (
            f"tables wider than their box at {width} px, {state}: {measured['tables']}"
        )
        assert measured["page"] <= measured["window"], f"the page scrolls sideways ({state})"
    driver.execute_script("document.querySelectorAll('details').forEach(d => { d.open = false; })")
    driver.execute_script("document.getElementById('purity').scrollIntoView()")
    assert driver.execute_script(KEY_CELLS, list(KEY_COLUMNS)) == []
    # the evidence itself: the first row's thumbnails are drawn inside the window
    inside = driver.execute_script(
        """const row = document.querySelector("table.purity tbody tr");
        return Array.from(row.querySelectorAll("img")).map(i => {const r = i.getBoundingClientRect();
          return r.width > 0 && r.left >= 0 && r.right <= window.innerWidth;});"""
    )
    assert len(inside) >= 2
    assert all(inside)
    # an image inlined once and repeated elsewhere (the gallery) is drawn in every place
    drawn = driver.execute_script(
        """return Array.from(document.querySelectorAll("img[data-same]")).map(i => i.complete && i.naturalWidth > 0);"""
    )
    assert drawn
    assert all(drawn)


def test_purity_header_sticks_and_explains(driver: Any, report_page: Path) -> None:
    _viewport(driver, 1400)
    _open(driver, report_page)
    heads = driver.execute_script(
        """const ths = Array.from(document.querySelectorAll("table.purity thead th"));
        return ths.map(th => ({text: th.textContent.trim(), title: th.getAttribute("title") || "",
                               position: getComputedStyle(th).position}));"""
    )
    assert heads
    assert all(h["position"] == "sticky" for h in heads)
    titled = {h["text"].rstrip("↕↑↓ ").strip(): h["title"] for h in heads if h["title"]}
    assert "n of k" in titled["purity"]  # the Definitions' k-NN class purity, as the column shows it
    assert {"source patch", "push distance", "ground-truth part"} <= set(titled)
    # scrolled down inside its box, the header is still at the top of the box
    top = driver.execute_script(
        """const box = document.querySelector(".tablebox"), th = box.querySelector("thead th");
        box.scrollIntoView(); box.scrollTop = box.scrollHeight / 2;
        return [th.getBoundingClientRect().top - box.getBoundingClientRect().top, box.scrollTop];"""
    )
    assert top[1] > 0
    assert abs(top[0]) <= 2


def test_first_screen_and_screenshots_at_1400(driver: Any, report_page: Path) -> None:
    from selenium.webdriver.common.by import By

    _viewport(driver, 1400, 900)
    _open(driver, report_page)
    glance = driver.find_element(By.ID, "glance")
    assert glance.location["y"] < 300  # the first thing below the title
    text = glance.text
    assert "before pruning" in text
    assert "after pruning" in text
    assert "ensemble" in text
    assert "pruned" in text
    assert "τ = " in text
    assert (
        driver.execute_script("return document.getElementById('glance').getBoundingClientRect().bottom")
        <= 900 + 200
    )  # the whole panel row is (about) on the first screen
    ids = driver.execute_script("return Array.from(document.querySelectorAll('[id]')).map(e => e.id)")
    assert len(ids) == len(set(ids)), "duplicate HTML ids"
    assert _shot(driver, "report-1400-first-screen.png").stat().st_size > 5_000
    driver.execute_script("document.getElementById('purity').scrollIntoView()")
    assert _shot(driver, "report-1400-purity.png").stat().st_size > 5_000
    driver.execute_script("document.getElementById('audit').scrollIntoView()")
    assert _shot(driver, "report-1400-audit.png").stat().st_size > 5_000
