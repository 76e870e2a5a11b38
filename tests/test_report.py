"""The report: report.json round-trips, every number on the page comes from it, data is escaped, missing
steps are named, the faithfulness check and the thumbnails are right, and the CLI writes the files."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from protoaudit.cli import main
from protoaudit.core.faithfulness import deletion_curves, trapezoid_auc
from protoaudit.core.geometry import cell_footprint
from protoaudit.engine.io import jsonable
from protoaudit.engine.run import load_run
from protoaudit.report import (
    ReportOptions,
    build_report,
    render_html,
    render_markdown,
    write_report,
)
from protoaudit.report.images import BOX_COLOUR, box_thumbnail

from .report_helpers import (
    HOSTILE_CLASS,
    HOSTILE_ID,
    copy_run,
    read_html,
    untraced_numbers,
    write_contract_files,
)

FAST = ReportOptions(
    reasoning_correct=2, reasoning_wrong=2, faithfulness_per_member=2, deletion_steps=8, random_orders=2
)


@pytest.fixture(scope="module")
def full_run(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run plus purity.csv, audit.json, duplicates.csv and one nearest_train.csv."""
    run_dir = copy_run(tiny_run, tmp_path_factory.mktemp("full"))
    write_contract_files(run_dir)
    return run_dir


@pytest.fixture(scope="module")
def full_report(full_run: Path) -> Any:
    torch.set_num_threads(1)
    return build_report(load_run(full_run), FAST)


def test_report_json_round_trips_and_is_strict(full_report: Any, tmp_path: Path) -> None:
    written = write_report(full_report, tmp_path, html=True, markdown=True)
    text = written["json"].read_text(encoding="utf-8")
    data = json.loads(text)
    assert data == full_report.data
    assert json.loads(json.dumps(data)) == data
    assert "NaN" not in text
    assert "Infinity" not in text
    assert data["format"] == "protoaudit-report"
    # images stay out of report.json; the page carries them
    assert "data:image/png" not in text
    assert set(written) == {"json", "html", "markdown"}


def test_every_number_shown_comes_from_report_json(full_report: Any, tmp_path: Path) -> None:
    write_report(full_report, tmp_path)
    data = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    reader = read_html(html)
    assert len(reader.numbers) > 200  # the page does show numbers: accuracy, purity, distances, timings…
    assert untraced_numbers(html, data) == []


def test_each_image_is_inlined_once_and_its_repeats_name_it(full_report: Any) -> None:
    import re

    html = render_html(full_report)
    page = re.sub(r'<div class="sheet".*?</div>\s*</details>', "", html, flags=re.S)  # sheets: fragments
    inlined = re.findall(r'<img class="[^"]*" id="(img-\d+)" src="(data:image/png;base64,[^"]+)"', html)
    uris = [u for _, u in inlined]
    assert len(uris) == len(set(uris))  # no image's data twice among the page's own <img>
    ids = {i for i, _ in inlined}
    repeats = re.findall(r'<img class="[^"]*" data-same="(img-\d+)"', page)
    assert repeats  # the gallery shows the prototype tables' thumbnails again
    assert set(repeats) <= ids
    # the assets the gallery repeats are the ones shown first: each repeat stands for an image of the report
    by_id = dict(inlined)
    assert {by_id[r] for r in repeats} <= set(full_report.assets.values())


def test_thumbnail_budget_stops_the_images_and_keeps_every_row(full_run: Path) -> None:
    """With a byte budget that holds about one prototype's images, the later rows keep their numbers and the
    classes of their nearest images as text, without figures, and the page says how many have thumbnails."""
    import dataclasses
    import re

    one = build_report(load_run(full_run), dataclasses.replace(FAST, thumbnail_bytes=1))
    html = render_html(one)
    member = one.data["members"][0]
    assert member["thumbnails"] == 1  # the first image passes the budget, which is then spent
    assert [r["thumb"] is not None for r in member["prototypes"]][:2] == [True, False]
    assert all(n["thumb"] is None for r in member["prototypes"][1:] for n in r["nearest"] or [])
    table = html[html.index('<table class="sortable purity" id="purity-1"') :]
    table = table[: table.index("</table>")]
    rows = table.split("<tr")[2:]  # after the header row
    assert len(rows) == len(member["prototypes"])
    assert "<figure" in rows[0]
    for row, p in zip(rows[1:], member["prototypes"][1:], strict=True):
        assert "<figure" not in row
        shown = re.search(r'classes <span class="nc">([^<]*(?:<b>[^<]*</b>[^<]*)*)</span>', row)
        assert shown is not None
        listed = [int(c) for c in re.sub(r"</?b>", "", shown.group(1)).split()]
        assert listed == p["nearest_classes"]
        own = [int(c) for c in re.findall(r"<b>(\d+)</b>", shown.group(1))]
        assert own == [c for c in p["nearest_classes"] if c == p["class"]]
    assert f'Thumbnails for the first <span class="n">1</span> of <span class="n">{len(rows)}</span>' in html
    assert untraced_numbers(html, one.data) == []


