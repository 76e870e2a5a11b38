"""The ProtoPNet member (paper §2.1): trunk f → add-on 1×1 convs → prototype layer g_p → last layer h.

The model only computes; training stages live in :mod:`protoaudit.train` and push in :mod:`protoaudit.push`.
Inputs are images in [0, 1]; the member normalises them with its trunk's mean and std, so a member and its
preprocessing cannot drift apart.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from protoaudit.core.trunks import create_trunk, trunk_info

EPSILON = 1e-4  # the ε of the similarity log((d + 1) / (d + ε))
AddOnKind = Literal["bottleneck", "regular"]


@dataclass
class MemberConfig:
    """Architecture of one member: everything needed to rebuild it before its weights are loaded."""

    trunk: str
    n_classes: int
    prototypes_per_class: int = 10
    prototype_dim: int = 128
    add_on: AddOnKind = "bottleneck"
    image_size: int = 224
    class_names: list[str] = field(default_factory=list)
    # None: prototype j belongs to class j // prototypes_per_class; [] is a member whose every prototype was pruned
    prototype_class: list[int] = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if not self.class_names:
            self.class_names = [str(k) for k in range(self.n_classes)]
        if self.prototype_class is None:
            self.prototype_class = [j // self.prototypes_per_class for j in range(self.n_prototypes_initial)]

    @property
    def n_prototypes_initial(self) -> int:
        return self.n_classes * self.prototypes_per_class

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MemberConfig:
        return cls(**data)


def build_add_on(kind: AddOnKind, in_channels: int, prototype_dim: int) -> nn.Sequential:
    """The two (or more) 1×1 convs between trunk and prototypes, ending in a sigmoid.

    ``regular``: conv(C→D), ReLU, conv(D→D), sigmoid. ``bottleneck`` (the original's default): pairs of
    1×1 convs halving the channels until D is reached, ReLU between, sigmoid at the end.
    """
    layers: list[nn.Module] = []
    if kind == "regular":
        layers = [
            nn.Conv2d(in_channels, prototype_dim, 1),
            nn.ReLU(),
            nn.Conv2d(prototype_dim, prototype_dim, 1),
            nn.Sigmoid(),
        ]
    elif kind == "bottleneck":
        cin = in_channels
        while True:
            cout = max(prototype_dim, cin // 2)
            layers += [nn.Conv2d(cin, cout, 1), nn.ReLU(), nn.Conv2d(cout, cout, 1)]
            if cout > prototype_dim:
                layers.append(nn.ReLU())
                cin = cout
            else:
                layers.append(nn.Sigmoid())
                break
    else:
        raise ValueError(f"add_on must be 'bottleneck' or 'regular', got {kind!r}")
    for m in layers:
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return nn.Sequential(*layers)


def squared_distances(z: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Squared L2 distance of every prototype to every latent patch, by ‖z‖² − 2 z·p + ‖p‖², clamped ≥ 0.

    z: (N, D, H, W) float; prototypes: (m, D) float → (N, m, H, W) float.
    """
    z2 = (z * z).sum(dim=1, keepdim=True)  # (N, 1, H, W)
    zp = torch.einsum("ndhw,md->nmhw", z, prototypes)
    p2 = (prototypes * prototypes).sum(dim=1).view(1, -1, 1, 1)
    if torch.is_grad_enabled() and (z.requires_grad or prototypes.requires_grad):
        return torch.clamp(z2 - 2 * zp + p2, min=0.0)
    # Without autograd the same arithmetic runs in place on the product (−2zp + z2 is z2 − 2zp exactly, so
    # the values are bit for bit those above): no (N, m, H, W) temporaries, a third of the memory traffic.
    return zp.mul_(-2).add_(z2).add_(p2).clamp_(min=0.0)


def similarity(distances: torch.Tensor) -> torch.Tensor:
    """The paper's activation log((d + 1) / (d + ε)); same shape as ``distances``."""
    return torch.log((distances + 1) / (distances + EPSILON))


class ProtoPNet(nn.Module):
    """One member. ``forward(x)`` maps (N, 3, S, S) images in [0, 1] to (logits (N, K), min_distances (N, m))."""

    mean: torch.Tensor
    std: torch.Tensor
    prototype_class: torch.Tensor

    def __init__(self, config: MemberConfig, weights: str | None = None) -> None:
        super().__init__()
        self.config = config
        info = trunk_info(config.trunk)
        self.trunk = create_trunk(config.trunk, weights)
        self.add_on = build_add_on(config.add_on, info.out_channels, config.prototype_dim)
        m = len(config.prototype_class)
        self.prototype_vectors = nn.Parameter(torch.rand(m, config.prototype_dim))
        self.last_layer = nn.Linear(m, config.n_classes, bias=False)
        self.register_buffer("mean", torch.tensor(info.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(info.std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer(
            "prototype_class", torch.tensor(config.prototype_class, dtype=torch.long), persistent=False
        )
        self.set_last_layer_incorrect_connection(-0.5)

    # -- structure -------------------------------------------------------------------------------------
    @property
    def n_prototypes(self) -> int:
        return int(self.prototype_vectors.shape[0])

    @property
    def n_classes(self) -> int:
        return self.config.n_classes

    def class_identity(self) -> torch.Tensor:
        """(m, K) float one-hot: entry (j, k) is 1 when prototype j belongs to class k."""
        return torch.nn.functional.one_hot(self.prototype_class, self.n_classes).to(
            self.prototype_vectors.dtype
        )

    def set_last_layer_incorrect_connection(self, incorrect_strength: float) -> None:
        """w_h(k, j) = 1 for own-class prototypes and ``incorrect_strength`` otherwise (paper §2.2)."""
        identity = self.class_identity().t()  # (K, m)
        with torch.no_grad():
            self.last_layer.weight.copy_(identity + incorrect_strength * (1 - identity))

    # -- computation -----------------------------------------------------------------------------------
    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """f followed by the add-on layers: (N, 3, S, S) in [0, 1] → z (N, D, H, W) in (0, 1)."""
        return self.add_on(self.trunk((x - self.mean) / self.std))

    def distances(self, z: torch.Tensor) -> torch.Tensor:
        """(N, D, H, W) → (N, m, H, W) squared L2 distances to every prototype.

        At least float32, also under bf16 autocast: ‖z‖² − 2z·p + ‖p‖² cancels badly in low precision.
        """
        dtype = torch.promote_types(self.prototype_vectors.dtype, torch.float32)  # float64 stays float64
        with torch.autocast(z.device.type, enabled=False):
            return squared_distances(z.to(dtype), self.prototype_vectors.to(dtype))

    def head(self, min_distances: torch.Tensor) -> torch.Tensor:
        """(N, m) min distances → (N, K) logits = h(similarities)."""
        return self.last_layer(similarity(min_distances))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.distances(self.latent(x))
        min_distances = d.amin(dim=(2, 3))  # over the grid in place (no copy of the strided product)
        return self.head(min_distances), min_distances

    def max_distance(self) -> float:
        """Largest possible squared distance between two latent patches in (0, 1)^D: D."""
        return float(self.config.prototype_dim)

    # -- pruning ---------------------------------------------------------------------------------------
    def keep_prototypes(self, keep: torch.Tensor) -> None:
        """Remove prototypes not in ``keep`` (bool (m,) or index tensor), with their last-layer columns."""
        index = keep.nonzero().flatten() if keep.dtype == torch.bool else keep.long()
        with torch.no_grad():
            self.prototype_vectors = nn.Parameter(self.prototype_vectors[index].clone())
            weight = self.last_layer.weight[:, index].clone()
            self.last_layer = nn.Linear(len(index), self.n_classes, bias=False).to(weight.device)
            self.last_layer.weight.copy_(weight)
        self.config.prototype_class = [self.config.prototype_class[i] for i in index.tolist()]
        self.prototype_class = torch.tensor(
            self.config.prototype_class, dtype=torch.long, device=weight.device
        )
