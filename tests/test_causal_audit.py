"""Causal labels and detectors on a member built by hand, whose answers are known by construction."""

from __future__ import annotations

from collections.abc import Collection
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from protoaudit.core.model import MemberConfig, ProtoPNet
from protoaudit.engine.causal_audit import causal_labels, min_distances, run_detectors

S = 32  # image size; the hand-built trunk pools 8 × 8 cells → a 4 × 4 latent grid
GREY = (0.45, 0.5, 0.55)
ELEMENTS = {  # name → (kind, cell (h, w), colour)
    "marker": ("shortcut", (0, 0), None),  # pink-and-white checkerboard
    "part 0: red square": ("discriminative", (3, 3), (0.9, 0.1, 0.1)),
    "shared 0: white block": ("shared", (0, 3), (1.0, 1.0, 1.0)),
}


class FakeInterventions:
    """Images of a grey background with three elements, each in its own 8 × 8 cell, drawn again without one."""

    def __init__(self, n: int) -> None:
        self.n = n

    def elements(self, i: int) -> list[tuple[str, str]]:
        return [(name, kind) for name, (kind, _, _) in self.elements_drawn.items()]

    elements_drawn: ClassVar[dict[str, tuple[str, tuple[int, int], tuple[float, float, float] | None]]] = (
        ELEMENTS
    )

    def render(self, i: int, remove: str | Collection[str] | None = None) -> torch.Tensor:
        removed = {remove} if isinstance(remove, str) else set(remove or ())
        if removed - set(self.elements_drawn):
            raise ValueError(remove)
        x = torch.tensor(GREY).view(3, 1, 1).repeat(1, S, S)
        x[:, :, : S // 2] += 0.02 * i  # a little variation from image to image, on the background only
        for name, (_, (h, w), colour) in self.elements_drawn.items():
            if name in removed:
                continue
            cell = x[:, h * 8 : h * 8 + 8, w * 8 : w * 8 + 8]
            if colour is None:
                yy, xx = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
                checker = ((yy + xx) % 2).bool()
                cell[:] = torch.where(
                    checker, torch.tensor([1.0, 0.4, 0.8]).view(3, 1, 1), torch.ones(3, 1, 1)
                )
            else:
                cell[:] = torch.tensor(colour).view(3, 1, 1)
        return x


class FakeSplit:
    def __init__(self, n: int, labels: np.ndarray) -> None:
        self.interventions = FakeInterventions(n)
        self.labels = labels
        self.image_ids = [f"push/{i:06d}" for i in range(n)]

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: list[int]) -> torch.Tensor:
        return torch.stack([self.interventions.render(i) for i in indices])


def hand_built_member() -> ProtoPNet:
    """A member whose latent patch (h, w) depends only on the pixels of cell (h, w): average pooling over
    8 × 8 cells, then a random 1 × 1 convolution, then the add-on."""
    torch.manual_seed(0)
    model = ProtoPNet(
        MemberConfig("tiny_vgg", n_classes=2, prototypes_per_class=2, prototype_dim=16, image_size=S)
    )
    model.trunk = nn.Sequential(nn.AvgPool2d(8), nn.Conv2d(3, 96, 1))
    return model.eval()


def test_a_prototype_on_the_marker_is_shortcut_and_one_on_plain_background_is_background() -> None:
    model = hand_built_member()
    split = FakeSplit(2, np.array([0, 1]))
    with torch.no_grad():
        z = model.latent(split.batch([0, 1]))  # (2, D, 4, 4)
    sources = [(0, 0, 0), (0, 2, 1), (1, 3, 3), (1, 0, 3)]  # marker, background, part, shared (image, h, w)
    with torch.no_grad():
        model.prototype_vectors.copy_(torch.stack([z[i, :, h, w] for i, h, w in sources]))
    out = causal_labels(model, split, np.array([i for i, _, _ in sources]), 8, torch.device("cpu"))
    assert out is not None
    assert out["concept_kind"].tolist() == ["shortcut", "background", "discriminative", "shared"]
    assert out["concept"].tolist() == ["marker", "background", "part 0: red square", "shared 0: white block"]
    # the background prototype's patch is untouched by every removal: no drop at all
    np.testing.assert_allclose(out["drops"][1], 0.0, atol=1e-6)
    assert out["drop"][0] > 0.5
    # on the unmodified source image the prototype is at distance 0 (up to float32 cancellation in
    # ‖z‖² − 2z·p + ‖p‖², which moves log((d + 1)/(d + 1e-4)) by a few hundredths)
    assert np.allclose(out["base"], np.log(1 / 1e-4), atol=0.05)


class TwinInterventions(FakeInterventions):
    """The images above with a second red square, a twin of part 0, in cell (2, 3)."""

    elements_drawn: ClassVar[dict[str, tuple[str, tuple[int, int], tuple[float, float, float] | None]]] = {
        **ELEMENTS,
        "part 1: red square": ("discriminative", (2, 3), (0.9, 0.1, 0.1)),
    }


