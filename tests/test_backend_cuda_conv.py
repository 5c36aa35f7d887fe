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
  sample's contraction bound (reference.contraction_bound), the 2 tol for the stopping error, plus
  4 * 2^-24 sqrt(n) / (1 - c) for float16's subnormal spacing.
"""

import functools
import math

import pytest
import torch

import pcdeq_kernels as pk
from pcdeq_kernels import reference
from pcdeq_kernels.backends import cuda

from problems import TOL, adjoint_map, check_against_reference, forward_map, make_problem
from problems import ALL_ACTIVATIONS

pytestmark = pytest.mark.skipif(
    not cuda.is_available(), reason=f"the CUDA backend cannot run here: {cuda.unavailable_reason()}"
)

# (B, C, H, W)
SHAPES = [(3, 5, 7, 6), (4, 17, 9, 11), (1, 1, 1, 1), (2, 8, 16, 17), (2, 3, 40, 50), (300, 2, 3, 3)]
SCHEDULES = ("auto", "1", "3")
STATE_RTOL = {torch.float64: 1e-12, torch.float32: 5e-5}
RESIDUAL_RTOL = {torch.float64: 1e-6, torch.float32: 1e-2}
UNIT_ROUNDOFF = {"tf32": 2.0**-11, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
TINY = {"tf32": 0.0, torch.float16: 2.0**-24, torch.bfloat16: 0.0}


@pytest.fixture(params=SCHEDULES)
def schedule(request, monkeypatch):
    """The host-check schedule (read by the C++ side at every call)."""
    monkeypatch.setenv("PCDEQ_CUDA_CHECK_EVERY", request.param)
    return request.param


@pytest.fixture
def cudnn_ieee():
    """Exact float32 convolutions (no TF32), for the backend and the reference alike."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = before


@pytest.fixture
def cudnn_tf32():
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    yield
    torch.backends.cudnn.allow_tf32 = before


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


def _assert_within_rounding(x, x_star, c, kind, stop, tol=1e-4):
    """The rounded-operand bound of the module docstring; c: per-sample contraction bounds."""
    x, x_star, c = x.double().flatten(1), x_star.double().flatten(1), c.double()
    unit, tiny = UNIT_ROUNDOFF[kind], TINY[kind]
    if stop == "batch":
        c_max = c.max()
        allowed = (4 * unit + 2 * tol) / (1 - c_max) * x_star.norm() + 4 * tiny * x.numel() ** 0.5 / (1 - c_max)
        assert (x - x_star).norm() <= allowed, ((x - x_star).norm().item(), allowed.item())
    else:
        allowed = (4 * unit + 2 * tol) / (1 - c) * x_star.norm(dim=1) + 4 * tiny * x.shape[1] ** 0.5 / (1 - c)
        excess = (x - x_star).norm(dim=1) / allowed
        assert (excess <= 1).all(), excess.max().item()


def _not_slower(its, its_ref):
    return (its <= its_ref + (0.25 * its_ref.float()).long() + 2).all()


# --- exact arithmetic: float64, and float32 without TF32 --------------------------------------------


