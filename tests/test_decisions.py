"""A reviewer's --remove / --keep decisions: logged, applied with the last-layer retune, shown in the report."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from protoaudit.cli import main
from protoaudit.engine.decisions import DECISIONS_FILE, apply_decisions, parse_selection
from protoaudit.engine.run import load_run
from protoaudit.errors import InputError


def _prune(run_dir: Path, *args: str) -> int:
    with pytest.raises(SystemExit) as exc:
        main(["prune", str(run_dir), "--finetune-epochs", "0", "--json", *args])
    return int(exc.value.code or 0)


@pytest.fixture
def run_copy(tiny_run: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "tiny"
    shutil.copytree(tiny_run, run_dir)
    return run_dir


def test_remove_is_logged_applied_and_survives_a_report_round_trip(
    run_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _prune(run_copy, "--remove", "vgg:1,2", "--reason", "both sit on the background") == 0
    capsys.readouterr()
    lines = (run_copy / DECISIONS_FILE).read_text().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    weights = (run_copy / "members" / "vgg" / "model.safetensors").read_bytes()
    assert record["member"] == "vgg"
    assert record["action"] == "remove"
    assert record["prototypes"] == [1, 2]
    assert record["reason"] == "both sit on the background"
    assert record["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    assert record["time"]

    run = load_run(run_copy)
    purity = pd.read_csv(run_copy / "purity.csv")
    vgg = purity[purity["member"] == "vgg"].set_index("prototype")
    assert vgg.loc[[1, 2], "pruned"].astype(bool).tolist() == [True, True]
    assert vgg.loc[1, "decision"] == "removed by reviewer"
    parents = run.member_meta("vgg-pruned")["pruning"]["pruned_prototypes"]
    assert {1, 2} <= set(parents)
    kept_parents = run.prototypes("vgg-pruned")["parent_prototype"].tolist()
    assert 1 not in kept_parents
    assert 2 not in kept_parents

    # a later --keep is appended; the first line stays byte for byte, and prototype 1 comes back
    assert _prune(run_copy, "--keep", "vgg:1", "--reason", "the red disc: checked by hand") == 0
    capsys.readouterr()
    lines2 = (run_copy / DECISIONS_FILE).read_text().splitlines()
    assert lines2[0] == lines[0]
    assert json.loads(lines2[1])["action"] == "keep"
    kept_parents = load_run(run_copy).prototypes("vgg-pruned")["parent_prototype"].tolist()
    assert 1 in kept_parents
    assert 2 not in kept_parents

    # every detector's pooled scores are audit keys for --fail-under
    from protoaudit.engine.audit_file import flat_metrics

    audit = json.loads((run_copy / "audit.json").read_text())
    metrics = flat_metrics(audit)
    assert any(key.startswith("detector.knn_purity.") for key in metrics)
    for name, scores in audit["detectors"]["pooled"].items():
        if scores["precision"] is not None:
            assert metrics[f"detector.{name}.precision"] == scores["precision"]

    from protoaudit.report import build_report

    report = build_report(load_run(run_copy))
    section = json.loads(json.dumps(report.data))["detectors"]
    assert section["available"]
    log = section["decisions"]["log"]
    assert [(r["member"], r["action"], r["prototypes"], r["reason"]) for r in log] == [
        ("vgg", "remove", "1, 2", "both sit on the background"),
        ("vgg", "keep", "1", "the red disc: checked by hand"),
    ]
    from protoaudit.report.render import render_html

    html = render_html(report)
    assert "both sit on the background" in html
    assert 'id="decisions"' in html


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--remove", "vgg:1"], "need --reason"),
        (["--remove", "vgg:99", "--reason", "x"], "has prototypes 0..11, not 99"),
        (["--remove", "nobody:1", "--reason", "x"], "no ProtoPNet member 'nobody'"),
        (["--remove", "vgg:a", "--reason", "x"], "'a' is not a prototype number"),
        (["--remove", "vgg:1", "--keep", "vgg:1", "--reason", "x"], "both in --remove and in --keep"),
        (["--detector", "shift_sensitivity"], "no test_shifted split"),
        (["--detector", "magic"], "expected one of knn_purity"),
    ],
)
def test_bad_decisions_stop_with_exit_2_and_write_nothing(
    run_copy: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _prune(run_copy, *args) == 2
    assert message in capsys.readouterr().err
    assert not (run_copy / DECISIONS_FILE).exists()
    assert not (run_copy / "purity.csv").exists()
    assert not (run_copy / "members" / "vgg-pruned").exists()


def test_a_decision_for_other_weights_is_stale_and_not_applied() -> None:
    records = [
        {"member": "vgg", "action": "remove", "prototypes": [0], "weights_sha256": "old"},
        {"member": "vgg", "action": "remove", "prototypes": [2], "weights_sha256": "now"},
        {"member": "resnet", "action": "remove", "prototypes": [1], "weights_sha256": "now"},
        {"member": "vgg", "action": "keep", "prototypes": [3], "weights_sha256": "now"},
    ]
    pruned, notes, stale = apply_decisions([False, False, False, True], "vgg", records, "now")
    assert pruned.tolist() == [False, False, True, False]
    assert notes == ["", "", "removed by reviewer", "kept by reviewer"]
    assert stale == [records[0]]
    assert parse_selection("vgg: 3, 1,3", "--remove") == ("vgg", [3, 1])
    with pytest.raises(InputError, match="expected MEMBER:PROTOTYPE"):
        parse_selection("vgg", "--remove")
