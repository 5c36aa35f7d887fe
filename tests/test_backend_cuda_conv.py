"""The compiled CUDA backend on convolutional problems (csrc/cuda/conv_solve.cu) against the reference.

A conv problem is u, v, D of shape (B, C, H, W) and a nonnegative 3x3 kernel (C, C, 3, 3), padding 1;
the ops are the dense ones' (pcdeq_C::forward_solve / adjoint_solve), recognised by weight.dim() == 4.
Every test needs a GPU and is skipped, with the reason, where the backend cannot run (no GPU, or an
extension built without its CUDA kernels). The kernels' compilation for sm_80 and sm_90 is checked
without a GPU by tests/test_backend_cuda.py, which compiles every csrc/cuda/*.cu (and fails on
register spills in the kernels its HOT_KERNELS names).

Each step is a cuDNN convolution plus one fused epilogue kernel; the host checks the per-image flags
every few steps (PCDEQ_CUDA_CHECK_EVERY=k, or an adaptive schedule by default) and then compacts the
still-active images into a smaller convolution batch. The tests run under three schedules (every
step, every 3 steps, adaptive), which moves the checks and the compactions around; the results must
not depend on them: per-image counts, freezing, residuals and states are the reference's.

Shapes: ragged ones (B=3, C=5, 7x6; B=4, C=17, 9x11), a 1x1 image with one channel, images of more
than one epilogue block (2048 elements: 8x16x17, 3x40x50) and a batch of 300 small images (more
images than threads in the batch rule's final reduction).

Tolerances, each with its reason:

- float64 (tol 1e-9): only the summation order differs from the reference's convolution (cuDNN's
  algorithms differ between layouts and batch sizes), so states agree to 1e-12 and counts are equal
  except off by one where the residual is within 1e-6 relative of tol at the earlier count.
- float32 with TF32 off (torch.backends.cudnn.allow_tf32 = False; tol 1e-4): exact fp32 convolutions
  in another summation order, perhaps another algorithm (Winograd: errors of ~1e-6 relative): states
  to 5e-5, counts off by one only where the residual is within 1e-2 relative of tol (a residual of
  1e-4 is a difference of nearly equal iterates: its own rounding is 1e-3 relative or more).
- TF32 (float32 with allow_tf32 = True, torch's default for convolutions), float16, bfloat16: the
  convolution sees the state and W rounded to the operand type (unit roundoff u = 2^-11 for TF32 and
  fp16, 2^-8 for bf16) and half outputs are rounded once more. Compared with the float64 fixed point
  of the same (rounded) inputs, per sample: ||x - x*|| <= (4u + 2 tol) / (1 - c) ||x*||, with c the
  sample's contraction bound (reference.global_contraction_rate), the 2 tol for the stopping error, plus
  4 * 2^-24 sqrt(n) / (1 - c) for float16's subnormal spacing.
"""

import functools
import math

import pytest
import torch

import pcdeq_kernels as pk
from pcdeq_kernels import reference
from pcdeq_kernels.backends import cuda

from problems import (
    ALL_ACTIVATIONS,
    TOL,
    adjoint_spec,
    assert_within_rounding,
    check_adjoint_solve,
    check_against_reference,
    check_bad_inputs_raise_clear_errors,
    check_empty_batch,
    check_forward_solve,
    check_gradients_match_the_reference_backend,
    check_max_iter_cap,
    check_nan_residual_never_counts_as_converged,
    check_ragged_convergence,
    check_z0_is_the_starting_point,
    cudnn_allow_tf32,
    forward_map,
    gradcheck_fixed_point,
    make_problem,
    not_slower,
    opcheck_both_ops,
    ragged_problem,
    spec,
)

pytestmark = pytest.mark.skipif(
    not cuda.is_available(), reason=f"the CUDA backend cannot run here: {cuda.unavailable_reason()}"
)

# (B, C, H, W)
SHAPES = [(3, 5, 7, 6), (4, 17, 9, 11), (1, 1, 1, 1), (2, 8, 16, 17), (2, 3, 40, 50), (300, 2, 3, 3)]
SCHEDULES = ("auto", "1", "3")
STATE_RTOL = {torch.float64: 1e-12, torch.float32: 5e-5}
RESIDUAL_RTOL = {torch.float64: 1e-6, torch.float32: 1e-2}


