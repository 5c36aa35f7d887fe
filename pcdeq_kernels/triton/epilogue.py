"""Triton device helpers shared by the dense (``dense.py``) and convolutional (``conv.py``) kernels.

Every pcDEQ kernel ends its tile the same way: add the bias (u, or v for the adjoint), apply the
activation (or multiply by D for the adjoint), and reduce the squared norms that the stopping rule
``||x_{k+1} - x_k|| / (||x_{k+1}|| + 1e-5) < tol`` needs: summed in float64, as ``reference.squared_norms``
does (the squares of a float32 state reach 1.2e77, far beyond float32), and turned into the float32
residual by ``relative_residual`` (NaN when a sum is not finite). The states and matmuls stay float32:
only the per-sample sums are float64. Those pieces live here, once, so that the
two kernel families cannot drift apart; the kernels pick the map with a ``tl.constexpr`` epilogue id
from the map table (``activations.map_ids()``): an activation's ``kernel_id`` for the forward map,
``ADJOINT_ID`` for the adjoint. The ids are read from the table into ``tl.constexpr`` globals below (jit
code may read constexpr globals); ``activation`` has one branch per activation and no default: an id
without a branch fails ``tl.static_assert`` when the kernel is compiled (or run by the interpreter),
and the launchers refuse ids outside the table before that (``launch.map_id``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..activations import ACTIVATIONS, ADJOINT_ID
from ..reference import RESIDUAL_EPS
from . import launch

# The map ids, from the table. ADJOINT is the kernels' name for the adjoint's id (D * (.)).
ADJOINT = tl.constexpr(ADJOINT_ID)
_TANH = tl.constexpr(ACTIVATIONS["tanh"].kernel_id)
_SOFTSIGN = tl.constexpr(ACTIVATIONS["softsign"].kernel_id)
_RELU6 = tl.constexpr(ACTIVATIONS["relu6"].kernel_id)
_SIGMOID = tl.constexpr(ACTIVATIONS["sigmoid"].kernel_id)
_EPS = tl.constexpr(RESIDUAL_EPS)  # the stopping rule's denominator guard, shared with the reference
_INF = tl.constexpr(float("inf"))

# A sample's stepwise status (the ``active`` buffer of ``close_previous_step``; the values in launch.py):
# iterating, stopped having met the rule (converged), stopped on a non-finite residual (unconverged). A
# sample still RUNNING after the last step ran out of steps (unconverged); converged is ``status == MET``.
RUNNING = tl.constexpr(launch.RUNNING)
MET = tl.constexpr(launch.MET)
FAILED = tl.constexpr(launch.FAILED)


@triton.jit
def activation(x, ACT: tl.constexpr):
    """act(x) in float32 for the activation whose ``kernel_id`` is ACT; any other id is a compile-time
    error (``tl.static_assert``), so an activation added to the table without a branch here cannot
    compile into some other activation.

    No libdevice (the interpreter has none): tanh and sigmoid come from ``exp``. For ``|x| >= 0.625``
    ``tanh|x| = (1 - e) / (1 + e)`` with ``e = exp(-2|x|) <= 0.29`` (no overflow, and the cancellation
    in ``1 - e`` at most doubles exp's error, which is a few ulp on GPUs: ``ex2.approx``). Below 0.625
    that cancellation grows without bound as ``x -> 0``, so ``tanh x = x + x^3 P(x^2)`` there, with P of
    degree 5 fitted for this project (weighted least squares of ``(tanh(x)/x - 1)/x^2`` on [0, 0.625]
    in float64): relative error 2e-10 in exact arithmetic, about 1 ulp evaluated in float32.
    """
    if ACT == _TANH:
        ax = tl.abs(x)
        xs = tl.minimum(tl.maximum(x, -0.625), 0.625)  # the polynomial's range (no overflow outside it)
        z = xs * xs
        p = 0.0021536143280329644
        p = p * z - 0.00818997083729613
        p = p * z + 0.02170626131393174
        p = p * z - 0.05394789002143328
        p = p * z + 0.1333321614999511
        p = p * z - 0.33333331108468517
        t_small = xs + xs * z * p
        e = tl.exp(-2.0 * ax)
        t_big = (1.0 - e) / (1.0 + e)
        t_big = tl.where(x < 0.0, -t_big, t_big)
        y = tl.where(ax < 0.625, t_small, t_big)
    elif ACT == _SOFTSIGN:
        y = x / (1.0 + tl.abs(x))
    elif ACT == _RELU6:
        # Not tl.minimum/maximum: their default (min.f32/max.f32, numpy's fmin/fmax in the interpreter)
        # returns the other operand for a NaN; torch's clamp, and this, keep the NaN.
        y = tl.where(x < 0.0, 0.0, tl.where(x > 6.0, 6.0, x))
    elif ACT == _SIGMOID:
        y = 1.0 / (1.0 + tl.exp(-x))
    else:
        tl.static_assert(False, "unknown activation id: not a kernel_id of pcdeq_kernels.activations.ACTIVATIONS")
    return y


@triton.jit
def epilogue(acc, bias, scale, ACT: tl.constexpr):
    """The map's elementwise tail: ``act(acc + bias)``, or ``scale * (acc + bias)`` for the adjoint."""
    if ACT == ADJOINT:
        y = scale * (acc + bias)
    else:
        y = activation(acc + bias, ACT)
    return y


@triton.jit
def sum_squares(x):
    """Per-row sums of squares of a float32 tile (axis 1), in float64 (``reference.squared_norms``): each
    square is exact in float64 and the sum cannot overflow. (Squaring in float32 overflows at 1.8e19,
    and a finite/inf residual is 0: "converged".)"""
    x64 = x.to(tl.float64)
    return tl.sum(x64 * x64, axis=1)


@triton.jit
def relative_residual(diff_sq, norm_sq):
    """``||x_{k+1} - x_k|| / (||x_{k+1}|| + 1e-5)`` in float32 from the two float64 squared norms, as
    ``reference.residual_from_squares``: computed in float64, rounded once to float32, NaN where either
    sum is not finite (a non-finite iterate: never a spurious 0, or a finite value from inf/inf)."""
    # float64 sqrt and division are correctly rounded on NVIDIA GPUs (sqrt.rn.f64, div.rn.f64) and in
    # numpy (the interpreter), as in torch: the residual is the reference's for the same sums. The
    # guard is built as a float64 constant from the Python value (not rounded through float32 first).
    eps = tl.full((), _EPS, tl.float64)
    r = tl.sqrt(diff_sq) / (tl.sqrt(norm_sq) + eps)
    # sums of squares are >= 0 or NaN: "< inf" is "finite"
    return tl.where((diff_sq < _INF) & (norm_sq < _INF), r, float("nan")).to(tl.float32)


@triton.jit
def goes_on(r, tol):
    """Whether a sample whose step left the residual ``r`` iterates on (``reference.iterate``): not if it
    met the rule (``r < tol``: converged), nor if ``r`` is not finite (NaN or Inf: it stops at once,
    unconverged)."""
    return ~(r < tol) & (r < _INF)


@triton.jit
def any_set(mask):
    """Whether any entry of a boolean vector is set (a scalar the loop conditions can test)."""
    return tl.max(mask.to(tl.int32), axis=0) > 0


@triton.jit
def initial_state(x0_ptr, bias_ptr, scale_ptr, offs, mask, HAS_X0: tl.constexpr, ACT: tl.constexpr,
                  ROWS: tl.constexpr, COLS: tl.constexpr):
    """A (ROWS, COLS) tile of the start state in float32: x0 if given, else ``h_0 = D * v`` for the
    adjoint and ``z_0 = 0`` for the forward map (the reference's defaults)."""
    if HAS_X0:
        x = tl.load(x0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    elif ACT == ADJOINT:
        x = (tl.load(scale_ptr + offs, mask=mask, other=0.0).to(tl.float32)
             * tl.load(bias_ptr + offs, mask=mask, other=0.0).to(tl.float32))
    else:
        x = tl.zeros((ROWS, COLS), dtype=tl.float32)
    return x


@triton.jit
def next_state(acc, bias_ptr, scale_ptr, offs, mask, ACT: tl.constexpr):
    """A tile of the next state from its matmul (or conv) tile: ``act(acc + u)``, or ``D * (acc + v)``
    for the adjoint, with the tile's bias (and D) loaded here, after the K loop, so that they hold no
    registers during it. Padded entries stay 0: the epilogue of 0 is not 0 for sigmoid (0.5)."""
    bias = tl.load(bias_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if ACT == ADJOINT:
        scale = tl.load(scale_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        scale = bias  # unused by the forward epilogue
    return tl.where(mask, epilogue(acc, bias, scale, ACT), 0.0)


@triton.jit
def close_previous_step(idx, idx_ok, records, first_program, sums_ptr, tot_ptr, active_ptr, its_ptr, res_ptr,
                        B, tol, t, STOP_BATCH: tl.constexpr):
    """The stepwise solves' bookkeeping at the start of launch ``t``: which of the samples ``idx`` (a
    vector of rows, or one image) iterate in step t. Step t-1 is complete (its launch has finished), so
    its per-sample squared norms decide, by ``reference.iterate``'s rule: a sample running in step t-1
    takes that step's residual and count, then stops, converged (MET), if ``r < tol`` (with STOP_BATCH:
    if the batch residual is), and stops, unconverged (FAILED), if that residual is not finite (a NaN
    never counts as converged, and is never iterated on).

    Buffers: ``sums`` (3, 2, B) float64, the per-sample squared norms of step ``s`` in slot ``s % 3``
    (launch t adds into slot t, reads slot t-1, clears slot t+1 here); ``tot`` (3, 2) float64, the same
    over the batch; ``active`` (2, B) int32, slot ``s % 2`` = each sample's status (RUNNING, MET or
    FAILED) at the start of step ``s``. Only the programs with ``records`` set write per-sample results
    (one per sample), and only ``first_program`` clears the batch totals. Returns whether the samples
    iterate in step t.
    """
    status_prev = tl.load(active_ptr + ((t + 1) % 2) * B + idx, mask=idx_ok, other=MET)
    act_prev = status_prev == RUNNING
    if t > 0:
        prev = sums_ptr + ((t + 2) % 3) * 2 * B
        # Read through atomics (adding 0 changes nothing; the slot is not written in this launch): the
        # compiler's layout pass may recompute a chain of plain loads and arithmetic in every layout
        # that uses its result, and the verdict is used in the tile's row layout too (several rows per
        # thread there), so the float64 square roots and division, long instruction sequences, ran
        # once per row a thread holds: +60 to +100 registers in the dense step kernel, and spills. An
        # atomic's result is not recomputed: the residual is computed once, in the vector's own layout.
        r = relative_residual(tl.atomic_add(prev + idx, 0.0, mask=idx_ok),
                               tl.atomic_add(prev + B + idx, 0.0, mask=idx_ok))
        if STOP_BATCH:
            t_prev = tot_ptr + ((t + 2) % 3) * 2
            # (r * 0.0 +: the batch's verdict takes r's shape, vector or scalar)
            decides = r * 0.0 + relative_residual(tl.load(t_prev), tl.load(t_prev + 1))
        else:
            decides = r
        verdict = tl.where(goes_on(decides, tol), RUNNING, tl.where(decides < tol, MET, FAILED))
        status_now = tl.where(act_prev, verdict, status_prev)
        was = records & act_prev
        tl.store(res_ptr + idx, r, mask=was)
        tl.store(its_ptr + idx, tl.load(its_ptr + idx, mask=was, other=0) + 1, mask=was)
    else:
        status_now = status_prev
    tl.store(active_ptr + (t % 2) * B + idx, status_now, mask=records)
    nxt = sums_ptr + ((t + 1) % 3) * 2 * B
    zero = (idx * 0).to(tl.float64)
    tl.store(nxt + idx, zero, mask=records)
    tl.store(nxt + B + idx, zero, mask=records)
    if STOP_BATCH:
        two = tl.arange(0, 2)
        tl.store(tot_ptr + ((t + 1) % 3) * 2 + two, tl.zeros((2,), dtype=tl.float64),
                 mask=(two * 0 + first_program.to(tl.int32)) != 0)
    return status_now == RUNNING
