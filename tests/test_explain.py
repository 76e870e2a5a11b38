"""Reasoning sheets: points add up to the members' logits and the ensemble's; PNG and escaped HTML."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from protoaudit.core.model import similarity
from protoaudit.engine.explain import explain_image
from protoaudit.engine.run import load_run
from protoaudit.report.sheet import render_sheet_html, render_sheet_png, sheet_basename

from .conftest import run_cli


@pytest.fixture(scope="module")
def sheet_and_run(tiny_run: Path) -> tuple:
    run = load_run(tiny_run)
    bundle = run.dataset()
    image_id = bundle.test.image_ids[5]
    return explain_image(run, image_id, top_classes=3, bundle=bundle), run, bundle


def test_points_add_up_to_the_logits(sheet_and_run: tuple) -> None:
    sheet, run, bundle = sheet_and_run
    x = bundle.test.batch([5])
    assert sheet.label == int(bundle.test.labels[5])
    assert len(sheet.classes) == 3
    ensemble = torch.zeros(bundle.n_classes)
    for name in ("vgg", "resnet"):
        model = run.member(name)
        with torch.no_grad():
            logits, min_distances = model(x)
        ensemble += logits[0]
        np.testing.assert_allclose(sheet.member_logits[name], logits[0].numpy(), atol=1e-4)
        for cls in sheet.classes:
            member = next(m for m in cls.members if m.member == name)
            assert member.points == pytest.approx(float(logits[0, cls.class_index]), abs=1e-4)
            assert sum(r.points for r in member.prototypes) + member.other_points == pytest.approx(
                member.points
            )
            own = [j for j, k in enumerate(model.config.prototype_class) if k == cls.class_index]
            assert sorted(r.prototype for r in member.prototypes) == own
            points = [r.points for r in member.prototypes]
            assert points == sorted(points, reverse=True)
            for row in member.prototypes:
                assert row.distance == pytest.approx(float(min_distances[0, row.prototype]), abs=1e-5)
                assert row.similarity == pytest.approx(
                    float(similarity(min_distances[0, row.prototype])), abs=1e-4
                )
                assert row.weight == pytest.approx(
                    float(model.last_layer.weight.detach()[cls.class_index, row.prototype])
                )
                assert row.points == pytest.approx(row.similarity * row.weight)
                assert row.activation.shape == (4, 4)
                assert row.activation[row.h, row.w] == pytest.approx(row.activation.max())
                y0, y1, x0, x1 = row.box
                assert 0 <= y0 < y1 <= 32
                assert 0 <= x0 < x1 <= 32
                assert row.cell == (row.h * 8, row.h * 8 + 8, row.w * 8, row.w * 8 + 8)
                assert row.source_image == run.prototypes(name).iloc[row.prototype]["source_image"]
    for cls in sheet.classes:
        assert cls.points == pytest.approx(float(ensemble[cls.class_index]), abs=1e-4)
        assert cls.points == pytest.approx(sum(m.points for m in cls.members))
    assert [c.class_index for c in sheet.classes] == torch.argsort(ensemble, descending=True).tolist()[:3]
    assert sheet.predicted == int(ensemble.argmax())
    document = json.loads(json.dumps(sheet.to_dict()))
    assert document["classes"][0]["members"][0]["prototypes"][0]["points"] == pytest.approx(
        sheet.classes[0].members[0].prototypes[0].points
    )


def test_png_sheet(sheet_and_run: tuple, tmp_path: Path) -> None:
    from PIL import Image

    sheet, _, _ = sheet_and_run
    path = render_sheet_png(sheet, tmp_path / "sheets" / "one.png", max_prototypes=2)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        width, height = img.size
        pixels = np.asarray(img.convert("RGB"))
    assert width > 600
    assert height > 1000  # 3 classes × 2 members × 2 rows of thumbnails
    assert pixels.std() > 20  # not blank
    assert [p.name for p in path.parent.iterdir()] == ["one.png"]  # no temporary file left


def test_html_fragment_is_escaped_and_self_contained(sheet_and_run: tuple) -> None:
    sheet, _, _ = sheet_and_run
    html = render_sheet_html(sheet, max_prototypes=2)
    assert html.startswith('<section class="protoaudit-sheet">')
    # the image, then 4 thumbnails per shown row: 3 classes × 2 members × 2 rows
    assert html.count('src="data:image/png;base64,') == 1 + 4 * 3 * 2 * 2
    assert "http" not in html
    evil = "<script>alert(1)</script>"
    sheet.classes[0].class_name = evil
    sheet.image_id = 'x"&<b>'
    sheet.class_names = [evil] * len(sheet.class_names)
    html = render_sheet_html(sheet, max_prototypes=1)
    assert evil not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert 'x"&<b>' not in html


def test_sheet_basename() -> None:
    assert sheet_basename("test/000012") == "test_000012"
    assert sheet_basename("../../etc/passwd") == "etc_passwd"
    assert sheet_basename("///") == "image"
    assert sheet_basename("crop.jpg") == "crop"  # a file's own extension does not stay in the sheet's name
    assert sheet_basename("Bird.JPEG") == "Bird"


def test_explain_command(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    bundle = load_run(tiny_run).dataset()
    pixels = (bundle.test.batch([0])[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    Image.fromarray(pixels).resize((100, 100)).save(tmp_path / "query.jpg")
    code, out, _ = run_cli(
        ["explain", str(tiny_run), str(tmp_path / "query.jpg"), "--out", str(tmp_path / "o"), "--json"],
        capsys,
    )
    assert code == 0
    document = json.loads(out)
    assert document["label"] is None
    assert document["image_id"] == "query.jpg"
    assert Path(document["png"]).is_file()
    page = Path(document["html"]).read_text()
    assert page.count("<section") == 1
    assert page.startswith("<!doctype html>")
    assert "<style>" in page
    assert "Content-Security-Policy" in page
    assert Path(document["png"]).name == "query.png"
    assert Path(document["html"]).name == "query.html"
    assert "as trained, before pruning" in page
    code, out, err = run_cli(["explain", str(tiny_run), str(tmp_path / "missing.png")], capsys)
    assert code == 2
    assert "neither a file nor an image id" in err
    assert out == ""
    code, _, err = run_cli(["explain", str(tiny_run), "a", "b"], capsys)
    assert code == 2
    assert "expected [RUN] IMAGE" in err
