"""The two solver ops every backend implements, as ``torch.library`` custom ops.

    pcdeq::forward_solve(u, weight, z0, spec) -> (z*, iterations, residual, converged)
    pcdeq::adjoint_solve(v, weight, D, spec)  -> (h*, iterations, residual, converged)

``spec`` is a ``SolveSpec.key`` (the ops take strings, not Python objects); its ``backend`` is normally
the concrete name ``fixed_point`` resolved, and is resolved again here (cheaply) so that a direct call
with ``"auto"``, or with a backend that cannot solve the tensors, behaves as ``fixed_point`` does. The
ops check what the dispatcher cannot see statically (negative or non-finite entries: one host read per
call), return an empty batch's outputs without calling a backend, and apply the non-convergence
policy, so every backend behaves the same way and ``torch.compile`` sees one opaque op per solve (the
fake kernels give it the output shapes). Gradients are attached one level up, in ``functional.py``.

Those host reads (and the stepwise loops' convergence checks) cannot be part of a CUDA graph: the ops
are tagged ``cudagraph_unsafe``, so ``torch.compile(mode="reduce-overhead")`` keeps them out of its
graphs, and a solve called while a stream is being captured (``torch.cuda.graph``) is refused with a
clear error instead of failing inside the capture.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import numpy
import torch
from torch import Tensor

from . import backends, reference
from .backends import compiled
from .activations import get_activation
from .problem import check_like, describe, empty_outputs, empty_state, empty_stats, state_format
from .spec import SolveSpec


class NonConvergenceError(RuntimeError):
    """Raised when ``on_nonconvergence="raise"`` and some sample did not meet ``tol`` within ``max_iter``."""


def _check_not_capturing(x: Tensor) -> None:
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "a pcDEQ solve cannot be captured in a CUDA graph (torch.cuda.graph): it checks its inputs and its "
            "convergence on the host. Run the pcDEQ layer outside the captured region (torch.compile with "
            "mode='reduce-overhead' does so by itself)"
        )


# The compiled CPU checks (csrc/cpu/solve_checks.h): one C++ pass each where the torch formulation is
# half a dozen ops and a host read (about 20 us a call each, a sixth of a paper-sized solve).
_CPU_CHECKS = compiled.has_kernels("CPU") and hasattr(torch.ops.pcdeq_C, "inputs_are_valid")
_SOME_UNCONVERGED, _GUARD_DECIDED = 1, 2  # solve_report's bits


def _values_are_valid(u: Tensor, weight: Tensor, z0: Optional[Tensor], zero_at_zero: bool) -> bool:
    """Whether u, weight and z0 are finite and >= 0 and (``zero_at_zero``) no sample of u is all 0."""
    if _CPU_CHECKS and u.is_cpu:  # (no autograd sees these calls: grad mode is off around every solve)
        return torch.ops.pcdeq_C.inputs_are_valid.default(u, weight, z0, zero_at_zero)
    # A few reductions and one host read (NaN propagates through min and max, so non-finite entries
    # show up as a non-finite extreme).
    named = [t for t in (weight, u, z0) if t is not None and t.numel() > 0]  # an empty batch: only W
    lo, hi = torch.aminmax(torch.cat([t.detach().reshape(-1) for t in named]))
    row_max = u.detach().flatten(1).amax(dim=1) if u.numel() > 0 else lo.new_ones(1)
    lo, hi, smallest_row_max = torch.stack([lo, hi, row_max.min()]).double().tolist()
    return math.isfinite(lo) and math.isfinite(hi) and lo >= 0 and not (zero_at_zero and smallest_row_max == 0)


def _check_values(u: Tensor, weight: Tensor, z0: Optional[Tensor], activation: str) -> None:
    """Reject negative or non-finite inputs, and (for an activation with act(0) = 0) samples whose u is
    identically 0: one check of everything at once (``_values_are_valid``); each tensor is looked at on
    its own only to word an error."""
    zero_at_zero = get_activation(activation).value_at_zero == 0
    if _values_are_valid(u, weight, z0, zero_at_zero):
        return
    named = [(name, t) for name, t in (("weight", weight), ("u", u), ("z0", z0)) if t is not None and t.numel() > 0]
    for name, t in named:
        t_lo, t_hi = torch.stack(torch.aminmax(t.detach())).double().tolist()
        what = {"weight": "weight", "u": "u (the injection)", "z0": "z0"}[name]
        if not (math.isfinite(t_lo) and math.isfinite(t_hi)):
            fix = {
                "weight": "check the learning rate and the weight's parametrization",
                "u": "check the layer's input",
                "z0": "pass a finite starting point",
            }[name]
            raise ValueError(f"{what} contains NaN or Inf; {fix}")
        if t_lo < 0:
            fix = {
                "weight": "a pcDEQ layer needs W >= 0. Call layer.project_() after each optimizer step, "
                "or use parametrization='softplus'.",
                "u": "pcDEQ needs u >= 0: pass the input through softplus(beta=5) (pcDEQ-1) or relu (pcDEQ-2) first",
                "z0": "the iteration must start in the nonnegative orthant",
            }[name]
            raise ValueError(f"{what} has negative entries (min {t_lo:.3g}); {fix}")
    rows = (u.detach().flatten(1).amax(dim=1) == 0).nonzero().flatten().tolist() if zero_at_zero else []
    if not rows:  # (the entry-by-entry look above is the authority; it found nothing)
        return
    raise ValueError(
        f"u (the injection) is identically 0 in sample(s) {rows[:10]}{' ...' if len(rows) > 10 else ''}: with "
        f"{activation}(0) = 0, z = 0 is a fixed point there and the iteration from 0 never leaves it, although "
        "positive fixed points may exist. pcDEQ-1 activations need u > 0: use the softplus(beta=5) injection, "
        "or activation='sigmoid' (pcDEQ-2, for which u >= 0 suffices)"
    )


def _apply_policy(what: str, state: Tensor, converged: Tensor, residual: Tensor, spec: SolveSpec, stacklevel: int = 4) -> None:
    """The non-convergence policy; and, under the per-sample rule, a warning for samples that met it
    only through its ``+ 1e-5`` guard: ``||dx|| / (||x|| + 1e-5) < tol`` while ``||dx|| / ||x|| >= tol``,
    i.e. the state is so small (``||x||`` of order 1e-5 or below) that the rule says nothing about its
    accuracy. One host transfer of three per-sample values; the rest is numpy on the host."""
    if spec.on_nonconvergence == "ignore":
        return
    adjoint = what == "backward"
    tol = spec.backward_tol if adjoint else spec.tol
    max_iter = spec.backward_max_iter if adjoint else spec.max_iter
    if _CPU_CHECKS and state.is_cpu:  # the common case, nothing to say, in one C++ pass
        report = torch.ops.pcdeq_C.solve_report.default(state, converged, residual, tol, reference.RESIDUAL_EPS)
        if not report & (_SOME_UNCONVERGED | (_GUARD_DECIDED if spec.stop == "sample" else 0)):
            return
    # (a float32 norm may overflow to inf: harmless, a huge state is not one the guard decided)
    per_sample = (converged, residual, torch.linalg.vector_norm(state.detach().flatten(1).float(), dim=1))
    if state.device.type != "cpu":  # one transfer (one synchronisation) for the three
        per_sample = torch.stack([t.double() for t in per_sample]).cpu().unbind()
    converged, residual, norm = (t.numpy() for t in per_sample)
    converged = converged > 0
    if spec.stop == "sample":
        with numpy.errstate(invalid="ignore"):  # NaN residuals compare false: never guard-decided
            # (a zero step, residual 0, is exact whatever the norm: an all-zero gradient's adjoint, say)
            guard = converged & (residual > 0) & (norm * (tol - residual) <= residual * reference.RESIDUAL_EPS)
        if guard.any():
            warnings.warn(
                f"pcDEQ {what} solve: {int(guard.sum())} of {converged.size} samples met tol={tol:g} only through "
                f"the stopping rule's +{reference.RESIDUAL_EPS:g} guard (their norm is below about "
                f"{reference.RESIDUAL_EPS:g}, so the relative change is still above tol): the official rule, but no "
                "accuracy guarantee for them; scale the input (or the loss) up, or lower tol",
                RuntimeWarning,
                stacklevel=stacklevel,
            )
    if converged.all():
        return
    n_failed = int((~converged).sum())
    non_finite = numpy.flatnonzero(~converged & ~numpy.isfinite(residual)).tolist()
    if non_finite:
        message = (
            f"pcDEQ {what} solve: {len(non_finite)} of {converged.size} samples hit a non-finite (NaN or Inf) "
            f"iterate or residual and stopped there, unconverged (samples {non_finite[:10]}"
            f"{' ...' if len(non_finite) > 10 else ''}): check the scale of the weight and of the "
            f"{'incoming gradient' if adjoint else 'injection u'} (an overflow), or the loss"
        )
        if n_failed > len(non_finite):
            message += f"; {n_failed - len(non_finite)} more did not reach tol={tol:g} within max_iter={max_iter}"
    else:
        message = (
            f"pcDEQ {what} solve: {n_failed} of {converged.size} samples did not reach tol={tol:g} within "
            f"max_iter={max_iter} (worst relative residual {residual.max():.3g}); raise max_iter or tol"
        )
    if spec.on_nonconvergence == "raise":
        raise NonConvergenceError(message)
    warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)


def _empty_solve(x: Tensor, x0: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A batch of no samples (e.g. an empty DDP shard): nothing to solve, whatever the backend. The
    state is a copy of x0 (an op's outputs never alias its inputs) or zeros."""
    state = empty_state(x)
    if x0 is not None:
        state.copy_(x0)
    return (state, *(t.zero_() for t in empty_stats(x)))


