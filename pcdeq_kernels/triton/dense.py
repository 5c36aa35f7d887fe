"""Fused Triton kernels for the dense pcDEQ map and its adjoint, and their launchers.

Both solves are one kernel shape, ``x_{k+1} = epilogue(x_k @ M + bias)`` with a per-row residual:

    forward   z_{k+1} = act(z_k @ W.T + u)         M[k, n] = W[n, k]   epilogue act(.)   (ACT = kernel_id)
    adjoint   h_{k+1} = D * (h_k @ W + v)          M[k, n] = W[k, n]   epilogue D * (.)  (ACT = ADJOINT)

so every kernel takes the operand ``M`` as ``w_ptr`` plus two strides (``M[k, n]`` lives at
``w_ptr + k * stride_wk + n * stride_wn``) and a ``tl.constexpr`` epilogue id from the map table
(``activations.map_ids()``): the activation's ``kernel_id`` for the forward map, ``ADJOINT_ID`` for the
adjoint (``epilogue.ADJOINT`` in jit code). The launchers take a ``SolveSpec`` and turn it into the
iteration they run (``launch.iteration``: the id, checked against the table, and the stopping rule). The state
and the matmuls' accumulation are float32 whatever the operands' dtype (fp32, fp16, bf16: loaded as they
are, converted in registers), exactly as ``reference.py`` solves half-precision inputs in float32; the
per-row squared norms are summed in float64 and the residual computed in float64 and rounded to float32
(``reference.residual_from_squares``: no overflow, NaN for a non-finite row).

Stopping rule, per row ``b`` (``reference.iterate``): ``r_b = ||x_{k+1,b} - x_{k,b}|| / (||x_{k+1,b}||
+ 1e-5)``; with ``stop="sample"`` a row whose ``r_b < tol`` freezes, converged (its state and iteration
count stop changing, its last residual is kept), and a row whose ``r_b`` is not finite freezes so too,
unconverged, after that step; with ``stop="batch"`` all rows freeze together once the same ratio over
the whole batch is below ``tol`` (converged) or not finite (not). Rows are independent, so a block of
rows can run to convergence on its own. Three kernels:

``_solve_onchip_kernel``  one launch per solve, padded ``d <= ONCHIP_MAX_DIM`` (128). A program owns
    ``BLOCK_B`` whole rows; the state tile (BLOCK_B, D_PAD) stays in registers and ``M`` (D_PAD, D_PAD)
    is loaded once, before the loop (the compiler stages it in shared memory). Each iteration is one
    ``tl.dot``, the epilogue, two row reductions and the freeze; the loop ends when every row of the
    block has stopped or after ``max_iter`` iterations. No host synchronisation.
``_solve_scratch_kernel`` one launch per solve, any ``d``. Triton cannot slice a register tensor, so a
    K-tiled matmul needs its left operand in memory: the state ping-pongs between two float32 planes of
    a global scratch buffer (2, B, d) (L2-resident at the sizes where this path is chosen). Per
    iteration the program walks the (BLOCK_N)-wide column tiles of its rows, each an ordinary K loop,
    accumulates the row sums in registers, then decides which rows freeze; a CTA barrier separates
    iterations (one plane is read while the other is written, so one barrier is enough).
``_step_kernel``          one iteration over a (row block, column tile) grid, for the stepwise path
    (few row blocks and large ``d``, where one program per row block leaves the GPU idle; and
    ``stop="batch"``, which needs a grid-wide reduction). Per-row partial sums are combined with
    atomics. The freeze decision for step ``t`` needs the complete sums of step ``t``, which exist only
    once its launch has finished, so launch ``t + 1`` makes it (every program recomputes it for its
    rows; the programs of column tile 0 record it): rotating buffers (sums: 3 slots, statuses: 2)
    keep readers and writers of one launch on different slots. The host reads the statuses only
    every ``check_every`` steps; steps after convergence only copy frozen rows.

The split path is the stepwise loop with each step's matmul done by ``torch.mm`` (cuBLAS) into a float32
buffer and ``_step_kernel(FUSED_MATMUL=False)`` as its epilogue: cuBLAS's large tiles, which the fused
step kernel cannot hold in registers next to its epilogue, for one more pass over the (B, d) product.

``choose_path`` picks between the single-launch kernels and the stepwise loop (overridable).

Matmul precision (``resolve_precision``): ``"ieee"`` (exact float32, the default, as torch's
``"highest"``) or ``"tf32"`` (tensor cores). Triton lowers an ieee ``tl.dot`` to FMAs with each
thread's operand slices in registers, so the tiled kernels' ieee configs use K blocks of 16 and the
on-chip kernel's ieee configs fewer state values per thread (smaller row blocks, or 16 warps at
D_PAD = 128). Configurations (block sizes, warps, stages) are autotuned on the GPU among ones that
compile without register spills for sm_80 and sm_90 under Triton 3.6, 3.8 and 3.9 (``aot_plan``/
``aot_compile``; checked by the tests, with ``aot.spills_accepted``'s one exception).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..activations import ADJOINT_ID, map_ids
from ..precision import torch_matmul_precision
from ..spec import SolveSpec
from . import aot, launch, limits
from .epilogue import (ADJOINT, any_set, close_previous_step, epilogue, goes_on, initial_state, next_state,
                       relative_residual, sum_squares)
from .launch import PRECISIONS, Iteration, arg, autotuned, benchmark, launching, make_configs, tuned

# "auto" uses the single-launch kernels up to this d even when the row blocks alone cannot fill the
# GPU: below it one program's iteration (2 * BLOCK_B * d^2 flops) costs about what a launch does.
SINGLE_LAUNCH_MAX_DIM = 512


# --------------------------------------------------------------------------------------------- configs


# (BLOCK_B, num_warps, num_stages); pruned by _onchip_fits.
ONCHIP_CONFIGS = make_configs([(16, 4, 1), (16, 8, 1), (32, 8, 1), (64, 8, 1), (32, 16, 1), (16, 16, 1)], ("BLOCK_B",))
# (BLOCK_B, BLOCK_N, BLOCK_K, num_warps, num_stages). BLOCK_K = 16 serves PRECISION="ieee": Triton's
# fp32 FMA dot holds each thread's slice of both operands for the whole K block in registers, which
# spills beyond 16; the tensor-core ("tf32") configs take 32 (_tile_candidates). Every config listed
# compiles for sm_80 and sm_90 with every epilogue and operand dtype, under Triton 3.6, 3.8 and 3.9,
# without spills beyond ptxas's occupancy trade (tests/test_backend_triton.py; aot.spills_accepted: at
# most 24 bytes, in 31 of the 17100 compiles of the whole product under the three). Many nearby
# ones do not, in one version or another: ptxas often caps a kernel at an occupancy step (80, 128 or
# 168 registers) and spills 8 bytes to get there; so the ieee small tiles (16 x 32, 32 x 32, whatever the warps and stages)
# give way to 16 x 128 tiles and 32 x 64 tiles over 8 warps, and the step kernel's tf32 64 x 128 tile to
# 32 x 128. The 16-warp scratch tile says maxnreg=128, which is all a 512-thread block can have anyway:
# left to itself, ptxas aims at two blocks per SM (64 registers) when B and d are multiples of 16, and
# spills 24 to 40 bytes. (32 x 64 over 16 warps still spills 8 bytes at 128 registers under 3.6.)
# Since the squared norms are float64 (each row's two sums held across the column loop, and summed
# across threads, in float64), the 8-warp ieee scratch tiles run 1 stage: with 2, unaligned float32
# ones need more than 255 registers and spill 8 bytes (16 x 128 on sm_90 under 3.9, 32 x 64 on sm_80
# under 3.6); so does the 16 x 64 tf32 tile over 4 warps (adjoint, sm_90, 3.8), which with 1 stage
# ptxas stops at 168 registers (24 bytes): it runs 1 stage and says maxnreg=255. So does the step
# kernel's 32 x 64 tf32 tile over 4 warps: left to itself, ptxas stops its unaligned split-path
# epilogue (tanh, sm_90, 3.9) at 168 registers and spills 16 bytes. With 255 allowed, both need at most
# 222 to 255 registers and spill nothing under 3.6, 3.8 or 3.9.
SCRATCH_CONFIGS = make_configs(
    [(16, 64, 32, 4, 1, 255), (16, 128, 32, 8, 2), (32, 64, 32, 8, 2),
     (16, 128, 16, 16, 1, 128), (32, 64, 16, 8, 1), (16, 128, 16, 8, 1)],
    ("BLOCK_B", "BLOCK_N", "BLOCK_K"),
)
STEP_CONFIGS = make_configs(
    [(16, 64, 32, 4, 3), (16, 128, 32, 16, 3), (32, 64, 32, 4, 3, 255), (64, 64, 32, 8, 3), (32, 128, 32, 8, 3),
     (16, 64, 16, 4, 3), (32, 64, 16, 8, 3), (64, 64, 16, 8, 3), (32, 128, 16, 8, 3)],
    ("BLOCK_B", "BLOCK_N", "BLOCK_K"),
)
ONCHIP_MAX_DIM = 128  # largest padded d the on-chip kernel takes (M: 64 KB of fp32 in shared memory)

# The on-chip configs (BLOCK_B, num_warps) that compile without register spills, by precision and
# D_PAD (the AOT compiles: sm_80 and sm_90, every epilogue and dtype, Triton 3.6, 3.8 and 3.9). The
# pattern: the state tile (BLOCK_B, D_PAD) may spread at most 16 fp32 values per thread under tf32,
# 8 under ieee (the FMA dot holds more operand values); 4 warps serve only tiles up to 16 x 32; 16
# warps only D_PAD = 128, where ieee needs them: 16 x 128 over 8 warps spills hundreds of bytes under
# Triton 3.6. Two tiles within the ieee rule spill a few bytes at an occupancy step ptxas picks (80
# registers), each in one version: 32 x 32 over 8 warps (3.6) and 64 x 16 over 8 warps (3.9); and
# one within the tf32 rule, 32 x 128 over 8 warps, spills 24 bytes at 128 registers under 3.6 when B
# and d are multiples of 16 (adjoint, float32, sm_90). Since the residual is computed in float64 (square
# roots and a division per row a thread holds), 32 x 128 tf32 over 16 warps, at the 128 registers a
# 512-thread block can have, spills 40 bytes under 3.6 (unaligned half precision, sm_90): tf32 at
# D_PAD = 128 takes 16 x 128 over 8 warps only.
_ONCHIP_FITS = {
    ("ieee", 16): {(16, 4), (16, 8), (32, 8)},
    ("ieee", 32): {(16, 4), (16, 8), (64, 8)},
    ("ieee", 64): {(16, 8), (32, 8)},
    ("ieee", 128): {(32, 16)},
    ("tf32", 16): {(16, 4), (16, 8), (32, 8), (64, 8)},
    ("tf32", 32): {(16, 4), (16, 8), (32, 8), (64, 8)},
    ("tf32", 64): {(16, 8), (32, 8), (64, 8)},
    ("tf32", 128): {(16, 8)},
}

# Triton 3.8 (what torch 2.14 pins) lays out the ieee dot at D_PAD = 128 so that ptxas, on sm_90, keeps
# 32 x 128 over 16 warps at 32 or 64 registers and spills 1.7 to 2.9 KB (3.6 and 3.9: none); 16 x 128
# over 16 warps is clean there (and spills up to 1.2 KB under 3.6). Measured with the AOT compiles;
# ``scripts/check_triton_aot.sh 3.8.0`` keeps it so.
if tuple(int(p) for p in triton.__version__.split(".")[:2]) == (3, 8):
    _ONCHIP_FITS[("ieee", 128)] = {(16, 16)}


def _onchip_fits(block_b: int, d_pad: int, num_warps: int, precision: str) -> bool:
    """Whether an on-chip config compiles without register spills (``_ONCHIP_FITS``)."""
    return (block_b, num_warps) in _ONCHIP_FITS.get((precision, d_pad), ())


def _rows_pruned(configs, batch):
    """Drop configs whose row block is much larger than the batch (all padding); keep at least one."""
    wanted = max(16, triton.next_power_of_2(max(batch, 1)))
    kept = [c for c in configs if c.kwargs["BLOCK_B"] <= wanted]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_B"])]


def _onchip_candidates(configs, named_args, **kwargs):
    d_pad, precision = arg(named_args, kwargs, "D_PAD"), arg(named_args, kwargs, "PRECISION")
    fits = [c for c in configs if _onchip_fits(c.kwargs["BLOCK_B"], d_pad, c.num_warps, precision)]
    return _rows_pruned(fits or configs[:1], arg(named_args, kwargs, "B"))


def _tile_candidates(configs, named_args, **kwargs):
    ieee = arg(named_args, kwargs, "PRECISION") == "ieee"
    kept = [c for c in configs if (c.kwargs["BLOCK_K"] <= 16) == ieee]
    return _rows_pruned(kept or configs[:1], arg(named_args, kwargs, "B"))


_prune_onchip = autotuned(_onchip_candidates)
_prune_tiles = autotuned(_tile_candidates)


# --------------------------------------------------------------------------------------------- kernels
#
# Addressing: a program moves its pointers to its first row once (a 64-bit scalar offset) and indexes
# its tile with 32-bit offsets (BLOCK_B * d < 2**31 always holds), which keeps 64-bit index tiles out of
# the registers. Tiles needed only by the epilogue are loaded after the K loop, for the same reason.


@triton.autotune(configs=tuned(ONCHIP_CONFIGS), key=["B", "d", "PRECISION", "ACT"],
                 prune_configs_by={"early_config_prune": _prune_onchip}, do_bench=benchmark)
@triton.jit(do_not_specialize=["max_iter"])
def _solve_onchip_kernel(
    x0_ptr, bias_ptr, scale_ptr, w_ptr, out_ptr, its_ptr, res_ptr, conv_ptr,
    B, d, stride_wk, stride_wn, tol, max_iter,
    ACT: tl.constexpr, HAS_X0: tl.constexpr, PRECISION: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """Whole solve for BLOCK_B rows with the state in registers (see the module docstring)."""
    row0 = tl.program_id(0) * BLOCK_B
    first = tl.cast(row0, tl.int64) * d
    lrows = tl.arange(0, BLOCK_B)
    cols = tl.arange(0, D_PAD)
    row_ok = row0 + lrows < B
    col_ok = cols < d
    mask = row_ok[:, None] & col_ok[None, :]
    offs = lrows[:, None] * d + cols[None, :]

    bias = tl.load(bias_ptr + first + offs, mask=mask, other=0.0).to(tl.float32)
    if ACT == ADJOINT:
        scale = tl.load(scale_ptr + first + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        scale = bias  # unused by the forward epilogue
    x = initial_state(x0_ptr + first, bias_ptr + first, scale_ptr + first, offs, mask, HAS_X0, ACT, BLOCK_B, D_PAD)
    # The operand is loop-invariant: loaded once (the compiler keeps it in shared memory), zero outside
    # (d, d) so that padded columns contribute nothing.
    w = tl.load(
        w_ptr + cols[:, None] * stride_wk + cols[None, :] * stride_wn,
        mask=col_ok[:, None] & col_ok[None, :], other=0.0,
    ).to(tl.float32)

    active = row_ok
    its = tl.zeros((BLOCK_B,), dtype=tl.int32)
    res = tl.full((BLOCK_B,), float("inf"), dtype=tl.float32)
    k = 0
    go = (k < max_iter) & any_set(active)
    while go:
        acc = tl.dot(x, w, input_precision=PRECISION)
        # Padded columns must stay 0: the epilogue of 0 is not 0 for sigmoid (0.5).
        x_new = tl.where(mask, epilogue(acc, bias, scale, ACT), 0.0)
        r = relative_residual(sum_squares(x_new - x), sum_squares(x_new))
        # reference.iterate: rows active before this step take the new state, residual and count;
        # then rows with r < tol stop, and so do rows whose r is not finite (a NaN never converges).
        x = tl.where(active[:, None], x_new, x)
        res = tl.where(active, r, res)
        its += active.to(tl.int32)
        active = active & goes_on(r, tol)
        k += 1
        go = (k < max_iter) & any_set(active)

    tl.store(out_ptr + first + offs, x.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(its_ptr + row0 + lrows, its, mask=row_ok)
    tl.store(res_ptr + row0 + lrows, res, mask=row_ok)
    # A row met the rule iff its last residual is below tol (else it ran out of steps, or its residual
    # is not finite, or it never stepped).
    tl.store(conv_ptr + row0 + lrows, res < tol, mask=row_ok)


@triton.jit
def _matmul_tile(a_ptr, w_ptr, row_ok, cols_n, d, stride_wk, stride_wn, PRECISION: tl.constexpr,
                 BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``A[rows, :] @ M[:, cols_n]`` in float32, A (row-major, row stride d, already at the first row)."""
    lrows = tl.arange(0, BLOCK_B)
    n_ok = cols_n < d
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        cols_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = cols_k < d
        a = tl.load(a_ptr + lrows[:, None] * d + cols_k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        m = tl.load(
            w_ptr + cols_k[:, None] * stride_wk + cols_n[None, :] * stride_wn,
            mask=k_ok[:, None] & n_ok[None, :], other=0.0,
        ).to(tl.float32)
        acc = tl.dot(a, m, acc, input_precision=PRECISION)
    return acc


@triton.autotune(configs=tuned(SCRATCH_CONFIGS), key=["B", "d", "PRECISION", "ACT"],
                 prune_configs_by={"early_config_prune": _prune_tiles}, do_bench=benchmark)
@triton.jit(do_not_specialize=["max_iter"])
def _solve_scratch_kernel(
    x0_ptr, bias_ptr, scale_ptr, w_ptr, buf_ptr, out_ptr, its_ptr, res_ptr, conv_ptr,
    B, d, stride_wk, stride_wn, tol, max_iter,
    ACT: tl.constexpr, HAS_X0: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Whole solve for BLOCK_B rows of any width, the state in two planes of ``buf`` (2, B, d) fp32."""
    row0 = tl.program_id(0) * BLOCK_B
    first = tl.cast(row0, tl.int64) * d
    plane = tl.cast(B, tl.int64) * d
    lrows = tl.arange(0, BLOCK_B)
    row_ok = row0 + lrows < B
    # Every pointer below starts at this program's first row.
    x0_ptr += first
    bias_ptr += first
    scale_ptr += first
    buf_ptr += first
    out_ptr += first

    # x_0 into plane 0 (only this program's rows: a row block's planes are private to it).
    for n0 in range(0, d, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        mask = row_ok[:, None] & (cols < d)[None, :]
        offs = lrows[:, None] * d + cols[None, :]
        x = initial_state(x0_ptr, bias_ptr, scale_ptr, offs, mask, HAS_X0, ACT, BLOCK_B, BLOCK_N)
        tl.store(buf_ptr + offs, x, mask=mask)
    tl.debug_barrier()

    active = row_ok
    its = tl.zeros((BLOCK_B,), dtype=tl.int32)
    res = tl.full((BLOCK_B,), float("inf"), dtype=tl.float32)
    k = 0
    go = (k < max_iter) & any_set(active)
    while go:
        src = buf_ptr + (k % 2) * plane
        dst = buf_ptr + ((k + 1) % 2) * plane
        diff_sq = tl.zeros((BLOCK_B,), dtype=tl.float64)
        norm_sq = tl.zeros((BLOCK_B,), dtype=tl.float64)
        for n0 in range(0, d, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            acc = _matmul_tile(src, w_ptr, row_ok, cols, d, stride_wk, stride_wn, PRECISION, BLOCK_B, BLOCK_N, BLOCK_K)
            mask = row_ok[:, None] & (cols < d)[None, :]
            offs = lrows[:, None] * d + cols[None, :]
            x_new = next_state(acc, bias_ptr, scale_ptr, offs, mask, ACT)
            x_old = tl.load(src + offs, mask=mask, other=0.0)
            diff_sq += sum_squares(x_new - x_old)
            norm_sq += sum_squares(x_new)
            # Frozen rows carry their state over, so the newest plane always holds every row.
            tl.store(dst + offs, tl.where(active[:, None], x_new, x_old), mask=mask)
        r = relative_residual(diff_sq, norm_sq)
        res = tl.where(active, r, res)
        its += active.to(tl.int32)
        active = active & goes_on(r, tol)
        k += 1
        go = (k < max_iter) & any_set(active)
        # The next iteration reads what other threads of this program just wrote to dst.
        tl.debug_barrier()

    final = buf_ptr + (k % 2) * plane
    for n0 in range(0, d, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        mask = row_ok[:, None] & (cols < d)[None, :]
        offs = lrows[:, None] * d + cols[None, :]
        x = tl.load(final + offs, mask=mask, other=0.0)
        tl.store(out_ptr + offs, x.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(its_ptr + row0 + lrows, its, mask=row_ok)
    tl.store(res_ptr + row0 + lrows, res, mask=row_ok)
    tl.store(conv_ptr + row0 + lrows, res < tol, mask=row_ok)  # met the rule (as the on-chip kernel)


@triton.autotune(
    configs=tuned(STEP_CONFIGS), key=["B", "d", "PRECISION", "ACT", "FUSED_MATMUL"],
    prune_configs_by={"early_config_prune": _prune_tiles}, do_bench=benchmark,
    # Benchmarking re-runs the launch: restore what it accumulates (atomics, the iteration counter).
    restore_value=["sums_ptr", "tot_ptr", "its_ptr"],
)
@triton.jit(do_not_specialize=["t"])
def _step_kernel(
    x_in_ptr, x_out_ptr, bias_ptr, scale_ptr, w_ptr, pre_ptr, sums_ptr, tot_ptr, active_ptr, its_ptr, res_ptr,
    B, d, stride_wk, stride_wn, tol, t,
    ACT: tl.constexpr, STOP_BATCH: tl.constexpr, COMPUTE: tl.constexpr, FUSED_MATMUL: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Step ``t`` of the stepwise solve on a (row block, column tile) grid, plus the bookkeeping of step t-1.

    Buffers (initialised by the launcher; both ``active`` slots start RUNNING): ``sums``, ``tot`` and
    ``active`` as ``close_previous_step`` describes them, with rows for samples; this launch adds row
    block x column tile's squared norms (float64) into slot ``t % 3``. ``COMPUTE=False`` does only the
    bookkeeping (the launch after the last step). ``FUSED_MATMUL=False`` (the split path) reads
    ``x_in @ M``, computed before the launch, from ``pre`` (float32 (B, d)) instead of computing it.
    """
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    row0 = pid_b * BLOCK_B
    rows = row0 + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    # One program per row block writes the per-row results. (Scalars are broadcast to vectors before
    # combining with vector masks: the interpreter turns bool-vector & bool-scalar into integers.)
    records = row_ok & ((rows * 0 + pid_n) == 0)

    act_now = close_previous_step(rows, row_ok, records, (pid_b + pid_n) == 0, sums_ptr, tot_ptr, active_ptr,
                                   its_ptr, res_ptr, B, tol, t, STOP_BATCH)

    if COMPUTE:
        first = tl.cast(row0, tl.int64) * d
        lrows = tl.arange(0, BLOCK_B)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = row_ok[:, None] & (cols < d)[None, :]
        offs = lrows[:, None] * d + cols[None, :]
        if any_set(act_now):
            if FUSED_MATMUL:
                acc = _matmul_tile(x_in_ptr + first, w_ptr, row_ok, cols, d, stride_wk, stride_wn, PRECISION,
                                   BLOCK_B, BLOCK_N, BLOCK_K)
            else:
                acc = tl.load(pre_ptr + first + offs, mask=mask, other=0.0)
            x_new = next_state(acc, bias_ptr + first, scale_ptr + first, offs, mask, ACT)
            x = tl.load(x_in_ptr + first + offs, mask=mask, other=0.0)
            diff_sq = sum_squares(x_new - x)  # float64
            norm_sq = sum_squares(x_new)
            adds = row_ok & act_now
            cur = sums_ptr + (t % 3) * 2 * B
            tl.atomic_add(cur + rows, diff_sq, mask=adds)
            tl.atomic_add(cur + B + rows, norm_sq, mask=adds)
            if STOP_BATCH:
                t_cur = tot_ptr + (t % 3) * 2
                tl.atomic_add(t_cur, tl.sum(tl.where(adds, diff_sq, 0.0), axis=0))
                tl.atomic_add(t_cur + 1, tl.sum(tl.where(adds, norm_sq, 0.0), axis=0))
            x = tl.where(act_now[:, None], x_new, x)
        else:  # every row of the block has stopped: carry the state over
            x = tl.load(x_in_ptr + first + offs, mask=mask, other=0.0)
        tl.store(x_out_ptr + first + offs, x, mask=mask)


# ------------------------------------------------------------------------------------------- launchers


def resolve_precision(precision: Optional[str] = None) -> str:
    """The ``tl.dot`` input precision of a dense solve (``launch.resolve_precision``): ``precision``, else
    ``PCDEQ_TRITON_PRECISION``, else torch's float32 matmul setting, read by ``torch_matmul_precision``
    from either of torch's APIs: exact fp32 (torch's default, ``"highest"``) gives ``"ieee"``, TF32
    (``"high"``/``"medium"``, or ``torch.backends.cuda.matmul.fp32_precision = "tf32"``) gives ``"tf32"``."""
    return launch.resolve_precision(precision, torch_matmul_precision)


def choose_path(batch: int, dim: int, stop: str = "sample", device=None, path: Optional[str] = None) -> str:
    """``"single"`` (one launch per solve), ``"stepwise"`` (a launch per iteration) or, only when asked
    for, ``"split"`` for a problem shape.

    ``path`` (or the environment variable ``PCDEQ_TRITON_PATH``) forces one: ``"single"``,
    ``"stepwise"``, ``"split"`` or ``"auto"`` (the default). ``stop="batch"`` is always stepwise (or
    split): its stopping rule is a reduction over all row blocks, which one launch cannot make without a
    grid-wide barrier (``launch.requested_path``). ``"split"`` is the stepwise loop with each step's
    matmul done by ``torch.mm`` (cuBLAS: large tiles, TMA) and the step kernel as its fused epilogue, at
    the price of writing and reading the (B, d) product once more per step; "auto" does not pick it yet
    (no GPU timings to say where it wins: ``python -m pcdeq_kernels.bench --paths
    official,triton-stepwise,triton-split``).

    ``"auto"``: a single launch runs one program per 16 rows (the smallest row block), each doing
    ``2 * 16 * d^2`` flops per iteration; the stepwise loop spreads an iteration over row blocks *and*
    column tiles but pays a launch (about 10 us from Python) per iteration. So: single launch when
    d <= SINGLE_LAUNCH_MAX_DIM (a program's iteration then costs about what a launch does) or when the
    row blocks alone fill the GPU's SMs; stepwise otherwise (few rows, wide layers). This threshold
    comes from that cost model, not from measurements.
    """
    path = launch.requested_path(path, stop, split=True)
    if path != "auto":
        return path
    if dim <= SINGLE_LAUNCH_MAX_DIM or triton.cdiv(batch, 16) >= launch.num_sms(torch.device(device or "cpu")):
        return "single"
    return "stepwise"


def _check_inputs(x: Tensor, weight: Tensor, others: dict) -> None:
    """``launch.check_inputs`` for (B, d) states, and the 32-bit limits of the dense kernels."""
    launch.check_inputs(x, weight, others, x_dims=2, taps=(), needs="dense solves need x (B, d) and weight (d, d)")
    # The kernels index W and a row block with 32-bit offsets, the per-row buffers with 32-bit rows.
    if x.shape[1] > limits.MAX_DIM or x.shape[0] > limits.MAX_BATCH:
        raise ValueError(
            f"the Triton kernels take d <= {limits.MAX_DIM} and B <= {limits.MAX_BATCH} (32-bit indexing); got "
            f"B={x.shape[0]}, d={x.shape[1]}: split the batch, or use another backend"
        )


def _solve(x0, bias, scale, weight, it: Iteration, path, precision, check_every):
    """Shared launcher, on contiguous tensors; the operand is W.T for the forward map, W for the adjoint."""
    batch, dim = bias.shape
    device = bias.device
    precision = resolve_precision(precision)
    path = choose_path(batch, dim, it.stop, device, path)
    # M[k, n] = W[n, k] (forward: z @ W.T) or W[k, n] (adjoint: h @ W)
    stride_wk, stride_wn = (dim, 1) if it.adjoint else (1, dim)
    if scale is None:
        scale = bias  # the forward epilogue never reads it
    if path in ("stepwise", "split"):
        if path == "split" and precision != torch_matmul_precision():
            raise ValueError(
                f"the split path's matmul is torch.mm, which follows torch's float32 matmul precision "
                f"({torch_matmul_precision()!r} now); precision={precision!r} was asked: set torch's precision "
                "instead (torch.backends.cuda.matmul.fp32_precision), or use path='stepwise'"
            )
        # the split path's torch.mm operand: M as a float32 matrix (a view when W is float32); detached,
        # since mm(out=) refuses inputs that require grad and the solve is below autograd anyway
        split_operand = (weight if it.adjoint else weight.t()).detach().float() if path == "split" else None
        return _solve_stepwise(x0, bias, scale, weight, it, precision, launch.check_every(check_every),
                               stride_wk, stride_wn, split_operand)
    out = torch.empty((batch, dim), dtype=bias.dtype, device=device)
    its, res, conv = launch.stats(batch, device)
    grid = lambda meta: (triton.cdiv(batch, meta["BLOCK_B"]),)  # noqa: E731
    d_pad = max(16, triton.next_power_of_2(dim))  # tl.dot needs every block dimension >= 16
    common = dict(ACT=it.map_id, HAS_X0=x0 is not None, PRECISION=precision)
    if x0 is None:
        x0 = bias  # a valid pointer the kernel never reads (HAS_X0=False)
    if d_pad <= ONCHIP_MAX_DIM:
        with launching(device):
            _solve_onchip_kernel[grid](
                x0, bias, scale, weight, out, its, res, conv,
                batch, dim, stride_wk, stride_wn, float(it.tol), int(it.max_iter), D_PAD=d_pad, **common,
            )
    else:
        buf = torch.empty((2, batch, dim), dtype=torch.float32, device=device)
        with launching(device):
            _solve_scratch_kernel[grid](
                x0, bias, scale, weight, buf, out, its, res, conv,
                batch, dim, stride_wk, stride_wn, float(it.tol), int(it.max_iter), **common,
            )
    return out, its, res, conv


def _launch_step(x_in, x_out, bias, scale, weight, bufs, map_id, stride_wk, stride_wn, tol, t, stop_batch,
                 compute, precision, pre=None):
    """One step launch; ``pre`` (the split path): ``x_in @ M`` already computed, the kernel reads it."""
    batch, dim = bias.shape
    sums, tot, active, its, res = bufs

    def grid(meta):  # the bookkeeping-only launch needs one program per row block
        return triton.cdiv(batch, meta["BLOCK_B"]), triton.cdiv(dim, meta["BLOCK_N"]) if compute else 1

    with launching(bias.device):
        _step_kernel[grid](
            x_in, x_out, bias, scale, weight, x_in if pre is None else pre, sums, tot, active, its, res,
            batch, dim, stride_wk, stride_wn, float(tol), int(t),
            ACT=map_id, STOP_BATCH=stop_batch, COMPUTE=compute, FUSED_MATMUL=pre is None, PRECISION=precision,
        )


def _solve_stepwise(x0, bias, scale, weight, it: Iteration, precision, check_every, stride_wk, stride_wn,
                    split_operand=None):
    """The host loop of step launches (``launch.run_steps``). With ``split_operand`` (M, float32) the
    split path: each step's matmul is ``torch.mm`` (cuBLAS on a GPU) into a float32 buffer, and the step
    kernel is its fused epilogue (activation or multiply by D, next state, per-row residual, freezing);
    else the step kernel computes its tile's matmul itself. Frozen rows are carried over, so the newest
    plane holds every row."""
    batch, dim = bias.shape
    x = launch.state_planes((batch, dim), bias.device)
    pre = None if split_operand is None else torch.empty((batch, dim), dtype=torch.float32, device=bias.device)
    launch.start_state(x[0], x0, bias, scale, it.map_id)
    bufs = launch.step_buffers(batch, bias.device)
    _, _, active, its, res = bufs

    def step(t, compute):
        if compute and pre is not None:
            torch.mm(x[t % 2], split_operand, out=pre)
        _launch_step(x[t % 2], x[(t + 1) % 2], bias, scale, weight, bufs, it.map_id, stride_wk, stride_wn, it.tol,
                     t, it.batch_stop, compute, precision, pre if compute else None)

    steps = launch.run_steps(step, it.max_iter, check_every, active)
    return x[steps % 2].to(bias.dtype), its, res, launch.converged(active, steps)


def forward_solve(u: Tensor, weight: Tensor, z0: Optional[Tensor], spec: SolveSpec, *, path: Optional[str] = None,
                  precision: Optional[str] = None, check_every: Optional[int] = None):
    """Solve ``z = act(z @ W.T + u)`` from ``z0`` (default 0) by ``spec`` (its activation, ``tol``,
    ``max_iter`` and ``stop``). Returns ``(z* in u.dtype, iterations int32, residual float32, converged
    bool)``, each per row, with the semantics of ``reference.forward_solve``.

    ``path``: see ``choose_path``; ``precision``: see ``resolve_precision``; ``check_every``: how many
    steps the stepwise loop runs between host reads of the convergence flags (``launch.check_every``).
    """
    it = launch.iteration(spec, adjoint=False)
    _check_inputs(u, weight, {"z0": z0})
    z0 = None if z0 is None else z0.contiguous()
    return _solve(z0, u.contiguous(), None, weight.contiguous(), it, path, precision, check_every)


def adjoint_solve(v: Tensor, weight: Tensor, D: Tensor, spec: SolveSpec, *, path: Optional[str] = None,
                  precision: Optional[str] = None, check_every: Optional[int] = None):
    """Solve ``h = D * (h @ W + v)`` from ``h_0 = D * v`` by ``spec``'s adjoint stopping rule
    (``backward_tol``, ``backward_max_iter``, ``stop``); returns as ``forward_solve`` (h* in v.dtype)."""
    it = launch.iteration(spec, adjoint=True)
    _check_inputs(v, weight, {"D": D})
    return _solve(None, v.contiguous(), D.contiguous(), weight.contiguous(), it, path, precision, check_every)


def _step(x, bias, scale, weight, map_id, precision):
    batch, dim = bias.shape
    x_out = torch.empty((batch, dim), dtype=torch.float32, device=bias.device)
    bufs = launch.step_buffers(batch, bias.device)
    stride_wk, stride_wn = (dim, 1) if map_id == ADJOINT_ID else (1, dim)
    _launch_step(x.float().contiguous(), x_out, bias, bias if scale is None else scale, weight, bufs, map_id,
                 stride_wk, stride_wn, 1.0, 0, False, True, resolve_precision(precision))
    sums = bufs[0]
    return x_out, sums[0, 0], sums[0, 1]


def forward_step(z: Tensor, u: Tensor, weight: Tensor, activation: str, *, precision: Optional[str] = None):
    """One fused step: ``(z_next = act(z @ W.T + u), ||z_next - z||^2, ||z_next||^2)``, per row: the state
    float32, the squared norms float64."""
    map_id = launch.map_id(activation)
    _check_inputs(u, weight, {"z": z})
    return _step(z, u.contiguous(), None, weight.contiguous(), map_id, precision)


def adjoint_step(h: Tensor, v: Tensor, weight: Tensor, D: Tensor, *, precision: Optional[str] = None):
    """One fused adjoint step: ``(h_next = D * (h @ W + v), ||h_next - h||^2, ||h_next||^2)``, per row, as
    ``forward_step``."""
    map_id = launch.map_id(None)
    _check_inputs(v, weight, {"h": h, "D": D})
    return _step(h, v.contiguous(), D.contiguous(), weight.contiguous(), map_id, precision)


# ------------------------------------------------------------------------------- ahead-of-time compiles

# Every kernel's arguments by role, for compiling without a GPU (``aot.ARG_TYPES``: the roles both
# kernel families share) plus the dense ones.
_ARG_TYPES = {**aot.ARG_TYPES, "d": "i32", "pre_ptr": "*fp32"}
KERNELS = {"onchip": _solve_onchip_kernel, "scratch": _solve_scratch_kernel, "step": _step_kernel}
CONFIGS = {"onchip": ONCHIP_CONFIGS, "scratch": SCRATCH_CONFIGS, "step": STEP_CONFIGS}
CANDIDATES = {"onchip": _onchip_candidates, "scratch": _tile_candidates, "step": _tile_candidates}


def aot_variants(kernel: str, precision: str, *, d_pad: int = 128, batch: int = 1 << 20):
    """The launch configurations the autotuner may pick for ``kernel`` on a GPU (after pruning)."""
    return CANDIDATES[kernel](CONFIGS[kernel], {"B": batch, "D_PAD": d_pad, "PRECISION": precision})


# The integer arguments a launch specialises as multiples of 16 when they are (B, d and the weight
# stride that is not 1, which is d).
_SHAPE_ARGS = ("B", "d", "stride_wk", "stride_wn")


def aot_plan(full: bool = False) -> list[dict]:
    """Keyword sets for ``aot_compile`` that cover every kernel configuration a launch can compile.

    A launch compiles a variant per (epilogue, operand dtype, whether B and d are multiples of 16
    (``aligned``: Triton then specialises them, and the weight stride d, as such), whether z0 is given
    (``has_x0``; the single-launch kernels), the step kernel's stop rule, bookkeeping-only launch and
    split-path epilogue (``fused_matmul=False``)). ``full=True``: the whole product (capability x
    precision x kernel x pruned config x every map of the table (``map_ids()``: the adjoint and each
    activation) x operand dtype x aligned x those variants, every on-chip D_PAD): 6060 compiles with the
    table's five maps. The default covers every (capability,
    precision, kernel, config), each with the adjoint epilogue in float32 (the most registers on chip:
    it keeps D as well as v) and tanh in bfloat16, both aligned or not (given z0 when aligned; and the
    step kernel also as the split path's epilogue, under the default stop rule); plus, on sm_90, every
    (epilogue, dtype) pair for each kernel's first config: 294.
    """
    pairs = [(act, dt) for act in map_ids().values() for dt in aot.TRITON_DTYPES]
    heaviest = [(ADJOINT_ID, torch.float32), (map_ids()["tanh"], torch.bfloat16)]
    plan = []
    for capability in aot.CAPABILITIES:
        for precision in PRECISIONS:
            for kernel in KERNELS:
                d_pads = [16, 32, 64, 128] if full and kernel == "onchip" else [ONCHIP_MAX_DIM]
                if kernel == "step":
                    # the split path's epilogue, per stop rule (the default plan: the default rule)
                    variants = [*aot.STEP_VARIANTS,
                                *(dict(stop_batch=b, compute=True, fused_matmul=False) for b in (False, True))]
                else:
                    variants = list(aot.SOLVE_VARIANTS)
                for d_pad in d_pads:
                    for i, config in enumerate(aot_variants(kernel, precision, d_pad=d_pad)):
                        if full:
                            chosen = [(act, dt, al, v) for act, dt in pairs for al in (False, True) for v in variants]
                        else:
                            # the largest variant (z0 given when aligned), and the split path's epilogue
                            chosen = [(act, dt, al, v) for act, dt in heaviest for al in (False, True)
                                      for v in [variants[al and kernel != "step"]] + variants[3:4]]
                            if i == 0 and capability == 90:
                                chosen += [(act, dt, False, variants[0]) for act, dt in pairs
                                           if (act, dt) not in heaviest]
                        for act, dtype, aligned, extra in chosen:
                            plan.append(dict(kernel=kernel, config=config, act_id=act, dtype=dtype, precision=precision,
                                             capability=capability, d_pad=d_pad, aligned=aligned, **extra))
    return plan


def aot_compile(kernel: str, config, *, act_id: int, dtype: torch.dtype, precision: str, capability: int,
                d_pad: int = 128, stop_batch: bool = False, compute: bool = True, aligned: bool = False,
                has_x0: bool = False, fused_matmul: bool = True) -> dict:
    """Compile one kernel configuration for ``sm_<capability>`` without a GPU; return its resource use.

    Returns ``{"registers", "spill_bytes" (per-thread local memory: 0 means no spills), "shared" (bytes
    of shared memory), "num_warps", "num_stages"}`` (``aot.compile_for_gpu``). ``aligned``: the variant
    a launch compiles when B and d are multiples of 16.
    """
    constexprs = dict(ACT=act_id, PRECISION=precision, **config.kwargs)
    if kernel == "onchip":
        constexprs.update(D_PAD=d_pad)
    if kernel in ("onchip", "scratch"):
        constexprs.update(HAS_X0=has_x0)
    if kernel == "step":
        constexprs.update(STOP_BATCH=stop_batch, COMPUTE=compute, FUSED_MATMUL=fused_matmul)
    return aot.compile_for_gpu(KERNELS[kernel].fn, _ARG_TYPES, constexprs, dtype, config, capability,
                               divisible=_SHAPE_ARGS if aligned else ())
