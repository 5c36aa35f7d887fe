"""Fused Triton kernels for the convolutional pcDEQ map and its adjoint, and their launchers.

The map is a 3x3 convolution with padding 1 and a nonnegative kernel W of shape (C, C, 3, 3), on
states of shape (B, C, H, W):

    forward   z_{k+1} = act(conv(z_k, W) + u)              F.conv2d(z, W, padding=1)
    adjoint   h_{k+1} = D * (conv^T(h_k, W) + v)           F.conv_transpose2d(h, W, padding=1), h_0 = D * v

Both are one implicit GEMM. With the state of one image as a matrix ``x[p, k]`` (pixel ``p = i * width +
j``, channel ``k``) and the tap ``t = 3 * ty + tx`` reading pixel ``(i + ty - 1, j + tx - 1)``:

    L(x)[(i, j), n] = sum_{t < 9} sum_k x[(i + ty - 1, j + tx - 1), k] * M_t[k, n]    (x = 0 outside)

    forward   M_t[k, n] = W[n, k, ty, tx]
    adjoint   M_t[k, n] = W[k, n, 2 - ty, 2 - tx]        the transposed convolution is a convolution
                                                         with the kernel flipped and its channels swapped

so the kernels reduce over K = 9 taps x C input channels, and the adjoint differs from the forward map
only in where ``M_t[k, n]`` lives. The launcher packs W once per solve tap-major, ``Wp[t] = W[:, :, ty,
tx]`` (nine (C, C) matrices, ``W.permute(2, 3, 0, 1)``: 9 C^2 elements, negligible next to a solve),
and every kernel reads ``M_t[k, n]`` at ``w_ptr + t * stride_wt + k * stride_wk + n * stride_wn``:

    forward   w_ptr = Wp[0]   stride_wt = +C^2   (stride_wk, stride_wn) = (1, C)    Wp[t].T, as dense's W.T
    adjoint   w_ptr = Wp[8]   stride_wt = -C^2   (stride_wk, stride_wn) = (C, 1)    Wp[8 - t], as dense's W

one kernel body for both (``ACT`` = the map's id from the table: the activation's ``kernel_id``, or
``ADJOINT_ID`` for ``D * (.)``; the epilogue helpers of ``epilogue.py``, shared with ``dense.py``), and
each tap's operand tile is contiguous along one of its dimensions in both directions. The launchers
take a ``SolveSpec`` and share their checks, buffers and host loop with ``dense.py`` (``launch.py``).

Layout: the kernels work in channels-last (NHWC). The reduction dimension is the input channels, so
in NHWC an operand tile (BLOCK_P pixels, BLOCK_K channels) is BLOCK_P contiguous runs (coalesced
loads), a tap is one pixel offset for every channel, and an image is one contiguous (H * W, C) block
(an image-private scratch region, a contiguous output tile). In NCHW the reduction would stride by
H * W. So u, D and z0 are converted once per solve (one copy each; channels_last inputs are used as
they are, without a copy), the state is float32 NHWC, and the result comes back in the input's memory
format (``torch.empty_like``: NCHW for contiguous inputs, channels_last for channels_last ones).

Stopping rule, per image ``b`` (``reference.iterate``): ``r_b = ||x_{k+1,b} - x_{k,b}|| /
(||x_{k+1,b}|| + 1e-5)`` over the whole image (all channels and pixels; the squared norms summed in
float64, the ratio computed in float64 and rounded to float32, NaN for a non-finite image); with
``stop="sample"`` an image whose ``r_b < tol`` freezes, converged (state, count and residual stop
changing), and one whose ``r_b`` is not finite freezes, unconverged, after that step; with
``stop="batch"`` all freeze together once the ratio over the whole batch is below ``tol`` (converged)
or not finite (not). Images are independent. Two kernels:

``_solve_scratch_kernel``  one launch per solve, one program per image. A convolution reads each
    state entry from nine pixels, which Triton cannot gather from a register tensor, so the state
    ping-pongs between two float32 planes of a global scratch buffer (2, B, H, W, C), each program only
    touching its own image (L1/L2-resident at the sizes where this path is chosen). Per iteration the
    program walks its image's (pixel tile, channel tile) grid, each tile one K loop over the 9 taps and
    the channel blocks (``tl.dot``) and the fused epilogue (bias, activation or D, store, the two squared
    norms, summed in float64 registers), then tests its residual; a CTA barrier separates iterations (one
    plane is read while the other is written, so one barrier is enough). An image that has converged
    leaves the loop (per-image early exit); no host synchronisation.
``_step_kernel``  one iteration over a (image x pixel tile, channel tile) grid, for the stepwise path
    (large images, where one program per image would leave the GPU idle, and ``stop="batch"``, which
    needs a grid-wide reduction). Tiles add their squared norms into per-image sums with atomics. The
    freeze decision for step ``t`` needs the complete sums of step ``t``, so launch ``t + 1`` makes it
    (every program for its image; the image's first tile records it), with dense's rotating buffers
    (sums: 3 slots, statuses: 2). A frozen image's programs do nothing at all, not even a copy:
    an image active for exactly its first ``n`` steps holds its final state in plane ``n % 2``, which
    the launcher picks per image at the end. The host reads the statuses every ``check_every``
    steps.

``choose_path`` picks between them by shape (overridable, as dense's). Precision, operand dtypes and
configurations follow ``dense.py``: float32 state and matmul accumulation (float64 squared norms);
fp32/fp16/bf16 operands converted in registers; ``"ieee"`` or ``"tf32"`` dots (``resolve_precision``: by
default what torch's own float32 convolutions use, TF32 unless turned off, as the reference's and the
CUDA backend's cuDNN calls do; ieee configs use K blocks of 16); configurations compile without register spills for sm_80 and sm_90 (``aot_plan``/``aot_compile``,
checked by the tests; see ``aot_compile`` for the one kind of spill ptxas chooses by itself).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..activations import ADJOINT_ID, map_ids
from ..precision import torch_conv_precision
from ..spec import SolveSpec
from . import aot, launch, limits
from .epilogue import close_previous_step, goes_on, initial_state, next_state, relative_residual, sum_squares
from .launch import Iteration, arg, autotuned, benchmark, launching, make_configs, tuned

# "auto" takes the single launch when one program's iteration (one image: 18 C^2 H W flops) costs at
# most about what a launch does; the dense kernels' bound (2 * 16 * 512^2 flops per program-iteration).
SINGLE_LAUNCH_MAX_FLOPS = 2 * 16 * 512 * 512


# --------------------------------------------------------------------------------------------- configs

# (BLOCK_P, BLOCK_N, BLOCK_K, num_warps, num_stages): pixels x output channels per tile, input channels
# per K block. BLOCK_K = 16 serves PRECISION="ieee", 32 "tf32" (as in dense.py). Every config listed
# compiles for sm_80 and sm_90 with every epilogue and operand dtype (aot_plan(full=True)), under Triton
# 3.6, 3.8 and 3.9, without spills beyond ptxas's occupancy trade (aot.spills_accepted: 8 or 16 bytes,
# in some 16-divisible specialisations and, under 3.8, the ieee scratch tiles on sm_90); the others
# tried spilled (a few bytes to a few hundred) in some variant, in one version or another: most
# 128-pixel tiles, 64 x 32 tiles with K blocks of 16, and in the scratch kernel 32 x 32 ieee tiles (over
# 1 to 16 warps, 1 to 3 stages: ptxas caps them at an occupancy step, 64 to 168 registers, and spills 8
# or 16 bytes), 64 x 64 ieee tiles over 8 warps and 64 x 64 tf32 tiles with 2 stages; so its ieee tiles
# are 16 x 32 over 2 warps (what C <= 32 takes), 16 x 64 over 4 and 64 x 64 over 16. The first entry is
# the one the interpreter runs, whatever the precision: its cost is per operation, not per element, so
# 64 x 32 tiles keep the tests fast while their images (up to 81 pixels, 40 channels) still span several
# pixel tiles, channel tiles and K blocks. The 16 x 32 ieee tile says maxnreg=128: left to itself,
# Triton 3.6's ptxas stops it at 80 registers and spills 24 bytes when given z0 with C, H, W and B
# multiples of 16 (bfloat16, sm_80).
SCRATCH_CONFIGS = make_configs(
    [(64, 32, 32, 4, 1), (64, 32, 32, 8, 2), (64, 64, 32, 8, 1),
     (16, 32, 16, 2, 1, 128), (16, 64, 16, 4, 1), (64, 64, 16, 16, 1)],
    ("BLOCK_P", "BLOCK_N", "BLOCK_K"),
)
# The step kernel's 64 x 64 ieee tile runs 1 stage: with 2, Triton 3.6's ptxas spills 32 bytes (tanh,
# float32, sm_90). How close these sit to ptxas's occupancy steps shows in that a change of the
# kernel's source that leaves its work alone can move a config across one: rerun the AOT tests
# under both versions (scripts/check_triton_aot.sh) after any change here.
STEP_CONFIGS = make_configs(
    [(64, 32, 32, 4, 2), (64, 32, 32, 8, 2), (64, 64, 32, 8, 2), (32, 32, 16, 4, 2), (64, 64, 16, 8, 1)],
    ("BLOCK_P", "BLOCK_N", "BLOCK_K"),
)


def _tile_candidates(configs, named_args, **kwargs):
    """Configs of the requested precision whose tiles are not mostly padding for this C and H * W."""
    ieee = arg(named_args, kwargs, "PRECISION") == "ieee"
    channels = max(16, triton.next_power_of_2(arg(named_args, kwargs, "C")))
    pixels = max(32, triton.next_power_of_2(arg(named_args, kwargs, "H") * arg(named_args, kwargs, "Wd")))
    same = [c for c in configs if (c.kwargs["BLOCK_K"] <= 16) == ieee] or configs[:1]
    kept = [c for c in same if c.kwargs["BLOCK_N"] <= channels and c.kwargs["BLOCK_P"] <= pixels]
    return kept or [min(same, key=lambda c: c.kwargs["BLOCK_P"] * c.kwargs["BLOCK_N"])]


_prune_tiles = autotuned(_tile_candidates)


# --------------------------------------------------------------------------------------------- kernels
#
# Addressing: a program moves its pointers to its image once (a 64-bit scalar offset) and indexes
# inside the image with 32-bit offsets (C * H * W < 2**31, checked by the launchers).


@triton.jit
def _conv_tile(x_ptr, w_ptr, pix, pix_ok, cols_n, C, H, Wd, stride_wt, stride_wk, stride_wn,
               PRECISION: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``L(x)[pix, cols_n]`` in float32 for one image, x (NHWC float32) already at the image's start.

    One flat loop over (tap, channel block) pairs: a single pipelined loop even when C fits one block.
    (Unrolling the taps with ``tl.static_range`` instead, each with compile-time shifts and masks, kept
    more addresses live: more registers, and spills.)
    """
    i = pix // Wd
    j = pix - i * Wd
    lanes_k = tl.arange(0, BLOCK_K)
    a_offs = (pix * C)[:, None] + lanes_k[None, :]
    m_offs = lanes_k[:, None] * stride_wk + cols_n[None, :] * stride_wn
    n_ok = (cols_n < C)[None, :]
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    k_blocks = tl.cdiv(C, BLOCK_K)
    for step in range(0, 9 * k_blocks):
        t = step // k_blocks
        k0 = (step - t * k_blocks) * BLOCK_K
        dy = t // 3 - 1
        dx = t - 3 * (t // 3) - 1
        ok = pix_ok & (i + dy >= 0) & (i + dy < H) & (j + dx >= 0) & (j + dx < Wd)
        k_ok = lanes_k + k0 < C
        a = tl.load(x_ptr + ((dy * Wd + dx) * C + k0) + a_offs, mask=ok[:, None] & k_ok[None, :], other=0.0)
        m = tl.load(w_ptr + (t * stride_wt + k0 * stride_wk) + m_offs, mask=k_ok[:, None] & n_ok,
                    other=0.0).to(tl.float32)
        acc = tl.dot(a, m, acc, input_precision=PRECISION)
    return acc


@triton.autotune(configs=tuned(SCRATCH_CONFIGS), key=["B", "C", "H", "Wd", "PRECISION", "ACT"],
                 prune_configs_by={"early_config_prune": _prune_tiles}, do_bench=benchmark)
@triton.jit(do_not_specialize=["max_iter"])
def _solve_scratch_kernel(
    x0_ptr, bias_ptr, scale_ptr, w_ptr, buf_ptr, out_ptr, its_ptr, res_ptr, conv_ptr,
    B, C, H, Wd, stride_wt, stride_wk, stride_wn, tol, max_iter,
    ACT: tl.constexpr, HAS_X0: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Whole solve for one image, the state in two planes of ``buf`` (2, B, H, W, C) fp32 (NHWC)."""
    img = tl.program_id(0)
    hw = H * Wd
    # Pointers are moved to this program's image where they are used, not once here: kept as
    # (parameter, offset), they need no registers of their own across the iteration loop.
    first = tl.cast(img, tl.int64) * hw * C
    plane = tl.cast(B, tl.int64) * hw * C

    # x_0 into plane 0 (only this image: an image's planes are private to its program).
    for p0 in range(0, hw, BLOCK_P):
        pix = p0 + tl.arange(0, BLOCK_P)
        for n0 in range(0, C, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            mask = (pix < hw)[:, None] & (cols < C)[None, :]
            offs = pix[:, None] * C + cols[None, :]
            x = initial_state(x0_ptr + first, bias_ptr + first, scale_ptr + first, offs, mask, HAS_X0, ACT,
                               BLOCK_P, BLOCK_N)
            tl.store(buf_ptr + first + offs, x, mask=mask)
    tl.debug_barrier()

    # reference.iterate for one image: step until r < tol (converged), r not finite (a NaN or Inf: stop
    # at once, unconverged) or max_iter.
    k = 0
    r = tl.full((), float("inf"), dtype=tl.float32)
    go = k < max_iter
    while go:
        src = buf_ptr + (first + (k % 2) * plane)
        dst = buf_ptr + (first + ((k + 1) % 2) * plane)
        diff_sq = tl.zeros((), dtype=tl.float64)  # the image's squared norms, in float64
        norm_sq = tl.zeros((), dtype=tl.float64)
        for p0 in range(0, hw, BLOCK_P):
            pix = p0 + tl.arange(0, BLOCK_P)
            pix_ok = pix < hw
            for n0 in range(0, C, BLOCK_N):
                cols = n0 + tl.arange(0, BLOCK_N)
                acc = _conv_tile(src, w_ptr, pix, pix_ok, cols, C, H, Wd, stride_wt, stride_wk, stride_wn,
                                 PRECISION, BLOCK_P, BLOCK_N, BLOCK_K)
                mask = pix_ok[:, None] & (cols < C)[None, :]
                offs = pix[:, None] * C + cols[None, :]
                x_new = next_state(acc, bias_ptr + first, scale_ptr + first, offs, mask, ACT)
                diff = x_new - tl.load(src + offs, mask=mask, other=0.0)
                diff_sq += tl.sum(sum_squares(diff), axis=0)
                norm_sq += tl.sum(sum_squares(x_new), axis=0)
                tl.store(dst + offs, x_new, mask=mask)
        r = relative_residual(diff_sq, norm_sq)
        k += 1
        go = (k < max_iter) & goes_on(r, tol)
        # The next iteration (or the copy-out) reads what other threads of this program just wrote.
        tl.debug_barrier()

    final = buf_ptr + (first + (k % 2) * plane)
    for p0 in range(0, hw, BLOCK_P):
        pix = p0 + tl.arange(0, BLOCK_P)
        for n0 in range(0, C, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            mask = (pix < hw)[:, None] & (cols < C)[None, :]
            offs = pix[:, None] * C + cols[None, :]
            x = tl.load(final + offs, mask=mask, other=0.0)
            tl.store(out_ptr + first + offs, x.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(its_ptr + img, k)
    tl.store(res_ptr + img, r)
    tl.store(conv_ptr + img, r < tol)  # met the rule (else out of steps, or r not finite)


@triton.autotune(
    configs=tuned(STEP_CONFIGS), key=["B", "C", "H", "Wd", "PRECISION", "ACT"],
    prune_configs_by={"early_config_prune": _prune_tiles}, do_bench=benchmark,
    # Benchmarking re-runs the launch: restore what it accumulates (atomics, the iteration counter).
    restore_value=["sums_ptr", "tot_ptr", "its_ptr"],
)
@triton.jit(do_not_specialize=["t"])
def _step_kernel(
    x_in_ptr, x_out_ptr, bias_ptr, scale_ptr, w_ptr, sums_ptr, tot_ptr, active_ptr, its_ptr, res_ptr,
    B, C, H, Wd, stride_wt, stride_wk, stride_wn, tol, t,
    ACT: tl.constexpr, STOP_BATCH: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Step ``t`` of the stepwise solve for one (pixel tile, channel tile) of one image, plus the
    bookkeeping of step t-1 for that image.

    Grid: (B * pixel tiles, channel tiles). Buffers (initialised by the launcher; both ``active`` slots
    start RUNNING): ``sums``, ``tot`` and ``active`` as ``close_previous_step`` describes them, with
    images for samples. ``COMPUTE=False`` does only the bookkeeping (the launch after the last step).
    """
    hw = H * Wd
    tiles = tl.cdiv(hw, BLOCK_P)
    img = tl.program_id(0) // tiles
    p0 = (tl.program_id(0) - img * tiles) * BLOCK_P
    pid_n = tl.program_id(1)
    records = (p0 == 0) & (pid_n == 0)  # the image's first tile writes its per-image results

    act_now = close_previous_step(img, img < B, records, (tl.program_id(0) + pid_n) == 0, sums_ptr, tot_ptr,
                                   active_ptr, its_ptr, res_ptr, B, tol, t, STOP_BATCH)

    if COMPUTE:
        if act_now:  # a frozen image's programs stop here (its state is in plane its % 2)
            first = tl.cast(img, tl.int64) * hw * C
            x_in = x_in_ptr + first
            pix = p0 + tl.arange(0, BLOCK_P)
            pix_ok = pix < hw
            cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            acc = _conv_tile(x_in, w_ptr, pix, pix_ok, cols, C, H, Wd, stride_wt, stride_wk, stride_wn,
                             PRECISION, BLOCK_P, BLOCK_N, BLOCK_K)
            mask = pix_ok[:, None] & (cols < C)[None, :]
            offs = pix[:, None] * C + cols[None, :]
            x_new = next_state(acc, bias_ptr + first, scale_ptr + first, offs, mask, ACT)
            diff = x_new - tl.load(x_in + offs, mask=mask, other=0.0)
            diff_sq = tl.sum(sum_squares(diff), axis=0)  # float64
            norm_sq = tl.sum(sum_squares(x_new), axis=0)
            cur = sums_ptr + (t % 3) * 2 * B
            tl.atomic_add(cur + img, diff_sq)
            tl.atomic_add(cur + B + img, norm_sq)
            if STOP_BATCH:
                t_cur = tot_ptr + (t % 3) * 2
                tl.atomic_add(t_cur, diff_sq)
                tl.atomic_add(t_cur + 1, norm_sq)
            tl.store(x_out_ptr + first + offs, x_new, mask=mask)


# ------------------------------------------------------------------------------------------- launchers


def resolve_precision(precision: Optional[str] = None) -> str:
    """The ``tl.dot`` input precision of a conv solve (``launch.resolve_precision``) with torch's float32
    *convolution* setting as the default (cuDNN's TF32 switch, on unless ``torch.backends.cudnn.allow_tf32
    = False`` or ``torch.backends.cudnn.conv.fp32_precision = "ieee"``): a conv solve computes at the
    precision torch's conv2d would, as the reference's and the CUDA backend's convolutions do."""
    return launch.resolve_precision(precision, torch_conv_precision)


def choose_path(batch: int, channels: int, height: int, width: int, stop: str = "sample", device=None,
                path: Optional[str] = None) -> str:
    """``"single"`` (one launch per solve) or ``"stepwise"`` (a launch per iteration) for a problem shape.

    ``path`` (or ``PCDEQ_TRITON_PATH``) forces one: ``"single"``, ``"stepwise"`` or ``"auto"`` (the
    default), as in ``dense.choose_path`` (``launch.requested_path``); ``stop="batch"`` is always
    stepwise (a whole-batch reduction per iteration).

    ``"auto"``: the single launch runs one program per image, each doing ``18 C^2 H W`` flops per
    iteration on one SM; the stepwise loop spreads an iteration over every (image, pixel tile,
    channel tile) but pays a launch (about 10 us from Python) per iteration. So: single launch when an
    image's iteration is at most ``SINGLE_LAUNCH_MAX_FLOPS`` (dense's per-program bound: the work then
    costs about what a launch does; e.g. C=20 at 32x32, C=64 at 8x8), or when the images alone give
    every SM two programs (``B >= 2 * SMs``: one's barrier and memory waits overlap the other's
    work); stepwise otherwise (few large images). From this cost model, not from measurements.
    """
    path = launch.requested_path(path, stop, split=False)
    if path != "auto":
        return path
    flops = 18 * channels * channels * height * width
    if flops <= SINGLE_LAUNCH_MAX_FLOPS or batch >= 2 * launch.num_sms(torch.device(device or "cpu")):
        return "single"
    return "stepwise"


def _check_inputs(x: Tensor, weight: Tensor, others: dict) -> None:
    """``launch.check_inputs`` for (B, C, H, W) states and (C, C, 3, 3) kernels, and the 32-bit limits
    of the conv kernels."""
    launch.check_inputs(x, weight, others, x_dims=4, taps=(3, 3),
                        needs="convolutional solves need x (B, C, H, W) and weight (C, C, 3, 3)")
    batch, channels, height, width = x.shape
    # 32-bit offsets inside an image and the packed kernel; per-image buffers (6 B) and the step grid
    # (B * pixel tiles of at least 32) below 2**31.
    if (channels > limits.MAX_CHANNELS or channels * height * width > limits.MAX_IMAGE or batch > limits.MAX_BATCH
            or batch * triton.cdiv(height * width, 32) >= 2**31):
        raise ValueError(
            f"the Triton conv kernels take C <= {limits.MAX_CHANNELS}, C * H * W < 2**31 and B <= "
            f"{limits.MAX_BATCH} (32-bit indexing); got B={batch}, C={channels}, H={height}, W={width}: split "
            "the batch, or use another backend"
        )


def _nhwc(t: Optional[Tensor]) -> Optional[Tensor]:
    """(B, C, H, W) -> its (B, H, W, C) contiguous view: a copy for NCHW, free for channels_last."""
    return None if t is None else t.permute(0, 2, 3, 1).contiguous()


def _operand(weight: Tensor, adjoint: bool):
    """``(w, stride_wt, stride_wk, stride_wn)`` with ``M_t[k, n]`` at ``w + t stride_wt + k stride_wk +
    n stride_wn`` (module docstring): the kernel packed tap-major, ``Wp[t] = W[:, :, t // 3, t % 3]``."""
    c = weight.shape[0]
    packed = weight.permute(2, 3, 0, 1).contiguous().view(9, c, c)
    if adjoint:  # M_t = Wp[8 - t] (flipped taps), read as is (k indexes W's output channels)
        return packed[8], -c * c, c, 1
    return packed[0], c * c, 1, c  # M_t = Wp[t].T


def _solve(x0, bias, scale, weight, it: Iteration, path, precision, check_every):
    """Shared launcher; returns the state as ``torch.empty_like(bias)`` (dtype and memory format)."""
    batch, channels, height, width = bias.shape
    device = bias.device
    precision = resolve_precision(precision)
    path = choose_path(batch, channels, height, width, it.stop, device, path)
    w, stride_wt, stride_wk, stride_wn = _operand(weight, it.adjoint)
    geometry = (batch, channels, height, width, stride_wt, stride_wk, stride_wn)
    out = torch.empty_like(bias)
    x0, bias, scale = _nhwc(x0), _nhwc(bias), _nhwc(scale)
    if scale is None:
        scale = bias  # the forward epilogue never reads it
    if path == "stepwise":
        x, its, res, conv = _solve_stepwise(x0, bias, scale, w, it, precision, launch.check_every(check_every),
                                            geometry)
        out.copy_(x.permute(0, 3, 1, 2))
        return out, its, res, conv
    its, res, conv = launch.stats(batch, device)
    # The kernel writes (B, H, W, C): straight into a channels_last result, else into a staging buffer.
    target = out.permute(0, 2, 3, 1)
    staged = not target.is_contiguous()
    if staged:
        target = torch.empty(target.shape, dtype=out.dtype, device=device)
    buf = torch.empty((2, batch, height, width, channels), dtype=torch.float32, device=device)
    with launching(device):
        _solve_scratch_kernel[(batch,)](
            bias if x0 is None else x0, bias, scale, w, buf, target, its, res, conv,
            batch, channels, height, width, stride_wt, stride_wk, stride_wn, float(it.tol), int(it.max_iter),
            ACT=it.map_id, HAS_X0=x0 is not None, PRECISION=precision,
        )
    if staged:
        out.copy_(target.permute(0, 3, 1, 2))
    return out, its, res, conv


def _launch_step(x_in, x_out, bias, scale, w, bufs, map_id, geometry, tol, t, stop_batch, compute, precision):
    batch, channels, height, width, stride_wt, stride_wk, stride_wn = geometry
    sums, tot, active, its, res = bufs

    def grid(meta):  # the bookkeeping-only launch needs only each image's first tile
        tiles = batch * triton.cdiv(height * width, meta["BLOCK_P"])
        return tiles, triton.cdiv(channels, meta["BLOCK_N"]) if compute else 1

    with launching(bias.device):
        _step_kernel[grid](
            x_in, x_out, bias, scale, w, sums, tot, active, its, res,
            batch, channels, height, width, stride_wt, stride_wk, stride_wn, float(tol), int(t),
            ACT=map_id, STOP_BATCH=stop_batch, COMPUTE=compute, PRECISION=precision,
        )


def _solve_stepwise(x0, bias, scale, w, it: Iteration, precision, check_every, geometry):
    """The host loop of step launches (``launch.run_steps``) on NHWC tensors; returns the float32 NHWC
    state and the stats."""
    x = launch.state_planes(bias.shape, bias.device)
    launch.start_state(x[0], x0, bias, scale, it.map_id)
    bufs = launch.step_buffers(bias.shape[0], bias.device)
    _, _, active, its, res = bufs

    def step(t, compute):
        _launch_step(x[t % 2], x[(t + 1) % 2], bias, scale, w, bufs, it.map_id, geometry, it.tol, t, it.batch_stop,
                     compute, precision)

    steps = launch.run_steps(step, it.max_iter, check_every, active)
    # Image b iterated during exactly its first its[b] steps, step s writing plane (s + 1) % 2 (a frozen
    # image's programs write nothing).
    final = torch.where((its % 2 == 1).view(-1, 1, 1, 1), x[1], x[0])
    return final, its, res, launch.converged(active, steps)


def forward_solve(u: Tensor, weight: Tensor, z0: Optional[Tensor], spec: SolveSpec, *, path: Optional[str] = None,
                  precision: Optional[str] = None, check_every: Optional[int] = None):
    """Solve ``z = act(conv2d(z, W, padding=1) + u)`` from ``z0`` (default 0), u (B, C, H, W), W (C, C, 3, 3),
    by ``spec`` (its activation, ``tol``, ``max_iter`` and ``stop``).

    Returns ``(z* in u.dtype and u's memory format, iterations int32, residual float32, converged
    bool)``, each per image, with the semantics of ``reference.forward_solve``. ``path``: see
    ``choose_path``; ``precision``: see ``resolve_precision``; ``check_every``: how many steps the
    stepwise loop runs between host reads of the convergence flags (``launch.check_every``).
    """
    it = launch.iteration(spec, adjoint=False)
    _check_inputs(u, weight, {"z0": z0})
    return _solve(z0, u, None, weight, it, path, precision, check_every)


def adjoint_solve(v: Tensor, weight: Tensor, D: Tensor, spec: SolveSpec, *, path: Optional[str] = None,
                  precision: Optional[str] = None, check_every: Optional[int] = None):
    """Solve ``h = D * (conv_transpose2d(h, W, padding=1) + v)`` from ``h_0 = D * v`` by ``spec``'s adjoint
    stopping rule (``backward_tol``, ``backward_max_iter``, ``stop``); returns as ``forward_solve`` (h* in
    v.dtype and v's memory format)."""
    it = launch.iteration(spec, adjoint=True)
    _check_inputs(v, weight, {"D": D})
    return _solve(None, v, D, weight, it, path, precision, check_every)


def _step(x, bias, scale, weight, map_id, precision):
    batch, channels, height, width = bias.shape
    out = torch.empty_like(bias, dtype=torch.float32)
    bufs = launch.step_buffers(batch, bias.device)
    w, *strides = _operand(weight, map_id == ADJOINT_ID)
    x_out = torch.empty((batch, height, width, channels), dtype=torch.float32, device=bias.device)
    nhwc_bias = _nhwc(bias)
    _launch_step(_nhwc(x.float()), x_out, nhwc_bias, nhwc_bias if scale is None else _nhwc(scale), w, bufs,
                 map_id, (batch, channels, height, width, *strides), 1.0, 0, False, True, resolve_precision(precision))
    out.copy_(x_out.permute(0, 3, 1, 2))
    sums = bufs[0]
    return out, sums[0, 0], sums[0, 1]


def forward_step(z: Tensor, u: Tensor, weight: Tensor, activation: str, *, precision: Optional[str] = None):
    """One fused step: ``(z_next = act(conv2d(z, W, padding=1) + u), ||z_next - z||^2, ||z_next||^2)``, the
    norms per image; z_next float32 in u's memory format, the norms float64."""
    map_id = launch.map_id(activation)
    _check_inputs(u, weight, {"z": z})
    return _step(z, u, None, weight, map_id, precision)


def adjoint_step(h: Tensor, v: Tensor, weight: Tensor, D: Tensor, *, precision: Optional[str] = None):
    """One fused adjoint step: ``(h_next = D * (conv_transpose2d(h, W, padding=1) + v), ||h_next - h||^2,
    ||h_next||^2)``, as ``forward_step``."""
    map_id = launch.map_id(None)
    _check_inputs(v, weight, {"h": h, "D": D})
    return _step(h, v, D, weight, map_id, precision)


# ------------------------------------------------------------------------------- ahead-of-time compiles

# Arguments by role, for compiling without a GPU: the roles both kernel families share (``aot.ARG_TYPES``)
# plus the image geometry and the tap stride (+-C^2, never 1).
_ARG_TYPES = {**aot.ARG_TYPES, "C": "i32", "H": "i32", "Wd": "i32", "stride_wt": "i32"}
KERNELS = {"scratch": _solve_scratch_kernel, "step": _step_kernel}
CONFIGS = {"scratch": SCRATCH_CONFIGS, "step": STEP_CONFIGS}


def aot_variants(kernel: str, precision: str, *, channels: int = 256, pixels: int = 4096, batch: int = 1 << 20):
    """The launch configurations the autotuner may pick for ``kernel`` on a GPU (after pruning)."""
    named = {"B": batch, "C": channels, "H": pixels, "Wd": 1, "PRECISION": precision}
    return _tile_candidates(CONFIGS[kernel], named)


def aot_plan(full: bool = False) -> list[dict]:
    """Keyword sets for ``aot_compile`` that cover every kernel configuration a launch can compile.

    ``full=True``: the whole product: capability x precision x kernel x pruned config x epilogue (every
    map of the table, ``map_ids()``: the adjoint and each activation) x operand dtype x ``aligned``, and
    the step kernel's three variants, the scratch kernel's two (``has_x0``: z0 given or not): 1620
    compiles with the table's five maps. The default, 94:
    every (capability, precision, kernel, config) with the adjoint epilogue in float32 (it loads D as
    well as v) and tanh in bfloat16, the latter also aligned; plus, on sm_90 under "ieee", every
    epilogue in float32 and bfloat16 for each kernel's first config (float16 operands compile as
    bfloat16 ones do: 16-bit loads converted in registers); the step kernel in its largest variant
    (stop="batch", with the convolution); the scratch kernel also given z0 in its aligned tanh bfloat16
    compiles.
    """
    epilogues = map_ids().values()
    tanh = map_ids()["tanh"]
    everything = [(act, dt, al) for act in epilogues for dt in aot.TRITON_DTYPES for al in (False, True)]
    base = [(ADJOINT_ID, torch.float32, False), (tanh, torch.bfloat16, False), (tanh, torch.bfloat16, True)]
    sweep = base + [(act, dt, False) for act in epilogues for dt in (torch.float32, torch.bfloat16)
                    if (act, dt, False) not in base]
    plan = []
    for capability in aot.CAPABILITIES:
        for precision in launch.PRECISIONS:
            for kernel in KERNELS:
                variants = list(aot.STEP_VARIANTS if kernel == "step" else aot.SOLVE_VARIANTS)
                variants = variants if full else variants[:1]
                for i, config in enumerate(aot_variants(kernel, precision)):
                    if full:
                        chosen = everything
                    elif i == 0 and capability == 90 and precision == "ieee":
                        chosen = sweep
                    else:
                        chosen = base
                    for act, dtype, aligned in chosen:
                        # given z0: the aligned tanh bfloat16 compile of the default plan
                        given = [dict(has_x0=True)] if kernel == "scratch" and aligned and not full else []
                        for extra in variants + given:
                            plan.append(dict(kernel=kernel, config=config, act_id=act, dtype=dtype, aligned=aligned,
                                             precision=precision, capability=capability, **extra))
    return plan


# The integer arguments a launch specialises as multiples of 16 when they are (C = 64, 32 x 32 images).
_SHAPE_ARGS = ("B", "C", "H", "Wd", "stride_wt", "stride_wk", "stride_wn")


def aot_compile(kernel: str, config, *, act_id: int, dtype: torch.dtype, precision: str, capability: int,
                stop_batch: bool = False, compute: bool = True, aligned: bool = False, has_x0: bool = False) -> dict:
    """Compile one kernel configuration for ``sm_<capability>`` without a GPU; return its resource use:
    ``{"registers", "spill_bytes" (0: no spills), "shared" (bytes), "num_warps", "num_stages"}``.
    ``aligned``: the variant Triton compiles when C, H, W and B are multiples of 16 (it specialises
    such arguments: loads are vectorised, far fewer registers)."""
    constexprs = dict(ACT=act_id, PRECISION=precision, **config.kwargs)
    if kernel == "scratch":
        constexprs.update(HAS_X0=has_x0)
    else:
        constexprs.update(STOP_BATCH=stop_batch, COMPUTE=compute)
    return aot.compile_for_gpu(KERNELS[kernel].fn, _ARG_TYPES, constexprs, dtype, config, capability,
                               divisible=_SHAPE_ARGS if aligned else ())
