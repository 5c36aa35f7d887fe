"""The custom ops: opcheck (schema, fake kernels, dispatch) and torch.compile of a whole layer."""

import pytest
import torch

import pcdeq_kernels as pk
from pcdeq_kernels import ops, reference
from pcdeq_kernels.problem import Problem

from problems import make_problem


def _solves_here(backend, kind, dtype=torch.float32):
    """Whether ``backend`` is available and can solve ``kind`` problems of CPU tensors in ``dtype``
    (Triton only under the interpreter, and not in float64)."""
    b = pk.backends.get(backend)
    return b.is_available() and not b.unsupported_reason(pk.SolveSpec(), Problem(kind, "cpu", dtype, 1))


def _key(backend, stop="sample"):
    return pk.SolveSpec(tol=1e-6, max_iter=100, stop=stop, backend=backend).key


OPCHECK_CASES = [
    (backend, conv_hw, dtype)
    for backend in pk.backends.BACKEND_NAMES
    for conv_hw in (None, (4, 5))
    for dtype in (torch.float32, torch.float64)
    if _solves_here(backend, "dense" if conv_hw is None else "conv", dtype)
]
COMPILE_CASES = [
    (backend, layer_cls, shape)
    for backend in pk.backends.BACKEND_NAMES
    for layer_cls, shape, kind in ((pk.PCDEQLinear, (6, 12), "dense"), (pk.PCDEQConv2d, (2, 3, 5, 5), "conv"))
    if _solves_here(backend, kind)
]


@pytest.mark.parametrize("backend, conv_hw, dtype", OPCHECK_CASES, ids=str)
def test_opcheck_forward_and_adjoint(backend, conv_hw, dtype):
    u, w = make_problem(3, 5, "tanh", dtype=dtype, conv_hw=conv_hw)
    z0 = torch.rand_like(u)
    for z_init in (None, z0):
        torch.library.opcheck(ops.forward_solve, (u, w, z_init, _key(backend)))
    z, *_ = reference.forward_solve(u, w, "tanh", tol=1e-8)
    D = reference.activation_derivative_at(z, u, w, "tanh")
    torch.library.opcheck(ops.adjoint_solve, (torch.randn_like(u), w, D, _key(backend, "batch")))


def _strided_inputs(u):
    """``u`` in the layouts users pass besides contiguous: a transposed matrix (dense), channels-last and
    an odd permutation (images)."""
    if u.dim() == 2:
        return [u.t().contiguous().t()]
    return [u.contiguous(memory_format=torch.channels_last), u.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)]


@pytest.mark.parametrize("backend, conv_hw, dtype", OPCHECK_CASES, ids=str)
def test_output_layout_is_what_the_fake_kernels_say(backend, conv_hw, dtype):
    """The state comes back contiguous, or channels-last for channels-last images, whatever the
    backend and whatever the other inputs' layouts: torch.compile plans strides with the fake kernels."""
    u, w = make_problem(3, 5, "tanh", dtype=dtype, conv_hw=conv_hw)
    D = torch.rand_like(u)
    for x in _strided_inputs(u):
        torch.library.opcheck(ops.forward_solve, (x, w, None, _key(backend)))
        torch.library.opcheck(ops.adjoint_solve, (x, w, D, _key(backend)))
        z = ops.forward_solve(x, w, None, _key(backend))[0]
        h = ops.adjoint_solve(x, w, D, _key(backend))[0]
        layout = torch.channels_last if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(
            memory_format=torch.channels_last) else torch.contiguous_format
        assert z.is_contiguous(memory_format=layout) and h.is_contiguous(memory_format=layout)


