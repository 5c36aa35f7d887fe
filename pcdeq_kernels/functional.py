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

from . import backends, ops, reference
from .activations import get_activation
from .problem import describe, state_format
from .spec import SolveSpec, with_solve_options

@dataclasses.dataclass
class SolverStats:
    """Per-sample statistics of one solve (tensors of shape (B,)).

    ``contraction_bound`` is an upper bound on the spectral radius of the Jacobian at ``z*`` (the
    adjoint's linear rate and the forward iteration's asymptotic one), by Collatz-Wielandt from ``z*``
    and two power steps (``reference.contraction_bound``: three matmuls, in float64). It is computed on
    first access (the stats keep references to ``z*``, ``u`` and ``W`` until then). The backward fields
    are filled when the gradient is computed (in eager mode; under ``torch.compile`` they stay at
    0 / NaN).
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
            z, u, weight, activation = self._bound_inputs
            self._bound = reference.contraction_bound(z, u, weight, activation)
            self._bound_inputs = None
        return self._bound

    def summary(self) -> dict[str, float]:
        """Batch means and maxima as Python numbers (one host read), for logging; NaN for an empty batch."""
        keys = ("forward_iterations_mean", "forward_iterations_max", "converged_fraction",
                "contraction_bound_max", "backward_iterations_mean", "backward_iterations_max")
        if self.forward_iterations.numel() == 0:
            return dict.fromkeys(keys, float("nan"))
        values = torch.stack([
            self.forward_iterations.double().mean(), self.forward_iterations.double().max(),
            self.converged.double().mean(), self.contraction_bound.double().max(),
            self.backward_iterations.double().mean(), self.backward_iterations.double().max(),
        ]).tolist()
        return dict(zip(keys, values))


def _without_autocast(x: Tensor):
    """The solves run in the precision of their inputs (half inputs are solved in float32, exactly as
    without autocast), never autocast's: autocast stays on inside autograd Functions and custom ops and
    would recast the solvers' own convolutions and matmuls to float16/bfloat16."""
    device = x.device.type
    if device in ("cpu", "cuda") and (torch.compiler.is_compiling() or torch.is_autocast_enabled(device)):
        return torch.autocast(device, enabled=False)
    return contextlib.nullcontext()  # (building an autocast context costs ~5 us: only when it is on)


class _FixedPoint(torch.autograd.Function):
    """Forward: one ``forward_solve`` op. Backward: one ``adjoint_solve`` op (or JFB).

    The gradient is first-order only: a backward that would itself be differentiated
    (``create_graph=True``, gradient penalties, Hessian-vector products) is refused with a clear error
    rather than returning a gradient detached from W and u; so are ``torch.func`` transforms (``solve``).
    """

    @staticmethod
    def forward(ctx, u, weight, z0, spec, backend, stats_out):
        # (the ctx form: with setup_context, Function.apply binds the arguments through inspect.signature
        # on every call, a cost the paper-sized solve notices)
        with _without_autocast(u):
            z, its, res, conv = ops.solve(False, u, weight, z0, spec, backend)
            out = _official_output(z, u, weight, spec) if spec.stop == "official" else z
        ctx.spec = spec
        ctx.backend = backend
        ctx.stats_out = stats_out
        ctx.save_for_backward(u, weight, z)  # (the last iterate: D and dL/dW are taken there)
        ctx.mark_non_differentiable(its, res, conv)
        ctx.set_materialize_grads(False)  # (no zero tensors made for the three statistics' gradients)
        return out, its, res, conv

    @staticmethod
    def backward(ctx, grad_z, *_):
        if grad_z is None:  # z* was not used: nothing flows back (the grads are not materialized)
            return None, None, None, None, None, None
        saved = ctx.saved_tensors  # (unpacked once: each access checks every saved tensor again)
        # Grad mode is on in a backward only when a graph of it is wanted (create_graph=True): refuse when
        # the gradient would have to depend on something that requires grad.
        if torch.is_grad_enabled() and any(t.requires_grad for t in (grad_z, *saved)):
            raise RuntimeError(
                "pcDEQ layers give first-order gradients only: this backward was asked to build a graph "
                "(torch.autograd.grad(..., create_graph=True), a double backward, a gradient penalty or a "
                "Hessian-vector product through z*), and the implicit gradient is a fixed-point solve that is "
                "not differentiated itself. Compute such terms without create_graph through the pcDEQ layer"
            )
        with _without_autocast(grad_z):
            return _FixedPoint._backward(ctx, grad_z, *saved)

    @staticmethod
    def _backward(ctx, grad_z, u, weight, z):
        spec = ctx.spec
        if z.dim() == 4:
            # Convolutions run about twice as fast on channels-last tensors on CPU (oneDNN) and GPU
            # (cuDNN), and the compiled solvers iterate in that layout: convert once, here.
            u, z, grad_z = (t.contiguous(memory_format=torch.channels_last) for t in (u, z, grad_z))
        D = reference.activation_derivative_at(z, u, weight, spec.activation)
        v = _as_dtype(grad_z, D.dtype)
        if spec.backward == "jfb":
            h = D * v
        elif spec.stop == "official":
            # The official code iterates g = J^T g + v with J taken at its output T(z_K), then passes g
            # back through that last application, whose D is the one at z_K.
            D_out = reference.activation_derivative_at(_official_output(z, u, weight, spec), u, weight, spec.activation)
            g, its, res, _ = ops.solve(True, v, _as_dtype(weight, D.dtype), D_out, spec, ctx.backend)
            h = D * g
        else:
            h, its, res, _ = ops.solve(True, v, _as_dtype(weight, D.dtype), D, spec, ctx.backend)
        if spec.backward != "jfb" and not torch.compiler.is_compiling():
            for stats in ctx.stats_out:
                stats.backward_iterations.copy_(its)
                stats.backward_residual.copy_(res)
        needs_u, needs_w = ctx.needs_input_grad[:2]
        grad_u = _as_dtype(h, u.dtype) if needs_u else None
        grad_w = None
        if needs_w:
            grad_w = _as_dtype(reference.weight_grad(h, _as_dtype(z, h.dtype), _as_dtype(weight, h.dtype)), weight.dtype)
        return grad_u, grad_w, None, None, None, None


