"""Bad input gets a clear error that names the problem and the fix; nothing is silently ignored."""

import warnings

import pytest
import torch

import pcdeq_kernels as pk
from pcdeq_kernels import ops

from problems import make_problem


@pytest.fixture(params=["compiled", "torch"])
def value_checks(request, monkeypatch):
    """The op layer's value checks on CPU tensors run as one compiled pass (pcdeq_C.inputs_are_valid,
    solve_report) where the extension is built, and as torch reductions elsewhere (GPUs): every test of
    what they refuse and report runs through both."""
    if request.param == "compiled" and not ops._CPU_CHECKS:
        pytest.skip("needs the compiled extension (its pcdeq_C check ops)")
    monkeypatch.setattr(ops, "_CPU_CHECKS", request.param == "compiled")
    if request.param == "torch":  # (the cpu backend's eager path makes the compiled checks inside its op)
        monkeypatch.setattr(ops, "has_eager_solve", lambda *args: False)
    return request.param


@pytest.fixture
def problem(value_checks):
    return make_problem(4, 6, "tanh", dtype=torch.float32)


def test_negative_weight(problem):
    u, w = problem
    w[1, 2] = -0.5
    with pytest.raises(ValueError, match=r"weight has negative entries \(min -0.5\).*project_\(\)"):
        pk.fixed_point(u, w)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight(problem, bad):
    u, w = problem
    w[0, 0] = bad
    with pytest.raises(ValueError, match="weight contains NaN or Inf"):
        pk.fixed_point(u, w)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_injection(problem, bad):
    u, w = problem
    u[3, 1] = bad
    with pytest.raises(ValueError, match=r"u \(the injection\) contains NaN or Inf"):
        pk.fixed_point(u, w)


def test_negative_injection(problem):
    u, w = problem
    u[0, 0] = -1.0
    with pytest.raises(ValueError, match=r"negative entries.*softplus\(beta=5\).*relu"):
        pk.fixed_point(u, w)


@pytest.mark.parametrize(
    "u_shape, w_shape, match",
    [
        ((4, 6), (6, 5), r"u of shape \(B, d\) and weight \(d, d\)"),
        ((4, 5), (6, 6), r"got u \(4, 5\), weight \(6, 6\)"),
        ((4, 6, 1), (6, 6), r"dense pcDEQ needs u of shape \(B, d\)"),
        ((2, 3, 5, 5), (3, 3, 5, 5), r"weight \(C, C, 3, 3\)"),
        ((2, 4, 5, 5), (3, 3, 3, 3), r"convolutional pcDEQ needs"),
        ((6,), (6,), r"weight must have shape \(d, d\) \(dense\) or \(C, C, 3, 3\)"),
    ],
)
def test_wrong_shapes(u_shape, w_shape, match):
    with pytest.raises(ValueError, match=match):
        pk.fixed_point(torch.rand(u_shape), torch.rand(w_shape))


def test_wrong_dtypes(problem):
    u, w = problem
    with pytest.raises(TypeError, match=r"u is torch.float32 but weight is torch.float64"):
        pk.fixed_point(u, w.double())
    with pytest.raises(TypeError, match=r"u has dtype torch.int64"):
        pk.fixed_point(torch.ones(4, 6, dtype=torch.long), w)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        pk.fixed_point(u.numpy(), w)


def test_wrong_device(problem):
    u, w = problem
    with pytest.raises(ValueError, match=r"u is on cpu but weight is on meta"):
        pk.fixed_point(u, w.to("meta"))


def test_unknown_activation_and_keyword(problem):
    u, w = problem
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        pk.fixed_point(u, w, "gelu")
    with pytest.raises(TypeError, match="unexpected keyword argument 'tolerance'"):
        pk.fixed_point(u, w, tolerance=1e-3)
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_iters'"):
        pk.PCDEQLinear(6, max_iters=10)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_iter=0), "max_iter must be an integer >= 1"),
        (dict(max_iter=2.5), "max_iter must be an integer >= 1"),
        (dict(backward_max_iter=-1), "backward_max_iter must be an integer >= 1"),
        (dict(tol=0), "tol must be a positive finite number"),
        (dict(tol=-1e-3), "tol must be a positive finite number"),
        (dict(tol=float("nan")), "tol must be a positive finite number"),
        (dict(backward_tol=0.0), "backward_tol must be a positive finite number"),
        (dict(stop="global"), r"stop must be one of \('sample', 'batch', 'official'\)"),
        (dict(backward="unrolled"), r"backward must be one of \('implicit', 'jfb'\)"),
        (dict(on_nonconvergence="silent"), "on_nonconvergence must be one of"),
        (dict(backend="numba"), "unknown backend 'numba'"),
    ],
)
def test_bad_options(problem, kwargs, match):
    u, w = problem
    with pytest.raises(ValueError, match=match):
        pk.fixed_point(u, w, **kwargs)


