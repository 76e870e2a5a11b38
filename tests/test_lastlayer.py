"""The last layer's convex problem: FISTA's answer meets the L1 optimality conditions and matches an
independent solver (L-BFGS-B on the smooth split w = w⁺ − w⁻ of the off-class entries)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize

from protoaudit.core.lastlayer import last_layer_objective, solve_last_layer


def _problem(
    k: int = 4, per_class: int = 2, n: int = 120, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Similarities that favour the own class's prototypes, with noise (not separable)."""
    g = torch.Generator().manual_seed(seed)
    m = k * per_class
    owner = torch.arange(m) // per_class
    labels = torch.randint(0, k, (n,), generator=g)
    own = (owner[None, :] == labels[:, None]).double()
    sims = (
        0.5
        + torch.rand(n, m, generator=g, dtype=torch.float64)
        + 1.5 * own * torch.rand(n, m, generator=g, dtype=torch.float64)
    )
    off_class = owner[None, :] != torch.arange(k)[:, None]  # (K, m)
    init = torch.where(off_class, -0.5, 1.0).double()
    return sims, labels, off_class, init


def _autograd_gradient(w: torch.Tensor, sims: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    w = w.detach().double().clone().requires_grad_(True)
    F.cross_entropy(sims.double() @ w.t(), labels).backward()
    assert w.grad is not None
    return w.grad


def test_solution_meets_the_l1_optimality_conditions() -> None:
    sims, labels, off_class, init = _problem()
    lam = 0.01
    sol = solve_last_layer(sims, labels, off_class, lam, init=init, tol=1e-8, max_iter=20000)
    assert sol.converged
    assert sol.residual <= 1e-8
    w = sol.weight
    g = _autograd_gradient(w, sims, labels)
    on = ~off_class
    zero = off_class & (w == 0)
    nonzero = off_class & (w != 0)
    # the penalty produced exact zeros and left some off-class connections: the check covers both cases
    assert zero.sum() >= 3
    assert nonzero.sum() >= 1
    assert g[on].abs().max() <= 1e-8  # unpenalised: gradient 0
    assert g[zero].abs().max() <= lam + 1e-8  # 0 ∈ g + λ·[−1, 1]
    assert (g[nonzero] + lam * torch.sign(w[nonzero])).abs().max() <= 1e-8  # g + λ·sign(w) = 0
    assert sol.objective == pytest.approx(last_layer_objective(w, sims, labels, off_class, lam), abs=1e-12)
    assert sol.objective < last_layer_objective(init, sims, labels, off_class, lam)


def _reference_lbfgsb(
    sims: torch.Tensor, labels: torch.Tensor, off_class: torch.Tensor, lam: float
) -> tuple[np.ndarray, float]:
    """Smooth reformulation: off-class w = u − v with u, v ≥ 0, penalty λ·Σ(u + v); on-class w free."""
    s = sims.double().numpy()
    y = np.eye(off_class.shape[0])[labels.numpy()]
    off = off_class.numpy()
    n_on, n_off = int((~off).sum()), int(off.sum())

    def unpack(z: np.ndarray) -> np.ndarray:
        w = np.zeros(off.shape)
        w[~off] = z[:n_on]
        w[off] = z[n_on : n_on + n_off] - z[n_on + n_off :]
        return w

    def fun(z: np.ndarray) -> tuple[float, np.ndarray]:
        w = unpack(z)
        logits = s @ w.T
        logits -= logits.max(1, keepdims=True)
        log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        ce = -(y * log_p).sum(1).mean()
        grad_w = (np.exp(log_p) - y).T @ s / len(s)
        grad = np.concatenate([grad_w[~off], grad_w[off] + lam, -grad_w[off] + lam])
        return ce + lam * z[n_on:].sum(), grad

    z0 = np.zeros(n_on + 2 * n_off)
    bounds = [(None, None)] * n_on + [(0.0, None)] * (2 * n_off)
    res = minimize(
        fun,
        z0,
        jac=True,
        method="L-BFGS-B",
        bounds=bounds,
        options={"maxiter": 50000, "ftol": 1e-16, "gtol": 1e-12, "maxcor": 30},
    )
    return unpack(res.x), float(res.fun)


@pytest.mark.parametrize("lam", [1e-3, 0.03])
def test_matches_an_independent_solver(lam: float) -> None:
    # K − 1 = 3 off-class entries per prototype (odd): the minimiser is unique, so the weights must agree
    sims, labels, off_class, init = _problem(k=4, per_class=2, n=150, seed=1)
    sol = solve_last_layer(sims, labels, off_class, lam, init=init, tol=1e-8, max_iter=20000)
    ref_w, ref_obj = _reference_lbfgsb(sims, labels, off_class, lam)
    assert sol.converged
    assert sol.objective == pytest.approx(ref_obj, abs=1e-9)
    np.testing.assert_allclose(sol.weight.numpy(), ref_w, atol=1e-4)
    # the same connections vanish: exactly 0 in FISTA's answer, below 1e-6 in the reference's
    off = off_class.numpy()
    np.testing.assert_array_equal(sol.weight.numpy()[off] == 0, np.abs(ref_w[off]) < 1e-6)
    assert (sol.weight[off_class] == 0).sum() > 0


def test_large_penalty_zeroes_every_off_class_weight_and_float32_in_gives_float32_out() -> None:
    sims, labels, off_class, init = _problem(seed=2)
    sol = solve_last_layer(sims.float(), labels, off_class, 5.0, init=init.float(), tol=1e-7)
    assert sol.weight.dtype == torch.float32
    assert (sol.weight[off_class] == 0).all()
    assert sol.weight[~off_class].abs().max() > 0


def test_iteration_guard_reports_not_converged() -> None:
    sims, labels, off_class, init = _problem(seed=3)
    sol = solve_last_layer(sims, labels, off_class, 1e-3, init=init, tol=1e-12, max_iter=3)
    assert sol.iterations == 3
    assert not sol.converged
    assert sol.residual > 1e-12


def test_shapes_are_checked() -> None:
    sims, labels, off_class, _ = _problem()
    with pytest.raises(ValueError, match="columns"):
        solve_last_layer(sims[:, :-1], labels, off_class, 1e-3)
    with pytest.raises(ValueError, match="l1"):
        solve_last_layer(sims, labels, off_class, -1.0)
