"""fixed_point's implicit gradients against float64 autograd through the unrolled iteration."""

import pytest
import torch

import pcdeq_kernels as pk
from pcdeq_kernels import ops, reference

from problems import ALL_ACTIVATIONS, gradcheck_fixed_point, make_problem, unrolled_fixed_point

SHAPES = [dict(batch=5, dim=13), dict(batch=3, dim=4, conv_hw=(5, 6))]


def _grads(z, u, w, seed=7):
    g = torch.Generator().manual_seed(seed)
    weights = torch.randn(z.shape, generator=g, dtype=torch.float64).to(z.dtype)
    return torch.autograd.grad((z * weights).sum(), (u, w))


def _rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=["dense", "conv"])
@pytest.mark.parametrize("stop", ["sample", "batch"])
def test_implicit_gradient_matches_unrolled_autograd_float64(activation, shape, stop):
    u, w = make_problem(shape["batch"], shape["dim"], activation, conv_hw=shape.get("conv_hw"), weight_scale=0.7)
    u.requires_grad_()
    w.requires_grad_()
    z, stats = pk.fixed_point(u, w, activation, tol=1e-14, max_iter=5000, stop=stop, backend="reference")
    steps = int(stats.forward_iterations.max()) + 30  # run the unrolled iteration past convergence
    z_unrolled = unrolled_fixed_point(u, w, activation, steps)
    torch.testing.assert_close(z, z_unrolled, rtol=0, atol=1e-13)
    for got, want in zip(_grads(z, u, w), _grads(z_unrolled, u, w)):
        assert _rel_err(got, want) < 1e-6
    assert (stats.backward_iterations > 0).all() and (stats.backward_residual < 1e-13).all()  # "batch": per sample near tol


@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
@pytest.mark.parametrize("conv_hw", [None, (3, 4)], ids=["dense", "conv"])
def test_gradcheck_float64(activation, conv_hw):
    # u away from 0 and a light W keep relu6's pre-activations off its kinks at 0 and 6
    u, w = make_problem(2, 3, activation, conv_hw=conv_hw, weight_scale=0.3, u_offset=0.5, u_scale=0.3)
    gradcheck_fixed_point(u, w, activation, "reference")


def test_gradient_of_float32_solve_is_close_to_float64():
    # float32: rounding in each step is amplified by at most 1/(1 - c) in the solution and gradient,
    # with c < 0.7 here: 1e-5 relative is a few ulps times that factor
    u, w = make_problem(8, 32, "tanh", weight_scale=0.7)
    u64, w64 = u.clone().requires_grad_(), w.clone().requires_grad_()
    u32, w32 = u.float().requires_grad_(), w.float().requires_grad_()
    z64, _ = pk.fixed_point(u64, w64, "tanh", tol=1e-13, max_iter=1000)
    z32, _ = pk.fixed_point(u32, w32, "tanh", tol=1e-7, max_iter=1000)
    assert _rel_err(z32.double(), z64) < 1e-6
    for got, want in zip(_grads(z32, u32, w32), _grads(z64, u64, w64)):
        assert got.dtype == torch.float32 and _rel_err(got.double(), want) < 1e-5


@pytest.mark.parametrize("conv_hw", [None, (4, 5)], ids=["dense", "conv"])
def test_jfb_gradient_is_the_one_step_formula(conv_hw):
    u, w = make_problem(4, 6, "softsign", conv_hw=conv_hw)
    u.requires_grad_()
    w.requires_grad_()
    z, stats = pk.fixed_point(u, w, "softsign", tol=1e-12, backward="jfb")
    v = torch.randn_like(z)
    gu, gw = torch.autograd.grad(z, (u, w), v)
    D = reference.activation_derivative_at(z.detach(), u.detach(), w.detach(), "softsign")
    torch.testing.assert_close(gu, D * v)
    torch.testing.assert_close(gw, reference.weight_grad(D * v, z.detach(), w.detach()))
    assert (stats.backward_iterations == 0).all()