@pytest.fixture(params=SCHEDULES)
def schedule(request, monkeypatch):
    """The host-check schedule (read by the C++ side at every call)."""
    monkeypatch.setenv("PCDEQ_CUDA_CHECK_EVERY", request.param)
    return request.param


@pytest.fixture
def cudnn_ieee():
    """Exact float32 convolutions (no TF32), for the backend and the reference alike."""
    with cudnn_allow_tf32(False):
        yield


@pytest.fixture
def cudnn_tf32():
    """TF32 float32 convolutions (torch's default), for the backend and the reference alike."""
    with cudnn_allow_tf32(True):
        yield


def _gpu(*tensors):
    return tuple(t.cuda() for t in tensors)


def _conv_problem(shape, activation, dtype=torch.float64, seed=0, **kwargs):
    batch, channels, height, width = shape
    return _gpu(*make_problem(batch, channels, activation, dtype=dtype, conv_hw=(height, width), seed=seed, **kwargs))


@functools.lru_cache(maxsize=None)
def _adjoint_problem_f64(shape, activation, seed):
    """(v, W, D) in float64 on the GPU: D at the forward fixed point (solved once per problem)."""
    u, w = _conv_problem(shape, activation, seed=seed)
    z, *_ = reference.forward_solve(u, w, activation, tol=1e-13, max_iter=3000)
    D = reference.activation_derivative_at(z, u, w, activation)
    v = torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return v.cuda(), w, D


def _adjoint_problem(shape, activation, dtype, seed=0):
    return tuple(t.to(dtype) for t in _adjoint_problem_f64(shape, activation, seed))


def _check_against_reference(got, want, step_fn, x0, tol, stop, dtype):
    """tests/problems.check_against_reference with this file's state and residual tolerances (docstring)."""
    assert got[0].device.type == "cuda" and got[1].device.type == "cuda" and got[2].device.type == "cuda"
    check_against_reference(
        got, want, step_fn, x0, tol, stop, dtype, state_rtol=STATE_RTOL[dtype], residual_rtol=RESIDUAL_RTOL[dtype]
    )


# --- exact arithmetic: float64, and float32 without TF32 --------------------------------------------


