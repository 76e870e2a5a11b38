"""The last layer as the paper's convex problem (§2.2, stage 4), solved to a tolerance.

With the latent space fixed, the last layer h (K × m, no bias) minimises

    F(W) = (1/N) Σ_i CE(W s_i, y_i) + λ · Σ_{(k, j) off-class} |W_kj|

over the similarities s_i (m,) of the training images: cross-entropy plus an L1 penalty on the connections
between a prototype and a class it does not belong to. F is convex; the paper optimises it so that off-class
connections become exactly 0 and a reasoning sheet reads "this looks like that" (the class's own prototypes
carry its decision).

The solver is accelerated proximal gradient (FISTA) on the whole set at once: a gradient step on the
cross-entropy, then soft-thresholding of the off-class entries only (the proximal map of the penalty, which sets
entries to exactly 0). The step comes from a backtracking line search that may also lengthen it (Scheinberg,
Goldfarb & Bai 2014), momentum restarts when it points uphill (O'Donoghue & Candès 2015), and the solver stops
when the L1 optimality conditions hold to a tolerance (the smallest subgradient of F is small), not after a
fixed number of epochs.

References:
    Chen et al., "This Looks Like That: Deep Learning for Interpretable Image Recognition", NeurIPS 2019, §2.2.
    Beck & Teboulle, "A Fast Iterative Shrinkage-Thresholding Algorithm for Linear Inverse Problems",
    SIAM J. Imaging Sciences 2009.
    Scheinberg, Goldfarb & Bai, "Fast First-Order Methods for Composite Convex Optimization with
    Backtracking", Foundations of Computational Mathematics 2014.
    O'Donoghue & Candès, "Adaptive Restart for Accelerated Gradient Schemes", Foundations of Computational
    Mathematics 2015.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LastLayerSolution:
    """The solver's answer.

    ``weight`` (K, m) in the similarities' dtype and on their device, off-class entries exactly 0 where the penalty
    zeroes them; ``objective`` F(W) and ``cross_entropy`` its first term at ``weight``; ``residual`` the
    largest entry of the minimum-norm subgradient of F at ``weight`` (0 at an exact minimiser);
    ``converged`` whether ``residual`` fell to the tolerance before ``max_iter`` iterations.
    """

    weight: torch.Tensor
    iterations: int
    converged: bool
    objective: float
    cross_entropy: float
    residual: float


def _cross_entropy_and_grad(
    weight: torch.Tensor, sims: torch.Tensor, onehot: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of logits ``sims @ weight.T`` and its gradient (K, m)."""
    logits = sims @ weight.t()
    log_p = torch.log_softmax(logits, dim=1)
    ce = -(onehot * log_p).sum(1).mean()
    grad = (log_p.exp() - onehot).t() @ sims / len(sims)
    return ce, grad