def test_the_report_command_defaults_to_the_report_options_budget() -> None:
    import inspect

    from protoaudit.cli.report import report_command

    default = inspect.signature(report_command).parameters["thumbnail_mb"].default
    assert int(default * (1 << 20)) == ReportOptions().thumbnail_bytes


def test_the_number_check_catches_a_number_that_is_not_in_report_json(full_report: Any) -> None:
    html = render_html(full_report)
    data = json.loads(json.dumps(full_report.data))
    forged = html.replace('<span class="n pct">', '<span class="n pct">123', 1)
    assert untraced_numbers(forged, data) != []
    stray = html.replace("<main>", "<main><p>top-1 is 97.31 %</p>", 1)
    assert "97.31" in untraced_numbers(stray, data)


def test_report_sections_read_the_contract_files(full_report: Any, full_run: Path) -> None:
    data = full_report.data
    assert data["purity"]["available"]
    assert data["purity"]["k"] == 6
    assert data["purity"]["threshold"] == 3
    assert data["purity"]["scale"] == "count"
    vgg = next(m for m in data["members"] if m["name"] == "vgg")
    table = pd.read_csv(full_run / "purity.csv")
    purity = {r["prototype"]: r for r in table[table["member"] == "vgg"].to_dict("records")}
    for row in vgg["prototypes"]:
        assert row["purity"] == purity[row["prototype"]]["purity"]
        assert row["pruned"] == (row["purity"] < 3)
        assert row["thumb"] in full_report.assets
    assert vgg["nearest_source"] == "nearest_train.csv"
    assert all(len(r["nearest"]) == 6 for r in vgg["prototypes"])
    assert data["audit"]["available"]
    assert {r["member"] for r in data["audit"]["members_table"]} == {
        "vgg",
        "resnet",
    }
    assert data["duplicates"]["available"]
    assert len(data["duplicates"]["rows"]) == 1
    names = {f["name"] for f in data["figures"]}
    assert {"purity", "accuracy", "sparsity", "confusion", "deletion"} <= names


def test_bare_run_says_what_is_not_computed_yet(tiny_run: Path) -> None:
    torch.set_num_threads(1)
    report = build_report(load_run(tiny_run), FAST)
    data = report.data
    assert not data["purity"]["available"]
    assert "protoaudit prune" in data["purity"]["note"]
    assert not data["audit"]["available"]
    assert not data["duplicates"]["available"]
    assert "purity" not in {f["name"] for f in data["figures"]}
    assert all(r["purity"] is None and r["pruned"] is None for m in data["members"] for r in m["prototypes"])
    html = render_html(report)
    assert html.count("not computed yet — run <code>") == 0  # notes are text, escaped, not markup
    assert f"k-NN class purity not computed yet — run `protoaudit prune {tiny_run}`" in html  # with the path


def test_ensemble_is_recomputed_and_matches_accuracy_csv(full_report: Any, full_run: Path) -> None:
    confusion = full_report.data["confusion"]
    before = next(m for m in confusion["models"] if not m["pruned"])
    matrix = np.asarray(before["matrix"])
    n_test = load_run(full_run).meta["dataset"]["splits"]["test"]
    assert matrix.sum() == n_test
    assert math.isclose(np.trace(matrix) / n_test, before["top1_recomputed"])
    assert before["matches_accuracy_csv"] is True
    assert all(c["matches_accuracy_csv"] is True for c in confusion["checkpoints"])


