"""The sparse last layer in training and pruning, and the audit sections compactness, uncertainty,
calibration and push_effect of a real (tiny) run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from protoaudit.core.lastlayer import l1_residual
from protoaudit.core.model import similarity
from protoaudit.core.stats import bootstrap_interval, mcnemar_exact
from protoaudit.engine.data import build_dataset
from protoaudit.engine.recipe import load_recipe
from protoaudit.engine.run import load_run
from protoaudit.engine.train import _min_distances_pass, train_member

from .conftest import TINY_RECIPE


def _trained(solver: str, *overrides: str) -> tuple:
    recipe = load_recipe(TINY_RECIPE, overrides=[f"schedule.last_layer_solver={solver}", *overrides])
    bundle = build_dataset(recipe.data, recipe.seed)
    trained = train_member(recipe.members[0], recipe, bundle, torch.device("cpu"), seed=0)
    return recipe, bundle, trained


@pytest.mark.parametrize("solver", ["fista", "fista_each_push"])
def test_training_last_layer_is_the_convex_optimum_with_exact_zeros(solver: str) -> None:
    recipe, bundle, trained = _trained(
        solver, "schedule.last_layer_tol=1e-4", "schedule.last_layer_max_iter=5000", "loss.l1=0.05"
    )
    model = trained.model
    last = [h for h in trained.history if h["stage"] == "last_layer"]
    final = [h for h in trained.history if h["stage"] == "last_layer_final"]
    assert last
    if solver == "fista":  # the original's Adam after each push, one convex solve of the selected layer
        assert all(h["solver"] == "adam" for h in last)
        assert len(final) == 1
        assert final[0]["solver"] == "fista"
        assert final[0]["converged"]
        assert final[0]["epoch"] == trained.selected_epoch
        assert trained.dense_last_layer is not None
        off = (1 - model.class_identity().t()).bool()
        assert (trained.dense_last_layer[off] == 0).sum() == 0  # the Adam layer it replaced had no zero
    else:
        assert all(h["solver"] == "fista" for h in last)
        assert all(h["converged"] for h in last)
        assert not final
        assert trained.dense_last_layer is None
    # the selected state's h satisfies the L1 optimality conditions on the push split's similarities
    sims = similarity(_min_distances_pass(model, bundle.push, 16, torch.device("cpu"))).double()
    labels = torch.as_tensor(np.asarray(bundle.push.labels))
    w = model.last_layer.weight.detach().double().clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(sims @ w.t(), labels).backward()
    assert w.grad is not None
    off = (1 - model.class_identity().t()).bool()
    residual = l1_residual(w.detach(), w.grad, off, recipe.loss.l1)
    assert float(residual.max()) <= 10 * recipe.schedule.last_layer_tol  # float32 weights, recomputed latents
    weight = model.last_layer.weight.detach()
    # exact zeros, not small values (λ = 0.05: on this weakly trained member λ = 1e-4 keeps every off-class
    # connection, which the optimality check above accepts as the optimum)
    assert (weight[off] == 0).float().mean() >= 0.5


def test_final_solve_adds_augmented_views_and_leaves_the_sgd_epochs_alone() -> None:
    from protoaudit.engine.data import iter_batches
    from protoaudit.engine.train import views_generator_for

    common = (
        "data.augment=true",
        "loss.l1=0.05",
        "schedule.last_layer_tol=1e-4",
        "schedule.last_layer_max_iter=5000",
    )
    _, _, plain = _trained("fista", *common, "schedule.last_layer_views=0")
    recipe, bundle, viewed = _trained("fista", *common, "schedule.last_layer_views=2")
    final = next(h for h in viewed.history if h["stage"] == "last_layer_final")
    assert final["views"] == 2
    assert final["n_examples"] == len(bundle.push) + 2 * len(bundle.train)
    assert final["converged"]
    # the views come from a stream of their own: the SGD epochs and the Adam layer they end with are unchanged
    assert plain.dense_last_layer is not None
    assert viewed.dense_last_layer is not None
    assert torch.equal(plain.dense_last_layer, viewed.dense_last_layer)
    assert not torch.equal(plain.model.last_layer.weight, viewed.model.last_layer.weight)
    # the solved layer is the optimum on the push split followed by two augmented passes, recomputed here
    model, cpu, size = viewed.model, torch.device("cpu"), recipe.schedule.eval_batch_size
    parts = [_min_distances_pass(model, bundle.push, size, cpu)]
    generator = views_generator_for(0)
    with torch.no_grad():
        for _ in range(2):
            batches = iter_batches(bundle.train, torch.arange(len(bundle.train)), size, 0, False, generator)
            parts.append(torch.cat([model(x)[1] for _, x in batches]))
    assert not torch.equal(parts[1], parts[2])  # two different draws, not the same images twice
    sims = similarity(torch.cat(parts)).double()
    labels = torch.as_tensor(
        np.concatenate([np.asarray(bundle.push.labels)] + 2 * [np.asarray(bundle.train.labels)])
    )
    off = (1 - model.class_identity().t()).bool()

    def residual(s: torch.Tensor, y: torch.Tensor) -> float:
        w = model.last_layer.weight.detach().double().clone().requires_grad_(True)
        torch.nn.functional.cross_entropy(s @ w.t(), y).backward()
        assert w.grad is not None
        return float(l1_residual(w.detach(), w.grad, off, recipe.loss.l1).max())

    assert residual(sims, labels) <= 10 * recipe.schedule.last_layer_tol
    n_push = len(bundle.push)
    assert (
        residual(sims[:n_push], labels[:n_push]) > 10 * recipe.schedule.last_layer_tol
    )  # the views mattered


def test_views_default_to_one_where_the_recipe_augments_and_the_final_solve_runs() -> None:
    def views(*overrides: str) -> int:
        return load_recipe(TINY_RECIPE, overrides=list(overrides)).final_solve_views()

    assert views("data.augment=true") == 1  # as the original, whose stage 3 sees augmented images
    assert views("data.augment=false") == 0
    assert views("data.augment=true", "schedule.last_layer_solver=adam") == 0  # no final solve to add them to
    assert views("data.augment=true", "schedule.last_layer_views=3") == 3


def test_views_without_augmentation_or_without_the_final_solve_are_refused() -> None:
    from protoaudit.engine.recipe import RecipeError

    with pytest.raises(RecipeError, match=r"last_layer_views = 1 needs data\.augment"):
        load_recipe(TINY_RECIPE, overrides=["data.augment=false", "schedule.last_layer_views=1"])
    with pytest.raises(RecipeError, match=r"last_layer_views = 2 needs last_layer_solver = \"fista\""):
        load_recipe(
            TINY_RECIPE,
            overrides=["data.augment=true", "schedule.last_layer_views=2", "schedule.last_layer_solver=adam"],
        )


def test_adam_solver_keeps_the_original_schedule() -> None:
    _, _, trained = _trained("adam")
    last = [h for h in trained.history if h["stage"] == "last_layer"]
    assert all(h["solver"] == "adam" for h in last)
    off = (1 - trained.model.class_identity().t()).bool()
    assert (trained.model.last_layer.weight.detach()[off] == 0).sum() == 0  # Adam leaves no exact zero


def test_push_effect_is_recorded_per_push_on_val_test_and_push() -> None:
    _, bundle, trained = _trained("fista")
    last = [h for h in trained.history if h["stage"] == "last_layer"]
    for h in last:
        effect = h["push_effect"]
        assert set(effect) == {"val", "test", "push"}
        assert effect["test"]["push"]["n"] == len(bundle.test)
        assert 0.0 <= effect["val"]["push"]["changed"] <= 1.0
        # val top-1 after stage 4, from the kept latents, is the number model selection used
        assert effect["val"]["push_and_last_layer"]["top1_after"] == pytest.approx(h["val_top1"])


@pytest.fixture(scope="module")
def pruned_run(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import shutil

    from protoaudit.engine.prune import prune_run

    target = tmp_path_factory.mktemp("evaluation") / tiny_run.name
    shutil.copytree(tiny_run, target)
    prune_run(load_run(target), k=6, threshold=3)
    return target


def test_accuracy_csv_has_paired_intervals_that_contain_top1(pruned_run: Path) -> None:
    accuracy = pd.read_csv(pruned_run / "accuracy.csv")
    assert {"top1_low", "top1_high"} <= set(accuracy.columns)
    assert (accuracy["top1_low"] <= accuracy["top1"]).all()
    assert (accuracy["top1"] <= accuracy["top1_high"]).all()
    audit = json.loads((pruned_run / "audit.json").read_text())
    intervals = audit["uncertainty"]["intervals"]
    ensemble = accuracy[(accuracy["model"] == "ensemble") & ~accuracy["pruned"]].iloc[0]
    assert intervals["ensemble"]["top1_low"] == pytest.approx(ensemble["top1_low"])


def test_audit_sections_match_a_direct_computation(pruned_run: Path) -> None:
    from protoaudit.engine.evaluation import checkpoint_outputs

    run = load_run(pruned_run)
    bundle = run.dataset()
    audit = json.loads((pruned_run / "audit.json").read_text())
    assert {"compactness", "uncertainty", "calibration", "push_effect"} <= set(audit)
    labels = np.asarray(bundle.test.labels)
    outputs = checkpoint_outputs(run, bundle, 16)
    # McNemar of each pruned member against its unpruned one, from the checkpoints' own predictions
    for c in audit["uncertainty"]["mcnemar"]:
        if c["comparison"] != "pruned vs unpruned member":
            continue
        a = outputs[c["a"]].logits.argmax(1) == labels
        b = outputs[c["b"]].logits.argmax(1) == labels
        assert c["p_value"] == pytest.approx(mcnemar_exact(a, b)["p_value"])
    assert any(c["a"] == "ensemble" for c in audit["uncertainty"]["mcnemar"])
    # the ensemble's global size is the members' summed; sparsity is at least the members' smallest
    comp = audit["compactness"]["models"]
    assert comp["ensemble"]["global_size"] == sum(comp[m]["global_size"] for m in run.member_names)
    member = run.member_names[0]
    w = outputs[member].weight
    assert w is not None
    assert comp[member]["sparsity"] == pytest.approx(float((np.abs(w) <= 1e-3).mean()))
    # ECE bins count every test image
    assert sum(audit["calibration"]["models"]["ensemble"]["count"]) == len(labels)
    iv = bootstrap_interval(outputs[member].logits.argmax(1) == labels)
    assert audit["uncertainty"]["intervals"][member]["top1_high"] == pytest.approx(iv.high)
    assert audit["push_effect"]["members"][member]  # one row per push and split


def test_audit_command_exposes_the_new_keys(pruned_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from protoaudit.engine.audit_file import flat_metrics, load_audit

    keys = flat_metrics(load_audit(load_run(pruned_run)))
    for key in ("ensemble.local_size", "vgg.off_class_sparsity", "vgg.top1_low", "ensemble.ece"):
        assert key in keys, key
    assert any(k.startswith("mcnemar.vgg-pruned_vs_vgg") for k in keys)


def test_report_shows_the_audit_sections_and_traces_their_numbers(pruned_run: Path, tmp_path: Path) -> None:
    from protoaudit.report.build import ReportOptions, build_report
    from protoaudit.report.render import write_report

    from .report_helpers import untraced_numbers

    options = ReportOptions(
        reasoning_correct=1, reasoning_wrong=1, faithfulness_per_member=1, deletion_steps=4, random_orders=1
    )
    report = build_report(load_run(pruned_run), options)
    ev = report.data["evaluation"]
    assert ev["available"]
    assert ev["source"] == "audit.json"
    models = {row["model"] for row in ev["compactness"]}
    assert {"vgg", "vgg-pruned", "ensemble", "ensemble-pruned"} <= models
    assert {s["solver"] for s in ev["last_layer_stages"]} == {"adam", "fista (final, selected push)"}
    # the dense (Adam) and the solved layer side by side; the solved one is the member's own test top-1
    compared = {(d["member"], d["layer"]): d for d in ev["dense_vs_solved"]}
    accuracy = pd.read_csv(pruned_run / "accuracy.csv")
    for member in ("vgg", "resnet"):
        solved = compared[(member, "solved (FISTA)")]
        dense = compared[(member, "dense (Adam)")]
        own = accuracy[(accuracy["model"] == member) & ~accuracy["pruned"]]
        assert solved["top1"] == pytest.approx(float(own["top1"].iloc[0]))
        assert dense["off_class_sparsity"] == 0.0  # Adam leaves no weight at zero
        assert 0.0 <= solved["p_value"] <= 1.0
    assert any(f["name"] == "reliability" for f in report.data["figures"])
    accuracy_rows = report.data["accuracy"]["rows"]
    assert all(r["top1_low"] <= r["top1"] <= r["top1_high"] for r in accuracy_rows)
    written = write_report(report, tmp_path)
    html = written["html"].read_text(encoding="utf-8")
    assert 'id="mcnemar"' in html
    assert 'id="push-effect"' in html
    assert untraced_numbers(html, json.loads(written["json"].read_text(encoding="utf-8"))) == []
