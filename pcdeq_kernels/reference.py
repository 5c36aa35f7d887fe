"""Pure-PyTorch reference solver: the specification every backend is tested against.

Short and obvious on purpose; float64-capable; never optimised. Two maps, one loop:

    forward   z_{k+1} = act(L(z_k) + u)              z_0 = 0 (or a given z0)
    adjoint   h_{k+1} = D * (L^T(h_k) + v)           h_0 = D * v,   D = act'(L(z*) + u)

where ``L`` is the nonnegative linear map: ``z @ W.T`` for a dense weight of shape (d, d), or a 3x3
convolution with padding 1 for a kernel of shape (C, C, 3, 3); ``L^T`` is its adjoint. At the adjoint
fixed point, ``dL/du = h*`` and ``dL/dW = weight_grad(h*, z*)`` (``h*.T @ z*`` for dense).

Stopping rule (the official code's), per sample b with ``x`` the state (z or h):

    r_b = ||x_{k+1,b} - x_{k,b}|| / (||x_{k+1,b}|| + 1e-5)

``stop="sample"``: each sample stops (its state freezes and its iteration count stops) once
``r_b < tol``; ``stop="batch"``: all samples stop together once the same ratio taken over the whole
batch (Frobenius norms) is below ``tol``. Either way at most ``max_iter`` steps are taken.
``stop="official"`` is the official code's algorithm step for step: the whole-batch ratio formed as
it forms it (the two norms in the state dtype, read to the host, divided in Python), and the
adjoint iterated on ``g = L^T(h) + v`` (``h = D * g``) with the ratio measured on ``g``. The squared
norms are summed in float64 (no overflow for a float32 state), and a residual that is not finite
(NaN or Inf) stops its sample (or, with "batch", the batch) at once, unconverged: a non-finite iterate
is never "converged" and never iterated on.

Returned per sample: the iteration count (map applications), the last relative residual ``r_b``,
and whether the stopping rule was met. Half-precision inputs are solved in float32.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .activations import get_activation

RESIDUAL_EPS = 1e-5  # the official code's denominator guard


def linear_map(z: Tensor, weight: Tensor) -> Tensor:
    """L(z): ``z @ W.T`` (dense, W of shape (d, d)) or ``conv2d(z, W, padding=1)`` (W (C, C, 3, 3))."""
    if weight.dim() == 2:
        return z @ weight.T
    return F.conv2d(z, weight, padding=1)


def adjoint_map(h: Tensor, weight: Tensor) -> Tensor:
    """L^T(h): ``h @ W`` (dense) or the transposed convolution (conv)."""
    if weight.dim() == 2:
        return h @ weight
    return F.conv_transpose2d(h, weight, padding=1)


def weight_grad(h: Tensor, z: Tensor, weight: Tensor) -> Tensor:
    """dL/dW for ``L(z) = z W^T`` given the adjoint state ``h = dL/d(pre-activation)``."""
    if weight.dim() == 2:
        return h.T @ z
    return torch.nn.grad.conv2d_weight(z, weight.shape, h, padding=1)


def solver_dtype(dtype: torch.dtype) -> torch.dtype:
    """State and accumulation dtype: float64 stays float64, everything else is solved in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def squared_norms(x: Tensor) -> Tensor:
    """Per-sample sums of squares, accumulated in float64: they cannot overflow for a float32 (or half)
    state, whose squares stay below 1.2e77."""
    return x.flatten(1).to(torch.float64).square().sum(dim=1)


def per_sample_norm(x: Tensor) -> Tensor:
    return squared_norms(x).sqrt().to(x.dtype)


def residual_from_squares(sq_diff: Tensor, sq_norm: Tensor, dtype: torch.dtype) -> Tensor:
    """``sqrt(sq_diff) / (sqrt(sq_norm) + 1e-5)`` in float64, rounded to ``dtype``; NaN where a sum is
    not finite (a non-finite iterate, or a float64 state beyond 1e154): never a spurious 0."""
    r = sq_diff.sqrt() / (sq_norm.sqrt() + RESIDUAL_EPS)
    return torch.where(torch.isfinite(sq_diff) & torch.isfinite(sq_norm), r, float("nan")).to(dtype)


def relative_residual(x_next: Tensor, x: Tensor) -> Tensor:
    """Per-sample ``||x_next - x|| / (||x_next|| + 1e-5)``."""
    return residual_from_squares(squared_norms(x_next - x), squared_norms(x_next), x.dtype)