def test_memory_does_not_grow_with_the_iteration_count():
    """What autograd keeps for backward must not depend on how many iterations the solve took."""

    def saved_for_backward(weight_scale, tol):
        u, w = make_problem(16, 24, "tanh", weight_scale=weight_scale)
        u.requires_grad_()
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            z, stats = pk.fixed_point(u, w, "tanh", tol=tol, max_iter=5000)
        nodes, stack = set(), [z.grad_fn]
        while stack:
            node = stack.pop()
            if node is not None and node not in nodes:
                nodes.add(node)
                stack.extend(n for n, _ in node.next_functions)
        return int(stats.forward_iterations.max()), sum(saved), len(nodes)

    few = saved_for_backward(0.05, 1e-3)
    many = saved_for_backward(0.95, 1e-13)
    assert many[0] > 10 * few[0], (few, many)
    assert many[1:] == few[1:]
    assert few[1] <= 3 * 16 * 24 * 8 + 24 * 24 * 8  # u, z and W; nothing per iteration


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gradients_flow_in_the_input_dtype(dtype):
    u, w = make_problem(4, 8, "sigmoid", dtype=dtype)
    u.requires_grad_()
    w.requires_grad_()
    z, _ = pk.fixed_point(u, w, "sigmoid")
    gu, gw = torch.autograd.grad(z.float().sum(), (u, w))
    assert z.dtype == gu.dtype == gw.dtype == dtype
    u64, w64 = u.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    z64, _ = pk.fixed_point(u64, w64, "sigmoid", tol=1e-12)
    gu64, gw64 = torch.autograd.grad(z64.sum(), (u64, w64))
    # solved in float32 from rounded inputs; the gradients are rounded to the half dtype at the end
    assert _rel_err(gu.double(), gu64) < 4 * torch.finfo(dtype).eps
    assert _rel_err(gw.double(), gw64) < 4 * torch.finfo(dtype).eps


needs_cpu = pytest.mark.skipif(not pk.available_backends()["cpu"], reason="needs the compiled extension")
# The two autograd implementations: the cpu backend's eager calls get a C++ node (pcdeq_C::eager_solve),
# every other call the Python autograd.Function (functional._FixedPoint).
GRADIENT_PATHS = [pytest.param("cpu", marks=needs_cpu), "reference"]


@pytest.mark.parametrize("backend", GRADIENT_PATHS)
@pytest.mark.parametrize("loss", ["linear", "nonlinear"])
@pytest.mark.parametrize("wrt", ["u", "weight"])
def test_create_graph_is_a_clear_error_not_a_detached_gradient(loss, wrt, backend):
    """A gradient penalty needs the gradient as a function of W and u: the layer cannot give that, and
    says so, whether or not the incoming gradient requires grad (a loss linear in z*: it does not)."""
    u, w = make_problem(3, 4, "tanh")
    x = {"u": u, "weight": w}[wrt].requires_grad_()
    z, _ = pk.fixed_point(u, w, backend=backend)
    out = z.sum() if loss == "linear" else z.square().sum()
    with pytest.raises(RuntimeError, match="first-order gradients only.*create_graph=True"):
        torch.autograd.grad(out, x, create_graph=True)


@pytest.mark.parametrize("transform", ["grad", "vmap"])
def test_torch_func_transforms_are_a_clear_error(transform):
    u, w = make_problem(3, 4, "tanh")
    if transform == "grad":
        call = lambda: torch.func.grad(lambda w_: pk.fixed_point(u, w_)[0].sum())(w)  # noqa: E731
    else:
        call = lambda: torch.func.vmap(lambda u_: pk.fixed_point(u_[None], w)[0])(u)  # noqa: E731
    with pytest.raises(RuntimeError, match="do not support torch.func transforms"):
        call()


def _python_function_only(monkeypatch):
    """Make every call take functional._FixedPoint (the path of the other backends and traced calls)."""
    monkeypatch.setattr(ops, "has_eager_solve", lambda *args: False)


def _cpu_solve_and_grads(u, w, activation, wrt=("u", "weight"), z0=None, **options):
    leaves = {"u": u.clone().requires_grad_("u" in wrt), "weight": w.clone().requires_grad_("weight" in wrt)}
    z, stats = pk.fixed_point(leaves["u"], leaves["weight"], activation, z0=z0, backend="cpu", **options)
    g = torch.randn(z.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(z.dtype)
    grads = torch.autograd.grad(z, [leaves[name] for name in wrt], g)
    return z, grads, stats


# Both paths run the same compiled forward and adjoint ops; they differ only in D = act'(L(z*) + u),
# which the C++ node evaluates with the cpu backend's SIMD formulas (float tanh within 2 ulp, torch's
# within 1 ulp): h* moves by a few ulp times 1/(1 - c), c <= 0.5 here. Half inputs are solved in
# float32 and the gradient rounded to the input dtype at the end: one rounding may flip (one ulp).
PATH_TOLERANCES = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2**-7}


