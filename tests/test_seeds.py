"""``train-ensemble --seeds``: one complete run per seed on the same data, and the mean ± std table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binom

from protoaudit.engine.recipe import RecipeError, load_recipe
from protoaudit.engine.run import load_logits, load_run
from protoaudit.engine.seeds import summarise

from .conftest import TINY_RECIPE, run_cli

FAST = ["--set", "schedule.epochs=2", "--set", "schedule.push_start=2", "--threads", "1", "-q"]


@pytest.fixture(scope="module")
def seeds_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from protoaudit.cli import main

    out = tmp_path_factory.mktemp("seeds")
    with pytest.raises(SystemExit) as exc:
        main(["train-ensemble", str(TINY_RECIPE), "--seeds", "3,5", "--out", str(out), *FAST])
    assert exc.value.code in (0, None)
    return out / "tiny"


def test_one_run_per_seed_on_the_same_data(seeds_root: Path) -> None:
    runs = {s: seeds_root / f"tiny-seed{s}" for s in (3, 5)}
    documents = {s: json.loads((p / "run.json").read_text()) for s, p in runs.items()}
    assert {s: d["seed"] for s, d in documents.items()} == {3: 3, 5: 5}
    assert all(d["status"] == "complete" for d in documents.values())
    # the same images on every seed: the spread is the training's
    assert documents[3]["dataset"]["fingerprint"] == documents[5]["dataset"]["fingerprint"]
    # each is an ordinary run: its recipe names one seed and no list
    recipe = load_recipe(runs[5] / "recipe.toml")
    assert recipe.seed == 5
    assert recipe.seeds is None
    assert load_run(runs[3]).member_names == ["vgg", "resnet"]
    # and the seeds trained differently
    w3 = load_logits(runs[3], "vgg")
    w5 = load_logits(runs[5], "vgg")
    assert w3 is not None
    assert w5 is not None
    assert not np.array_equal(w3["test"].numpy(), w5["test"].numpy())


def test_summary_is_the_mean_and_sample_std_of_each_runs_accuracy(seeds_root: Path) -> None:
    summary = pd.read_csv(seeds_root / "seeds_summary.csv")
    per_seed = pd.read_csv(seeds_root / "seeds.csv")
    assert set(per_seed["seed"]) == {3, 5}
    for model in ("vgg", "resnet", "ensemble"):
        values = [
            float(
                pd.read_csv(seeds_root / f"tiny-seed{s}" / "accuracy.csv")
                .set_index("model")
                .loc[model, "top1"]
            )
            for s in (3, 5)
        ]
        row = summary.set_index("model").loc[model]
        assert row["n_seeds"] == 2
        assert row["top1_mean"] == pytest.approx(np.mean(values))
        assert row["top1_std"] == pytest.approx(abs(values[0] - values[1]) / np.sqrt(2))  # n − 1 = 1
        assert row["top1_min"] == pytest.approx(min(values))


def test_mcnemar_per_seed_is_the_exact_test_on_the_saved_logits(seeds_root: Path) -> None:
    document = json.loads((seeds_root / "seeds.json").read_text())
    tests = {t["seed"]: t for t in document["mcnemar_ensemble_vs_best_member"]}
    assert set(tests) == {3, 5}
    for seed, test in tests.items():
        run = seeds_root / f"tiny-seed{seed}"
        saved = {m: load_logits(run, m) for m in ("vgg", "resnet")}
        labels = saved["vgg"]["labels.test"].numpy()  # type: ignore[index]
        right = {m: v["test"].numpy().argmax(1) == labels for m, v in saved.items()}  # type: ignore[index]
        ensemble = (saved["vgg"]["test"] + saved["resnet"]["test"]).numpy().argmax(1) == labels  # type: ignore[index]
        best = test["best_member"]
        b = int((right[best] & ~ensemble).sum())
        c = int((~right[best] & ensemble).sum())
        assert (test["a_only"], test["b_only"]) == (b, c)
        expected = 1.0 if b + c == 0 else min(1.0, 2 * binom.cdf(min(b, c), b + c, 0.5))
        assert test["p_value"] == pytest.approx(expected)


def test_std_of_one_seed_is_undefined_not_zero() -> None:
    one = pd.DataFrame([{"seed": 0, "model": "vgg", "kind": "member", "backbone": "b", "top1": 0.5}])
    assert np.isnan(summarise(one)["top1_std"].iloc[0])


def test_bad_seeds_are_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(
        ["train-ensemble", str(TINY_RECIPE), "--seeds", "0,x", "--out", str(tmp_path), "-q"], capsys
    )
    assert code == 2
    assert "--seeds" in err
    assert len(err.strip().splitlines()) == 1
    assert out == ""
    with pytest.raises(RecipeError, match="distinct"):
        load_recipe(TINY_RECIPE, overrides=["seeds=[1, 1]"])
    assert not any(tmp_path.iterdir())


def test_a_single_seed_run_in_the_way_is_refused(tiny_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = sorted(p.name for p in tiny_run.iterdir())
    code, _, err = run_cli(
        ["train-ensemble", str(TINY_RECIPE), "--seeds", "0,1", "--out", str(tiny_run.parent), "-q"], capsys
    )
    assert code == 2
    assert "single-seed run" in err
    assert sorted(p.name for p in tiny_run.iterdir()) == before