def _solve(adjoint: bool, x: Tensor, weight: Tensor, other: Optional[Tensor], key: str):
    """Both ops' bodies: ``x`` is u (forward) or v (adjoint), ``other`` z0 (forward, optional) or D."""
    spec = SolveSpec.from_key(key)
    backend = backends.get(backends.resolve(spec, describe(x, weight, "v" if adjoint else "u")))
    return _run(adjoint, x, weight, other, spec, backend)


def _run(adjoint: bool, x: Tensor, weight: Tensor, other: Optional[Tensor], spec: SolveSpec, backend):
    """A solve by ``backend`` once the problem is known to be well formed and the backend chosen."""
    x_name, other_name = ("v", "D") if adjoint else ("u", "z0")
    check_like(other_name, other, x, x_name)
    _check_not_capturing(x)
    if not adjoint:
        _check_values(x, weight, other, spec.activation)
    if x.shape[0] == 0:
        return _empty_solve(x, None if adjoint else other)
    state, its, res, conv = (backend.adjoint_solve if adjoint else backend.forward_solve)(x, weight, other, spec)
    _apply_policy("backward" if adjoint else "forward", state, conv, res, spec)
    return state.contiguous(memory_format=state_format(x)), its, res, conv


def _fake(adjoint: bool, x: Tensor, weight: Tensor, other: Optional[Tensor], key: str):
    """Both ops' fake kernels: the static checks, then outputs of the right shapes and layouts."""
    SolveSpec.from_key(key)
    x_name, other_name = ("v", "D") if adjoint else ("u", "z0")
    describe(x, weight, x_name)
    check_like(other_name, other, x, x_name)
    return empty_outputs(x)


