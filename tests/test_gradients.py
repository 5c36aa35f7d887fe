"""fixed_point's implicit gradients against float64 autograd through the unrolled iteration."""

import pytest
import torch

import pcdeq_kernels as pk
from pcdeq_kernels import reference

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


@pytest.mark.parametrize("loss", ["linear", "nonlinear"])
@pytest.mark.parametrize("wrt", ["u", "weight"])
def test_create_graph_is_a_clear_error_not_a_detached_gradient(loss, wrt):
    """A gradient penalty needs the gradient as a function of W and u: the layer cannot give that, and
    says so, whether or not the incoming gradient requires grad (a loss linear in z*: it does not)."""
    u, w = make_problem(3, 4, "tanh")
    x = {"u": u, "weight": w}[wrt].requires_grad_()
    z, _ = pk.fixed_point(u, w)
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