def test_hostile_names_render_as_inert_text(tiny_run: Path, tmp_path: Path) -> None:
    run_dir = copy_run(tiny_run, tmp_path)
    write_contract_files(run_dir, hostile=True)
    torch.set_num_threads(1)
    report = build_report(load_run(run_dir), FAST)
    html = render_html(report)
    reader = read_html(html)
    # the class name and the quoted file name reach the page as text, never as markup or broken attributes
    assert HOSTILE_CLASS not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    text = "".join(reader.texts)
    assert HOSTILE_CLASS in text
    assert HOSTILE_ID in text
    assert [t for t, _ in reader.tags].count("script") == 1
    assert not any(t == "b" for t, _ in reader.tags)  # the <b> inside the image id stayed text
    # the only script is ours, and the Content-Security-Policy pins it by hash
    script = reader.scripts[0]
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    csp = next(
        a["content"]
        for t, a in reader.tags
        if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"
    )
    assert f"'sha256-{digest}'" in csp
    assert "default-src 'none'" in csp
    markdown = render_markdown(report)
    assert HOSTILE_CLASS not in markdown
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in markdown


def test_jsonable_refuses_nan_and_numpy_types() -> None:
    value = jsonable(
        {"a": np.float32(0.5), "b": float("nan"), "c": (np.int64(3), float("inf")), 4: np.bool_(True)}
    )
    assert value == {"a": 0.5, "b": None, "c": [3, None], "4": True}
    assert json.loads(json.dumps(value, allow_nan=False)) == value
    with pytest.raises(TypeError):
        jsonable({"x": object()})


def test_box_thumbnail_outlines_the_box_end_exclusive() -> None:
    image = np.zeros((16, 16, 3), dtype=np.uint8)
    png = box_thumbnail(image, (2, 10, 4, 12))
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert tuple(pixels[2, 4]) == BOX_COLOUR
    assert tuple(pixels[9, 11]) == BOX_COLOUR
    assert tuple(pixels[10, 12]) == (0, 0, 0)
    assert tuple(pixels[5, 7]) == (0, 0, 0)


def test_cell_footprints_tile_the_image() -> None:
    covered = np.zeros((30, 30), dtype=int)
    for h in range(7):
        for w in range(7):
            y0, y1, x0, x1 = cell_footprint(h, w, (7, 7), 30)
            covered[y0:y1, x0:x1] += 1
    assert (covered == 1).all()


def test_deletion_curves_start_at_one_and_meet_when_everything_is_deleted(tiny_run: Path) -> None:
    run = load_run(tiny_run)
    model = run.member("vgg")
    bundle = run.dataset()
    protos = run.prototypes("vgg").head(3)
    images = bundle.push.batch(protos["source_index"].tolist())
    curves = deletion_curves(
        model, images, torch.tensor(protos["prototype"].tolist()), steps=6, random_orders=2
    )
    assert curves.activation.shape == (3, 7)
    assert curves.random.shape == (3, 2, 7)
    with torch.no_grad():
        _, min_d = model(images)
    intact = torch.log((min_d + 1) / (min_d + 1e-4))[
        torch.arange(3), torch.tensor(protos["prototype"].tolist())
    ]
    np.testing.assert_allclose(curves.activation[:, 0], intact.numpy(), rtol=1e-4)
    # all pixels deleted: the same flat image whatever the order
    np.testing.assert_allclose(
        curves.random[:, :, -1], np.repeat(curves.activation[:, -1:], 2, axis=1), rtol=1e-5
    )
    act, _rnd = curves.normalised()
    np.testing.assert_allclose(act[:, 0], 1.0)
    assert trapezoid_auc(np.linspace(0, 1, 5), np.ones(5)) == pytest.approx(1.0)
    assert trapezoid_auc(np.linspace(0, 1, 3), np.array([1.0, 0.0, 0.0])) == pytest.approx(0.25)


def test_cli_writes_html_json_markdown_and_names_the_run(
    full_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "report",
                "--root",
                str(full_run.parent),
                "--html",
                "--markdown",
                "--json",
                "--deletion",
                "1",
                "--reasoning",
                "1",
                "--threads",
                "1",
            ]
        )
    out, err = capsys.readouterr()
    assert exc.value.code in (0, None)
    document = json.loads(out)
    assert f"using the most recent run: {full_run}" in err
    for kind in ("html", "json", "markdown"):
        path = Path(document["files"][kind]["path"])
        assert path.parent == full_run
        assert path.stat().st_size == document["files"][kind]["bytes"]
    assert "<!doctype html>" in (full_run / "report.html").read_text(encoding="utf-8")[:20]


