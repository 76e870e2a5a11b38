"""import-protopnet: a state dict with the original code's key names imports, and the imported member computes
exactly the paper's logits from the state dict's tensors.

The "original" state dicts are generated here with the original PPNet's key names and shapes
(features.*, add_on_layers.*, prototype_vectors (m, D, 1, 1), ones, last_layer.weight (K, m)); the reference
logits are computed from those tensors with the paper's formulas, without protoaudit's model code.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from protoaudit.engine.importer import convert_state_dict, import_protopnet, read_state_dict
from protoaudit.engine.recipe import load_recipe
from protoaudit.engine.run import Run, load_run

from .conftest import TINY_RECIPE, run_cli

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
K, PER_CLASS, D = 3, 2, 16
VGG11_CFG = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


# -- the original's modules, rebuilt here from its description -------------------------------------------


def original_vgg_features(cfg: list) -> nn.Sequential:
    """VGG_features.features: conv3x3(pad 1) + ReLU per number, 2x2 max pool per "M"."""
    layers: list[nn.Module] = []
    cin = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=True)]
            cin = v
    return nn.Sequential(*layers)


def original_add_on(kind: str, cin: int, dim: int) -> tuple[list[tuple[int, str]], dict[str, torch.Tensor]]:
    """The original PPNet's add_on_layers: [(sequential index of a conv, activation after it)] and weights."""
    spec: list[tuple[int, str]] = []
    weights: dict[str, torch.Tensor] = {}
    index = 0

    def conv(i: int, o: int, act: str) -> None:
        nonlocal index
        weights[f"add_on_layers.{index}.weight"] = torch.randn(o, i, 1, 1) * (2.0 / o) ** 0.5
        weights[f"add_on_layers.{index}.bias"] = torch.randn(o) * 0.1
        spec.append((index, act))
        index += 2  # conv, activation

    if kind == "regular":
        conv(cin, dim, "relu")
        conv(dim, dim, "sigmoid")
        return spec, weights
    current = cin
    while current > dim or not spec:
        out = max(dim, current // 2)
        conv(current, out, "relu")
        conv(out, out, "relu" if out > dim else "sigmoid")
        current //= 2
    return spec, weights


def randomise_batch_norm(module: nn.Module, gen: torch.Generator) -> None:
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


def original_state_dict(
    arch: str, add_on: str, seed: int, m: int = K * PER_CLASS
) -> tuple[dict, nn.Module, list]:
    """(state dict with the original's keys, the trunk as the original runs it, add-on spec)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if arch == "resnet18":
        net = torchvision.models.resnet18(weights=None)
        randomise_batch_norm(net, gen)
        trunk: nn.Module = nn.Sequential(
            net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4
        )
        # ResNet_features keeps torchvision's names, without the classifier
        features = {f"features.{k}": v for k, v in net.state_dict().items() if not k.startswith("fc.")}
        channels = 512
    elif arch == "vgg11":
        trunk = original_vgg_features(VGG11_CFG)
        # VGG_features wraps its Sequential as .features
        features = {f"features.features.{k}": v for k, v in trunk.state_dict().items()}
        channels = 512
    else:
        raise AssertionError(arch)
    spec, add_on_weights = original_add_on(add_on, channels, D)
    state = {
        **{k: v.clone() for k, v in features.items()},
        **add_on_weights,
        "prototype_vectors": torch.rand(m, D, 1, 1, generator=gen),
        "ones": torch.ones(m, D, 1, 1),
        "last_layer.weight": torch.randn(K, m, generator=gen),
    }
    return state, trunk.eval(), spec


@torch.no_grad()
def reference_logits(state: dict, trunk: nn.Module, spec: list, images: torch.Tensor) -> torch.Tensor:
    """Paper §2.1 from the raw tensors: z = add_on(f(x)); d_j = min over patches ‖z − p_j‖²;
    similarity log((d + 1)/(d + 1e-4)); logits = h(similarities)."""
    z = trunk((images - IMAGENET_MEAN) / IMAGENET_STD)
    for index, act in spec:
        z = F.conv2d(z, state[f"add_on_layers.{index}.weight"], state[f"add_on_layers.{index}.bias"])
        z = torch.relu(z) if act == "relu" else torch.sigmoid(z)
    p = state["prototype_vectors"][:, :, 0, 0]  # (m, D)
    diff = z[:, None] - p[None, :, :, None, None]  # (N, m, D, H, W)
    d = (diff * diff).sum(dim=2).flatten(2).min(dim=2).values  # (N, m)
    sim = torch.log((d + 1) / (d + 1e-4))
    return sim @ state["last_layer.weight"].t()


def check_run_contract(run_dir: Path, member: str, state: dict) -> Run:
    """The imported run is a run like a trained one, and its prototypes are the state dict's, unchanged."""
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["status"] == "complete"
    assert meta["members"] == [member]
    assert meta["origin"]["kind"] == "import-protopnet"
    accuracy = pd.read_csv(run_dir / "accuracy.csv")
    assert list(accuracy.columns) == [
        "model", "kind", "backbone", "pruned", "top1", "n_prototypes", "n_test", "top1_low", "top1_high",
    ]  # fmt: skip
    assert list(accuracy["model"]) == [member, "ensemble"]
    recipe = load_recipe(run_dir / "recipe.toml")
    assert [m.name for m in recipe.members] == [member]
    run = load_run(run_dir)
    model = run.member(member)
    torch.testing.assert_close(
        model.prototype_vectors.detach(), state["prototype_vectors"][:, :, 0, 0], rtol=0, atol=0
    )
    torch.testing.assert_close(model.last_layer.weight.detach(), state["last_layer.weight"], rtol=0, atol=0)
    prototypes = run.prototypes(member)
    assert list(prototypes.columns) == [
        "prototype", "class", "class_name", "source_image", "source_index", "label", "h", "w", "distance",
        "box_y0", "box_y1", "box_x0", "box_x1",
    ]  # fmt: skip
    assert len(prototypes) == model.n_prototypes
    return run


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny recipe at 64 px (a 2 x 2 latent grid for the stride-32 torchvision trunks)."""
    path = tmp_path_factory.mktemp("recipe") / "tiny64.toml"
    path.write_text(TINY_RECIPE.read_text().replace("image_size = 32", "image_size = 64"))
    return path


def test_resnet18_state_dict_imports_and_gives_the_papers_logits(
    recipe_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state, trunk, spec = original_state_dict("resnet18", "bottleneck", seed=1)
    path = tmp_path / "10push0.7822.pth"
    torch.save(state, path)
    code, out, err = run_cli(
        [
            "import-protopnet", str(path), "--arch", "resnet18", "--recipe", str(recipe_file),
            "--out", str(tmp_path / "runs"), "--name", "orig", "--member", "rn", "--json", "--quiet",
        ],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    doc = json.loads(out)
    assert doc["add_on"] == "bottleneck"
    assert (doc["n_classes"], doc["n_prototypes"], doc["prototype_dim"]) == (K, K * PER_CLASS, D)
    run_dir = tmp_path / "runs" / "orig"
    run = check_run_contract(run_dir, "rn", state)
    bundle = run.dataset()
    images = bundle.test.batch(range(len(bundle.test)))
    with torch.no_grad():
        logits, _ = run.member("rn")(images)
    expected = reference_logits(state, trunk, spec, images)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-4)
    assert float((logits - expected).abs().max()) < 1e-4
    accuracy = run.accuracy()
    top1 = float((expected.argmax(1).numpy() == bundle.test.labels).mean())
    assert accuracy.loc[accuracy["model"] == "rn", "top1"].item() == pytest.approx(top1)

    # prototypes.csv: each prototype's nearest latent patch among push images of its own class (brute force)
    prototypes = run.prototypes("rn")
    push = bundle.push.batch(range(len(bundle.push)))
    model = run.member("rn")
    with torch.no_grad():
        z = model.latent(push)  # (N, D, H, W)
    p = state["prototype_vectors"][:, :, 0, 0]
    for row in prototypes.itertuples():
        own = torch.as_tensor(bundle.push.labels == row._2)
        d = ((z[:, None] - p[row.prototype][None, :, None, None]) ** 2).sum(2)[:, 0]  # (N, H, W)
        d[~own] = float("inf")
        best = int(d.flatten().argmin())
        hh, ww = d.shape[1:]
        assert row.source_index == best // (hh * ww)
        assert (row.h, row.w) == ((best % (hh * ww)) // ww, best % ww)
        assert row.distance == pytest.approx(float(d.min()), rel=1e-4, abs=1e-5)
        assert row.distance > 0  # random prototypes were never pushed: the import must not move them


def test_vgg11_regular_add_on_imports_and_gives_the_papers_logits(recipe_file: Path, tmp_path: Path) -> None:
    state, trunk, spec = original_state_dict("vgg11", "regular", seed=2)
    path = tmp_path / "vgg.pth"
    torch.save(state, path)
    recipe = load_recipe(recipe_file, out=str(tmp_path / "runs"), overrides=["index.build=false"])
    result = import_protopnet(path, "vgg11", recipe, member_name="vgg")
    assert result.converted.add_on == "regular"
    run = check_run_contract(result.run_dir, "vgg", state)
    bundle = run.dataset()
    images = bundle.test.batch(range(len(bundle.test)))
    with torch.no_grad():
        logits, _ = run.member("vgg")(images)
    torch.testing.assert_close(logits, reference_logits(state, trunk, spec, images), rtol=1e-5, atol=1e-4)


def test_pruned_dataparallel_state_dict_without_batch_counts(tmp_path: Path) -> None:
    """A pruned original model (m not a multiple of K), saved through DataParallel ("module." prefix) by a torch
    that did not record num_batches_tracked: classes come from the last layer, every tensor maps unchanged."""
    state, _, _ = original_state_dict("resnet18", "bottleneck", seed=3, m=7)
    state["last_layer.weight"] = torch.full((K, 7), -0.5)
    classes = [0, 0, 1, 2, 2, 2, 1]
    for j, k in enumerate(classes):
        state["last_layer.weight"][k, j] = 1.0
    state = {f"module.{k}": v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "pruned.pth"
    torch.save(state, path)
    converted = convert_state_dict(read_state_dict(path), "resnet18")
    assert converted.prototype_class == classes
    assert "pruned" in converted.prototype_class_source
    assert torch.equal(
        converted.state["trunk.body.4.0.conv1.weight"], state["module.features.layer1.0.conv1.weight"]
    )
    assert torch.equal(converted.state["trunk.body.1.running_var"], state["module.features.bn1.running_var"])
    assert int(converted.state["trunk.body.1.num_batches_tracked"]) == 0


def test_densenet_keys_map_onto_the_trunk() -> None:
    """DenseNet_features keeps torchvision's names inside .features (plus a parameter-free final_relu)."""
    net = torchvision.models.densenet121(weights=None)
    state = {
        f"features.features.{k.removeprefix('features.')}": v
        for k, v in net.state_dict().items()
        if k.startswith("features.")
    }
    spec, add_on = original_add_on("bottleneck", 1024, D)
    state.update(add_on)
    state["prototype_vectors"] = torch.rand(K * PER_CLASS, D, 1, 1)
    state["last_layer.weight"] = torch.randn(K, K * PER_CLASS)
    converted = convert_state_dict(state, "densenet121")
    assert converted.add_on == "bottleneck"
    key = "trunk.features.denseblock4.denselayer16.norm2.running_var"
    assert torch.equal(
        converted.state[key], net.state_dict()["features.denseblock4.denselayer16.norm2.running_var"]
    )
    assert len(spec) == 2 * 6  # 1024 → 512 → … → 16: six conv pairs, all imported


def test_a_linear_activation_original_is_refused_with_one_line(
    recipe_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state, _, _ = original_state_dict("resnet18", "bottleneck", seed=1)
    path = tmp_path / "linear.pth"
    torch.save(state, path)
    code, _, err = run_cli(
        [
            "import-protopnet", str(path), "--arch", "resnet18", "--recipe", str(recipe_file),
            "--out", str(tmp_path / "runs"), "--activation", "linear", "--quiet",
        ],
        capsys,
    )  # fmt: skip
    assert code == 2
    assert "prototype_activation_function 'linear'" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()
