"""Deletion curves recorded at training (members/<m>/faithfulness.json): the file round-trips and holds what
deletion_curves computes, and the report reads it instead of running the members again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import protoaudit.report.faithfulness as report_faithfulness
from protoaudit.core.faithfulness import deletion_curves
from protoaudit.engine.faithfulness import DELETION_PROTOTYPES, member_faithfulness, record_faithfulness
from protoaudit.engine.run import FAITHFULNESS_FILE, load_faithfulness, load_run, save_faithfulness
from protoaudit.report import ReportOptions, build_report

from .report_helpers import copy_run

# no reasoning samples: the test counts the deletion passes only
OPTIONS = ReportOptions(reasoning_correct=0, reasoning_wrong=0, sheets=0)


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the report's calls of deletion_curves (each call: one member's sample)."""
    calls: list[int] = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return deletion_curves(*args, **kwargs)

    monkeypatch.setattr(report_faithfulness, "deletion_curves", counted)
    return calls


def test_training_records_the_curves_and_the_file_round_trips(tiny_run: Path, tmp_path: Path) -> None:
    run = load_run(tiny_run)
    for name in run.member_names:
        recorded = load_faithfulness(run.path, name)
        assert recorded is not None
        assert recorded["weights_sha256"] == run.member_meta(name)["weights_sha256"]
        assert len(recorded["prototypes"]) == min(DELETION_PROTOTYPES, run.member(name).n_prototypes)
    model = run.member("vgg")
    source_index = [int(i) for i in run.prototypes("vgg").sort_values("prototype")["source_index"]]
    document = member_faithfulness(model, run.dataset().push, source_index, [2, 0], steps=4, random_orders=3)
    member_dir = tmp_path / "members" / "vgg"
    member_dir.mkdir(parents=True)
    assert load_faithfulness(tmp_path, "vgg") is None
    save_faithfulness(member_dir, document)
    assert (member_dir / FAITHFULNESS_FILE).is_file()
    back = load_faithfulness(tmp_path, "vgg")
    assert back == document
    # the numbers are deletion_curves' on the prototypes' source images
    images = run.dataset().push.batch([source_index[2], source_index[0]])
    curves = deletion_curves(model, images, torch.tensor([2, 0]), steps=4, random_orders=3)
    assert [p["prototype"] for p in back["prototypes"]] == [2, 0]
    np.testing.assert_array_equal(
        np.asarray([p["activation"] for p in back["prototypes"]]), curves.activation
    )
    np.testing.assert_array_equal(np.asarray([p["random"] for p in back["prototypes"]]), curves.random)
    assert np.asarray(back["prototypes"][0]["random"]).shape == (3, 5)


def test_report_reads_recorded_curves_without_running_a_member(
    tiny_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _counting(monkeypatch)
    section = build_report(load_run(tiny_run), OPTIONS).data["faithfulness"]
    assert calls == []
    assert section["available"]
    assert section["sources"] == {name: "faithfulness.json" for name in load_run(tiny_run).member_names}
    assert section["summary"]["n"] == 2 * DELETION_PROTOTYPES
    assert all(p["score_intact"] > 0 for p in section["prototypes"])


def test_report_computes_the_curves_where_no_file_fits(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = copy_run(tiny_run, tmp_path)
    run = load_run(run_dir)
    first, second = run.member_names
    (run_dir / "members" / first / FAITHFULNESS_FILE).unlink()  # a run from before the file
    document = load_faithfulness(run_dir, second)
    assert document is not None
    save_faithfulness(run_dir / "members" / second, {**document, "weights_sha256": "0" * 64})  # other weights
    calls = _counting(monkeypatch)
    report = build_report(load_run(run_dir), OPTIONS).data
    assert len(calls) == 2
    assert report["faithfulness"]["sources"] == {
        first: "computed by the report",
        second: "computed by the report",
    }
    assert any("made by other weights" in note for note in report["notes"])
    # other settings than recorded (--deletion 3 --seed 1 on the CLI): computed too, in both members
    calls.clear()
    record_faithfulness(run_dir / "members" / second, run.member(second), run.dataset().push)
    build_report(load_run(run_dir), ReportOptions(reasoning_correct=0, reasoning_wrong=0, sheets=0, seed=1))
    assert len(calls) == 2


def test_report_computes_the_curves_of_a_damaged_file_and_says_so(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = copy_run(tiny_run, tmp_path)
    first = load_run(run_dir).member_names[0]
    document = load_faithfulness(run_dir, first)
    assert document is not None
    for entry in document["prototypes"]:
        del entry["activation"]  # the weights still match: only the curves are missing
    save_faithfulness(run_dir / "members" / first, document)
    calls = _counting(monkeypatch)
    report = build_report(load_run(run_dir), OPTIONS).data
    assert len(calls) == 1
    assert report["faithfulness"]["sources"][first] == "computed by the report"
    assert any("could not be read" in note for note in report["notes"])
