"""torchrun with 2 gloo ranks on the CPU against a single process.

Stated tolerance: push and the gathered evaluation are exact (the same prototypes, source patches and logits);
one epoch of joint SGD on frozen batch-norm statistics matches to 1e-5 (the ranks' gradients are averaged in
another summation order). With batch statistics, each rank normalises its own share of a batch (SyncBatchNorm
needs CUDA), so whole training runs agree only statistically; the end-to-end test checks what must hold anyway.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from protoaudit.engine.io import load_tensors

from .conftest import ROOT, TINY_RECIPE
from .ddp_common import run_steps

pytestmark = pytest.mark.slow  # spawns torchrun processes


def _torchrun(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free port on this machine
        "--nproc-per-node",
        "2",
        *args,
    ]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_two_ranks_match_one_process(tmp_path: Path) -> None:
    out = tmp_path / "ddp.safetensors"
    proc = _torchrun([str(ROOT / "tests" / "ddp_check.py"), str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = load_tensors(out)
    single = run_steps()
    for key in ("push_image_index", "push_h", "push_w"):
        assert torch.equal(ddp[key], single[key]), key
    torch.testing.assert_close(ddp["pushed_prototypes"], single["pushed_prototypes"], rtol=0, atol=1e-6)
    torch.testing.assert_close(ddp["test_logits"], single["test_logits"], rtol=0, atol=1e-5)
    moved = 0
    for key, value in single.items():
        if key.startswith("after_sgd."):
            torch.testing.assert_close(ddp[key], value, rtol=0, atol=1e-5, msg=key)
            moved += 1
    assert moved > 10


def test_torchrun_train_ensemble_writes_one_run(tmp_path: Path) -> None:
    proc = _torchrun(
        ["-m", "protoaudit", "train-ensemble", str(TINY_RECIPE), "--out", str(tmp_path / "runs")], tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("model\tkind\t") == 1, "only rank 0 prints (the accuracy table, once)"
    run_dir = tmp_path / "runs" / "tiny"
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["status"] == "complete"
    assert not list(run_dir.rglob("*.tmp"))
    assert not list(run_dir.rglob("checkpoint"))
    from protoaudit.core.metrics import top1
    from protoaudit.engine.run import load_run
    from protoaudit.engine.train import predict

    run = load_run(run_dir)
    bundle = run.dataset()
    acc = run.accuracy().set_index("model")
    for name in ("vgg", "resnet"):
        model = run.member(name)
        logits = predict(model, bundle.test, 64, torch.device("cpu"))
        assert top1(logits, bundle.test.labels) == pytest.approx(acc.loc[name, "top1"], abs=1e-12)
        table = run.prototypes(name)
        with torch.no_grad():
            z = model.latent(bundle.push.batch(table["source_index"].tolist()))
        for row in table.itertuples():  # push gathered across ranks: each prototype is its named patch
            torch.testing.assert_close(
                model.prototype_vectors[row.prototype].detach(),
                z[row.Index, :, row.h, row.w],
                rtol=0,
                atol=1e-6,
            )
            assert row.label == model.config.prototype_class[row.prototype]