@torch.library.custom_op("pcdeq::forward_solve", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def forward_solve(u: Tensor, weight: Tensor, z0: Optional[Tensor], spec: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _solve(False, u, weight, z0, spec)


@forward_solve.register_fake
def _(u, weight, z0, spec):
    return _fake(False, u, weight, z0, spec)


@torch.library.custom_op("pcdeq::adjoint_solve", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def adjoint_solve(v: Tensor, weight: Tensor, D: Tensor, spec: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _solve(True, v, weight, D, spec)


@adjoint_solve.register_fake
def _(v, weight, D, spec):
    return _fake(True, v, weight, D, spec)


@torch.library.custom_op("pcdeq::report_nonconvergence", mutates_args=())
def report_nonconvergence(state: Tensor, converged: Tensor, residual: Tensor, what: str, spec: str) -> None:
    """``_apply_policy`` for a solve made in compiled code: the cpu backend's C++ autograd node
    (``eager_solve``) calls this op after an adjoint solve in which ``solve_report`` found something to
    report, so that the policy and its messages exist once, here."""
    # (called from the C++ autograd engine: no user frame to point at; this line, not torch's internals)
    _apply_policy(what, state, converged, residual, SolveSpec.from_key(spec), stacklevel=2)


def eager_solve(u: Tensor, weight: Tensor, z0: Optional[Tensor], spec: SolveSpec, backend: str):
    """A plain eager call made by ``backend.eager_solve`` in one compiled call (what ``functional`` uses
    when ``has_eager_solve``): the checks, the solve, the gradient's autograd node (when u or weight
    requires grad) and the forward's report come back together; errors and warnings are worded here,
    on the slow path, only when its status says there is something to say. Returns ``(z*, iterations,
    residual, converged, backward_iterations, backward_residual)``; the backward applies its own policy."""
    check_like("z0", z0, u, "u")
    *out, status = backends.get(backend).eager_solve(u, weight, z0, spec)
    if status:
        if status & compiled.INVALID_INPUTS:
            _check_values(u, weight, z0, spec.activation)  # raises, with the message
            raise AssertionError("eager_solve refused inputs that _check_values accepts")  # (a bug if reached)
        _apply_policy("forward", out[0], out[3], out[2], spec)
    return out


def has_eager_solve(backend: str, u: Tensor, weight: Tensor, z0: Optional[Tensor]) -> bool:
    """Whether this call can take ``eager_solve``: the backend has one, the call is plain eager (a traced
    call takes the custom ops, which torch.compile sees) and the batch is not empty."""
    return hasattr(backends.get(backend), "eager_solve") and u.shape[0] > 0 and not _traced(u, weight, z0)


def _traced(*tensors: Optional[Tensor]) -> bool:
    """Whether anything other than plain eager execution is looking at this call: torch.compile or
    export, a tensor subclass (fake, functional, ...), or a torch function or dispatch mode."""
    return (
        torch.compiler.is_compiling()
        or any(t is not None and type(t) is not Tensor for t in tensors)
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._len_torch_dispatch_stack() > 0
    )


def solve(adjoint: bool, x: Tensor, weight: Tensor, other: Optional[Tensor], spec: SolveSpec, backend: str):
    """What ``functional`` calls, with the ``backend`` it resolved for ``spec`` and these tensors: the
    custom op (``adjoint_solve`` or ``forward_solve``) wherever the call is traced (the op resolves the
    backend again from the spec, to the same one), its body directly in plain eager mode, where the
    op's Python dispatch (and its decoding and checking again of what ``functional`` just checked)
    would cost about 40 us a call, a tenth of a paper-sized solve."""
    if _traced(x, weight, other):
        return (adjoint_solve if adjoint else forward_solve)(x, weight, other, spec.key)
    return _run(adjoint, x, weight, other, spec, backends.get(backend))