def _cross_entropy(weight: torch.Tensor, sims: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(sims @ weight.t(), labels)


def _soft_threshold(w: torch.Tensor, threshold: float, off_class: torch.Tensor) -> torch.Tensor:
    """Proximal map of threshold·Σ_off |w|: shrink off-class entries towards 0 by ``threshold``."""
    shrunk = torch.sign(w) * torch.clamp(w.abs() - threshold, min=0.0)
    return torch.where(off_class, shrunk, w)


def l1_residual(weight: torch.Tensor, grad: torch.Tensor, off_class: torch.Tensor, l1: float) -> torch.Tensor:
    """(K, m) magnitude of the minimum-norm subgradient of F at ``weight``, given ∇CE (``grad``).

    On-class entries: |g|. Off-class entries with w ≠ 0: |g + λ·sign(w)|. Off-class entries with w = 0:
    max(|g| − λ, 0), since the subdifferential of λ|w| at 0 is [−λ, λ]. All zero exactly at a minimiser
    (the optimality conditions of an L1-penalised convex problem).
    """
    on = grad.abs()
    nonzero = (grad + l1 * torch.sign(weight)).abs()
    zero = torch.clamp(grad.abs() - l1, min=0.0)
    off = torch.where(weight != 0, nonzero, zero)
    return torch.where(off_class, off, on)


def last_layer_objective(
    weight: torch.Tensor, similarities: torch.Tensor, labels: torch.Tensor, off_class: torch.Tensor, l1: float
) -> float:
    """F(W): mean cross-entropy + l1·Σ|off-class entries|, in float64.

    Args:
        weight: (K, m) float.
        similarities: (N, m) float, one row per image.
        labels: (N,) int64 in [0, K).
        off_class: (K, m) bool, True where prototype j does not belong to class k.
        l1: λ ≥ 0.
    """
    w = weight.double()
    ce = _cross_entropy(w, similarities.double(), labels)
    return float(ce + l1 * w[off_class].abs().sum())


def solve_last_layer(
    similarities: torch.Tensor,
    labels: torch.Tensor,
    off_class: torch.Tensor,
    l1: float,
    init: torch.Tensor | None = None,
    tol: float = 1e-5,
    max_iter: int = 5000,
    check_every: int = 10,
) -> LastLayerSolution:
    """Minimise F(W) = mean CE(W s_i, y_i) + l1·Σ_off |W| by FISTA, full batch, in float64.

    Args:
        similarities: (N, m) float, the fixed similarities of the training images (the paper's g_p).
        labels: (N,) int64 in [0, K).
        off_class: (K, m) bool, True where prototype j does not belong to class k (the penalised entries).
        l1: λ ≥ 0, the weight of the off-class L1 penalty (same scale as the training loss: mean CE + λ·sum).
        init: (K, m) starting weight (e.g. the current last layer); zeros when None.
        tol: stop when every entry of the minimum-norm subgradient of F is at most ``tol`` (see
            :func:`l1_residual`), checked every ``check_every`` iterations and at the end.
        max_iter: at most this many proximal-gradient steps; ``converged`` is False if the tolerance was
            not reached by then.

    Returns:
        :class:`LastLayerSolution` with the weight in the similarities' dtype (cast from the float64
        iterate; entries the penalty zeroed stay exactly 0).
    """
    if similarities.ndim != 2 or labels.ndim != 1 or len(labels) != len(similarities):
        raise ValueError(
            f"similarities must be (N, m) and labels (N,), got {tuple(similarities.shape)} and "
            f"{tuple(labels.shape)}"
        )
    k, m = off_class.shape
    if m != similarities.shape[1]:
        raise ValueError(f"off_class is {(k, m)} but similarities have {similarities.shape[1]} columns")
    if l1 < 0:
        raise ValueError(f"l1 must be >= 0, got {l1}")
    device = similarities.device
    sims = similarities.detach().to(torch.float64)
    labels = labels.to(device=device, dtype=torch.long)
    onehot = F.one_hot(labels, k).to(torch.float64)
    off = off_class.to(device=device, dtype=torch.bool)
    x = (
        init.detach().to(device=device, dtype=torch.float64).clone()
        if init is not None
        else torch.zeros(k, m, dtype=torch.float64, device=device)
    )

    def penalty(w: torch.Tensor) -> float:
        return float(l1 * w[off].abs().sum())

    # Curvature bound: the softmax cross-entropy Hessian is at most 1/2 · σ_max(S)² / N; a fraction of it
    # starts the line search, which lengthens and shortens the step as the local curvature allows.
    n = max(len(sims), 1)
    sigma = float(torch.linalg.matrix_norm(sims, ord=2)) if len(sims) else 1.0
    lipschitz = max(0.5 * sigma * sigma / n, 1e-12) * 0.1
    y, t = x.clone(), 1.0
    ce_x, grad_x = _cross_entropy_and_grad(x, sims, onehot)
    residual = float(l1_residual(x, grad_x, off, l1).max()) if x.numel() else 0.0
    iterations = 0
    converged = residual <= tol
    while not converged and iterations < max_iter:
        iterations += 1
        ce_y, grad_y = _cross_entropy_and_grad(y, sims, onehot)
        lipschitz_prev = lipschitz
        lipschitz *= 0.5  # try a longer step first
        for _ in range(200):
            x_new = _soft_threshold(y - grad_y / lipschitz, l1 / lipschitz, off)
            step = x_new - y
            ce_new = _cross_entropy(x_new, sims, labels)
            bound = ce_y + (grad_y * step).sum() + 0.5 * lipschitz * (step * step).sum()
            if ce_new <= bound + 1e-15 * max(1.0, abs(float(ce_y))):  # rounding slack
                break
            lipschitz *= 2.0
        else:
            raise FloatingPointError("the last-layer line search found no step (non-finite similarities?)")
        # Momentum for a varying step (Scheinberg, Goldfarb & Bai 2014), restarted when the step and the
        # momentum disagree (O'Donoghue & Candès 2015, gradient scheme).
        if float(((y - x_new) * (x_new - x)).sum()) > 0:
            t = 1.0
        t_new = (1.0 + math.sqrt(1.0 + 4.0 * (lipschitz / lipschitz_prev) * t * t)) / 2.0
        y = x_new + ((t - 1.0) / t_new) * (x_new - x)
        x, t = x_new, t_new
        if iterations % check_every == 0 or iterations == max_iter:
            ce_x, grad_x = _cross_entropy_and_grad(x, sims, onehot)
            residual = float(l1_residual(x, grad_x, off, l1).max())
            converged = residual <= tol
    ce_x, grad_x = _cross_entropy_and_grad(x, sims, onehot)
    residual = float(l1_residual(x, grad_x, off, l1).max()) if x.numel() else 0.0
    return LastLayerSolution(
        weight=x.to(similarities.dtype),
        iterations=iterations,
        converged=residual <= tol,
        objective=float(ce_x) + penalty(x),
        cross_entropy=float(ce_x),
        residual=residual,
    )