def batch_relative_residual(x_next: Tensor, x: Tensor) -> Tensor:
    """Whole-batch ``||x_next - x||_F / (||x_next||_F + 1e-5)`` (the official code's rule)."""
    return residual_from_squares(squared_norms(x_next - x).sum(), squared_norms(x_next).sum(), x.dtype)


def iterate(
    step: Callable[[Tensor], Tensor], x0: Tensor, *, tol: float, max_iter: int, stop: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Iterate ``x <- step(x)`` from ``x0`` with the stopping rule in the module docstring.

    A sample whose residual is not finite (NaN or Inf: a non-finite iterate) stops at once, unconverged,
    with that step taken; under ``stop="batch"`` a non-finite batch residual stops the whole batch so.
    Returns ``(x, iterations int32 (B,), residual (B,), converged bool (B,))``.
    """
    batch = x0.shape[0]
    x = x0
    iterations = torch.zeros(batch, dtype=torch.int32, device=x0.device)
    residual = torch.full((batch,), float("inf"), dtype=x0.dtype, device=x0.device)
    active = torch.ones(batch, dtype=torch.bool, device=x0.device)
    converged = torch.zeros(batch, dtype=torch.bool, device=x0.device)
    for _ in range(max_iter):
        x_next = step(x)
        r = relative_residual(x_next, x)
        if stop == "official":  # (as the official code forms it: float norms of the whole batch)
            r_batch = torch.tensor((x_next - x).norm().item() / (x_next.norm().item() + RESIDUAL_EPS))
        else:
            r_batch = batch_relative_residual(x_next, x) if stop == "batch" else None
        keep = active.view(-1, *([1] * (x.dim() - 1)))
        x = torch.where(keep, x_next, x)
        residual = torch.where(active, r, residual)
        iterations += active.to(torch.int32)
        if stop in ("batch", "official"):
            if bool(r_batch < tol):
                converged[:] = True
                break
            if not bool(torch.isfinite(r_batch)):
                break
        else:
            converged |= active & (r < tol)
            active = active & ~(r < tol) & torch.isfinite(r)
            if not bool(active.any()):
                break
    return x, iterations, residual, converged


def forward_solve(
    u: Tensor,
    weight: Tensor,
    activation: str,
    *,
    tol: float = 1e-4,
    max_iter: int = 200,
    stop: str = "sample",
    z0: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Solve ``z = act(L(z) + u)``. Returns ``(z*, iterations, residual, converged)``."""
    act = get_activation(activation).fn
    dtype = solver_dtype(u.dtype)
    u_, w_ = u.to(dtype), weight.to(dtype)
    x0 = torch.zeros_like(u_) if z0 is None else z0.to(dtype)
    z, its, res, conv = iterate(lambda z: act(linear_map(z, w_) + u_), x0, tol=tol, max_iter=max_iter, stop=stop)
    return z.to(u.dtype), its, res, conv


def adjoint_solve(
    v: Tensor,
    weight: Tensor,
    D: Tensor,
    *,
    tol: float = 1e-4,
    max_iter: int = 200,
    stop: str = "sample",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Solve ``h = D * (L^T(h) + v)`` from ``h_0 = D * v``. Returns ``(h*, iterations, residual, converged)``.
    With ``stop="official"`` the official code's iterate ``g`` (``g <- L^T(D * g) + v`` from ``v``: the
    same sequence, ``h = D * g``) is iterated, measured and returned instead."""
    dtype = solver_dtype(v.dtype)
    v_, w_, d_ = v.to(dtype), weight.to(dtype), D.to(dtype)
    if stop == "official":
        g, its, res, conv = iterate(lambda g: adjoint_map(d_ * g, w_) + v_, v_, tol=tol, max_iter=max_iter, stop=stop)
        return g.to(v.dtype), its, res, conv
    h, its, res, conv = iterate(lambda h: d_ * (adjoint_map(h, w_) + v_), d_ * v_, tol=tol, max_iter=max_iter, stop=stop)
    return h.to(v.dtype), its, res, conv


def activation_derivative_at(z: Tensor, u: Tensor, weight: Tensor, activation: str) -> Tensor:
    """``D = act'(L(z) + u)``: the diagonal of the Jacobian's activation part at ``z``."""
    dtype = solver_dtype(u.dtype)
    if z.dtype == weight.dtype == u.dtype == dtype:  # (the usual case: no conversions to make)
        return get_activation(activation).derivative(linear_map(z, weight) + u)
    return get_activation(activation).derivative(linear_map(z.to(dtype), weight.to(dtype)) + u.to(dtype))


def global_contraction_rate(z: Tensor, u: Tensor, activation: str) -> Tensor:
    """Per-sample ``max_i (1 - act(u)_i / z*_i)``: the rate at which the iteration from 0 approaches
    ``z*`` in the norm ``max_i |x_i| / z*_i``, at every step (not only asymptotically).

    By concavity ``J z* <= z* - act(u)`` (J the Jacobian at z*), so it is also an upper bound on
    ``rho(J)`` (Collatz-Wielandt with x = z*), but a loose one wherever some ``u_i`` is small. An entry
    with ``z*_i = 0`` gives no guarantee and counts as 1.
    """
    dtype = solver_dtype(u.dtype)
    z_, au = z.to(dtype), get_activation(activation).fn(u.to(dtype))
    ratio = torch.where(z_ > 0, au / z_.clamp_min(torch.finfo(dtype).tiny), torch.zeros_like(z_))
    return (1 - ratio).flatten(1).amax(dim=1)


POWER_STEPS = 2  # Collatz-Wielandt vectors after z* tried by contraction_bound (one matmul each)


def contraction_bound(z: Tensor, u: Tensor, weight: Tensor, activation: str, power_steps: int = POWER_STEPS) -> Tensor:
    """Per-sample upper bound on ``rho(J)``, the spectral radius of the Jacobian ``J = diag(D) L`` at
    ``z*`` (``D = act'(L(z*) + u)``): the linear rate of the adjoint iteration and the asymptotic rate
    of the forward one.

    ``J >= 0``, so for any positive vector ``x`` (Collatz-Wielandt) ``rho(J) <= max_i (J x)_i / x_i``.
    The vectors tried are ``x = z`` (its ``L(z)`` is the one that ``D`` needs) and ``power_steps``
    power iterates ``x <- J x`` (one more ``L`` each), which approach the Perron vector, where the
    bound is exact; the result is the smallest of their bounds, each valid, so the minimum is one too.
    With ``x = z*`` the bound is at most ``global_contraction_rate`` (concavity: ``J z* <= z* - act(u)``);
    the power steps take it down to about ``rho(J)`` where that rate is loose. It holds for the
    Jacobian at the ``z`` given, converged or not. Entries where ``D = 0`` (relu6 saturated) are zero
    rows of ``J``, which leave ``rho(J)`` to the other entries: the ratios are taken there, and ``x``
    needs to be positive there only. A vector with a zero entry among them gives no bound and is
    skipped (no vector at all: 1, as the global rate says there). Computed in float64 and raised by
    ``(8 n + 64)`` float64 ulps (``n`` the terms of one ``L`` entry) so that the rounding of the
    products and sums cannot take it below ``rho(J)`` (of ``J`` with ``D`` as computed); at most 1.
    """
    act = get_activation(activation)
    z_, u_, w_ = z.double(), u.double(), weight.double()
    best = torch.ones(z_.shape[0], dtype=torch.float64, device=z_.device)
    x, lx = z_, linear_map(z_, w_)
    D = act.derivative(lx + u_)
    active = D > 0  # J's nonzero rows; rho(J) is that of J on these entries alone (the rest are 0 rows)
    for step in range(power_steps + 1):
        jx = D * lx
        # An active entry with x_i = 0 makes the ratio inf (or NaN when (J x)_i = 0 too) and its max
        # inf or NaN, which fmin passes over: such a vector gives no bound.
        ratio = torch.where(active, jx / x, 0.0).flatten(1).amax(dim=1)
        best = torch.fmin(best, ratio)
        if step == power_steps:
            break
        x = jx / jx.flatten(1).amax(dim=1).view(-1, *([1] * (jx.dim() - 1)))  # (renormalised: no underflow)
        lx = linear_map(x, w_)
    terms = weight[0].numel()  # d (dense) or 9 C (conv)
    slack = (8 * terms + 64) * torch.finfo(torch.float64).eps
    return (best * (1 + slack)).clamp(max=1.0).to(solver_dtype(u.dtype))
