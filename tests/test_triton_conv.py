"""The fused convolutional Triton kernels (pcdeq_kernels/triton/conv.py) against the reference solver.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1); with ``TRITON_INTERPRET=0`` on a CUDA machine the same tests run the compiled
kernels, and the GPU-only tests (bfloat16, tf32) run too. The ahead-of-time test compiles every kernel
configuration for sm_80 and sm_90 on any machine and checks registers, spills and shared memory.

The interpreter's cost is per operation, so the images are small, and ragged for the interpreter's
64 x 32 tiles with K blocks of 32 (conv.py's first configs): C = 5 on 7 x 6 (one tile per image),
C = 17 on 9 x 9 (two pixel tiles, the last partial), and for single steps C = 40 on 9 x 9 (two pixel
tiles, two channel tiles, two K blocks per tap).

Tolerances (the comparison helpers are test_backend_triton's, so dense and conv are held to the same
standard): float32 states agree with the reference to 2e-6 of the largest entry (a few ulp of rounding
from a different summation order, amplified by the contraction, 1/(1-c) with c about 0.5 here);
float16 results to one float16 eps (both sides round the same float32 solution once); iteration counts
exactly, except off by one where the deciding residual is within 1% of tol.
"""

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import triton  # noqa: E402

import pcdeq_kernels as pk  # noqa: E402
from pcdeq_kernels import reference  # noqa: E402
from pcdeq_kernels.activations import get_activation  # noqa: E402
from pcdeq_kernels.backends import triton as triton_backend  # noqa: E402
from pcdeq_kernels.spec import SolveSpec  # noqa: E402
from pcdeq_kernels.triton import aot, conv, dense, launch, limits  # noqa: E402

from pcdeq_kernels.precision import torch_conv_precision  # noqa: E402
from problems import (  # noqa: E402
    ALL_ACTIVATIONS,
    adjoint_map,
    adjoint_spec,
    cudnn_allow_tf32,
    forward_map,
    make_problem,
    spec,
)
from test_backend_triton import (  # noqa: E402
    AOT_FULL,
    DEVICE,
    GPU,
    NO_NVIDIA_TOOLS,
    _assert_close_rel,
    _assert_solve_matches,
    _batch_residual_history,
    _residual_history,
    assert_compiles_fit,
    assert_stops_at_non_finite,
    assert_forced_config_solve,
    config_id,
    config_precision,
)

pytestmark = pytest.mark.skipif(not triton_backend.is_available(), reason=triton_backend.unavailable_reason())


@pytest.fixture(autouse=True)
def exact_float32_convolutions():
    """torch's float32 convolutions exact (no TF32) in every test here: on a GPU the reference convolves
    with cuDNN, in TF32 by default, and a float32 comparison should test the kernels rather than TF32's
    rounding (test_tf32_on_gpu does that); the Triton conv path's default precision follows the same
    switch (``conv.resolve_precision``)."""
    with cudnn_allow_tf32(False):
        yield

PATHS = ("single", "stepwise")
# (B, C, (H, W)): see the module docstring
SHAPES = {"5x7x6": (3, 5, (7, 6)), "17x9x9": (3, 17, (9, 9))}
STEP_SHAPE = (2, 40, (9, 9))
TOL = 1e-4


def _rel(dtype):
    """States: 2e-6 of the largest entry in float32; one half-precision eps otherwise (module docstring)."""
    return 2e-6 if dtype == torch.float32 else float(torch.finfo(dtype).eps)


def _problem(batch, channels, hw, activation, dtype=torch.float32, **kw):
    """make_problem's convolutional problem (W >= 0, row sums about 0.5) with the images' u scaled from
    0.1x to 20x: they saturate the activation to different degrees and stop at different iterations."""
    u, w = make_problem(batch, channels, activation, dtype=torch.float32, conv_hw=hw, **kw)
    u = u * torch.logspace(-1, math.log10(20), batch, dtype=u.dtype).view(-1, 1, 1, 1)
    return u.to(DEVICE, dtype), w.to(DEVICE, dtype)