@pytest.mark.parametrize("name", ["cpu", "cuda", "triton"])
def test_unavailable_backend_says_so(problem, name):
    if pk.available_backends()[name]:
        pytest.skip(f"backend {name} is available in this build")
    u, w = problem
    with pytest.raises(RuntimeError, match=f"backend '{name}' is not available: "):
        pk.fixed_point(u, w, backend=name)


def test_bad_z0(problem):
    u, w = problem
    with pytest.raises(ValueError, match="z0 must be a tensor shaped like u"):
        pk.fixed_point(u, w, z0=torch.zeros(3, 6))
    with pytest.raises(ValueError, match="z0 has negative entries"):
        pk.fixed_point(u, w, z0=-torch.ones_like(u))


def test_nonconvergence_is_reported_warned_or_raised(problem):
    u, w = make_problem(4, 6, "tanh", weight_scale=0.9)
    with pytest.warns(RuntimeWarning, match=r"4 of 4 samples did not reach tol=1e-12 within max_iter=3"):
        _, stats = pk.fixed_point(u, w, tol=1e-12, max_iter=3)
    assert not stats.converged.any() and (stats.forward_iterations == 3).all()
    with pytest.raises(pk.NonConvergenceError, match="raise max_iter or tol"):
        pk.fixed_point(u, w, tol=1e-12, max_iter=3, on_nonconvergence="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, stats = pk.fixed_point(u, w, tol=1e-12, max_iter=3, on_nonconvergence="ignore")
    assert not stats.converged.any()


def test_backward_nonconvergence_raises_when_asked(problem):
    u, w = make_problem(4, 6, "tanh", weight_scale=0.9)
    u.requires_grad_()
    z, _ = pk.fixed_point(u, w, tol=1e-12, backward_max_iter=2, on_nonconvergence="raise")
    with pytest.raises(pk.NonConvergenceError, match="backward solve: 4 of 4 samples"):
        z.sum().backward()


def test_module_rejects_invalid_pairs_and_names():
    with pytest.raises(ValueError, match=r"activation 'tanh' has tanh\(0\) = 0.*injection='softplus'"):
        pk.PCDEQLinear(8, "tanh", injection="relu")
    with pytest.raises(ValueError, match="unknown injection 'exp'"):
        pk.PCDEQLinear(8, "tanh", injection="exp")
    with pytest.raises(ValueError, match="unknown parametrization 'spectral'"):
        pk.PCDEQLinear(8, parametrization="spectral")
    layer = pk.PCDEQLinear(8)
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        layer.backend = "fast"
    with pytest.raises(ValueError, match=r"expects input \(\.\.\., 8\), got \(2, 7\)"):
        layer(torch.randn(2, 7))
    with pytest.raises(ValueError, match=r"expects input \(B, 3, H, W\), got \(2, 4, 5, 5\)"):
        pk.PCDEQConv2d(3)(torch.randn(2, 4, 5, 5))


@pytest.mark.parametrize("shape, w_shape", [((0, 4), (4, 4)), ((0, 4, 3, 5), (4, 4, 3, 3))])
def test_empty_batch_is_fine(shape, w_shape):
    u = torch.rand(shape, requires_grad=True)
    z, stats = pk.fixed_point(u, torch.rand(w_shape) * 0.01)
    z.sum().backward()
    assert z.shape == shape and u.grad.shape == shape and stats.forward_iterations.shape == (0,)


def test_zero_features_is_an_error():
    with pytest.raises(ValueError, match="weight has zero rows"):
        pk.fixed_point(torch.rand(3, 0), torch.rand(0, 0))


@pytest.mark.parametrize("activation", ["tanh", "softsign", "relu6"])
def test_zero_injection_rows_are_refused_where_zero_is_a_fixed_point(activation, value_checks):
    """With act(0) = 0 a sample whose u is all zeros has the spurious fixed point z = 0, which the
    iteration from 0 never leaves (positive ones exist: 0.958 for tanh with row sums 2)."""
    u, w = make_problem(4, 6, activation, dtype=torch.float32)
    u[1] = 0.0
    u[3] = 0.0
    with pytest.raises(ValueError, match=r"identically 0 in sample\(s\) \[1, 3\].*softplus"):
        pk.fixed_point(u, w, activation)
    u[1, 0] = 1e-3  # one positive entry is enough for the guarantees (W spreads it) ...
    u[3, 5] = 1e-3
    pk.fixed_point(u, w, activation)


def test_zero_injection_rows_are_fine_for_sigmoid(value_checks):
    u, w = make_problem(3, 6, "sigmoid", dtype=torch.float32)
    u[0] = 0.0
    z, stats = pk.fixed_point(u, w, "sigmoid")
    assert stats.converged.all() and (z[0] > 0.5).all()


@pytest.mark.parametrize("layer", [pk.PCDEQLinear, pk.PCDEQConv2d])
@pytest.mark.parametrize("size", [0, -3, 2.0, True])
def test_layer_sizes_must_be_positive_integers(layer, size):
    with pytest.raises(ValueError, match=r"(features|channels) must be an integer >= 1"):
        layer(size)


def test_conv_images_without_pixels_are_a_clear_error():
    with pytest.raises(ValueError, match=r"images of at least one pixel; got u \(2, 3, 0, 5\)"):
        pk.fixed_point(torch.rand(2, 3, 0, 5), torch.rand(3, 3, 3, 3) * 0.01)


def test_summary_of_an_empty_batch():
    _, stats = pk.fixed_point(torch.rand(0, 4), torch.rand(4, 4) * 0.1)
    summary = stats.summary()
    assert summary.keys() >= {"forward_iterations_mean", "converged_fraction"}
    assert all(v != v for v in summary.values())  # NaN: no samples


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_torch_jit_script_is_a_clear_error():
    with pytest.raises(RuntimeError, match="cannot be compiled by torch.jit.script.*torch.compile"):
        torch.jit.script(pk.PCDEQLinear(4))


def test_channels_last_input_gives_channels_last_output():
    layer = pk.PCDEQConv2d(3, backend="reference")
    x = torch.randn(2, 3, 5, 6).contiguous(memory_format=torch.channels_last)
    z = layer(x)
    assert z.is_contiguous(memory_format=torch.channels_last) and not z.is_contiguous()
    torch.testing.assert_close(z, layer(x.contiguous()))


def test_convergence_decided_by_the_stopping_rules_guard_is_reported(value_checks):
    """u = 1e-9 and row sums 0.99: ||z*|| is about 1e-6, below the rule's +1e-5 guard, which then
    declares convergence long before the iterate is accurate; the official rule, but said."""
    d = 8
    u = torch.full((2, d), 1e-9, dtype=torch.float64)
    w = torch.full((d, d), 0.99 / d, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match=r"2 of 2 samples met tol=0.0001 only through the stopping rule's \+1e-05 guard"):
        z, stats = pk.fixed_point(u, w, backend="reference")
    assert stats.converged.all()
    exact = 1e-9 / (1 - 0.99)  # tanh is the identity at this scale
    assert (z / exact).max() < 0.9  # the guard's verdict: far from the fixed point
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ... and a scale where the rule is meaningful says nothing
        pk.fixed_point(u * 1e8, w, backend="reference", tol=1e-6)


def _cpu_tensor_backends():
    """The backends that solve CPU tensors here (Triton only under its interpreter; float32 problems)."""
    from pcdeq_kernels.problem import Problem

    return [n for n in pk.backends.BACKEND_NAMES if pk.backends.get(n).is_available()
            and not pk.backends.get(n).unsupported_reason(pk.SolveSpec(), Problem("dense", "cpu", torch.float32, 1))]


@pytest.mark.parametrize("backend", _cpu_tensor_backends())
@pytest.mark.parametrize("conv_hw", [None, (4, 5)], ids=["dense", "conv"])
def test_huge_incoming_gradient_does_not_overflow_the_residual(backend, conv_hw):
    """An upstream gradient scaled by 1e20: the squares of the adjoint state overflow float32, and the
    residual must not become 0 ("converged" after a step or two): the gradient is the unscaled one,
    scaled."""
    u, w = make_problem(3, 6, "tanh", dtype=torch.float32, weight_scale=0.9, conv_hw=conv_hw)
    u.requires_grad_()
    g = torch.rand_like(u)
    z, _ = pk.fixed_point(u, w, tol=1e-6, backend=backend)
    (want,) = torch.autograd.grad(z, u, g)
    z, stats = pk.fixed_point(u, w, tol=1e-6, backend=backend)
    (got,) = torch.autograd.grad(z, u, g * 1e20)
    assert (stats.backward_iterations > 3).all()
    torch.testing.assert_close(got / 1e20, want, rtol=1e-4, atol=0)


@pytest.mark.parametrize("backend", _cpu_tensor_backends())
def test_non_finite_iterates_stop_at_once_and_say_so(backend):
    """bfloat16 W = 1e38 (finite) makes L(z) overflow to Inf and softsign(Inf) NaN: the solve stops at
    that step (not after max_iter steps: with 10**9 it ran for minutes), unconverged, and the message
    says non-finite."""
    u, w = make_problem(4, 8, "softsign", dtype=torch.bfloat16)
    w[:, :] = 1e38
    with pytest.warns(RuntimeWarning, match=r"4 of 4 samples hit a non-finite \(NaN or Inf\) iterate"):
        z, stats = pk.fixed_point(u, w, "softsign", max_iter=1000, backend=backend)
    assert not stats.converged.any() and (stats.forward_iterations <= 3).all()  # L(z) overflows by step 3
    with pytest.raises(pk.NonConvergenceError, match="non-finite"):
        pk.fixed_point(u, w, "softsign", max_iter=1000, backend=backend, on_nonconvergence="raise")