@needs_cpu
@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
@pytest.mark.parametrize("shape", [dict(batch=5, dim=13), dict(batch=3, dim=4, conv_hw=(5, 6))], ids=["dense", "conv"])
@pytest.mark.parametrize("dtype", PATH_TOLERANCES, ids=str)
def test_cpu_cpp_autograd_node_matches_the_python_function(activation, shape, dtype, monkeypatch):
    u, w = make_problem(shape["batch"], shape["dim"], activation, conv_hw=shape.get("conv_hw"), dtype=dtype)
    z, grads, stats = _cpu_solve_and_grads(u, w, activation)
    assert "pcdeq::cpu::FixedPoint" in z.grad_fn.name()  # the C++ node was taken
    _python_function_only(monkeypatch)
    z_py, grads_py, stats_py = _cpu_solve_and_grads(u, w, activation)
    assert z_py.grad_fn.name() == "_FixedPointBackward"
    torch.testing.assert_close(z, z_py, rtol=0, atol=0)  # the same forward op
    rtol = PATH_TOLERANCES[dtype]
    for got, want in zip(grads, grads_py):
        assert got.dtype == want.dtype == dtype
        torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * want.abs().max().item())
    assert torch.equal(stats.forward_iterations, stats_py.forward_iterations)
    assert torch.equal(stats.backward_iterations, stats_py.backward_iterations)
    assert (stats.backward_iterations > 0).all() and (stats.backward_residual < 1e-4).all()


@needs_cpu
@pytest.mark.parametrize(
    "variant", ["jfb", "batch_stop", "z0", "grad_u_only", "grad_weight_only", "channels_last"],
)
def test_cpu_cpp_autograd_node_matches_the_python_function_in_every_mode(variant, monkeypatch):
    conv = variant == "channels_last"
    u, w = make_problem(4, 3 if conv else 9, "sigmoid", conv_hw=(4, 5) if conv else None, dtype=torch.float32)
    if conv:
        u = u.contiguous(memory_format=torch.channels_last)
    kwargs = {
        "jfb": dict(backward="jfb"), "batch_stop": dict(stop="batch"), "z0": dict(z0=torch.full_like(u, 0.3)),
        "grad_u_only": dict(wrt=("u",)), "grad_weight_only": dict(wrt=("weight",)),
    }.get(variant, {})
    z, grads, stats = _cpu_solve_and_grads(u, w, "sigmoid", **kwargs)
    _python_function_only(monkeypatch)
    z_py, grads_py, stats_py = _cpu_solve_and_grads(u, w, "sigmoid", **kwargs)
    torch.testing.assert_close(z, z_py, rtol=0, atol=0)
    assert z.stride() == z_py.stride() and len(grads) == len(grads_py)
    for got, want in zip(grads, grads_py):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if variant == "jfb":
        assert (stats.backward_iterations == 0).all() and stats.backward_residual.isnan().all()
    else:
        assert torch.equal(stats.backward_iterations, stats_py.backward_iterations)


@pytest.mark.parametrize("backend", GRADIENT_PATHS)
def test_backward_twice_needs_retain_graph_and_gives_the_same_gradient(backend):
    u, w = make_problem(3, 5, "tanh", dtype=torch.float32)
    u.requires_grad_()
    z, stats = pk.fixed_point(u, w, backend=backend)
    (first,) = torch.autograd.grad(z.sum(), u, retain_graph=True)
    (second,) = torch.autograd.grad(z.sum(), u)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(z.sum(), u)


@pytest.mark.parametrize("backend", GRADIENT_PATHS)
def test_backward_nonconvergence_warns_with_the_policy(backend):
    u, w = make_problem(4, 6, "tanh", weight_scale=0.9, dtype=torch.float32)
    u.requires_grad_()
    z, stats = pk.fixed_point(u, w, backward_tol=1e-12, backward_max_iter=2, backend=backend)
    with pytest.warns(RuntimeWarning, match=r"backward solve: 4 of 4 samples did not reach tol=1e-12 within max_iter=2"):
        z.sum().backward()
    assert (stats.backward_iterations == 2).all() and u.grad is not None


@needs_cpu
def test_cpu_eager_path_runs_under_inference_mode_and_no_grad():
    """The cpu backend's eager op is registered below autograd too: inference-mode tensors reach it there."""
    u, w = make_problem(3, 5, "tanh", dtype=torch.float32)
    want, _ = pk.fixed_point(u, w, backend="reference", tol=1e-7)
    for context in (torch.inference_mode, torch.no_grad):
        with context():
            z, stats = pk.fixed_point(u.clone(), w.clone(), backend="cpu", tol=1e-7)
        assert z.grad_fn is None and stats.converged.all()
        torch.testing.assert_close(z, want, rtol=1e-5, atol=1e-6)