@pytest.mark.skipif(not pk.available_backends()["cpu"], reason="needs the compiled extension (pcdeq_C ops)")
@pytest.mark.parametrize("conv_hw", [None, (4, 5)], ids=str)
def test_compiled_ops_output_layout_is_what_their_fake_kernels_say(conv_hw):
    u, w = make_problem(3, 5, "tanh", conv_hw=conv_hw)
    for x in _strided_inputs(u):
        torch.library.opcheck(torch.ops.pcdeq_C.forward_solve.default, (x, w, None, 0, 1e-6, 100, False))
        torch.library.opcheck(torch.ops.pcdeq_C.adjoint_solve.default, (x, w, torch.rand_like(u), 1e-6, 100, False))


def test_ops_are_kept_out_of_cuda_graphs():
    """The solves read the host (input checks, convergence): torch.compile's cudagraphs must leave them out."""
    for op in (torch.ops.pcdeq.forward_solve.default, torch.ops.pcdeq.adjoint_solve.default):
        assert torch.Tag.cudagraph_unsafe in op.tags


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton", "reference"])
def test_capturing_a_solve_in_a_cuda_graph_is_a_clear_error(backend):
    if not pk.available_backends()[backend]:
        pytest.skip(f"backend {backend} is not available here")
    u, w = (t.cuda() for t in make_problem(4, 8, "tanh", dtype=torch.float32))
    pk.fixed_point(u, w, backend=backend)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        with torch.cuda.graph(graph):
            pk.fixed_point(u, w, backend=backend)


def test_ops_outputs_match_the_reference():
    u, w = make_problem(5, 7, "relu6")
    key = pk.SolveSpec(activation="relu6", tol=1e-9, max_iter=300, backend="reference").key
    z, its, res, conv = torch.ops.pcdeq.forward_solve(u, w, None, key)
    z_ref, its_ref, res_ref, conv_ref = reference.forward_solve(u, w, "relu6", tol=1e-9, max_iter=300)
    assert torch.equal(z, z_ref) and torch.equal(its, its_ref) and torch.equal(conv, conv_ref)


@pytest.mark.parametrize("backend, layer_cls, shape", COMPILE_CASES, ids=str)
def test_compile_fullgraph_matches_eager(backend, layer_cls, shape):
    torch.manual_seed(0)
    layer = layer_cls(shape[1], "tanh", tol=1e-6 if backend == "triton" else 1e-8, backend=backend)
    x = torch.randn(shape)
    z_eager = layer(x)
    (g_eager,) = torch.autograd.grad(z_eager.square().sum(), layer.weight_param.v)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    z_comp = compiled(x)
    (g_comp,) = torch.autograd.grad(z_comp.square().sum(), layer.weight_param.v)
    torch.testing.assert_close(z_comp, z_eager)
    torch.testing.assert_close(g_comp, g_eager)


def test_compile_sees_layers_with_different_tols():
    # Dynamo makes a float symbolic once it has seen two values of it in the same code (two layers
    # with different tols): the spec must never be formatted or rebuilt inside the traced forward.
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    for tol in (1e-6, 1e-7, 1e-5):
        layer = pk.PCDEQLinear(8, "tanh", tol=tol)
        z = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
        torch.testing.assert_close(z, layer(x))
        assert layer.stats.forward_residual.max() < tol


CHECK_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
CHECK_LAYOUTS = ["dense", "dense-transposed", "conv", "conv-channels-last"]


