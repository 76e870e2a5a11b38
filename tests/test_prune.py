"""Pruning by k-NN class purity, the pruned checkpoints, and audit --fail-under, on a copy of the tiny run."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from protoaudit.cli import main
from protoaudit.core.knn import min_distances_by_image
from protoaudit.core.metrics import top1
from protoaudit.engine.prune import prune_run
from protoaudit.engine.run import load_run
from protoaudit.engine.train import predict
from tests.conftest import counted_searches


@pytest.fixture(scope="module")
def pruned_run(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    run_dir = tmp_path_factory.mktemp("prune") / "tiny"
    shutil.copytree(tiny_run, run_dir)
    before = {str(p.relative_to(run_dir)): _sha(p) for p in (run_dir / "members").rglob("*") if p.is_file()}
    prune_run(load_run(run_dir), k=6, threshold=3, finetune_epochs=0)
    return run_dir, before


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_unpruned_checkpoints_are_untouched(pruned_run: tuple[Path, dict[str, str]]) -> None:
    run_dir, before = pruned_run
    for rel, digest in before.items():
        assert _sha(run_dir / rel) == digest, rel
    assert (run_dir / "members" / "vgg-pruned" / "model.safetensors").is_file()


def test_purity_table_matches_a_brute_force_count(pruned_run: tuple[Path, dict[str, str]]) -> None:
    """Purity recomputed here from the member's own latents: the 6 nearest training images, each through its
    closest patch, over all classes."""
    run_dir, _ = pruned_run
    run = load_run(run_dir)
    bundle = run.dataset()
    purity = pd.read_csv(run_dir / "purity.csv")
    for name in ("vgg", "resnet"):
        model = run.member(name)
        with torch.no_grad():
            z = model.latent(bundle.push.batch(list(range(len(bundle.push)))))  # (N, D, H, W)
        per_image = z.flatten(2).transpose(1, 2)  # (N, HW, D)
        d = ((per_image[:, :, None, :] - model.prototype_vectors.detach()[None, None]) ** 2).sum(
            -1
        )  # (N, HW, m)
        nearest = d.amin(dim=1).t()  # (m, N): each image once, through its closest patch
        table = purity[purity["member"] == name].sort_values("prototype")
        for j, row in enumerate(table.itertuples()):
            order = torch.argsort(nearest[j])[:6].numpy()
            hand = int((bundle.push.labels[order] == model.config.prototype_class[j]).sum())
            assert row.purity == hand, (name, j)
            assert row.pruned == (hand < 3)
            assert [int(c) for c in str(row.nearest_classes).split(";")] == bundle.push.labels[order].tolist()


def test_pruning_removes_exactly_the_listed_prototypes(pruned_run: tuple[Path, dict[str, str]]) -> None:
    run_dir, _ = pruned_run
    run = load_run(run_dir)
    purity = pd.read_csv(run_dir / "purity.csv")
    for name in ("vgg", "resnet"):
        parent = run.member(name)
        pruned = run.member(f"{name}-pruned")
        listed = purity[(purity["member"] == name) & purity["pruned"]]["prototype"].tolist()
        kept = [j for j in range(parent.n_prototypes) if j not in listed]
        assert run.member_meta(f"{name}-pruned")["pruning"]["pruned_prototypes"] == listed
        assert pruned.n_prototypes == len(kept)
        torch.testing.assert_close(pruned.prototype_vectors, parent.prototype_vectors[kept])
        # with no fine-tuning the remaining last-layer columns are the parent's, unchanged
        torch.testing.assert_close(pruned.last_layer.weight, parent.last_layer.weight[:, kept])
        assert pruned.config.prototype_class == [parent.config.prototype_class[j] for j in kept]
        protos = run.prototypes(f"{name}-pruned")
        assert protos["parent_prototype"].tolist() == kept


def test_pruned_checkpoint_reloads_with_the_reported_accuracy(
    pruned_run: tuple[Path, dict[str, str]],
) -> None:
    run_dir, _ = pruned_run
    run = load_run(run_dir)
    bundle = run.dataset()
    acc = run.accuracy()
    logits = []
    for name in ("vgg", "resnet"):
        member_logits = predict(run.member(f"{name}-pruned"), bundle.test, 64, torch.device("cpu"))
        row = acc[(acc["model"] == name) & acc["pruned"]]
        assert len(row) == 1
        assert top1(member_logits, bundle.test.labels) == pytest.approx(float(row["top1"].iloc[0]), abs=1e-12)
        logits.append(member_logits)
    ens = acc[(acc["model"] == "ensemble") & acc["pruned"]]
    assert top1(logits[0] + logits[1], bundle.test.labels) == pytest.approx(
        float(ens["top1"].iloc[0]), abs=1e-12
    )
    assert len(acc[~acc["pruned"]]) == 3  # the rows before pruning are kept


def test_min_distances_by_image_equals_brute_force() -> None:
    gen = torch.Generator().manual_seed(0)
    vectors = torch.rand(11, 4, generator=gen)
    image_index = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0, 1, 2, 2])
    prototypes = torch.rand(3, 4, generator=gen)
    got = min_distances_by_image(vectors, image_index, 3, prototypes, chunk=4)
    for i in range(3):
        for j in range(3):
            expected = ((vectors[image_index == i] - prototypes[j]) ** 2).sum(1).min()
            assert float(got[i, j]) == pytest.approx(float(expected), abs=1e-6)


def test_audit_fail_under_exit_codes(
    pruned_run: tuple[Path, dict[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir, _ = pruned_run
    value = json.loads((run_dir / "audit.json").read_text())["members"]["vgg"]["mean_purity"]
    for threshold, expected in ((value, 0), (value + 1e-6, 3), (value - 0.5, 0)):
        with pytest.raises(SystemExit) as exc:
            main(["audit", str(run_dir), "--fail-under", f"vgg.mean_purity={threshold!r}"])
        assert (exc.value.code or 0) == expected, threshold
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["audit", str(run_dir), "--fail-under", "no.such_metric=1"])
    assert exc.value.code == 2
    assert "unknown metric 'no.such_metric'" in capsys.readouterr().err


def test_ground_truth_audit_is_recorded(pruned_run: tuple[Path, dict[str, str]]) -> None:
    run_dir, _ = pruned_run
    audit = json.loads((run_dir / "audit.json").read_text())
    purity = pd.read_csv(run_dir / "purity.csv")
    assert set(purity["source_part_kind"]) <= {"background", "shared", "discriminative"}
    for name in ("vgg", "resnet"):
        member = audit["members"][name]
        t = purity[purity["member"] == name]
        bad = t["source_part_kind"].isin(["background", "shared"])
        hit = int((bad & t["pruned"]).sum())
        if t["pruned"].any():
            assert member["pruning_precision"] == pytest.approx(hit / int(t["pruned"].sum()))
        if bad.any():
            assert member["pruning_recall"] == pytest.approx(hit / int(bad.sum()))
        assert 0.0 <= member["consistency"] <= 1.0
        assert 0.0 <= member["stability"] <= 1.0
        assert member["n_pruned"] == int(t["pruned"].sum())
    assert np.isfinite(audit["ensemble"]["top1_pruned"])


def test_one_search_serves_every_k(pruned_run: tuple[Path, dict[str, str]]) -> None:
    """The k nearest images of a smaller k are the first columns of a larger k's search, and prune's
    nearest_train.csv and purity.csv come from that one search."""
    from protoaudit.engine.index.search import load_index, nearest_images

    run_dir, _ = pruned_run
    run = load_run(run_dir)
    index = load_index(run, "vgg", "train")
    prototypes = run.member("vgg").prototype_vectors
    wide = nearest_images(index, prototypes, 10)
    narrow = nearest_images(index, prototypes, 6)
    np.testing.assert_array_equal(wide.first(6).rows, narrow.rows)
    np.testing.assert_array_equal(wide.first(6).distances, narrow.distances)
    written = pd.read_csv(run_dir / "members" / "vgg" / "nearest_train.csv")
    assert written.groupby("prototype")["rank"].max().min() == 10
    purity = pd.read_csv(run_dir / "purity.csv")
    vgg = purity[purity["member"] == "vgg"].set_index("prototype")
    own = np.asarray(run.member("vgg").config.prototype_class)
    first6 = written[written["rank"] <= 6]
    counted = (first6["label"].to_numpy() == own[first6["prototype"].to_numpy()]).reshape(-1, 6).sum(1)
    np.testing.assert_array_equal(vgg["purity"].to_numpy(), counted)
    with pytest.raises(ValueError, match="asked for 11"):
        wide.first(11)


def test_audit_table_off_a_terminal_reads_cleanly(
    pruned_run: tuple[Path, dict[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir, _ = pruned_run
    audit = json.loads((run_dir / "audit.json").read_text())
    with pytest.raises(SystemExit) as exc:
        main(["audit", str(run_dir), "--fail-under", "pruning_precision=0"])
    assert (exc.value.code or 0) == 0
    out, err = capsys.readouterr()
    assert f"audit — {run_dir}" in err  # the title on stderr, the table alone on stdout
    lines = out.splitlines()
    assert lines[0].split("\t") == ["metric", "value", "fail_under", "ok"]
    rows = {line.split("\t")[0]: line.split("\t") for line in lines[1:]}
    assert all(len(r) == 4 for r in rows.values())
    assert "None" not in out
    assert "nan" not in out
    assert rows["vgg.n_prototypes"][1] == str(audit["members"]["vgg"]["n_prototypes"])  # a count, not 12.0000
    assert rows["pruning_precision"][2] == "0"
    assert rows["vgg.mean_purity"][2] == ""
    assert float(rows["vgg.mean_purity"][1]) == audit["members"]["vgg"]["mean_purity"]  # in full


def test_prune_says_an_older_report_is_stale(
    pruned_run: tuple[Path, dict[str, str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "tiny"
    shutil.copytree(pruned_run[0], run_dir)
    (run_dir / "report.html").write_text("<!doctype html>")
    with pytest.raises(SystemExit) as exc:
        main(["prune", str(run_dir), "--finetune-epochs", "0"])
    assert (exc.value.code or 0) == 0
    err = capsys.readouterr().err
    assert f"{run_dir / 'report.html'} predates this pruning and is stale" in err
    assert f"protoaudit report {run_dir} --html" in err


def test_prune_searches_each_members_training_index_once(tiny_run: Path, tmp_path: Path) -> None:
    """One nearest-images search per member serves purity, the ground-truth audit and nearest_train.csv."""
    run_dir = tmp_path / "tiny"
    shutil.copytree(tiny_run, run_dir)
    with counted_searches() as searched:
        prune_run(load_run(run_dir), k=6, threshold=3, finetune_epochs=0)
    n = len(load_run(run_dir).member_names)
    # the training index once (max(k, PIP-Net's top 10)), keeping every image's distances for the audit and
    # the last-layer retune; the test index not at all: the detectors' test distances and nearest_test.csv come
    # from the distances the members' test pass saved
    assert sorted(searched) == sorted([("train", 10, True)] * n)


@pytest.mark.parametrize("saved", ["removed", "tampered", "damaged"])
def test_prune_searches_the_test_index_where_no_sound_test_distances_are_saved(
    tiny_run: Path, tmp_path: Path, saved: str
) -> None:
    """Without the saved test distances, or with a file that no longer gives the saved logits, prune searches
    the test index instead — and nearest_test.csv is the one the saved distances give, up to float rounding
    (the forward pass and the index's products sum in different orders)."""
    import io

    from rich.console import Console

    from protoaudit.engine.io import load_tensors, save_tensors, tensor_file_metadata
    from protoaudit.engine.progress import Reporter
    from protoaudit.engine.run import TEST_DISTANCES_FILE

    reference = tmp_path / "reference"
    shutil.copytree(tiny_run, reference)
    prune_run(load_run(reference), k=6, threshold=3, finetune_epochs=0)
    run_dir = tmp_path / "tiny"
    shutil.copytree(tiny_run, run_dir)
    names = load_run(run_dir).member_names
    for name in names:
        path = run_dir / "members" / name / TEST_DISTANCES_FILE
        if saved == "removed":
            path.unlink()
        elif saved == "damaged":  # not safetensors any more
            path.write_bytes(b"\x00" * 64)
        else:  # one distance changed, the file otherwise intact (its weights digest still right)
            tensors = load_tensors(path)
            tensors["min_distances"][0, 0] += 5.0
            save_tensors(path, tensors, tensor_file_metadata(path))
    log = io.StringIO()
    reporter = Reporter(Console(file=log, width=1000), bars=False)
    with counted_searches() as searched:
        prune_run(load_run(run_dir), k=6, threshold=3, finetune_epochs=0, reporter=reporter)
    assert sorted(split for split, _, _ in searched) == sorted(["train"] * len(names) + ["test"] * len(names))
    logged = log.getvalue().splitlines()
    warned = [m for m in logged if TEST_DISTANCES_FILE in m]
    assert len(warned) == (0 if saved == "removed" else len(names))
    for name in names:
        a = pd.read_csv(reference / "members" / name / "nearest_test.csv")
        b = pd.read_csv(run_dir / "members" / name / "nearest_test.csv")
        assert a[["prototype", "rank", "image_index", "h", "w"]].equals(
            b[["prototype", "rank", "image_index", "h", "w"]]
        )
        np.testing.assert_allclose(a["distance"], b["distance"], rtol=1e-5, atol=1e-5)
