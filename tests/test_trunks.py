"""Pretrained weights: local state-dict files load exactly; ImageNet weights without a network fail in one line."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch


def test_local_pth_state_dict_loads_the_same_tensors(tmp_path: Path) -> None:
    import torchvision

    from protoaudit.core.trunks import create_trunk

    torch.manual_seed(1)
    reference = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        for param in reference.parameters():
            param.normal_()
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    trunk = create_trunk("resnet18", str(path))
    loaded = trunk.state_dict()
    expected = reference.state_dict()
    assert loaded["body.0.weight"].shape == expected["conv1.weight"].shape
    assert torch.equal(loaded["body.0.weight"], expected["conv1.weight"])
    assert torch.equal(loaded["body.7.1.conv2.weight"], expected["layer4.1.conv2.weight"])
    assert torch.equal(loaded["body.1.running_var"], expected["bn1.running_var"])
    fresh = create_trunk("resnet18", None)
    assert not torch.equal(fresh.state_dict()["body.0.weight"], expected["conv1.weight"])


def test_local_safetensors_file_loads_the_same_tensors(tmp_path: Path) -> None:
    from protoaudit.core.trunks import create_trunk
    from protoaudit.engine.io import save_tensors

    source = create_trunk("tiny_vgg")
    with torch.no_grad():
        for param in source.parameters():
            param.uniform_(-1, 1)
    path = tmp_path / "tiny_vgg.safetensors"
    save_tensors(path, dict(source.state_dict()))
    loaded = create_trunk("tiny_vgg", str(path)).state_dict()
    assert loaded.keys() == source.state_dict().keys()
    for key, value in source.state_dict().items():
        assert torch.equal(loaded[key], value), key


def test_member_with_a_weights_file_uses_it(tmp_path: Path) -> None:
    from protoaudit.core.model import MemberConfig, ProtoPNet
    from protoaudit.core.trunks import create_trunk
    from protoaudit.engine.io import save_tensors

    source = create_trunk("tiny_resnet")
    with torch.no_grad():
        for param in source.parameters():
            param.fill_(0.125)
    path = tmp_path / "w.safetensors"
    save_tensors(path, dict(source.state_dict()))
    member = ProtoPNet(MemberConfig(trunk="tiny_resnet", n_classes=2, image_size=32), weights=str(path))
    assert torch.equal(member.trunk.stem[0].weight, torch.full_like(member.trunk.stem[0].weight, 0.125))


def test_wrong_weights_files_are_one_line_errors(tmp_path: Path) -> None:
    from protoaudit.core.trunks import create_trunk
    from protoaudit.engine.io import save_tensors
    from protoaudit.errors import WeightsUnavailableError

    save_tensors(tmp_path / "vgg.safetensors", dict(create_trunk("tiny_vgg").state_dict()))
    with pytest.raises(WeightsUnavailableError, match="does not fit this trunk") as info:
        create_trunk("tiny_resnet", str(tmp_path / "vgg.safetensors"))
    assert "\n" not in str(info.value)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsUnavailableError, match="is not a readable state dict"):
        create_trunk("tiny_vgg", str(tmp_path / "junk.pth"))


def test_imagenet_without_network_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No download is attempted for real: torch.hub's downloader is replaced by one that finds no network,
    and torch's cache points at an empty folder."""
    import torch.hub

    from protoaudit.core.trunks import create_trunk
    from protoaudit.errors import WeightsUnavailableError

    def no_network(url: str, dst: str, *args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    with pytest.raises(WeightsUnavailableError) as info:
        create_trunk("resnet18", "imagenet")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("cannot obtain ImageNet weights for resnet18")
    assert "Temporary failure in name resolution" in message
    assert 'weights = "/path/to/resnet18.pth"' in message
    assert str(tmp_path / "hub" / "checkpoints") in message


def test_imagenet_for_a_tiny_trunk_says_none_exist() -> None:
    from protoaudit.core.trunks import create_trunk
    from protoaudit.errors import WeightsUnavailableError

    with pytest.raises(WeightsUnavailableError, match="no ImageNet weights exist for TinyVGG"):
        create_trunk("tiny_vgg", "imagenet")


def test_imagenet_without_network_stops_training_before_any_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch.hub

    from protoaudit.cli import main

    def no_network(url: str, dst: str, *args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "tiny.toml"
    args = ["train-ensemble", str(recipe), "--out", str(tmp_path / "runs"), "--quiet"]
    args += ["--set", "members.vgg.trunk=resnet18", "--set", 'members.vgg.weights="imagenet"']
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "cannot obtain ImageNet weights for resnet18" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()