def _check_case(layout, dtype, gen):
    """u, weight, z0 of a layout (non-contiguous and channels-last ones included), nonnegative, then
    with entries spoiled at random: a NaN, +-inf, a negative (-0.0 counts as >= 0), zero rows."""
    if layout.startswith("dense"):
        u, w, z0 = torch.rand(5, 7, generator=gen), torch.rand(7, 7, generator=gen), torch.rand(5, 7, generator=gen)
        if layout == "dense-transposed":
            u, z0 = torch.rand(7, 5, generator=gen).T, torch.rand(7, 5, generator=gen).T
    else:
        u, w, z0 = torch.rand(3, 4, 2, 5, generator=gen), torch.rand(4, 4, 3, 3, generator=gen), torch.rand(3, 4, 2, 5, generator=gen)
        if layout == "conv-channels-last":
            u, z0 = (t.contiguous(memory_format=torch.channels_last) for t in (u, z0))
    u, w, z0 = (t.to(dtype) for t in (u, w, z0))
    spoil = torch.randint(0, 8, (), generator=gen).item()
    target = (u, w, z0)[torch.randint(0, 3, (), generator=gen).item()]
    flat_index = torch.randint(0, target.numel(), (), generator=gen).item()
    value = {0: float("nan"), 1: float("inf"), 2: -float("inf"), 3: -1e-3, 4: -0.0}.get(spoil)
    if value is not None:
        target[tuple(int(i) for i in torch.unravel_index(torch.tensor(flat_index), target.shape))] = value
    elif spoil == 5:
        u[torch.randint(0, u.shape[0], (), generator=gen).item()] = 0.0  # a zero row
    return u, w, z0


@pytest.mark.skipif(not ops._CPU_CHECKS, reason="needs the compiled extension (its pcdeq_C check ops)")
@pytest.mark.parametrize("layout", CHECK_LAYOUTS)
@pytest.mark.parametrize("dtype", CHECK_DTYPES, ids=str)
def test_compiled_value_check_agrees_with_the_torch_one(layout, dtype, monkeypatch):
    gen = torch.Generator().manual_seed(CHECK_DTYPES.index(dtype) * 10 + CHECK_LAYOUTS.index(layout))
    verdicts = set()
    for _ in range(40):
        u, w, z0 = _check_case(layout, dtype, gen)
        for z0_ in (z0, None):
            for zero_at_zero in (True, False):
                compiled = torch.ops.pcdeq_C.inputs_are_valid(u, w, z0_, zero_at_zero)
                monkeypatch.setattr(ops, "_CPU_CHECKS", False)
                expected = ops._values_are_valid(u, w, z0_, zero_at_zero)
                monkeypatch.setattr(ops, "_CPU_CHECKS", True)
                assert compiled == expected, (u, w, z0_, zero_at_zero)
                verdicts.add(compiled)
    assert verdicts == {True, False}  # both answers were exercised


@pytest.mark.skipif(not ops._CPU_CHECKS, reason="needs the compiled extension (its pcdeq_C check ops)")
@pytest.mark.parametrize("dtype", CHECK_DTYPES, ids=str)
def test_compiled_solve_report_agrees_with_its_definition(dtype):
    """solve_report's bits: 1 when a sample did not converge, 2 when a converged sample with r > 0 has
    ||x|| (tol - r) <= r eps (the stopping rule's guard decided), computed here in float64."""
    gen = torch.Generator().manual_seed(CHECK_DTYPES.index(dtype))
    tol, eps = 1e-4, 1e-5
    seen = set()
    for _ in range(200):
        scale = 10.0 ** torch.randint(-9, 2, (), generator=gen).item()  # the guard matters below ~1e-5
        state = (torch.rand(6, 9, generator=gen, dtype=torch.float64) * scale).to(dtype)
        converged = torch.rand(6, generator=gen) < (1.0 if torch.rand((), generator=gen) < 0.5 else 0.8)
        residual = (torch.rand(6, generator=gen, dtype=torch.float64) * tol).float()
        residual[torch.rand(6, generator=gen) < 0.1] = 0.0
        residual[torch.rand(6, generator=gen) < 0.02] *= 30  # r >= tol (the batch rule's converged samples)
        norm = state.double().norm(dim=1)
        r = residual.double()
        guard = converged & (r > 0) & (norm * (tol - r) <= r * eps)
        expected = int(not converged.all()) | (2 if guard.any() else 0)
        assert torch.ops.pcdeq_C.solve_report(state, converged, residual, tol, eps) == expected
        seen.add(expected)
    assert seen == {0, 1, 2, 3}