def _adjoint_problem(batch, channels, hw, activation, dtype=torch.float32, seed=0):
    """v, W, D with D = act'(L(z*) + u) at the reference fixed point, as the implicit backward builds it."""
    u, w = _problem(batch, channels, hw, activation, dtype, seed=seed)
    z = reference.forward_solve(u, w, activation, tol=1e-6, max_iter=500)[0]
    D = reference.activation_derivative_at(z, u, w, activation).to(dtype)
    v = torch.randn(u.shape, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
    return v, w, D


def _check_forward(out, u, w, activation, z0=None, **kw):
    ref = reference.forward_solve(u, w, activation, z0=z0, **kw)
    x0 = torch.zeros_like(u, dtype=torch.float32) if z0 is None else z0.float()
    history = _residual_history(forward_map(u.float(), w.float(), activation), x0, int(ref[1].max()) + 1)
    _assert_solve_matches(out, ref, history, kw["tol"], _rel(u.dtype))
    return ref


# ----------------------------------------------------------------------------------------- fused steps


@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_step_and_its_image_norms(activation, dtype):
    batch, channels, hw = STEP_SHAPE
    u, w = _problem(batch, channels, hw, activation, dtype)
    z = torch.rand(u.shape, device=DEVICE)
    z_next, diff_sq, norm_sq = conv.forward_step(z, u, w, activation)
    ref = get_activation(activation).fn(F.conv2d(z.double(), w.double(), padding=1) + u.double())
    assert z_next.dtype == torch.float32 and z_next.shape == u.shape
    _assert_close_rel(z_next, ref, 2e-6)
    torch.testing.assert_close(diff_sq.double(), (ref - z.double()).square().flatten(1).sum(1), rtol=1e-5, atol=0)
    torch.testing.assert_close(norm_sq.double(), ref.square().flatten(1).sum(1), rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_adjoint_step_is_the_transposed_convolution(dtype):
    """The adjoint reads the same packed kernel with flipped taps and swapped channels (strides only)."""
    batch, channels, hw = STEP_SHAPE
    v, w = _problem(batch, channels, hw, "tanh", dtype)
    D = torch.rand(v.shape, device=DEVICE).to(dtype)
    h = torch.randn(v.shape, device=DEVICE)
    h_next, diff_sq, norm_sq = conv.adjoint_step(h, v, w, D)
    ref = D.double() * (F.conv_transpose2d(h.double(), w.double(), padding=1) + v.double())
    _assert_close_rel(h_next, ref, 2e-6)
    torch.testing.assert_close(diff_sq.double(), (ref - h.double()).square().flatten(1).sum(1), rtol=1e-5, atol=0)
    torch.testing.assert_close(norm_sq.double(), ref.square().flatten(1).sum(1), rtol=1e-5, atol=0)


# ------------------------------------------------------------------------------------------ the solves


# Every activation on the one-tile images; the two families' representatives on the multi-tile ones
# (the epilogue is elementwise: the tiling does not depend on it).
FORWARD_CASES = [("5x7x6", a) for a in ALL_ACTIVATIONS] + [("17x9x9", "tanh"), ("17x9x9", "sigmoid")]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape,activation", FORWARD_CASES)
def test_forward_solve_matches_reference(path, shape, activation):
    batch, channels, hw = SHAPES[shape]
    u, w = _problem(batch, channels, hw, activation)
    out = conv.forward_solve(u, w, None, spec(activation, TOL, 200, "sample"), path=path, precision="ieee")
    ref = _check_forward(out, u, w, activation, tol=TOL, max_iter=200)
    assert ref[3].all() and len(set(ref[1].tolist())) > 1  # the images stop at different iterations


@pytest.mark.parametrize("path", PATHS)
def test_float16_forward_solve(path):
    batch, channels, hw = SHAPES["17x9x9"]
    u, w = _problem(batch, channels, hw, "tanh", torch.float16)
    out = conv.forward_solve(u, w, None, spec("tanh", TOL, 200, "sample"), path=path, precision="ieee")
    assert out[0].dtype == torch.float16
    _check_forward(out, u, w, "tanh", tol=TOL, max_iter=200)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("activation", ["tanh", "sigmoid"])
def test_adjoint_solve_matches_reference(path, shape, activation):
    batch, channels, hw = SHAPES[shape]
    v, w, D = _adjoint_problem(batch, channels, hw, activation)
    out = conv.adjoint_solve(v, w, D, adjoint_spec(TOL, 200, "sample"), path=path, precision="ieee")
    ref = reference.adjoint_solve(v, w, D, tol=TOL, max_iter=200)
    history = _residual_history(adjoint_map(v.float(), w.float(), D.float()), D.float() * v.float(), int(ref[1].max()) + 1)
    _assert_solve_matches(out, ref, history, TOL, _rel(v.dtype))
    assert ref[3].all()


@pytest.mark.parametrize("kernel, config", [(k, c) for k, cs in conv.CONFIGS.items() for c in cs],
                         ids=lambda v: config_id(v) if isinstance(v, triton.Config) else v)
def test_every_config_solves_like_the_reference(kernel, config, monkeypatch):
    """Every config the autotuner may pick on a GPU (the interpreter otherwise runs only the first),
    forced, solves a ragged problem (17 channels, 9 x 9 images) forward and backward as the reference does."""
    monkeypatch.setattr(conv.KERNELS[kernel], "configs", [config])  # one config: launched as it is
    monkeypatch.setattr(conv.KERNELS[kernel], "best_config", None, raising=False)
    path = "stepwise" if kernel == "step" else "single"
    precision = config_precision(config)
    batch, channels, hw = SHAPES["17x9x9"]
    u, w = _problem(batch, channels, hw, "tanh")
    out = conv.forward_solve(u, w, None, spec("tanh", TOL, 200, "sample"), path=path, precision=precision)
    ref = reference.forward_solve(u, w, "tanh", tol=TOL, max_iter=200)
    history = _residual_history(forward_map(u, w, "tanh"), torch.zeros_like(u), int(ref[1].max()) + 1)
    assert_forced_config_solve(out, ref, history, TOL, precision)
    v, w, D = _adjoint_problem(batch, channels, hw, "sigmoid")
    out = conv.adjoint_solve(v, w, D, adjoint_spec(TOL, 200, "sample"), path=path, precision=precision)
    ref = reference.adjoint_solve(v, w, D, tol=TOL, max_iter=200)
    history = _residual_history(adjoint_map(v, w, D), D * v, int(ref[1].max()) + 1)
    assert_forced_config_solve(out, ref, history, TOL, precision)
    assert conv.KERNELS[kernel].best_config is config


@pytest.mark.parametrize("path", PATHS)
def test_degenerate_shapes(path):
    """One channel, one row, one column, one pixel: the boundary masks alone shape the convolution."""
    for batch, channels, hw in [(1, 1, (1, 1)), (2, 3, (1, 5)), (2, 2, (4, 1))]:
        u, w = _problem(batch, channels, hw, "softsign")
        out = conv.forward_solve(u, w, None, spec("softsign", 1e-5, 100, "sample"), path=path)
        ref = reference.forward_solve(u, w, "softsign", tol=1e-5, max_iter=100)
        history = _residual_history(forward_map(u, w, "softsign"), torch.zeros_like(u), int(ref[1].max()) + 1)
        _assert_solve_matches(out, ref, history, 1e-5, 2e-6)


def _stops(path):
    """The stopping rules a path takes (``stop="batch"`` is stepwise only)."""
    return ("sample", "batch") if path == "stepwise" else ("sample",)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
def test_nan_never_counts_as_converged(path, activation):
    """A NaN pixel in u (the op layer rejects it; the kernels must still follow the rule) makes its
    image's first iterate and residual NaN: the image stops after that step, unconverged, while the
    others go on and converge as the reference's do; under the batch rule (stepwise) every image stops
    after that step, unconverged (tests/problems.py's check_nan_residual_never_counts_as_converged)."""
    batch, channels, hw = SHAPES["5x7x6"]
    u, w = _problem(batch, channels, hw, activation)
    u[1, 2, 3, 4] = math.nan
    history = _residual_history(forward_map(u, w, activation), torch.zeros_like(u), 30)
    for stop in _stops(path):
        out = conv.forward_solve(u, w, None, spec(activation, TOL, 30, stop), path=path)
        ref = reference.forward_solve(u, w, activation, tol=TOL, max_iter=30, stop=stop)
        assert_stops_at_non_finite(out, ref, 1, stop, history, TOL, 2e-6)
        assert out[3].cpu()[[0, 2]].all() == (stop == "sample")


@pytest.mark.parametrize("path", PATHS)
def test_huge_states_do_not_overflow_the_residual(path):
    """The adjoint from v scaled by 1e20: the squares of its state overflow float32, so the per-image
    (and batch) sums are float64: residuals, counts and flags are the reference's under either rule;
    and an image whose state is NaN from h_0 stops at its first step, unconverged (test_backend_triton's
    test of the same name, for the dense kernels)."""
    batch, channels, hw = SHAPES["5x7x6"]
    v, w, D = _adjoint_problem(batch, channels, hw, "tanh")
    v = v * 1e20
    step = adjoint_map(v, w, D)
    for stop in _stops(path):
        out = conv.adjoint_solve(v, w, D, adjoint_spec(TOL, 200, stop), path=path)
        ref = reference.adjoint_solve(v, w, D, tol=TOL, max_iter=200, stop=stop)
        assert (out[0].flatten(1).abs().amax(1) > 1e19).all() and out[3].all() and (out[1] > 2).all()
        history = (_residual_history if stop == "sample" else _batch_residual_history)(step, D * v, 200)
        _assert_solve_matches(out, ref, history, TOL, 2e-6)
    v[1, 2, 3, 4] = math.nan
    history = _residual_history(adjoint_map(v, w, D), D * v, 200)
    for stop in _stops(path):
        out = conv.adjoint_solve(v, w, D, adjoint_spec(TOL, 200, stop), path=path)
        ref = reference.adjoint_solve(v, w, D, tol=TOL, max_iter=200, stop=stop)
        assert_stops_at_non_finite(out, ref, 1, stop, history, TOL, 2e-6)


@pytest.mark.parametrize("path", PATHS)
def test_z0_and_max_iter_are_honoured(path):
    batch, channels, hw = SHAPES["5x7x6"]
    u, w = _problem(batch, channels, hw, "relu6", weight_scale=0.9)
    z0 = torch.rand(u.shape, device=DEVICE)
    out = conv.forward_solve(u, w, z0, spec("relu6", 1e-9, 4, "sample"), path=path)
    ref = reference.forward_solve(u, w, "relu6", tol=1e-9, max_iter=4, z0=z0)
    assert (out[1] == 4).all() and not out[3].any()  # nobody converges in 4 steps at tol 1e-9
    _assert_close_rel(out[0], ref[0], 2e-6)
    torch.testing.assert_close(out[2], ref[2], rtol=1e-4, atol=0)


def test_stop_batch_matches_reference():
    """stop='batch' (stepwise only): one count for every image, the reference's iterate and residuals."""
    batch, channels, hw = SHAPES["5x7x6"]
    u, w = _problem(batch, channels, hw, "tanh")
    history = _batch_residual_history(forward_map(u, w, "tanh"), torch.zeros_like(u), 200)
    for max_iter in (200, 5):
        out = conv.forward_solve(u, w, None, spec("tanh", TOL, max_iter, "batch"))
        ref = reference.forward_solve(u, w, "tanh", tol=TOL, max_iter=max_iter, stop="batch")
        assert len(set(out[1].tolist())) == 1
        _assert_solve_matches(out, ref, history, TOL, 2e-6)
    v, w, D = _adjoint_problem(batch, channels, hw, "tanh")
    out = conv.adjoint_solve(v, w, D, adjoint_spec(TOL, 200, "batch"))
    ref = reference.adjoint_solve(v, w, D, tol=TOL, max_iter=200, stop="batch")
    history = _batch_residual_history(adjoint_map(v, w, D), D * v, 200)
    assert out[3].all() and len(set(out[1].tolist())) == 1
    _assert_solve_matches(out, ref, history, TOL, 2e-6)


@pytest.mark.parametrize("path", PATHS)
def test_memory_formats(path):
    """NCHW and channels_last inputs give the same numbers, each returned in its own memory format."""
    batch, channels, hw = SHAPES["5x7x6"]
    u, w = _problem(batch, channels, hw, "softsign")
    z0 = torch.rand(u.shape, device=DEVICE)
    last = torch.channels_last
    softsign = spec("softsign", TOL, 200, "sample")
    nchw = conv.forward_solve(u, w, z0, softsign, path=path)
    nhwc = conv.forward_solve(u.to(memory_format=last), w.to(memory_format=last), z0, softsign, path=path)
    assert nchw[0].is_contiguous() and nhwc[0].is_contiguous(memory_format=last)
    for a, b in zip(nchw, nhwc):
        assert torch.equal(a, b)  # the kernels see the same NHWC tensors either way
    _check_forward(nhwc, u, w, "softsign", z0=z0, tol=TOL, max_iter=200)
    # the adjoint takes v's format; a D in another format is converted like any input
    v, w, D = _adjoint_problem(batch, channels, hw, "tanh")
    rule = adjoint_spec(TOL, 200, "sample")
    h = conv.adjoint_solve(v.to(memory_format=last), w, D, rule, path=path)[0]
    assert h.is_contiguous(memory_format=last)
    assert torch.equal(h, conv.adjoint_solve(v, w, D.to(memory_format=last), rule, path=path)[0])


def test_stepwise_results_do_not_depend_on_how_often_the_host_checks():
    batch, channels, hw = SHAPES["5x7x6"]
    u, w = _problem(batch, channels, hw, "sigmoid")
    runs = [conv.forward_solve(u, w, None, spec("sigmoid", TOL, 30, "sample"), path="stepwise", check_every=k)
            for k in (1, 4, 30)]  # 30: never checks, runs max_iter steps (converged images do nothing)
    assert runs[0][3].all() and runs[0][1].max() < 30 and len(set(runs[0][1].tolist())) > 1
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_empty_batch_is_answered_by_the_op_layer():
    """An empty batch never reaches a backend (the op layer answers it, gradients included); a launcher
    given one says so rather than launching an empty grid."""
    u, w = _problem(0, 4, (5, 5), "tanh")
    uu = u.clone().requires_grad_()
    z, stats = pk.fixed_point(uu, w, "tanh", backend="triton")
    z.sum().backward()
    assert z.shape == (0, 4, 5, 5) and stats.forward_iterations.shape == (0,) and uu.grad.shape == u.shape
    for call in (lambda: conv.forward_solve(u, w, None, SolveSpec()), lambda: conv.adjoint_solve(u, w, u, SolveSpec()),
                 lambda: conv.forward_step(u, u, w, "tanh")):
        with pytest.raises(ValueError, match="empty batch is answered by the op layer"):
            call()


# ------------------------------------------------------------------------------------ path & options


def test_choose_path(monkeypatch):
    monkeypatch.delenv("PCDEQ_TRITON_PATH", raising=False)
    monkeypatch.setattr(launch, "num_sms", lambda device: 132)
    assert conv.choose_path(64, 20, 32, 32) == "single"  # 18 C^2 H W = 7.4 Mflop per image-iteration
    assert conv.choose_path(64, 82, 28, 28) == "stepwise"  # 95 Mflop, and 64 images for 132 SMs
    assert conv.choose_path(264, 82, 28, 28) == "single"  # two images per SM
    assert conv.choose_path(64, 20, 32, 32, stop="batch") == "stepwise"
    assert conv.choose_path(64, 82, 28, 28, path="single") == "single"
    assert conv.choose_path(64, 20, 32, 32, path="stepwise") == "stepwise"
    monkeypatch.setenv("PCDEQ_TRITON_PATH", "stepwise")
    assert conv.choose_path(64, 20, 32, 32) == "stepwise"
    monkeypatch.setenv("PCDEQ_TRITON_PATH", "single")
    assert conv.choose_path(64, 82, 28, 28) == "single"
    with pytest.raises(ValueError, match="stop='batch' needs the stepwise path"):
        conv.choose_path(64, 20, 32, 32, stop="batch", path="single")
    with pytest.raises(ValueError, match="Triton solve path must be one of"):
        conv.choose_path(64, 20, 32, 32, path="fast")


def test_precision_follows_torchs_convolution_setting(monkeypatch):
    """By default a conv solve computes as torch's conv2d would: TF32 unless torch's float32 convolution
    switch (legacy ``cudnn.allow_tf32`` or newer ``cudnn.conv.fp32_precision``) says exact; dense
    solves follow the matmul switch (exact unless asked). An explicit precision or
    PCDEQ_TRITON_PRECISION overrides."""
    monkeypatch.delenv("PCDEQ_TRITON_PRECISION", raising=False)
    assert torch_conv_precision() == conv.resolve_precision() == "ieee"  # this module's fixture
    with cudnn_allow_tf32(True):  # torch's default
        assert torch_conv_precision() == conv.resolve_precision() == "tf32"
        assert dense.resolve_precision() == "ieee"
        assert conv.resolve_precision("ieee") == "ieee"
        monkeypatch.setenv("PCDEQ_TRITON_PRECISION", "ieee")
        assert conv.resolve_precision() == "ieee"
        monkeypatch.delenv("PCDEQ_TRITON_PRECISION")
    if hasattr(torch.backends.cudnn, "conv"):  # the newer API (torch >= 2.9)
        setting = torch.backends.cudnn.conv
        before = setting.fp32_precision
        try:
            setting.fp32_precision = "tf32"
            assert conv.resolve_precision() == "tf32"
            setting.fp32_precision = "ieee"
            assert conv.resolve_precision() == "ieee"
        finally:
            setting.fp32_precision = before


def test_bad_inputs_raise_clear_errors(monkeypatch):
    """What the conv launchers check themselves (the options are the SolveSpec's): dtypes, shapes, and
    the kernels' 32-bit counts and offsets."""
    u, w = _problem(2, 3, (4, 5), "tanh")
    tanh = SolveSpec()
    with pytest.raises(TypeError, match="does not take float64.*backend='reference'"):
        conv.forward_solve(u.double(), w.double(), None, tanh)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        conv.forward_solve(u, w.int(), None, tanh)
    with pytest.raises(ValueError, match=r"need x \(B, C, H, W\) and weight \(C, C, 3, 3\)"):
        conv.forward_solve(u, w[:, :2], None, tanh)
    with pytest.raises(ValueError, match=r"need x \(B, C, H, W\) and weight \(C, C, 3, 3\)"):
        conv.forward_solve(u, torch.zeros(3, 3, 5, 5, device=DEVICE), None, tanh)
    with pytest.raises(ValueError, match=r"need x \(B, C, H, W\) and weight \(C, C, 3, 3\)"):
        conv.forward_solve(u.flatten(2), w, None, tanh)
    with pytest.raises(ValueError, match="z0 has shape"):
        conv.forward_solve(u, w, u[:, :, :2], tanh)
    with pytest.raises(ValueError, match="D has shape"):
        conv.adjoint_solve(u, w, u[:1], tanh)
    # a spec may ask for up to 2**63 - 1 steps; the kernels count in 32 bits
    with pytest.raises(ValueError, match="32-bit step counter"):
        conv.forward_solve(u, w, None, spec("tanh", TOL, limits.MAX_ITER + 1, "sample"))
    with pytest.raises(ValueError, match="32-bit step counter"):
        conv.adjoint_solve(u, w, u, adjoint_spec(TOL, limits.MAX_ITER + 1, "sample"))
    with pytest.raises(TypeError, match="take a pcdeq_kernels.SolveSpec, got float"):
        conv.adjoint_solve(u, w, u, 1e-4)  # the launchers' old signature
    with pytest.raises(ValueError, match="check_every must be"):
        conv.forward_solve(u, w, None, tanh, path="stepwise", check_every=0)
    with pytest.raises(ValueError, match="input precision must be one of"):
        conv.forward_solve(u, w, None, tanh, precision="fp8")
    with pytest.raises(ValueError, match="unknown activation"):
        conv.forward_step(u, u, w, "gelu")  # the single-step helpers take an activation's name
    monkeypatch.setattr(limits, "MAX_IMAGE", 50)
    with pytest.raises(ValueError, match="32-bit indexing"):
        conv.forward_solve(u, w, None, tanh)


# ----------------------------------------------------------------------------------- GPU-only checks


@GPU
@pytest.mark.parametrize("path", PATHS)
def test_bfloat16_on_gpu(path):
    batch, channels, hw = SHAPES["17x9x9"]
    u, w = _problem(batch, channels, hw, "tanh", torch.bfloat16)
    out = conv.forward_solve(u, w, None, spec("tanh", TOL, 200, "sample"), path=path, precision="ieee")
    ref = reference.forward_solve(u, w, "tanh", tol=TOL, max_iter=200)
    assert out[0].dtype == torch.bfloat16 and out[3].all()
    assert (out[1] - ref[1]).abs().max() <= 1
    _assert_close_rel(out[0], ref[0], float(torch.finfo(torch.bfloat16).eps))


@GPU
@pytest.mark.parametrize("path", PATHS)
def test_tf32_on_gpu(path):
    """tf32 rounds the state to 10 mantissa bits in the convolution: close to, not equal to, ieee."""
    batch, channels, hw = SHAPES["17x9x9"]
    u, w = _problem(batch, channels, hw, "tanh")
    out = conv.forward_solve(u, w, None, spec("tanh", TOL, 200, "sample"), path=path, precision="tf32")
    ref = reference.forward_solve(u, w, "tanh", tol=TOL, max_iter=200)
    assert out[3].all() and (out[1] - ref[1]).abs().max() <= 3
    _assert_close_rel(out[0], ref[0], 2e-3)


# ------------------------------------------------------------------------------ ahead-of-time compiles

@pytest.mark.skipif(not aot.cuobjdump_available(), reason=NO_NVIDIA_TOOLS)
def test_every_kernel_configuration_compiles_for_sm80_and_sm90_without_spills():
    results = aot.compile_plan_in_workers("conv", full=AOT_FULL)
    kernels = {(r["kernel"], r["precision"], r["capability"], r["aligned"]) for r in results}
    assert len(kernels) == 2 * 2 * 2 * 2 and len(results) > 50  # both kernels, precisions, targets, alignments
    assert_compiles_fit(results)


# ------------------------------------------------------------------- through fixed_point and the layer


@pytest.mark.parametrize("stop", ["sample", "batch"])
def test_fixed_point_and_layer_gradients_match_reference(stop):
    # the dispatcher routes (C, C, 3, 3) weights to conv.py; forward and implicit backward (the adjoint
    # solve on the same kernels) agree with the reference backend's to the solves' accuracy (tol 1e-6,
    # float32: 1e-4 relative leaves room for 1/(1-c) amplification and the different summation order)
    u, w = make_problem(3, 6, "tanh", dtype=torch.float32, conv_hw=(5, 7), weight_scale=0.6)
    u, w = u.to(DEVICE), w.to(DEVICE)
    weights = torch.randn(u.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    results = {}
    for backend in ("triton", "reference"):
        uu, ww = u.clone().requires_grad_(), w.clone().requires_grad_()
        z, stats = pk.fixed_point(uu, ww, "tanh", tol=1e-6, stop=stop, backend=backend)
        results[backend] = (z, *torch.autograd.grad((z * weights).sum(), (uu, ww)))
        assert stats.backend == backend and (stats.backward_iterations > 0).all()
    for got, want in zip(results["triton"], results["reference"]):
        assert ((got - want).norm() / want.norm()).item() < 1e-4
    layer = pk.PCDEQConv2d(6, "tanh", backend="triton").to(DEVICE)
    x = torch.randn(2, 6, 4, 5, device=DEVICE)
    layer(x).square().sum().backward()
    assert layer.stats.backend == "triton" and all(p.grad is not None for p in layer.parameters() if p.requires_grad)