def test_a_prototype_two_elements_carry_is_labelled_background_and_caught_by_removing_all() -> None:
    """With two identical red squares, removing either leaves the other: no single removal drops the part
    prototype's similarity, so the single-removal label says background; removing every element at once
    silences it (drop_all above one half), while the plain background prototype keeps its similarity (drop_all 0)."""
    from protoaudit.engine.causal_audit import causal_entry

    model = hand_built_member()
    split = FakeSplit(2, np.array([0, 1]))
    split.interventions = TwinInterventions(2)
    with torch.no_grad():
        z = model.latent(split.batch([0, 1]))
    sources = [(1, 3, 3), (0, 2, 1), (0, 0, 0), (1, 0, 3)]  # part (twinned), background, marker, shared
    with torch.no_grad():
        model.prototype_vectors.copy_(torch.stack([z[i, :, h, w] for i, h, w in sources]))
    out = causal_labels(model, split, np.array([i for i, _, _ in sources]), 8, torch.device("cpu"))
    assert out is not None
    assert out["concept_kind"].tolist() == ["background", "background", "shortcut", "shared"]
    assert np.nanmax(out["drops"][0]) < 0.01  # either twin alone answers as well as both
    assert out["drop_all"][0] > 0.5  # above the label's one half: silenced
    assert abs(out["drop_all"][1]) < 1e-6
    assert out["drop_all"][2] > 0.5
    assert out["drop_all"][3] > 0.5
    member_audit = type("A", (), {"causal": out})()
    entry = causal_entry(member_audit, [0, 0, 1, 1])  # type: ignore[arg-type]
    assert entry is not None
    assert entry["counts"]["background"] == 2
    assert entry["background_carried_by_elements"] == 1
    assert entry["prototypes"][0]["drop_all"] == float(out["drop_all"][0])


def test_no_interventions_means_no_causal_labels() -> None:
    model = hand_built_member()
    split = FakeSplit(1, np.array([0]))
    split.interventions = None  # type: ignore[assignment]
    assert causal_labels(model, split, np.array([0, 0, 0, 0]), 8, torch.device("cpu")) is None


def test_min_distances_of_a_split_and_of_a_tensor_agree() -> None:
    model = hand_built_member()
    split = FakeSplit(3, np.array([0, 1, 0]))
    a = min_distances(model, split, 2, torch.device("cpu"))
    b = min_distances(model, split.batch([0, 1, 2]), 2, torch.device("cpu"))
    torch.testing.assert_close(a, b)
    assert a.shape == (3, 4)


def test_run_detectors_flags_and_keeps_the_right_prototypes() -> None:
    """Push images where the marker and the red part go with class 0 and the shared block is everywhere; a
    shifted test split where the marker leaves class 0. Prototypes of class 0 on: the marker, the background,
    the part, the shared block."""
    model = hand_built_member()
    rng = np.random.default_rng(0)

    def split(n: int, marker_class: int | None, part_class: int) -> tuple[torch.Tensor, np.ndarray]:
        labels = np.repeat([0, 1], n // 2)
        images = []
        for i, y in enumerate(labels):
            x = torch.tensor(GREY).view(3, 1, 1).repeat(1, S, S) + 0.1 * float(rng.random())
            if (marker_class is None and y != 0) or y == marker_class:
                x[:, 0:8, 0:8] = torch.tensor([1.0, 0.4, 0.8]).view(3, 1, 1)
            if y == part_class:
                x[:, 24:32, 24:32] = torch.tensor([0.9, 0.1, 0.1]).view(3, 1, 1)
            x[:, 0:8, 24:32] = 1.0 - 0.05 * float(rng.random())
            images.append(x)
            del i
        return torch.stack(images), labels

    push_x, push_y = split(40, 0, 0)
    test_x, test_y = split(40, 0, 0)
    shifted_x, shifted_y = split(40, None, 0)  # the marker now on class 1, not class 0
    with torch.no_grad():
        z = model.latent(push_x[:1])
        model.prototype_vectors.copy_(
            torch.stack([z[0, :, 0, 0], z[0, :, 2, 1], z[0, :, 3, 3], z[0, :, 0, 3]])
        )
    model.config.prototype_class = [0, 0, 0, 0]
    model.prototype_class = torch.zeros(4, dtype=torch.long)

    cpu = torch.device("cpu")
    push_d = min_distances(model, push_x, 16, cpu)
    test_d, shifted_d = min_distances(model, test_x, 16, cpu), min_distances(model, shifted_x, 16, cpu)
    paper = np.array([False, True, False, True])
    result = run_detectors(model, paper, push_d, push_y, test_d, test_y, shifted_d, shifted_y)
    assert result.flags["knn_purity"].tolist() == paper.tolist()
    assert result.flags["class_information"].tolist() == [False, True, False, True]
    assert result.flags["shift_sensitivity"].tolist() == [True, False, False, False]
    assert result.flags["class_information_or_shift"].tolist() == [True, True, False, True]
    no_shift = run_detectors(model, paper, push_d, push_y, test_d, test_y, None, None)
    assert "shift_sensitivity" not in no_shift.flags
    assert "test_shifted" in no_shift.skipped["shift_sensitivity"]