def test_cli_bad_run_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["report", str(tmp_path / "nope")])
    _, err = capsys.readouterr()
    assert exc.value.code == 2
    assert re.search(r"error: run directory .*nope does not exist", err)
    assert not (tmp_path / "nope").exists()


def test_report_of_a_run_whose_dataset_changed_still_renders_with_a_note(
    tiny_run: Path, tmp_path: Path
) -> None:
    run_dir = copy_run(tiny_run, tmp_path)
    meta = json.loads((run_dir / "run.json").read_text())
    meta["dataset"]["fingerprint"] = "0" * 64
    (run_dir / "run.json").write_text(json.dumps(meta))
    report = build_report(load_run(run_dir), FAST)
    assert any("could not be rebuilt" in n for n in report.data["notes"])
    assert not report.data["confusion"]["available"]
    assert not report.data["faithfulness"]["available"]
    assert all(r["thumb"] is None for m in report.data["members"] for r in m["prototypes"])
    assert "could not be rebuilt" in render_html(report)


def test_report_of_a_really_pruned_run(tiny_run: Path, tmp_path: Path) -> None:
    """The files `protoaudit prune` and `global-analysis` write (not hand-made ones) reach the page, traced."""
    from protoaudit.engine.analysis import global_analysis
    from protoaudit.engine.prune import prune_run

    torch.set_num_threads(1)
    run_dir = copy_run(tiny_run, tmp_path)
    prune_run(load_run(run_dir))
    global_analysis(load_run(run_dir))
    report = build_report(load_run(run_dir), FAST)
    data = report.data
    assert data["purity"]["available"]
    assert data["audit"]["available"]
    assert data["duplicates"]["available"]
    assert data["accuracy"]["pruned_available"]
    pruned = pd.read_csv(run_dir / "purity.csv")
    shown = {(m["name"], r["prototype"]): r["pruned"] for m in data["members"] for r in m["prototypes"]}
    assert shown == {(r.member, r.prototype): bool(r.pruned) for r in pruned.itertuples()}
    assert {c["checkpoint"] for c in data["last_layer"]["checkpoints"]} == {
        "vgg",
        "resnet",
        "vgg-pruned",
        "resnet-pruned",
    }
    assert all(
        c["matches_accuracy_csv"] for c in data["confusion"]["checkpoints"] + data["confusion"]["models"]
    )
    # by default from the saved logits; --verify runs every checkpoint again, and both agree with accuracy.csv
    assert {c["source"] for c in data["confusion"]["checkpoints"]} == {"saved logits"}
    verified = build_report(load_run(run_dir), dataclasses.replace(FAST, verify=True)).data["confusion"]
    assert {c["source"] for c in verified["checkpoints"]} == {"checkpoint re-run"}
    assert [c["top1_recomputed"] for c in verified["checkpoints"]] == [
        c["top1_recomputed"] for c in data["confusion"]["checkpoints"]
    ]
    assert all(m["nearest_source"] == "nearest_train.csv" for m in data["members"])
    write_report(report, run_dir)
    html = (run_dir / "report.html").read_text(encoding="utf-8")
    assert untraced_numbers(html, json.loads((run_dir / "report.json").read_text(encoding="utf-8"))) == []


def test_open_hands_the_page_to_the_browser(
    full_run: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import webbrowser

    opened: list[str] = []
    monkeypatch.setattr(webbrowser, "open", lambda url, *a, **k: opened.append(url) or False)
    args = ["report", str(full_run), "--open", "--out", str(tmp_path), "--deletion", "0", "--reasoning", "0"]
    with pytest.raises(SystemExit) as exc:
        main(args)
    _, err = capsys.readouterr()
    assert exc.value.code in (0, None)
    assert opened == [(tmp_path / "report.html").resolve().as_uri()]
    assert "no browser could be opened" in err  # a machine without a browser is told, not failed
    data = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert data["faithfulness"]["note"] == "deletion curves: not asked for (--deletion 0)"
    assert data["reasoning"]["images"] == []


def test_accuracy_axis_is_fitted_to_the_values() -> None:
    from protoaudit.report.figures import accuracy_axis

    low, high = accuracy_axis([0.97, 0.985, 1.0])
    assert high == 1.0  # clipped at 100 %
    assert 0.95 <= low < 0.97  # not 0: a point of difference stays visible
    low, high = accuracy_axis([0.5, 0.5])
    assert (low, high) == (0.49, 0.51)  # equal values get a 1-point margin
