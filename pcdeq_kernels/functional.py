"""``fixed_point``: the one entry point the modules (and users) call.

    z*, stats = fixed_point(u, weight, activation)

solves ``z = act(L(z) + u)`` (``L(z) = z @ W.T`` for a (d, d) weight, a 3x3 convolution with padding 1
for a (C, C, 3, 3) kernel) and attaches the exact implicit gradient: with ``D = act'(L(z*) + u)`` and
``h* = D * (L^T(h*) + v)`` for the incoming gradient ``v = dLoss/dz*``,

    dLoss/du = h*        dLoss/dW = h*^T z*  (dense; the matching correlation for conv)

No autograd graph is kept across iterations: memory does not grow with the iteration count.
``backward="jfb"`` replaces ``h*`` by ``D * v`` (Jacobian-free backprop: cheaper, inexact).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import backends, ops, reference
from .activations import get_activation

STOP_RULES = ("sample", "batch")
BACKWARD_MODES = ("implicit", "jfb")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclasses.dataclass
class SolverStats:
    """Per-sample statistics of one solve (tensors of shape (B,)).

    ``contraction_bound`` is ``max_i (1 - act(u)_i / z*_i)``: an upper bound on the spectral radius of
    the Jacobian at ``z*`` (so on the adjoint's linear rate), and the rate at which the iteration from
    0 approaches ``z*`` in the norm ``max_i |x_i| / z*_i``. It is computed on first access (the stats
    keep references to ``z*`` and ``u`` until then). The backward fields are filled when the gradient
    is computed (in eager mode; under ``torch.compile`` they stay at 0 / NaN).
    """

    forward_iterations: Tensor
    forward_residual: Tensor
    converged: Tensor
    backward_iterations: Tensor
    backward_residual: Tensor
    backend: str
    _bound_inputs: Optional[tuple] = dataclasses.field(default=None, repr=False)
    _bound: Optional[Tensor] = dataclasses.field(default=None, repr=False)

    @property
    def contraction_bound(self) -> Tensor:
        if self._bound is None:
            z, u, activation = self._bound_inputs
            self._bound = reference.contraction_bound(z, u, activation)
            self._bound_inputs = None
        return self._bound

    def summary(self) -> dict[str, float]:
        """Batch means and maxima as Python numbers (one host read), for logging."""
        values = torch.stack([
            self.forward_iterations.double().mean(), self.forward_iterations.double().max(),
            self.converged.double().mean(), self.contraction_bound.double().max(),
            self.backward_iterations.double().mean(), self.backward_iterations.double().max(),
        ]).tolist()
        keys = ("forward_iterations_mean", "forward_iterations_max", "converged_fraction",
                "contraction_bound_max", "backward_iterations_mean", "backward_iterations_max")
        return dict(zip(keys, values))


def _problem_kind(u: Tensor, weight: Tensor) -> str:
    """Check shapes, dtypes and devices statically; return ``"dense"`` or ``"conv"``."""
    for name, t in (("u", u), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; pcDEQ solves float16, bfloat16, float32 or float64")
    if u.dtype != weight.dtype:
        raise TypeError(f"u is {u.dtype} but weight is {weight.dtype}; cast them to one dtype")
    if u.device != weight.device:
        raise ValueError(f"u is on {u.device} but weight is on {weight.device}; move them to one device")
    if weight.shape[0] == 0:
        raise ValueError("weight has zero rows; a pcDEQ layer needs at least one feature or channel")
    if weight.dim() == 2:
        if u.dim() != 2 or weight.shape[0] != weight.shape[1] or u.shape[1] != weight.shape[0]:
            raise ValueError(
                f"dense pcDEQ needs u of shape (B, d) and weight (d, d); got u {tuple(u.shape)}, "
                f"weight {tuple(weight.shape)}"
            )
        return "dense"
    if weight.dim() == 4:
        c = weight.shape[0]
        if tuple(weight.shape) != (c, c, 3, 3) or u.dim() != 4 or u.shape[1] != c:
            raise ValueError(
                f"convolutional pcDEQ needs u of shape (B, C, H, W) and weight (C, C, 3, 3); got u "
                f"{tuple(u.shape)}, weight {tuple(weight.shape)}"
            )
        return "conv"
    raise ValueError(
        f"weight must have shape (d, d) (dense) or (C, C, 3, 3) (conv); got {tuple(weight.shape)}"
    )


def _check_options(tol, max_iter, stop, backward, backward_tol, backward_max_iter, on_nonconvergence) -> None:
    for name, value in (("tol", tol), ("backward_tol", backward_tol)):
        if not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    for name, value in (("max_iter", max_iter), ("backward_max_iter", backward_max_iter)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if stop not in STOP_RULES:
        raise ValueError(f"stop must be one of {STOP_RULES}, got {stop!r}")
    if backward not in BACKWARD_MODES:
        raise ValueError(f"backward must be one of {BACKWARD_MODES}, got {backward!r}")
    if on_nonconvergence not in ops.NONCONVERGENCE_POLICIES:
        raise ValueError(f"on_nonconvergence must be one of {ops.NONCONVERGENCE_POLICIES}, got {on_nonconvergence!r}")


def _without_autocast(x: Tensor):
    """The solves run in the precision of their inputs (half inputs are solved in float32, exactly as
    without autocast), never autocast's: autocast stays on inside autograd Functions and custom ops and
    would recast the solvers' own convolutions and matmuls to float16/bfloat16."""
    if x.device.type in ("cpu", "cuda"):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


class _FixedPoint(torch.autograd.Function):
    """Forward: one ``forward_solve`` op. Backward: one ``adjoint_solve`` op (or JFB)."""

    @staticmethod
    def forward(ctx, u, weight, z0, config, stats_out):
        with _without_autocast(u):
            z, its, res, conv = ops.forward_solve(
                u, weight, z0, config["activation"], config["tol"], config["max_iter"], config["stop"],
                config["backend"], config["on_nonconvergence"],
            )
        ctx.config = config
        ctx.stats_out = stats_out
        ctx.save_for_backward(u, weight, z)
        ctx.mark_non_differentiable(its, res, conv)
        return z, its, res, conv

    @staticmethod
    @once_differentiable  # double backward would need the adjoint's own derivative: a clear error instead
    def backward(ctx, grad_z, *_):
        with _without_autocast(grad_z):
            return _FixedPoint._backward(ctx, grad_z)

    @staticmethod
    def _backward(ctx, grad_z):
        u, weight, z = ctx.saved_tensors
        cfg = ctx.config
        if z.dim() == 4:
            # Convolutions run about twice as fast on channels-last tensors on CPU (oneDNN) and GPU
            # (cuDNN), and the compiled solvers iterate in that layout: convert once, here.
            u, z, grad_z = (t.contiguous(memory_format=torch.channels_last) for t in (u, z, grad_z))
        D = reference.activation_derivative_at(z, u, weight, cfg["activation"])
        v = grad_z.to(D.dtype)
        if cfg["backward"] == "jfb":
            h = D * v
        else:
            h, its, res, _ = ops.adjoint_solve(
                v, weight.to(D.dtype), D, cfg["backward_tol"], cfg["backward_max_iter"], cfg["stop"],
                cfg["backend"], cfg["on_nonconvergence"],
            )
            if not torch.compiler.is_compiling():
                for stats in ctx.stats_out:
                    stats.backward_iterations.copy_(its)
                    stats.backward_residual.copy_(res)
        grad_u = h.to(u.dtype) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = reference.weight_grad(h, z.to(h.dtype), weight.to(h.dtype)).to(weight.dtype)
        return grad_u, grad_w, None, None, None


def fixed_point(
    u: Tensor,
    weight: Tensor,
    activation: str = "tanh",
    *,
    tol: float = 1e-4,
    max_iter: int = 200,
    stop: str = "sample",
    backward: str = "implicit",
    backward_tol: Optional[float] = None,
    backward_max_iter: Optional[int] = None,
    z0: Optional[Tensor] = None,
    backend: str = "auto",
    on_nonconvergence: str = "warn",
) -> tuple[Tensor, SolverStats]:
    """Solve ``z = act(L(z) + u)`` for ``W >= 0``, ``u >= 0``; return ``(z*, SolverStats)``.

    Args:
        u: injection, (B, d) for a dense weight or (B, C, H, W) for a conv kernel; ``u >= 0``.
        weight: (d, d) or (C, C, 3, 3), elementwise ``>= 0``.
        activation: "tanh", "softsign", "relu6" (pcDEQ-1, need ``u > 0``) or "sigmoid" (pcDEQ-2).
        tol, max_iter: forward stopping rule ``||z_{k+1}-z_k|| / (||z_{k+1}|| + 1e-5) < tol``.
        stop: "sample" (each sample stops on its own) or "batch" (whole-batch norms, as the official code).
        backward: "implicit" (exact gradient via the adjoint fixed point) or "jfb".
        backward_tol, backward_max_iter: the adjoint's stopping rule (default: the forward's).
        z0: optional nonnegative starting point (the fixed point does not depend on it).
        backend: "auto", "reference", "cpu", "cuda" or "triton".
        on_nonconvergence: "warn" (default), "raise" (``ops.NonConvergenceError``) or "ignore"; the
            per-sample ``converged`` flags are in the stats either way.
    """
    get_activation(activation)
    kind = _problem_kind(u, weight)
    backward_tol = tol if backward_tol is None else backward_tol
    backward_max_iter = max_iter if backward_max_iter is None else backward_max_iter
    _check_options(tol, max_iter, stop, backward, backward_tol, backward_max_iter, on_nonconvergence)
    if z0 is not None and (not isinstance(z0, Tensor) or z0.shape != u.shape or z0.device != u.device):
        raise ValueError(f"z0 must be a tensor shaped like u {tuple(u.shape)} on {u.device}")
    config = dict(
        activation=activation, tol=float(tol), max_iter=int(max_iter), stop=stop, backward=backward,
        backward_tol=float(backward_tol), backward_max_iter=int(backward_max_iter),
        on_nonconvergence=on_nonconvergence, backend=backends.resolve(backend, u.device.type, kind),
    )
    if u.shape[0] == 0:  # an empty batch (e.g. an empty DDP shard): nothing to solve, any backend agrees
        config["backend"] = "reference"
    u = u.contiguous()
    weight = weight.contiguous()
    z0 = None if z0 is None else z0.to(u.dtype).contiguous()
    # stats_out carries the stats object to the backward pass, which fills in the backward fields.
    stats_out: list = []
    z, its, res, conv = _FixedPoint.apply(u, weight, z0, config, stats_out)
    batch = u.shape[0]
    stats = SolverStats(
        forward_iterations=its,
        forward_residual=res,
        converged=conv,
        backward_iterations=torch.zeros(batch, dtype=torch.int32, device=u.device),
        backward_residual=torch.full((batch,), float("nan"), dtype=res.dtype, device=u.device),
        backend=config["backend"],
        _bound_inputs=(z.detach(), u.detach(), activation),
    )
    stats_out.append(stats)
    return z, stats
