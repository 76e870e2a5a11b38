"""Trunk registry: the convolutional network f of a ProtoPNet, created by name.

A recipe names a trunk by registry name (``"resnet34"``, ``"tiny_vgg"``), never by import path.
Each entry knows its output channel count, its downsampling factor and its input normalisation, so a
member and its preprocessing cannot drift apart.

Weights: ``"none"`` (random init), ``"imagenet"`` (torchvision's weight enums; downloaded into torch's
cache once, which needs a network) or a path to a local torchvision state dict (``.pth`` read with
``torch.load(weights_only=True)``, or ``.safetensors``).
"""

from __future__ import annotations

import fnmatch
import pickle
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from protoaudit.errors import WeightsUnavailableError

if TYPE_CHECKING:
    from torchvision.models import VGG, DenseNet, ResNet, WeightsEnum

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TrunkInfo:
    """What a member must know of its trunk: channels out, stride, normalisation."""

    name: str
    family: str
    out_channels: int
    stride: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    pretrained: bool = False  # whether "imagenet" weights exist for it


@dataclass(frozen=True)
class _Entry:
    info: TrunkInfo
    build: Callable[[str | None], nn.Module]


_REGISTRY: dict[str, _Entry] = {}


def register_trunk(
    info: TrunkInfo,
) -> Callable[[Callable[[str | None], nn.Module]], Callable[[str | None], nn.Module]]:
    """Decorator: register ``build(weights) -> nn.Module`` under ``info.name``."""

    def decorate(build: Callable[[str | None], nn.Module]) -> Callable[[str | None], nn.Module]:
        _REGISTRY[info.name] = _Entry(info, build)
        return build

    return decorate


def list_trunks(pattern: str = "*") -> list[str]:
    return sorted(name for name in _REGISTRY if fnmatch.fnmatch(name, pattern))


def trunk_info(name: str) -> TrunkInfo:
    try:
        return _REGISTRY[name].info
    except KeyError:
        raise KeyError(f"unknown trunk {name!r}; known: {', '.join(list_trunks())}") from None


def create_trunk(name: str, weights: str | None = None) -> nn.Module:
    """Build trunk ``name``; ``weights`` is None/"none", "imagenet", or a local state-dict path.

    Returns a module mapping ``(N, 3, H, W) float32`` to ``(N, C, H/stride, W/stride) float32``.
    """
    trunk_info(name)
    if weights in (None, "none"):
        weights = None
    return _REGISTRY[name].build(weights)


# ---------------------------------------------------------------------------------------------------
# Small trunks sized for CPU runs on small images (stride 8: a 64 px image gives an 8 x 8 latent grid).


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class TinyVGG(nn.Module):
    """VGG-style: three stages of 3x3 conv-BN-ReLU, each followed by 2x2 max pooling."""

    def __init__(self, widths: tuple[int, int, int] = (24, 48, 96)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for w in widths:
            layers += [*_conv_bn(cin, w), *_conv_bn(w, w), nn.MaxPool2d(2)]
            cin = w
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class TinyResNet(nn.Module):
    """ResNet-style: a stem, then one basic residual block per stage (stride 2 after the first)."""

    def __init__(self, widths: tuple[int, int, int] = (24, 48, 96)) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(3, widths[0]), nn.MaxPool2d(2))
        blocks = [_BasicBlock(widths[0], widths[0], 1)]
        blocks += [_BasicBlock(widths[i - 1], widths[i], 2) for i in range(1, len(widths))]
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))


class _DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin), nn.ReLU(inplace=False), nn.Conv2d(cin, growth, 3, padding=1, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], dim=1)


