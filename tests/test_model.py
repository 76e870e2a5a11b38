"""The member's computation against brute force (paper §2.1)."""

from __future__ import annotations

import math

import pytest
import torch

from protoaudit.core.model import (
    EPSILON,
    MemberConfig,
    ProtoPNet,
    build_add_on,
    similarity,
    squared_distances,
)


def brute_force_distances(z: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    n, _, hh, ww = z.shape
    out = torch.empty(n, p.shape[0], hh, ww, dtype=z.dtype)
    for i in range(n):
        for j in range(p.shape[0]):
            for h in range(hh):
                for w in range(ww):
                    out[i, j, h, w] = ((z[i, :, h, w] - p[j]) ** 2).sum()
    return out


def test_squared_distances_equal_brute_force() -> None:
    gen = torch.Generator().manual_seed(0)
    z = torch.rand(2, 5, 3, 4, generator=gen, dtype=torch.float64)
    p = torch.rand(7, 5, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(squared_distances(z, p), brute_force_distances(z, p), rtol=0, atol=1e-12)


def test_distances_are_clamped_at_zero() -> None:
    z = torch.full((1, 3, 2, 2), 0.3)
    p = torch.full((1, 3), 0.3)
    assert float(squared_distances(z, p).min()) >= 0.0


def test_identical_patch_gets_log_one_over_epsilon() -> None:
    torch.manual_seed(0)
    model = (
        ProtoPNet(
            MemberConfig(
                trunk="tiny_vgg", n_classes=2, prototypes_per_class=2, prototype_dim=8, image_size=32
            )
        )
        .double()
        .eval()
    )
    x = torch.rand(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        z = model.latent(x)
        model.prototype_vectors[1] = z[0, :, 2, 1]
        _, min_d = model(x)
    assert float(min_d[0, 1]) == pytest.approx(0.0, abs=1e-10)
    assert float(similarity(min_d)[0, 1]) == pytest.approx(math.log(1 / EPSILON), rel=1e-6)
    assert float(similarity(min_d)[0, 0]) < math.log(1 / EPSILON) - 1


def test_forward_is_max_similarity_then_last_layer() -> None:
    torch.manual_seed(1)
    model = ProtoPNet(
        MemberConfig(trunk="tiny_resnet", n_classes=3, prototypes_per_class=2, prototype_dim=6, image_size=32)
    ).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        logits, min_d = model(x)
        d = brute_force_distances(model.latent(x).double(), model.prototype_vectors.double())
        sims = similarity(d).flatten(2).amax(2)  # global max pooling of the similarity maps
        expected = sims @ model.last_layer.weight.double().t()
    torch.testing.assert_close(logits.double(), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(min_d.double(), d.flatten(2).amin(2), rtol=1e-4, atol=1e-5)


def test_last_layer_initialised_one_and_minus_half() -> None:
    model = ProtoPNet(
        MemberConfig(trunk="tiny_vgg", n_classes=3, prototypes_per_class=2, prototype_dim=4, image_size=32)
    )
    w = model.last_layer.weight.detach()
    assert model.last_layer.bias is None
    for k in range(3):
        for j in range(6):
            assert float(w[k, j]) == (1.0 if j // 2 == k else -0.5)


@pytest.mark.parametrize(
    ("kind", "cin", "dim", "convs"),
    [("regular", 96, 32, 2), ("bottleneck", 512, 128, 4), ("bottleneck", 96, 32, 4)],
)
def test_add_on_ends_in_sigmoid(kind: str, cin: int, dim: int, convs: int) -> None:
    layers = build_add_on(kind, cin, dim)  # type: ignore[arg-type]
    assert isinstance(layers[-1], torch.nn.Sigmoid)
    conv = [m for m in layers if isinstance(m, torch.nn.Conv2d)]
    assert len(conv) == convs
    assert conv[0].in_channels == cin
    assert conv[-1].out_channels == dim
    assert all(c.kernel_size == (1, 1) for c in conv)


def test_keep_prototypes_removes_columns() -> None:
    model = ProtoPNet(
        MemberConfig(trunk="tiny_vgg", n_classes=2, prototypes_per_class=3, prototype_dim=4, image_size=32)
    )
    with torch.no_grad():
        model.last_layer.weight.copy_(torch.arange(12, dtype=torch.float32).view(2, 6))
    vectors = model.prototype_vectors.detach().clone()
    model.keep_prototypes(torch.tensor([True, False, True, True, False, True]))
    assert model.n_prototypes == 4
    torch.testing.assert_close(model.prototype_vectors.detach(), vectors[[0, 2, 3, 5]])
    torch.testing.assert_close(
        model.last_layer.weight.detach(), torch.tensor([[0.0, 2, 3, 5], [6, 8, 9, 11]])
    )
    assert model.config.prototype_class == [0, 0, 1, 1]


def test_inference_distances_equal_the_autograd_formula_bit_for_bit() -> None:
    from protoaudit.core.model import squared_distances

    generator = torch.Generator().manual_seed(0)
    z = torch.rand(5, 16, 7, 7, generator=generator)
    prototypes = torch.rand(30, 16, generator=generator)
    prototypes[3] = z[1, :, 2, 4]  # a prototype on a patch: distance 0 there (clamped, never negative)
    with_grad = squared_distances(z, prototypes.clone().requires_grad_(True))
    assert with_grad.requires_grad
    with torch.no_grad():
        without = squared_distances(z, prototypes)
    assert torch.equal(with_grad.detach(), without)
    assert float(without[1, 3, 2, 4]) < 1e-6
    assert float(without.min()) >= 0.0
    reference = (z[:, None] - prototypes[None, :, :, None, None]).pow(2).sum(2)
    torch.testing.assert_close(without, reference, atol=1e-5, rtol=1e-5)