@pytest.mark.parametrize("stop", ["sample", "batch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
def test_forward_solve_matches_reference(activation, dtype, stop, schedule, cudnn_ieee):
    tol = TOL[dtype]
    for seed, shape in enumerate(SHAPES):
        u, w = _conv_problem(shape, activation, dtype=dtype, seed=seed, weight_scale=0.8)
        got = cuda.forward_solve(u, w, None, activation, tol, 500, stop)
        want = reference.forward_solve(u, w, activation, tol=tol, max_iter=500, stop=stop)
        _check_against_reference(got, want, forward_map(u, w, activation), torch.zeros_like(u), tol, stop, dtype)
        assert got[3].all(), shape


@pytest.mark.parametrize("stop", ["sample", "batch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
def test_adjoint_solve_matches_reference(activation, dtype, stop, schedule, cudnn_ieee):
    tol = TOL[dtype]
    for seed, shape in enumerate(SHAPES):
        v, w, D = _adjoint_problem(shape, activation, dtype, seed=seed)
        got = cuda.adjoint_solve(v, w, D, tol, 500, stop)
        want = reference.adjoint_solve(v, w, D, tol=tol, max_iter=500, stop=stop)
        _check_against_reference(got, want, adjoint_map(v, w, D), D * v, tol, stop, dtype)


@pytest.mark.parametrize("stop", ["sample", "batch"])
def test_ragged_convergence_freezing_and_compaction(stop, schedule):
    # images with very different injections stop at very different steps: the active set shrinks
    # step by step (compacting the convolution's batch), and frozen images must keep their state,
    # count and residual while the others go on, between host checks too
    u, w = make_problem(40, 3, "softsign", conv_hw=(6, 5), weight_scale=0.95)
    u = u * torch.logspace(-3, 1, 40, dtype=torch.float64)[:, None, None, None]
    u, w = _gpu(u, w)
    got = cuda.forward_solve(u, w, None, "softsign", 1e-10, 1000, stop)
    want = reference.forward_solve(u, w, "softsign", tol=1e-10, max_iter=1000, stop=stop)
    if stop == "sample":
        assert want[1].unique().numel() > 5  # the point of the test
    _check_against_reference(got, want, forward_map(u, w, "softsign"), torch.zeros_like(u), 1e-10, stop, torch.float64)
    # and the adjoint at the same problem
    D = reference.activation_derivative_at(want[0], u, w, "softsign")
    v = torch.randn(u.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).cuda()
    v = v * torch.logspace(-6, 0, 40, dtype=torch.float64, device="cuda")[:, None, None, None]
    got = cuda.adjoint_solve(v, w, D, 1e-10, 1000, stop)
    want = reference.adjoint_solve(v, w, D, tol=1e-10, max_iter=1000, stop=stop)
    _check_against_reference(got, want, adjoint_map(v, w, D), D * v, 1e-10, stop, torch.float64)


def test_per_image_counts_equal_solving_each_image_alone(schedule):
    u, w = _conv_problem((12, 4, 5, 7), "tanh", weight_scale=0.9)
    u = u * torch.logspace(-2, 0.5, 12, dtype=torch.float64, device="cuda")[:, None, None, None]
    z, its, res, conv = cuda.forward_solve(u, w, None, "tanh", 1e-11, 2000, "sample")
    assert its.unique().numel() > 3
    for b in range(12):
        z1, its1, res1, _ = cuda.forward_solve(u[b : b + 1], w, None, "tanh", 1e-11, 2000, "sample")
        assert abs(int(its1) - int(its[b])) <= 1
        if int(its1) == int(its[b]):
            torch.testing.assert_close(z1[0], z[b], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("max_iter", [0, 1, 3, 4, 5, 8, 9, 13, 17])
def test_max_iter_cap_and_no_convergence(max_iter, schedule):
    # around the first check (step 4 when adaptive) and the fixed cadences
    for shape in ((9, 3, 5, 4), (70, 6, 8, 8)):
        u, w = _conv_problem(shape, "tanh", weight_scale=0.9)
        for stop in ("sample", "batch"):
            z, its, res, conv = cuda.forward_solve(u, w, None, "tanh", 1e-30, max_iter, stop)
            want = reference.forward_solve(u, w, "tanh", tol=1e-30, max_iter=max_iter, stop=stop)
            assert (its == max_iter).all() and not conv.any()
            assert torch.equal(its, want[1]) and torch.equal(conv, want[3])
            torch.testing.assert_close(z, want[0], rtol=1e-13, atol=1e-13)
            torch.testing.assert_close(res, want[2], rtol=1e-8, atol=0)


def test_nan_residual_never_counts_as_converged(schedule):
    u, w = make_problem(10, 3, "sigmoid", conv_hw=(4, 4))
    u[2, 1, 2, 3] = math.nan  # the op layer above rejects this; the backend must still follow the rule
    u, w = _gpu(u, w)
    for stop in ("sample", "batch"):
        z, its, res, conv = cuda.forward_solve(u, w, None, "sigmoid", 1e-6, 50, stop)
        z_ref, its_ref, res_ref, conv_ref = reference.forward_solve(u, w, "sigmoid", tol=1e-6, max_iter=50, stop=stop)
        assert torch.equal(its, its_ref) and torch.equal(conv, conv_ref)
        assert res[2].isnan() and not conv[2] and its[2] == 50
        torch.testing.assert_close(z, z_ref, equal_nan=True)


@pytest.mark.parametrize("stop", ["sample", "batch"])
def test_z0_is_the_starting_point(stop, schedule):
    u, w = _conv_problem((5, 6, 7, 8), "relu6", weight_scale=0.8)
    z0 = torch.rand_like(u) * 3
    got = cuda.forward_solve(u, w, z0, "relu6", 1e-9, 500, stop)
    want = reference.forward_solve(u, w, "relu6", tol=1e-9, max_iter=500, stop=stop, z0=z0)
    _check_against_reference(got, want, forward_map(u, w, "relu6"), z0, 1e-9, stop, torch.float64)
    one = cuda.forward_solve(u, w, z0, "relu6", 1e-9, 1, stop)[0]
    torch.testing.assert_close(one, forward_map(u, w, "relu6")(z0), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
def test_channels_last_and_strided_inputs(dtype, cudnn_ieee):
    # the result does not depend on the inputs' memory format, and the state comes back in it
    # (as torch.empty_like(u), which the op's fake kernel promises)
    u, w = _conv_problem((4, 17, 9, 11), "tanh", dtype=dtype)
    want = cuda.forward_solve(u, w, None, "tanh", 1e-6, 500, "sample")
    u_cl = u.contiguous(memory_format=torch.channels_last)
    w_cl = w.contiguous(memory_format=torch.channels_last)
    wide = torch.zeros(4, 17, 9, 22, dtype=dtype, device="cuda")
    wide[..., ::2] = u
    u_strided = wide[..., ::2]
    for uu, ww in ((u_cl, w), (u_cl, w_cl), (u, w_cl), (u_strided, w)):
        got = cuda.forward_solve(uu, ww, None, "tanh", 1e-6, 500, "sample")
        assert got[0].stride() == torch.empty_like(uu).stride()
        for g, e in zip(got, want):
            assert torch.equal(g, e)
    z_cl = cuda.forward_solve(u_cl, w, None, "tanh", 1e-6, 500, "sample")[0]
    assert z_cl.is_contiguous(memory_format=torch.channels_last)
    v, w64, D = _adjoint_problem((4, 17, 9, 11), "tanh", dtype)
    want = cuda.adjoint_solve(v, w64, D, 1e-6, 500, "batch")
    v_cl, D_cl = (t.contiguous(memory_format=torch.channels_last) for t in (v, D))
    got = cuda.adjoint_solve(v_cl, w64, D_cl, 1e-6, 500, "batch")
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    for g, e in zip(got, want):
        assert torch.equal(g, e)


def test_inputs_are_not_modified():
    u, w = _conv_problem((3, 5, 7, 6), "tanh")
    z0 = torch.rand_like(u)
    saved = (u.clone(), w.clone(), z0.clone())
    cuda.forward_solve(u, w, z0, "tanh", 1e-9, 500, "sample")
    cuda.forward_solve(u, w, None, "tanh", 1e-9, 500, "batch")
    assert all(torch.equal(a, b) for a, b in zip((u, w, z0), saved))
    v, w2, D = _adjoint_problem((3, 5, 7, 6), "tanh", torch.float64)
    saved = (v.clone(), w2.clone(), D.clone())
    cuda.adjoint_solve(v, w2, D, 1e-9, 500, "sample")
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
                got = cuda.forward_solve(uu, ww, None, "tanh", tol, 500, "sample")
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
    c = reference.contraction_bound(z_star, u64, activation)
    v, _, D = _adjoint_problem(shape, activation, dtype, seed=seed)
    h_star = reference.adjoint_solve(v.double(), w64, D.double(), tol=1e-13, max_iter=3000)[0]
    return u, w, v, D, z_star, h_star, c


@pytest.mark.parametrize("stop", ["sample", "batch"])
@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
def test_tf32_forward_and_adjoint(activation, stop, schedule, cudnn_tf32):
    for seed, shape in enumerate(SHAPES):
        u, w, v, D, z_star, h_star, c = _fixed_points_f64(shape, activation, torch.float32, seed)
        its64 = reference.forward_solve(u.double(), w.double(), activation, tol=1e-4, max_iter=500, stop=stop)[1]
        z, its, res, conv = cuda.forward_solve(u, w, None, activation, 1e-4, 500, stop)
        assert z.dtype == torch.float32 and res.dtype == torch.float32
        assert conv.all(), shape  # from z0 = 0 the rounded iteration is monotone: it must stop
        _assert_within_rounding(z, z_star, c, "tf32", stop)
        assert _not_slower(its, its64), (shape, its, its64)
        h, *_ = cuda.adjoint_solve(v, w, D, 1e-4, 500, stop)
        _assert_within_rounding(h, h_star, c, "tf32", stop)


@pytest.mark.parametrize("stop", ["sample", "batch"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
def test_half_precision_forward_and_adjoint(activation, dtype, stop, schedule):
    for seed, shape in enumerate(SHAPES):
        u, w, v, D, z_star, h_star, c = _fixed_points_f64(shape, activation, dtype, seed)
        z, its, res, conv = cuda.forward_solve(u, w, None, activation, 1e-4, 500, stop)
        its_ref = reference.forward_solve(u, w, activation, tol=1e-4, max_iter=500, stop=stop)[1]
        assert z.dtype == dtype and res.dtype == torch.float32 and its.dtype == torch.int32
        assert conv.all(), shape
        _assert_within_rounding(z, z_star, c, dtype, stop)
        assert _not_slower(its, its_ref), (shape, its, its_ref)
        h, its_h, res_h, _ = cuda.adjoint_solve(v, w, D, 1e-4, 500, stop)
        assert h.dtype == dtype and res_h.dtype == torch.float32
        _assert_within_rounding(h, h_star, c, dtype, stop)


# --- gradients through fixed_point(backend="cuda") ------------------------------------------------------


@pytest.mark.parametrize("stop", ["sample", "batch"])
@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
def test_gradcheck_float64(activation, stop):
    # as tests/test_gradients.py: u away from 0 and a light W keep relu6 off its kinks
    u, w = _conv_problem((2, 3, 4, 3), activation, weight_scale=0.3, u_offset=0.5, u_scale=0.3)
    u.requires_grad_()
    w.requires_grad_()

    def f(u, w):
        z, stats = pk.fixed_point(u, w, activation, tol=1e-14, max_iter=5000, stop=stop, backend="cuda")
        assert stats.backend == "cuda"
        return z

    assert torch.autograd.gradcheck(f, (u, w), eps=1e-7, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("stop", ["sample", "batch"])
def test_gradients_match_the_reference_backend_float64(stop):
    u, w = _conv_problem((5, 6, 7, 6), "tanh", weight_scale=0.7)
    weights = torch.randn(u.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).cuda()
    results = {}
    for backend in ("cuda", "reference"):
        uu, ww = u.clone().requires_grad_(), w.clone().requires_grad_()
        z, stats = pk.fixed_point(uu, ww, "tanh", tol=1e-13, max_iter=5000, stop=stop, backend=backend)
        assert stats.backend == backend
        results[backend] = (z, *torch.autograd.grad((z * weights).sum(), (uu, ww)), stats)
    for got, want in zip(results["cuda"][:3], results["reference"][:3]):
        assert ((got - want).norm() / want.norm()).item() < 1e-10
    got_stats, want_stats = results["cuda"][3], results["reference"][3]
    assert (got_stats.backward_iterations > 0).all()
    assert (got_stats.forward_iterations - want_stats.forward_iterations).abs().max() <= 1
    assert (got_stats.backward_iterations - want_stats.backward_iterations).abs().max() <= 1


def test_auto_picks_cuda_for_conv_cuda_problems():
    u, w = _conv_problem((2, 3, 4, 4), "tanh")
    assert pk.fixed_point(u, w)[1].backend == "cuda"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck_both_ops(dtype):
    u, w = _conv_problem((3, 4, 5, 6), "tanh", dtype=dtype)
    z0 = torch.rand_like(u)
    for uu in (u, u.contiguous(memory_format=torch.channels_last)):
        for z_init in (None, z0):
            for batch_stop in (False, True):
                torch.library.opcheck(torch.ops.pcdeq_C.forward_solve.default, (uu, w, z_init, 0, 1e-6, 100, batch_stop))
    v, w, D = _adjoint_problem((3, 4, 5, 6), "tanh", dtype)
    for batch_stop in (False, True):
        torch.library.opcheck(torch.ops.pcdeq_C.adjoint_solve.default, (v, w, D, 1e-6, 100, batch_stop))


# --- inputs, errors ------------------------------------------------------------------------------------


def test_empty_batch_and_empty_images():
    w = torch.rand(5, 5, 3, 3, device="cuda") * 0.01
    op = torch.ops.pcdeq_C.forward_solve
    z, its, res, conv = op(torch.zeros(0, 5, 4, 4, device="cuda"), w, None, 0, 1e-4, 10, False)
    assert z.shape == (0, 5, 4, 4) and its.shape == res.shape == conv.shape == (0,)
    assert z.is_cuda and its.is_cuda
    # no elements per image: every step has residual 0 / (0 + 1e-5) = 0, as the dense solvers count
    # it for d = 0 (torch's own conv2d refuses an image of height 0, so the reference cannot run)
    u = torch.zeros(3, 5, 0, 4, device="cuda")
    for batch_stop in (False, True):
        z, its, res, conv = op(u, w, None, 0, 1e-4, 10, batch_stop)
        assert z.shape == u.shape and z.is_cuda
        assert its.tolist() == [1, 1, 1] and res.tolist() == [0.0, 0.0, 0.0] and conv.all()
    z, its, res, conv = op(u, w, None, 0, 1e-4, 0, False)  # max_iter = 0: nothing happens
    assert its.tolist() == [0, 0, 0] and res.isinf().all() and not conv.any()


def test_bad_inputs_raise_clear_errors():
    u, w = _conv_problem((2, 3, 4, 4), "tanh")
    op = torch.ops.pcdeq_C.forward_solve
    with pytest.raises(RuntimeError, match=r"convolutional pcDEQ needs u of shape \(B, C, H, W\) and weight \(C, C, 3, 3\)"):
        op(u, torch.rand(4, 4, 3, 3, dtype=torch.float64, device="cuda"), None, 0, 1e-4, 10, False)  # C differs
    with pytest.raises(RuntimeError, match="convolutional pcDEQ needs u of shape"):
        op(u, torch.rand(3, 3, 5, 5, dtype=torch.float64, device="cuda"), None, 0, 1e-4, 10, False)  # not 3x3
    with pytest.raises(RuntimeError, match="convolutional pcDEQ needs u of shape"):
        op(u[:, :, 0], w, None, 0, 1e-4, 10, False)  # u not 4-d
    with pytest.raises(RuntimeError, match="but weight is"):
        op(u, w.float(), None, 0, 1e-4, 10, False)
    with pytest.raises(RuntimeError, match="pcDEQ solves float16, bfloat16, float32 or float64"):
        op(u.long(), w.long(), None, 0, 1e-4, 10, False)
    with pytest.raises(RuntimeError, match="unknown activation id 7"):
        op(u, w, None, 7, 1e-4, 10, False)
    with pytest.raises(RuntimeError, match="z0 must match u"):
        op(u, w, u[:1], 0, 1e-4, 10, False)
    with pytest.raises(RuntimeError, match="max_iter must be >= 0"):
        op(u, w, None, 0, 1e-4, -1, False)
    with pytest.raises(RuntimeError, match="the cuda backend needs CUDA tensors"):
        op(u, w.cpu(), None, 0, 1e-4, 10, False)
    with pytest.raises(RuntimeError, match="D must match v"):
        torch.ops.pcdeq_C.adjoint_solve(u, w, u.float(), 1e-4, 10, False)
    with pytest.raises(RuntimeError, match="convolutional pcDEQ needs v of shape"):
        torch.ops.pcdeq_C.adjoint_solve(u[:, :2], w, u[:, :2], 1e-4, 10, False)


@pytest.mark.parametrize("value", ["0", "-2", "often", "3.5"])
def test_bad_check_schedule_variable(value, monkeypatch):
    u, w = _conv_problem((2, 3, 4, 4), "tanh")
    monkeypatch.setenv("PCDEQ_CUDA_CHECK_EVERY", value)
    with pytest.raises(RuntimeError, match=f"PCDEQ_CUDA_CHECK_EVERY={value}: give the number of steps"):
        torch.ops.pcdeq_C.forward_solve(u, w, None, 0, 1e-4, 10, False)