def _official_output(z: Tensor, u: Tensor, weight: Tensor, spec: SolveSpec) -> Tensor:
    """``stop="official"``: the official block's output, one more map application ``T(z_K)`` after the
    last iterate (its gradient is the one at ``z_K``: ``D`` and ``dL/dW`` are taken there, as there)."""
    return get_activation(spec.activation).fn(reference.linear_map(z, weight) + u)


def _as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)`` without the call when it is one already (a few us a call saved, on a solve's path)."""
    return t if t.dtype == dtype else t.to(dtype)


@with_solve_options
def fixed_point(
    u: Tensor,
    weight: Tensor,
    activation: Optional[str] = None,
    *,
    z0: Optional[Tensor] = None,
    spec: Optional[SolveSpec] = None,
    **options,
) -> tuple[Tensor, SolverStats]:
    """Solve ``z = act(L(z) + u)`` for ``W >= 0``, ``u >= 0``; return ``(z*, SolverStats)``.

    Args:
        u: injection, (B, d) for a dense weight or (B, C, H, W) for a conv kernel; ``u >= 0``.
        weight: (d, d) or (C, C, 3, 3), elementwise ``>= 0``.
        activation: "tanh" (the default), "softsign", "relu6" (pcDEQ-1, need ``u > 0``) or "sigmoid"
            (pcDEQ-2).
        z0: optional nonnegative starting point (the fixed point does not depend on it).
        spec: a ``SolveSpec`` to use instead of ``activation`` and the options (what layers pass).
        **options: the solve options, the fields of ``SolveSpec``: ``tol=1e-4``, ``max_iter=200``,
            ``stop="sample"``, ``backward="implicit"``, ``backward_tol``, ``backward_max_iter``,
            ``solver="picard"``, ``on_nonconvergence="warn"``, ``backend="auto"`` (see ``SolveSpec``).
    """
    if spec is None:
        spec = SolveSpec.from_options("fixed_point", activation="tanh" if activation is None else activation, **options)
    elif options or activation is not None:
        raise TypeError("fixed_point() takes either spec= or the solve options (activation included), not both")
    elif not isinstance(spec, SolveSpec):
        raise TypeError(f"spec must be a pcdeq_kernels.SolveSpec, got {type(spec).__name__}")
    return solve(u, weight, spec, z0)


def solve(u: Tensor, weight: Tensor, spec: SolveSpec, z0: Optional[Tensor] = None) -> tuple[Tensor, SolverStats]:
    """``fixed_point`` for a spec already built: resolve the backend, run the custom ops under autograd."""
    problem = describe(u, weight)
    if not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active():
        raise RuntimeError(
            "pcDEQ solves do not support torch.func transforms (grad, vjp, jacrev, vmap, ...): their gradient is "
            "an implicit solve that the transforms cannot see through (and a solve is batched already). Use "
            "torch.autograd (loss.backward() or torch.autograd.grad) on the batch"
        )
    # The backend is resolved here and travels by name beside the spec: a spec is never rebuilt in a
    # call (under torch.compile that would trace its validation; in eager mode it costs about 8 us).
    backend = backends.resolve(spec, problem)
    if z0 is not None:
        if not isinstance(z0, Tensor):
            raise ValueError(f"z0 must be a tensor shaped like u {tuple(u.shape)}, got {type(z0).__name__}")
        z0 = z0.to(u.dtype).contiguous()
    u = u.contiguous(memory_format=state_format(u))  # a channels-last image batch stays channels-last
    weight = weight.contiguous()
    # stats_out carries the stats object to the backward pass, which fills in the backward fields.
    stats_out: list = []
    backward_stats = None
    if ops.has_eager_solve(backend, u, weight, z0):
        # the whole call in compiled code, the gradient's autograd node included when one is needed: the
        # same computation as below, without the Python between the kernels (a third of a paper-sized step)
        z, its, res, conv, *backward_stats = ops.eager_solve(u, weight, z0, spec, backend)
    elif torch.is_grad_enabled() and (u.requires_grad or weight.requires_grad):
        z, its, res, conv = _FixedPoint.apply(u, weight, z0, spec, backend, stats_out)
    else:  # nothing to differentiate: the solve alone, without an autograd node (inference)
        with _without_autocast(u):
            z, its, res, conv = ops.solve(False, u, weight, z0, spec, backend)
            if spec.stop == "official":
                z = _official_output(z, u, weight, spec)
    if backward_stats is None:  # (the compiled node made and fills its own)
        batch = u.shape[0]
        backward_stats = (its.new_zeros(batch), res.new_full((batch,), float("nan")))
    stats = SolverStats(
        forward_iterations=its,
        forward_residual=res,
        converged=conv,
        backward_iterations=backward_stats[0],
        backward_residual=backward_stats[1],
        backend=backend,
        _bound_inputs=(z.detach(), u.detach(), weight.detach(), spec.activation),
    )
    stats_out.append(stats)
    return z, stats