@pytest.mark.parametrize("stop", ["sample", "batch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
def test_forward_solve_matches_reference(activation, dtype, stop, schedule, cudnn_ieee):
    for seed, shape in enumerate(SHAPES):
        u, w = _conv_problem(shape, activation, dtype=dtype, seed=seed, weight_scale=0.8)
        got, _ = check_forward_solve(cuda, u, w, activation, stop, check=_check_against_reference)
        assert got[3].all(), shape


@pytest.mark.parametrize("stop", ["sample", "batch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
def test_adjoint_solve_matches_reference(activation, dtype, stop, schedule, cudnn_ieee):
    for seed, shape in enumerate(SHAPES):
        v, w, D = _adjoint_problem(shape, activation, dtype, seed=seed)
        check_adjoint_solve(cuda, v, w, D, stop, check=_check_against_reference)


@pytest.mark.parametrize("stop", ["sample", "batch"])
def test_ragged_convergence_freezing_and_compaction(stop, schedule):
    # images with very different injections stop at very different steps: the active set shrinks
    # step by step (compacting the convolution's batch), and frozen images must keep their state,
    # count and residual while the others go on, between host checks too
    u, w = _gpu(*ragged_problem(40, 3, conv_hw=(6, 5)))
    _, want = check_ragged_convergence(cuda, u, w, stop, check=_check_against_reference)
    # and the adjoint at the same problem
    D = reference.activation_derivative_at(want[0], u, w, "softsign")
    v = torch.randn(u.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).cuda()
    v = v * torch.logspace(-6, 0, 40, dtype=torch.float64, device="cuda")[:, None, None, None]
    check_adjoint_solve(cuda, v, w, D, stop, tol=1e-10, max_iter=1000, check=_check_against_reference)


def test_per_image_counts_equal_solving_each_image_alone(schedule):
    u, w = _conv_problem((12, 4, 5, 7), "tanh", weight_scale=0.9)
    u = u * torch.logspace(-2, 0.5, 12, dtype=torch.float64, device="cuda")[:, None, None, None]
    z, its, res, conv = cuda.forward_solve(u, w, None, spec("tanh", 1e-11, 2000, "sample"))
    assert its.unique().numel() > 3
    for b in range(12):
        z1, its1, res1, _ = cuda.forward_solve(u[b : b + 1], w, None, spec("tanh", 1e-11, 2000, "sample"))
        assert abs(int(its1) - int(its[b])) <= 1
        if int(its1) == int(its[b]):
            torch.testing.assert_close(z1[0], z[b], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("max_iter", [0, 1, 3, 4, 5, 8, 9, 13, 17])
def test_max_iter_cap_and_no_convergence(max_iter, schedule):
    # around the first check (step 4 when adaptive) and the fixed cadences
    for shape in ((9, 3, 5, 4), (70, 6, 8, 8)):
        u, w = _conv_problem(shape, "tanh", weight_scale=0.9)
        check_max_iter_cap(cuda, u, w, "tanh", max_iter)


@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
def test_nan_residual_never_counts_as_converged(schedule, activation):
    u, w = make_problem(10, 3, activation, conv_hw=(4, 4))
    u[2, 1, 2, 3] = math.nan  # the op layer above rejects this; the backend must still follow the rule
    u, w = _gpu(u, w)
    check_nan_residual_never_counts_as_converged(cuda, u, w, activation)


@pytest.mark.parametrize("stop", ["sample", "batch"])
@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (2, 8, 16, 17)], ids=["one-chunk", "chunks"])
def test_float32_squared_norms_do_not_overflow(shape, stop, schedule, cudnn_ieee):
    # As in tests/test_backend_cpu.py: v scaled by 2^70 scales every adjoint iterate exactly, and their
    # squares (2^140) overflow float32; the epilogue's per-image sums (and the batch totals) are kept in
    # double, so the residual is that of the solve at 2^20: the same steps, the state scaled.
    v, w, D = _adjoint_problem(shape, "tanh", torch.float32)
    h, its, res, conv = cuda.adjoint_solve(v * 2.0**20, w, D, adjoint_spec(1e-5, 300, stop))
    h_big, its_big, res_big, conv_big = cuda.adjoint_solve(v * 2.0**70, w, D, adjoint_spec(1e-5, 300, stop))
    assert conv.all() and (its > 3).all()
    assert torch.equal(its_big, its) and torch.equal(conv_big, conv) and torch.equal(h_big * 2.0**-50, h)
    torch.testing.assert_close(res_big, res, rtol=1e-6, atol=0)


@pytest.mark.parametrize("stop", ["sample", "batch"])
def test_z0_is_the_starting_point(stop, schedule):
    u, w = _conv_problem((5, 6, 7, 8), "relu6", weight_scale=0.8)
    z0 = torch.rand_like(u) * 3
    check_z0_is_the_starting_point(cuda, u, w, "relu6", z0, stop, check=_check_against_reference)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
def test_channels_last_and_strided_inputs(dtype, cudnn_ieee):
    # the result does not depend on the inputs' memory format, and the state comes back in it
    # (as torch.empty_like(u), which the op's fake kernel promises)
    u, w = _conv_problem((4, 17, 9, 11), "tanh", dtype=dtype)
    want = cuda.forward_solve(u, w, None, spec("tanh", 1e-6, 500, "sample"))
    u_cl = u.contiguous(memory_format=torch.channels_last)
    w_cl = w.contiguous(memory_format=torch.channels_last)
    wide = torch.zeros(4, 17, 9, 22, dtype=dtype, device="cuda")
    wide[..., ::2] = u
    u_strided = wide[..., ::2]
    for uu, ww in ((u_cl, w), (u_cl, w_cl), (u, w_cl), (u_strided, w)):
        got = cuda.forward_solve(uu, ww, None, spec("tanh", 1e-6, 500, "sample"))
        assert got[0].stride() == torch.empty_like(uu).stride()
        for g, e in zip(got, want):
            assert torch.equal(g, e)
    z_cl = cuda.forward_solve(u_cl, w, None, spec("tanh", 1e-6, 500, "sample"))[0]
    assert z_cl.is_contiguous(memory_format=torch.channels_last)
    v, w64, D = _adjoint_problem((4, 17, 9, 11), "tanh", dtype)
    want = cuda.adjoint_solve(v, w64, D, adjoint_spec(1e-6, 500, "batch"))
    v_cl, D_cl = (t.contiguous(memory_format=torch.channels_last) for t in (v, D))
    got = cuda.adjoint_solve(v_cl, w64, D_cl, adjoint_spec(1e-6, 500, "batch"))
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    for g, e in zip(got, want):
        assert torch.equal(g, e)


def test_inputs_are_not_modified():
    u, w = _conv_problem((3, 5, 7, 6), "tanh")
    z0 = torch.rand_like(u)
    saved = (u.clone(), w.clone(), z0.clone())
    cuda.forward_solve(u, w, z0, spec("tanh", 1e-9, 500, "sample"))
    cuda.forward_solve(u, w, None, spec("tanh", 1e-9, 500, "batch"))
    assert all(torch.equal(a, b) for a, b in zip((u, w, z0), saved))
    v, w2, D = _adjoint_problem((3, 5, 7, 6), "tanh", torch.float64)
    saved = (v.clone(), w2.clone(), D.clone())
    cuda.adjoint_solve(v, w2, D, adjoint_spec(1e-9, 500, "sample"))
    assert all(torch.equal(a, b) for a, b in zip((v, w2, D), saved))


def test_without_cudnn_and_with_cudnn_benchmark(cudnn_ieee):
    # at::conv2d follows torch's settings: torch's own convolution when cuDNN is off (NCHW output,
    # which the solver puts back into its layout), autotuned algorithms per shape with benchmark=True
    u, w = _conv_problem((20, 4, 6, 6), "tanh", weight_scale=0.9)
    u = u * torch.logspace(-2, 0.5, 20, dtype=torch.float64, device="cuda")[:, None, None, None]
    for dtype in (torch.float64, torch.float32):
        uu, ww = u.to(dtype), w.to(dtype)
        tol = TOL[dtype]
        want = reference.forward_solve(uu, ww, "tanh", tol=tol, max_iter=500)
        for enabled, benchmark in ((False, False), (True, True)):
            before = torch.backends.cudnn.enabled, torch.backends.cudnn.benchmark
            torch.backends.cudnn.enabled, torch.backends.cudnn.benchmark = enabled, benchmark
            try:
                got = cuda.forward_solve(uu, ww, None, spec("tanh", tol, 500, "sample"))
            finally:
                torch.backends.cudnn.enabled, torch.backends.cudnn.benchmark = before
            _check_against_reference(got, want, forward_map(uu, ww, "tanh"), torch.zeros_like(uu), tol, "sample", dtype)


# --- rounded operands: TF32, float16, bfloat16 -------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _fixed_points_f64(shape, activation, dtype, seed):
    """The float64 forward and adjoint fixed points of the problem rounded to `dtype`, with c."""
    u, w = _conv_problem(shape, activation, dtype=dtype, seed=seed)
    u64, w64 = u.double(), w.double()
    z_star = reference.forward_solve(u64, w64, activation, tol=1e-13, max_iter=3000)[0]
    c = reference.global_contraction_rate(z_star, u64, activation)
    v, _, D = _adjoint_problem(shape, activation, dtype, seed=seed)
    h_star = reference.adjoint_solve(v.double(), w64, D.double(), tol=1e-13, max_iter=3000)[0]
    return u, w, v, D, z_star, h_star, c


@pytest.mark.parametrize("stop", ["sample", "batch"])
@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
def test_tf32_forward_and_adjoint(activation, stop, schedule, cudnn_tf32):
    for seed, shape in enumerate(SHAPES):
        u, w, v, D, z_star, h_star, c = _fixed_points_f64(shape, activation, torch.float32, seed)
        its64 = reference.forward_solve(u.double(), w.double(), activation, tol=1e-4, max_iter=500, stop=stop)[1]
        z, its, res, conv = cuda.forward_solve(u, w, None, spec(activation, 1e-4, 500, stop))
        assert z.dtype == torch.float32 and res.dtype == torch.float32
        assert conv.all(), shape  # from z0 = 0 the rounded iteration is monotone: it must stop
        assert_within_rounding(z, z_star, c, "tf32", stop)
        assert not_slower(its, its64), (shape, its, its64)
        h, *_ = cuda.adjoint_solve(v, w, D, adjoint_spec(1e-4, 500, stop))
        assert_within_rounding(h, h_star, c, "tf32", stop)


@pytest.mark.parametrize("stop", ["sample", "batch"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
def test_half_precision_forward_and_adjoint(activation, dtype, stop, schedule):
    for seed, shape in enumerate(SHAPES):
        u, w, v, D, z_star, h_star, c = _fixed_points_f64(shape, activation, dtype, seed)
        z, its, res, conv = cuda.forward_solve(u, w, None, spec(activation, 1e-4, 500, stop))
        its_ref = reference.forward_solve(u, w, activation, tol=1e-4, max_iter=500, stop=stop)[1]
        assert z.dtype == dtype and res.dtype == torch.float32 and its.dtype == torch.int32
        assert conv.all(), shape
        assert_within_rounding(z, z_star, c, dtype, stop)
        assert not_slower(its, its_ref), (shape, its, its_ref)
        h, its_h, res_h, _ = cuda.adjoint_solve(v, w, D, adjoint_spec(1e-4, 500, stop))
        assert h.dtype == dtype and res_h.dtype == torch.float32
        assert_within_rounding(h, h_star, c, dtype, stop)


# --- gradients through fixed_point(backend="cuda") ------------------------------------------------------


@pytest.mark.parametrize("stop", ["sample", "batch"])
@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
def test_gradcheck_float64(activation, stop):
    # as tests/test_gradients.py: u away from 0 and a light W keep relu6 off its kinks
    u, w = _conv_problem((2, 3, 4, 3), activation, weight_scale=0.3, u_offset=0.5, u_scale=0.3)
    gradcheck_fixed_point(u, w, activation, "cuda", stop=stop)


@pytest.mark.parametrize("stop", ["sample", "batch"])
def test_gradients_match_the_reference_backend_float64(stop):
    u, w = _conv_problem((5, 6, 7, 6), "tanh", weight_scale=0.7)
    check_gradients_match_the_reference_backend("cuda", u, w, "tanh", stop)


def test_auto_picks_cuda_for_conv_cuda_problems():
    u, w = _conv_problem((2, 3, 4, 4), "tanh")
    assert pk.fixed_point(u, w)[1].backend == "cuda"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck_both_ops(dtype):
    u, w = _conv_problem((3, 4, 5, 6), "tanh", dtype=dtype)
    u_cl = u.contiguous(memory_format=torch.channels_last)
    opcheck_both_ops([u, u_cl], w, [None, torch.rand_like(u)], _adjoint_problem((3, 4, 5, 6), "tanh", dtype))


# --- inputs, errors ------------------------------------------------------------------------------------


def test_empty_batch_and_empty_images():
    w = torch.rand(5, 5, 3, 3, device="cuda") * 0.01
    check_empty_batch(torch.zeros(0, 5, 4, 4, device="cuda"), w)
    # no elements per image: every step has residual 0 / (0 + 1e-5) = 0, as the dense solvers count
    # it for d = 0 (torch's own conv2d refuses an image of height 0, so the reference cannot run)
    op = torch.ops.pcdeq_C.forward_solve
    u = torch.zeros(3, 5, 0, 4, device="cuda")
    for batch_stop in (False, True):
        z, its, res, conv = op(u, w, None, 0, 1e-4, 10, batch_stop)
        assert z.shape == u.shape and z.is_cuda
        assert its.tolist() == [1, 1, 1] and res.tolist() == [0.0, 0.0, 0.0] and conv.all()
    with pytest.raises(RuntimeError, match="max_iter must be >= 1, got 0"):  # checked before the shortcut
        op(u, w, None, 0, 1e-4, 0, False)


def test_bad_inputs_raise_clear_errors():
    u, w = _conv_problem((2, 3, 4, 4), "tanh")
    check_bad_inputs_raise_clear_errors(u, w)
    with pytest.raises(RuntimeError, match="the cuda backend needs CUDA tensors"):
        torch.ops.pcdeq_C.forward_solve(u, w.cpu(), None, 0, 1e-4, 10, False)


@pytest.mark.parametrize("value", ["0", "-2", "often", "3.5"])
def test_bad_check_schedule_variable(value, monkeypatch):
    u, w = _conv_problem((2, 3, 4, 4), "tanh")
    monkeypatch.setenv("PCDEQ_CUDA_CHECK_EVERY", value)
    with pytest.raises(RuntimeError, match=f"PCDEQ_CUDA_CHECK_EVERY={value}: give the number of steps"):
        torch.ops.pcdeq_C.forward_solve(u, w, None, 0, 1e-4, 10, False)