class TinyDenseNet(nn.Module):
    """DenseNet-style: dense blocks of two layers joined by 1x1-conv + average-pool transitions."""

    def __init__(self, growth: int = 16, stem: int = 24) -> None:
        super().__init__()
        layers: list[nn.Module] = [*_conv_bn(3, stem), nn.MaxPool2d(2)]
        c = stem
        for stage in range(3):
            for _ in range(2):
                layers.append(_DenseLayer(c, growth))
                c += growth
            if stage < 2:
                layers += [nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2)]
                c //= 2
        layers += [nn.BatchNorm2d(c), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.out_channels = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


_TINY_MEAN = (0.5, 0.5, 0.5)
_TINY_STD = (0.25, 0.25, 0.25)


def _tiny(cls: type[nn.Module], **kwargs: object) -> Callable[[str | None], nn.Module]:
    def build(weights: str | None) -> nn.Module:
        model = cls(**kwargs)
        if weights == "imagenet":
            raise WeightsUnavailableError(
                f'no ImageNet weights exist for {cls.__name__}; use weights = "none" or a file'
            )
        if weights is not None:
            _load_local_state_dict(model, weights)
        return model

    return build


register_trunk(TrunkInfo("tiny_vgg", "vgg", 96, 8, _TINY_MEAN, _TINY_STD))(_tiny(TinyVGG))
register_trunk(TrunkInfo("tiny_resnet", "resnet", 96, 8, _TINY_MEAN, _TINY_STD))(_tiny(TinyResNet))
register_trunk(TrunkInfo("tiny_densenet", "densenet", TinyDenseNet().out_channels, 8, _TINY_MEAN, _TINY_STD))(
    _tiny(TinyDenseNet)
)


# ---------------------------------------------------------------------------------------------------
# torchvision trunks: the convolutional layers of VGG, ResNet and DenseNet (stride 32: 224 px -> 7 x 7).


class _ResNetConv(nn.Module):
    """ResNet conv1..layer4 without the pooling and classifier."""

    def __init__(self, net: ResNet) -> None:
        super().__init__()
        self.body = nn.Sequential(
            net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class _DenseNetConv(nn.Module):
    """DenseNet ``features`` (ending in norm5) followed by the ReLU torchvision applies in ``forward``."""

    def __init__(self, net: DenseNet) -> None:
        super().__init__()
        self.features = net.features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.features(x))


class _VGGConv(nn.Module):
    def __init__(self, net: VGG) -> None:
        super().__init__()
        self.features = net.features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _torchvision_builder(
    name: str, wrap: Callable[[nn.Module], nn.Module]
) -> Callable[[str | None], nn.Module]:
    def build(weights: str | None) -> nn.Module:
        import torchvision

        if weights == "imagenet":
            net = _download_imagenet(name)
        else:
            net = torchvision.models.get_model(name, weights=None)
            if weights is not None:
                _load_local_state_dict(net, weights)
        return wrap(net)

    return build


def _download_imagenet(name: str) -> nn.Module:
    import torchvision

    enum = torchvision.models.get_model_weights(name).DEFAULT
    try:
        return torchvision.models.get_model(name, weights=enum)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; a corrupt cache file is a RuntimeError
        raise _imagenet_unavailable(name, enum, exc) from exc


def fetch_imagenet_weights(name: str) -> None:
    """Make sure trunk ``name``'s ImageNet weights are in torch's cache (downloading them once), before a run
    writes anything; raises :class:`WeightsUnavailableError` with the way out when they cannot be had."""
    import torchvision

    if not trunk_info(name).pretrained:
        raise WeightsUnavailableError(f'no ImageNet weights exist for {name}; use weights = "none" or a file')
    enum = torchvision.models.get_model_weights(name).DEFAULT
    try:
        enum.get_state_dict(progress=False, check_hash=False)
    except (OSError, RuntimeError) as exc:
        raise _imagenet_unavailable(name, enum, exc) from exc


def _imagenet_unavailable(name: str, enum: WeightsEnum, exc: BaseException) -> WeightsUnavailableError:
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    return WeightsUnavailableError(
        f"cannot obtain ImageNet weights for {name} ({enum}): {_reason(exc)}; without a network, put "
        f'{Path(enum.url).name} in {cache} or set weights = "/path/to/{name}.pth" (a torchvision state dict)'
    )


def weights_only_refusal(exc: BaseException) -> str | None:
    """The global that ``torch.load(weights_only=True)`` refused to load (e.g. "GLOBAL posix.system") when
    ``exc`` is that refusal: the file is a pickle (raw or in torch's zip format) holding Python objects, not
    only tensors. None when ``exc`` is some other failure (a damaged file, another format)."""
    import re

    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    return f"GLOBAL {found.group(1)}" if found else None


def _reason(exc: BaseException) -> str:
    text = str(getattr(exc, "reason", "") or exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _load_local_state_dict(model: nn.Module, path: str) -> None:
    """Load a local torchvision state dict (``.pth``/``.pt`` with weights_only, or ``.safetensors``)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise WeightsUnavailableError(
            f'weights file {p} does not exist (weights = "none", "imagenet" or a file path)'
        )
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(p)
        else:
            with warnings.catch_warnings():  # torch warns about pickle protocols; the error says enough
                warnings.simplefilter("ignore")
                state = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = weights_only_refusal(exc)
        if refused is None:  # not a torch checkpoint at all
            raise WeightsUnavailableError(
                f"weights file {p} is not a readable state dict (not a torch checkpoint)"
            ) from exc
        # weights_only refused a pickled object: it is never unpickled
        raise WeightsUnavailableError(
            f"weights file {p} is not a state dict saved with weights only: it holds pickled Python objects "
            f"({refused}); save model.state_dict() (or a .safetensors file) and pass that"
        ) from exc
    except Exception as exc:
        raise WeightsUnavailableError(
            f"weights file {p} is not a readable state dict: {_reason(exc)}"
        ) from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsUnavailableError(
            f"weights file {p} holds a {type(state).__name__}, expected a state dict"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsUnavailableError(f"weights file {p} does not fit this trunk: {_reason(exc)}") from exc


def _register_torchvision() -> None:
    vgg_channels = 512
    for depth in (11, 13, 16, 19):
        for suffix in ("", "_bn"):
            name = f"vgg{depth}{suffix}"
            register_trunk(TrunkInfo(name, "vgg", vgg_channels, 32, pretrained=True))(
                _torchvision_builder(name, _VGGConv)
            )
    for depth, channels in ((18, 512), (34, 512), (50, 2048), (101, 2048), (152, 2048)):
        name = f"resnet{depth}"
        register_trunk(TrunkInfo(name, "resnet", channels, 32, pretrained=True))(
            _torchvision_builder(name, _ResNetConv)
        )
    for depth, channels in ((121, 1024), (161, 2208), (169, 1664), (201, 1920)):
        name = f"densenet{depth}"
        register_trunk(TrunkInfo(name, "densenet", channels, 32, pretrained=True))(
            _torchvision_builder(name, _DenseNetConv)
        )


_register_torchvision()
