"""The report in headless Chromium (Debian ``chromium`` + ``chromium-driver``): no console error, no request
leaves the page, a purity-table header sorts its table, data cannot run script; a screenshot is kept under
``test-artifacts/``. Without Chromium the tests skip — except under CI=true, where they fail."""

from __future__ import annotations

import base64
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from protoaudit.engine.run import load_run
from protoaudit.report import ReportOptions, build_report, write_report

from .report_helpers import HOSTILE_CLASS, HOSTILE_ID, copy_run, write_contract_files

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FAST = ReportOptions(
    reasoning_correct=2, reasoning_wrong=2, faithfulness_per_member=2, deletion_steps=8, random_orders=2
)


def _missing() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if shutil.which(path) is None:
            return f"{path} not found (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e .[test])"
    return None


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    reason = _missing()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"headless Chromium is required under CI: {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    chrome = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield chrome
    finally:
        chrome.quit()


def _open(driver: Any, path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Load ``path``; return its console entries and the URLs of every request the page made."""
    driver.get("about:blank")
    driver.get_log("browser")
    driver.get_log("performance")
    url = path.resolve().as_uri()
    driver.get(url)
    driver.execute_script("window.scrollTo(0, document.body.scrollHeight); window.scrollTo(0, 0);")
    console = driver.get_log("browser")
    requests = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            params = message["params"]
            requests.append(params["request"]["url"])
            requests.append(params.get("documentURL", ""))
    return console, [r for r in requests if r and not r.startswith("chrome://")]


def _screenshot(driver: Any, name: str) -> Path:
    """A full-page PNG under test-artifacts/ (git-ignored)."""
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
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    path.write_bytes(base64.b64decode(shot["data"]))
    return path


@pytest.fixture(scope="module")
def tiny_report(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = copy_run(tiny_run, tmp_path_factory.mktemp("browser"))
    write_contract_files(run_dir)
    torch.set_num_threads(1)
    write_report(build_report(load_run(run_dir), FAST), run_dir)
    return run_dir / "report.html"


def _column(driver: Any, table_id: str, header: str) -> list[str]:
    from selenium.webdriver.common.by import By

    table = driver.find_element(By.ID, table_id)
    heads = [
        th.text.strip().rstrip("↕↑↓ ").strip() for th in table.find_elements(By.CSS_SELECTOR, "thead th")
    ]
    col = heads.index(header)
    return [
        row.find_elements(By.TAG_NAME, "td")[col].get_attribute("data-sort")
        for row in table.find_elements(By.CSS_SELECTOR, "tbody tr")
    ]


def test_report_opens_offline_without_errors_and_sorts(driver: Any, tiny_report: Path) -> None:
    from selenium.webdriver.common.by import By

    console, requests = _open(driver, tiny_report)
    assert [e for e in console if e["level"] in ("SEVERE", "WARNING")] == []
    page = tiny_report.resolve().as_uri()
    assert page in requests  # the log did record the page's own load
    leaving = [u for u in requests if not (u == page or u.startswith("data:"))]
    assert leaving == []
    # every image is inlined and decoded
    broken = driver.execute_script(
        "return Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).length"
    )
    assert broken == 0
    assert driver.execute_script("return document.images.length") > 20

    header = driver.find_element(
        By.XPATH, "//table[@id='purity-1']//th[starts-with(normalize-space(.), 'push distance')]"
    )
    before = [float(v) for v in _column(driver, "purity-1", "push distance")]
    header.click()
    ascending = [float(v) for v in _column(driver, "purity-1", "push distance")]
    assert ascending == sorted(before)
    assert ascending != before
    assert header.get_attribute("aria-sort") == "ascending"
    header.click()
    assert [float(v) for v in _column(driver, "purity-1", "push distance")] == sorted(before, reverse=True)

    # "hide pruned" hides exactly the rows marked pruned
    n_pruned = len(driver.find_elements(By.CSS_SELECTOR, "#purity-1 tbody tr.pruned"))
    assert n_pruned > 0
    driver.find_element(By.CSS_SELECTOR, "input.hide-pruned[data-table='purity-1']").click()
    hidden = driver.execute_script("return document.querySelectorAll('#purity-1 tbody tr[hidden]').length")
    assert hidden == n_pruned
    driver.find_element(By.CSS_SELECTOR, "input.hide-pruned[data-table='purity-1']").click()

    assert driver.get_log("browser") == []
    shot = _screenshot(driver, "report-tiny.png")
    assert shot.stat().st_size > 10_000


def test_hostile_names_stay_text_in_the_browser(driver: Any, tiny_run: Path, tmp_path: Path) -> None:
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    run_dir = copy_run(tiny_run, tmp_path)
    write_contract_files(run_dir, hostile=True)
    torch.set_num_threads(1)
    write_report(build_report(load_run(run_dir), FAST), run_dir)
    console, _ = _open(driver, run_dir / "report.html")
    assert [e for e in console if e["level"] == "SEVERE"] == []
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text  # noqa: B018
    assert driver.execute_script("return document.scripts.length") == 1
    body = driver.find_element(By.TAG_NAME, "body").text
    assert HOSTILE_CLASS in body
    assert HOSTILE_ID in driver.execute_script("return document.body.textContent")
