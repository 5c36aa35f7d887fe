"""The Triton backend (pcdeq_kernels/triton/dense.py) against the reference solver.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1); with ``TRITON_INTERPRET=0`` on a CUDA machine the same tests run the compiled
kernels on the GPU, and the GPU-only tests (bfloat16, tf32, timing) run too. The ahead-of-time tests
compile every kernel configuration for sm_80 and sm_90 on any machine and check registers, spills and
shared memory.

Tolerances: float32 states agree with the reference to a few ulp amplified by the contraction
(``1/(1-c)``, c about 0.5 here), checked at 2e-6 relative to the largest entry; iteration counts
agree exactly except where a residual sits within 1% of ``tol`` (summation order decides those).
"""

import contextlib
import dataclasses
import inspect
import math
import os
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import pcdeq_kernels as pk  # noqa: E402
from pcdeq_kernels import reference  # noqa: E402
from pcdeq_kernels.activations import ACTIVATIONS, ADJOINT_ID, get_activation, map_ids  # noqa: E402
from pcdeq_kernels.backends import triton as triton_backend  # noqa: E402
from pcdeq_kernels.problem import Problem  # noqa: E402
from pcdeq_kernels.spec import SolveSpec  # noqa: E402
from pcdeq_kernels.triton import aot, dense, launch, limits  # noqa: E402
from pcdeq_kernels.triton.epilogue import activation, epilogue  # noqa: E402

from problems import (  # noqa: E402
    ALL_ACTIVATIONS,
    adjoint_spec,
    cuda_matmul_fp32_precision,
    float32_matmul_precision,
    make_problem,
    spec,
)

pytestmark = pytest.mark.skipif(not triton_backend.is_available(), reason=triton_backend.unavailable_reason())

# Compiled kernels need CUDA tensors; interpreted ones run on CPU tensors.
DEVICE = "cpu" if launch.INTERPRETED else "cuda"
GPU = pytest.mark.skipif(launch.INTERPRETED or not torch.cuda.is_available(),
                         reason="needs a CUDA GPU and TRITON_INTERPRET=0")
AOT_FULL = os.environ.get("PCDEQ_AOT_FULL") == "1"  # the whole product, not the default plan
NO_NVIDIA_TOOLS = "Triton's NVIDIA tools (ptxas, cuobjdump) are not installed"

# The three ways a solve runs: (path, precision) that select each kernel for the shapes used below
# (exact float32 matmuls, so that compiled runs on a GPU meet the same tolerances).
KERNEL_ROUTES = {"onchip": ("single", "ieee"), "scratch": ("single", "ieee"), "stepwise": ("stepwise", "ieee"),
                 "split": ("split", "ieee")}  # split: torch.mm, then the step kernel as its epilogue
# Ragged shapes: B and d are not multiples of any block size; scratch's d exceeds the on-chip limit.
SHAPES = {"onchip": (37, 100), "scratch": (20, 150), "stepwise": (37, 100), "split": (37, 100)}
assert SHAPES["onchip"][1] <= dense.ONCHIP_MAX_DIM < SHAPES["scratch"][1]


def _problem(batch, dim, activation, dtype=torch.float32, **kw):
    """make_problem's problem with the rows of u scaled from 0.1x to 20x: rows then saturate the
    activation to different degrees and stop at different iterations (freezing gets exercised)."""
    u, w = make_problem(batch, dim, activation, dtype=torch.float32, **kw)
    u = u * torch.logspace(-1, math.log10(20), batch, dtype=u.dtype)[:, None]
    return u.to(DEVICE, dtype), w.to(DEVICE, dtype)


def _adjoint_problem(batch, dim, activation, dtype=torch.float32, seed=0):
    """v, W, D with D = act'(z* W^T + u) at the reference fixed point, as the implicit backward builds it."""
    u, w = _problem(batch, dim, activation, dtype, seed=seed)
    z = reference.forward_solve(u, w, activation, tol=1e-6, max_iter=500)[0]
    D = reference.activation_derivative_at(z, u, w, activation).to(dtype)
    v = torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
    return v, w, D


def _residual_history(step, x0, n):
    """Per-row residuals of the first n steps of ``x <- step(x)`` (rows are independent: freezing a row
    does not change the others, so these are the residuals each row sees until it stops)."""
    out, x = [], x0
    for _ in range(n):
        x_next = step(x)
        out.append(reference.relative_residual(x_next, x))
        x = x_next
    return torch.stack(out, 1)


def _batch_residual_history(step, x0, n):
    """The whole-batch residual of the first n steps of ``x <- step(x)`` (stop="batch": every row stops
    on it), one row per sample, in ``_residual_history``'s layout."""
    out, x = [], x0
    for _ in range(n):
        x_next = step(x)
        out.append(reference.batch_relative_residual(x_next, x))
        x = x_next
    return torch.stack(out).expand(x0.shape[0], n)


def _assert_counts_match(its, ref_its, history, tol):
    """Equal iteration counts, except off by one where the deciding residual is within 1% of tol."""
    its, ref_its = its.cpu().long(), ref_its.cpu().long()
    for row in torch.nonzero(its != ref_its).flatten().tolist():
        k = min(its[row], ref_its[row]).item()
        assert abs(its[row] - ref_its[row]) == 1, f"row {row}: {its[row]} vs reference {ref_its[row]} iterations"
        r = history[row, k - 1].item()
        assert abs(r - tol) <= 1e-2 * tol, f"row {row}: counts differ but its residual {r:.6g} is not at tol {tol}"


def _assert_close_rel(x, ref, rel):
    err = ((x.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()
    assert err <= rel, f"relative error {err:.3g} > {rel:.3g}"


def _assert_solve_matches(out, ref, history, tol, rel):
    x, its, res, conv = out
    rx, rits, rres, rconv = ref
    assert x.dtype == rx.dtype and x.shape == rx.shape
    assert its.dtype == torch.int32 and res.dtype == torch.float32 and conv.dtype == torch.bool
    _assert_counts_match(its, rits, history, tol)
    same = its.cpu() == rits.cpu()
    assert torch.equal(conv.cpu()[same], rconv.cpu()[same])
    _assert_close_rel(x[same.to(x.device)], rx[same.to(rx.device)], rel)
    if not same.all():  # one step apart: a step moves the state by about tol (relative)
        _assert_close_rel(x[~same.to(x.device)], rx[~same.to(rx.device)], 10 * tol)
    # The last residual measures the difference of two nearly equal iterates, so rounding the state
    # (about 6e-8 relative) moves it by about 6e-8 / (r sqrt(d)) relative: 1e-3 near tol, more below.
    assert ((res.cpu() - rres.cpu()).abs()[same] <= 2e-3 * rres.cpu()[same] + 1e-2 * tol).all()


def assert_stops_at_non_finite(out, ref, bad, stop, history, tol, rel):
    """``reference.iterate``'s rule for a sample ``bad`` whose iterate is not finite from its first step:
    its residual is NaN and it stops after that step, unconverged; under the per-sample rule the others
    go on (``_assert_solve_matches`` against the reference, with the per-sample ``history``); under the
    batch rule the batch residual is NaN and every sample stops after that step, unconverged, with its
    own residual. The states are NaN exactly where the reference's are."""
    x, its, res, conv = (t.cpu() for t in out)
    assert res[bad].isnan() and its[bad] == 1 and not conv[bad]
    assert torch.equal(x.isnan(), ref[0].cpu().isnan())
    good = torch.arange(len(its)) != bad
    if stop == "batch":
        assert (its == 1).all() and not conv.any()
    else:
        assert (its[good] > 1).all()
    _assert_solve_matches(tuple(t[good] for t in (x, its, res, conv)), tuple(t.cpu()[good] for t in ref),
                          history.cpu()[good], tol, rel)


# --------------------------------------------------------------------------------------- activations


@triton.jit
def _activation_probe(x_ptr, y_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    tl.store(y_ptr + offs, activation(x, ACT), mask=mask)


@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
def test_activation_helper_matches_the_table(activation):
    """The jit helper every kernel uses vs activations.py, including tiny, huge and negative inputs."""
    act = get_activation(activation)
    x = torch.cat([torch.linspace(-30, 30, 2001), torch.logspace(-30, 1, 200), -torch.logspace(-30, 1, 200),
                   torch.tensor([0.0, 0.624999, 0.625, 0.625001, -0.625, 5.999, 6.0, 6.001, 88.0, 1e4])])
    x = torch.cat([x, torch.tensor([math.nan, math.inf, -math.inf])])  # NaN stays NaN, as in torch
    x = x.float().to(DEVICE)
    y = torch.empty_like(x)
    _activation_probe[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), ACT=act.kernel_id, BLOCK=1024)
    expected = act.fn(x.double())
    assert torch.equal(y.isnan(), expected.isnan())
    infinite = x.isinf() & ~expected.isnan()
    assert torch.equal(y[infinite].double(), expected[infinite])  # the limits, exactly
    y, expected, x = y[x.isfinite()], expected[x.isfinite()], x[x.isfinite()]
    # a few float32 ulp relative to the value, down to tiny |x| (tanh's polynomial branch). On a GPU
    # tl.exp(x) is ex2.approx(x * log2(e)): about 2 ulp, plus |x| * 6e-8 from rounding that product
    # (it matters only for sigmoid at very negative x, which pcDEQ's nonnegative inputs never reach).
    bound = (5e-7 + 1e-7 * x.double().abs()) * expected.abs()
    assert ((y.double() - expected).abs() <= bound + 1e-38).all()


@triton.jit
def _epilogue_probe(acc_ptr, bias_ptr, scale_ptr, y_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    acc = tl.load(acc_ptr + offs, mask=mask)
    bias = tl.load(bias_ptr + offs, mask=mask)
    scale = tl.load(scale_ptr + offs, mask=mask)
    tl.store(y_ptr + offs, epilogue(acc, bias, scale, ACT), mask=mask)


@pytest.mark.parametrize("name, map_id", list(map_ids().items()))
def test_every_map_of_the_table_runs_through_the_epilogue(name, map_id):
    """Every id of the map table (not a list written here: a new entry is tested by itself) runs through
    the kernels' shared epilogue as that map's tail: ``D * (acc + v)`` for the adjoint, ``act(acc + u)``
    for each activation. An activation added to the table without its branch in ``epilogue.activation``
    fails here, at its static_assert."""
    gen = torch.Generator().manual_seed(map_id + 10)
    acc, bias = (torch.randn(300, generator=gen) * 4 for _ in range(2))
    scale = torch.rand(300, generator=gen)
    acc, bias, scale = acc.to(DEVICE), bias.to(DEVICE), scale.to(DEVICE)
    y = torch.empty_like(acc)
    _epilogue_probe[(triton.cdiv(300, 128),)](acc, bias, scale, y, 300, ACT=map_id, BLOCK=128)
    pre = acc.double() + bias.double()
    expected = scale.double() * pre if map_id == ADJOINT_ID else ACTIVATIONS[name].fn(pre)
    torch.testing.assert_close(y.double(), expected, rtol=1e-6, atol=1e-7)


def _messages(exc) -> str:
    """An exception's message and those of its causes (a compile error wraps the static_assert's)."""
    out = []
    while exc is not None:
        out.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(out)


def test_an_id_outside_the_table_is_a_compile_time_error():
    """``epilogue.activation`` has one branch per activation and no default: any other id fails its
    ``tl.static_assert`` (the interpreter raises it when it runs the kernel, a GPU build when it
    compiles it) instead of computing some activation."""
    unknown = max(map_ids().values()) + 1
    x = torch.ones(16, device=DEVICE)
    with pytest.raises(Exception) as info:
        _activation_probe[(1,)](x, torch.empty_like(x), 16, ACT=unknown, BLOCK=16)
    assert "unknown activation id" in _messages(info.value)


# Compiled without the interpreter in a process of its own (a kernel compiles for real only when
# defined outside it): every map id of the table for sm_80 and sm_90, then an id outside it.
_COMPILE_EVERY_MAP_ID = """
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pcdeq_kernels.activations import map_ids
from pcdeq_kernels.triton.epilogue import epilogue


@triton.jit
def probe(x_ptr, y_ptr, ACT: tl.constexpr):
    offs = tl.arange(0, 16)
    x = tl.load(x_ptr + offs)
    tl.store(y_ptr + offs, epilogue(x, x, x, ACT))


def compile_for(act, capability):
    src = ASTSource(probe, {"x_ptr": "*fp32", "y_ptr": "*fp32", "ACT": "constexpr"}, constexprs={"ACT": act})
    return triton.compile(src, target=GPUTarget("cuda", capability, 32))


for act in map_ids().values():
    for capability in (80, 90):
        compile_for(act, capability)
    print("compiled", act)
try:
    compile_for(max(map_ids().values()) + 1, 90)
except Exception as e:
    messages = []
    while e is not None:
        messages.append(str(e))
        e = e.__cause__ or e.__context__
    print("refused" if any("unknown activation id" in m for m in messages) else "failed otherwise: " + messages[-1])
else:
    print("compiled the unknown id")
"""


@pytest.mark.skipif(not aot.cuobjdump_available(), reason=NO_NVIDIA_TOOLS)
def test_every_map_id_compiles_for_sm80_and_sm90_and_no_other_id_does(tmp_path):
    """The same with the real compiler (the static_assert is a compile-time error there too), under
    whichever Triton runs the tests (scripts/check_triton_aot.sh selects this test as well)."""
    script = tmp_path / "compile_every_map_id.py"
    script.write_text(_COMPILE_EVERY_MAP_ID)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), root) if p)
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.split("\n")
    assert [line for line in lines if line.startswith("compiled ")] == [f"compiled {i}" for i in map_ids().values()]
    assert "refused" in lines, done.stdout


# --------------------------------------------------------------------------------------- fused steps


@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_step_and_its_row_norms(activation, dtype):
    u, w = _problem(37, 100, activation, dtype)
    z = torch.rand(37, 100, device=DEVICE)
    z_next, diff_sq, norm_sq = dense.forward_step(z, u, w, activation)
    ref = get_activation(activation).fn(z.double() @ w.double().T + u.double())
    _assert_close_rel(z_next, ref, 2e-6)
    torch.testing.assert_close(diff_sq.double(), (ref - z.double()).square().sum(1), rtol=1e-5, atol=0)
    torch.testing.assert_close(norm_sq.double(), ref.square().sum(1), rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_adjoint_step_and_its_row_norms(dtype):
    v, w, D = _adjoint_problem(37, 100, "tanh", dtype)
    h = torch.randn(37, 100, device=DEVICE)
    h_next, diff_sq, norm_sq = dense.adjoint_step(h, v, w, D)
    ref = D.double() * (h.double() @ w.double() + v.double())
    _assert_close_rel(h_next, ref, 2e-6)
    torch.testing.assert_close(diff_sq.double(), (ref - h.double()).square().sum(1), rtol=1e-5, atol=0)
    torch.testing.assert_close(norm_sq.double(), ref.square().sum(1), rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------------------- the solves


@pytest.mark.parametrize("kernel", list(KERNEL_ROUTES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
def test_forward_solve_matches_reference(kernel, dtype, activation):
    path, precision = KERNEL_ROUTES[kernel]
    batch, dim = SHAPES[kernel]
    u, w = _problem(batch, dim, activation, dtype)
    tol = 1e-4
    out = dense.forward_solve(u, w, None, spec(activation, tol, 200, "sample"), path=path, precision=precision)
    ref = reference.forward_solve(u, w, activation, tol=tol, max_iter=200)
    act = get_activation(activation).fn
    u32, w32 = u.float(), w.float()
    history = _residual_history(lambda z: act(z @ w32.T + u32), torch.zeros_like(u32), int(ref[1].max()) + 1)
    # half precision: both round the same float32 solution to the output dtype; allow one half ulp
    rel = 2e-6 if dtype == torch.float32 else float(torch.finfo(dtype).eps)
    _assert_solve_matches(out, ref, history, tol, rel)
    assert ref[3].all() and len(set(ref[1].tolist())) > 1  # the rows stop at different iterations


@pytest.mark.parametrize("kernel", list(KERNEL_ROUTES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("activation", ["tanh", "sigmoid"])
def test_adjoint_solve_matches_reference(kernel, dtype, activation):
    path, precision = KERNEL_ROUTES[kernel]
    batch, dim = SHAPES[kernel]
    v, w, D = _adjoint_problem(batch, dim, activation, dtype)
    tol = 1e-4
    out = dense.adjoint_solve(v, w, D, adjoint_spec(tol, 200, "sample"), path=path, precision=precision)
    ref = reference.adjoint_solve(v, w, D, tol=tol, max_iter=200)
    v32, w32, d32 = v.float(), w.float(), D.float()
    history = _residual_history(lambda h: d32 * (h @ w32 + v32), d32 * v32, int(ref[1].max()) + 1)
    rel = 2e-6 if dtype == torch.float32 else float(torch.finfo(dtype).eps)
    _assert_solve_matches(out, ref, history, tol, rel)


def config_id(config):
    """``16x64x32/4w3s``: a config's block sizes, warps and stages."""
    regs = f"/{config.maxnreg}r" if config.maxnreg else ""
    return "x".join(map(str, config.kwargs.values())) + f"/{config.num_warps}w{config.num_stages}s{regs}"


def config_precision(config, d_pad=128):
    """The matmul precision a config serves (``_prune_tiles`` / ``_onchip_fits``): K blocks of 16 are
    the ieee configs; on chip, ieee if the tile fits it."""
    if "BLOCK_K" in config.kwargs:
        return "ieee" if config.kwargs["BLOCK_K"] <= 16 else "tf32"
    return "ieee" if dense._onchip_fits(config.kwargs["BLOCK_B"], d_pad, config.num_warps, "ieee") else "tf32"


def assert_forced_config_solve(out, ref, history, tol, precision):
    """A solve with one config forced vs the reference: to rounding (ieee, and tf32 configs under the
    interpreter, whose dot is exact); tf32 on a GPU as test_tf32_on_gpu allows."""
    if precision == "tf32" and not launch.INTERPRETED:
        assert out[3].all() and (out[1].cpu() - ref[1].cpu()).abs().max() <= 3
        _assert_close_rel(out[0], ref[0], 2e-3)
    else:
        _assert_solve_matches(out, ref, history, tol, 2e-6)


FORCED_CONFIG_CASES = [(kernel, config, path) for kernel, configs in dense.CONFIGS.items() for config in configs
                       for path in (("stepwise", "split") if kernel == "step" else ("single",))]


@pytest.mark.parametrize("kernel, config, path", FORCED_CONFIG_CASES,
                         ids=lambda v: config_id(v) if isinstance(v, triton.Config) else v)
def test_every_config_solves_like_the_reference(kernel, config, path, monkeypatch):
    """Every config the autotuner may pick on a GPU (the interpreter otherwise runs only the first),
    forced, solves a ragged problem forward and backward as the reference does: the masks and loops
    hold for every tile shape, the step kernel's also as the split path's epilogue."""
    monkeypatch.setattr(dense.KERNELS[kernel], "configs", [config])  # one config: launched as it is
    monkeypatch.setattr(dense.KERNELS[kernel], "best_config", None, raising=False)
    batch, dim = SHAPES[path if path != "single" else kernel]
    precision = config_precision(config)

    def solving():  # the split path's torch.mm follows torch's setting, which must match the config's
        return cuda_matmul_fp32_precision(precision) if path == "split" else contextlib.nullcontext()

    u, w = _problem(batch, dim, "tanh")
    with solving():
        out = dense.forward_solve(u, w, None, spec("tanh", 1e-4, 200, "sample"), path=path, precision=precision)
    ref = reference.forward_solve(u, w, "tanh", tol=1e-4, max_iter=200)
    history = _residual_history(lambda z: torch.tanh(z @ w.T + u), torch.zeros_like(u), int(ref[1].max()) + 1)
    assert_forced_config_solve(out, ref, history, 1e-4, precision)
    v, w, D = _adjoint_problem(batch, dim, "sigmoid")
    with solving():
        out = dense.adjoint_solve(v, w, D, adjoint_spec(1e-4, 200, "sample"), path=path, precision=precision)
    ref = reference.adjoint_solve(v, w, D, tol=1e-4, max_iter=200)
    history = _residual_history(lambda h: D * (h @ w + v), D * v, int(ref[1].max()) + 1)
    assert_forced_config_solve(out, ref, history, 1e-4, precision)
    assert dense.KERNELS[kernel].best_config is config


@pytest.mark.parametrize("kernel", list(KERNEL_ROUTES))
def test_small_and_single_row_problems(kernel):
    """Shapes far below every block size (d = 1, B = 1) go through the masks alone."""
    path, precision = KERNEL_ROUTES[kernel]
    for batch, dim in [(1, 1), (3, 5), (1, 40)]:
        u, w = _problem(batch, dim, "softsign")
        out = dense.forward_solve(u, w, None, spec("softsign", 1e-5, 100, "sample"), path=path, precision=precision)
        ref = reference.forward_solve(u, w, "softsign", tol=1e-5, max_iter=100)
        act = get_activation("softsign").fn
        history = _residual_history(lambda z: act(z @ w.T + u), torch.zeros_like(u), int(ref[1].max()) + 1)
        _assert_solve_matches(out, ref, history, 1e-5, 2e-6)


def _stops(path):
    """The stopping rules a path takes (``stop="batch"`` is stepwise or split only)."""
    return ("sample", "batch") if path in ("stepwise", "split") else ("sample",)


@pytest.mark.parametrize("kernel", list(KERNEL_ROUTES))
@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
def test_nan_never_counts_as_converged(kernel, activation):
    """A NaN in u (the op layer rejects it; the kernels must still follow the rule) makes that row's
    first iterate and residual NaN: the row stops after that step, unconverged, while the others go on
    and converge as the reference's do; under the batch rule (stepwise, split) the batch residual is NaN
    and every row stops after that step, unconverged (tests/problems.py's
    check_nan_residual_never_counts_as_converged, which the compiled backends run). Whatever the
    activation: relu6 included (a clamp written with min/max would turn the NaN into a finite row)."""
    path, precision = KERNEL_ROUTES[kernel]
    batch, dim = SHAPES[kernel]
    u, w = _problem(batch, dim, activation)
    u[2, 3] = math.nan
    act = get_activation(activation).fn
    history = _residual_history(lambda z: act(z @ w.T + u), torch.zeros_like(u), 30)
    for stop in _stops(path):
        out = dense.forward_solve(u, w, None, spec(activation, 1e-4, 30, stop), path=path, precision=precision)
        ref = reference.forward_solve(u, w, activation, tol=1e-4, max_iter=30, stop=stop)
        assert_stops_at_non_finite(out, ref, 2, stop, history, 1e-4, 2e-6)
        assert out[3].cpu()[torch.arange(batch) != 2].all() == (stop == "sample")


@pytest.mark.parametrize("kernel", list(KERNEL_ROUTES))
def test_huge_states_do_not_overflow_the_residual(kernel):
    """The adjoint from v scaled by 1e20 (the backward of a 1e20-scaled gradient): the squares of its
    state overflow float32, so the per-row (and batch) sums are float64: residuals, counts and flags are
    the reference's, under either stopping rule (float32 sums overflow: inf/inf = NaN at the first step,
    or finite/inf = 0, "converged", near the end). And a row whose state is NaN from h_0 (a NaN in v)
    stops at its first step, unconverged, the others going on (the batch: all stopping there)."""
    path, precision = KERNEL_ROUTES[kernel]
    batch, dim = SHAPES[kernel]
    v, w, D = _adjoint_problem(batch, dim, "tanh")
    v = v * 1e20
    step = lambda h: D * (h @ w + v)  # noqa: E731
    for stop in _stops(path):
        out = dense.adjoint_solve(v, w, D, adjoint_spec(1e-4, 200, stop), path=path, precision=precision)
        ref = reference.adjoint_solve(v, w, D, tol=1e-4, max_iter=200, stop=stop)
        assert (out[0].abs().amax(1) > 1e19).all() and out[3].all() and (out[1] > 2).all()
        history = (_residual_history if stop == "sample" else _batch_residual_history)(step, D * v, 200)
        _assert_solve_matches(out, ref, history, 1e-4, 2e-6)
    v[2, 3] = math.nan
    history = _residual_history(step, D * v, 200)
    for stop in _stops(path):
        out = dense.adjoint_solve(v, w, D, adjoint_spec(1e-4, 200, stop), path=path, precision=precision)
        ref = reference.adjoint_solve(v, w, D, tol=1e-4, max_iter=200, stop=stop)
        assert_stops_at_non_finite(out, ref, 2, stop, history, 1e-4, 2e-6)


@pytest.mark.parametrize("kernel", list(KERNEL_ROUTES))
def test_z0_and_max_iter_are_honoured(kernel):
    path, precision = KERNEL_ROUTES[kernel]
    batch, dim = SHAPES[kernel]
    u, w = _problem(batch, dim, "relu6", weight_scale=0.9)
    z0 = torch.rand(batch, dim, device=DEVICE)
    out = dense.forward_solve(u, w, z0, spec("relu6", 1e-9, 4, "sample"), path=path, precision=precision)
    ref = reference.forward_solve(u, w, "relu6", tol=1e-9, max_iter=4, z0=z0)
    assert (out[1] == 4).all() and not out[3].any()  # nobody converges in 4 steps at tol 1e-9
    _assert_close_rel(out[0], ref[0], 2e-6)
    torch.testing.assert_close(out[2], ref[2], rtol=1e-4, atol=0)


def test_stop_batch_matches_reference():
    """stop='batch' (stepwise only): one count for all rows, the reference's iterate and residuals."""
    u, w = _problem(37, 100, "tanh")
    history = _batch_residual_history(lambda z: torch.tanh(z @ w.T + u), torch.zeros_like(u), 200)
    for max_iter in (200, 5):
        out = dense.forward_solve(u, w, None, spec("tanh", 1e-4, max_iter, "batch"))
        ref = reference.forward_solve(u, w, "tanh", tol=1e-4, max_iter=max_iter, stop="batch")
        assert len(set(out[1].tolist())) == 1
        _assert_solve_matches(out, ref, history, 1e-4, 2e-6)
    v, w, D = _adjoint_problem(37, 100, "tanh")
    out = dense.adjoint_solve(v, w, D, adjoint_spec(1e-4, 200, "batch"))
    ref = reference.adjoint_solve(v, w, D, tol=1e-4, max_iter=200, stop="batch")
    history = _batch_residual_history(lambda h: D * (h @ w + v), D * v, 200)
    assert out[3].all() and len(set(out[1].tolist())) == 1
    _assert_solve_matches(out, ref, history, 1e-4, 2e-6)


def test_stepwise_results_do_not_depend_on_how_often_the_host_checks():
    u, w = _problem(20, 40, "sigmoid")
    runs = [dense.forward_solve(u, w, None, spec("sigmoid", 1e-4, 40, "sample"), path="stepwise", check_every=k)
            for k in (1, 3, 40)]  # 40: never checks, runs max_iter steps (the late ones only copy)
    assert runs[0][3].all() and runs[0][1].max() < 40
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_autotuning_can_be_turned_off(monkeypatch):
    """PCDEQ_TRITON_AUTOTUNE=0: each launch gets the first config that suits it (no compiling and timing
    of the others); 1 (the default): all that suit it; anything else is an error."""
    from pcdeq_kernels.triton import conv

    named = {"B": 1000, "d": 300, "D_PAD": 64, "PRECISION": "tf32", "C": 64, "H": 16, "Wd": 16}  # D_PAD 64: several tf32 fits
    prunes = [(dense._prune_onchip, dense.ONCHIP_CONFIGS), (dense._prune_tiles, dense.STEP_CONFIGS),
              (dense._prune_tiles, dense.SCRATCH_CONFIGS), (conv._prune_tiles, conv.STEP_CONFIGS)]
    monkeypatch.delenv("PCDEQ_TRITON_AUTOTUNE", raising=False)
    every = [prune(configs, named) for prune, configs in prunes]
    assert all(len(kept) > 1 for kept in every)
    monkeypatch.setenv("PCDEQ_TRITON_AUTOTUNE", "0")
    assert [prune(configs, named) for prune, configs in prunes] == [kept[:1] for kept in every]
    assert dense.aot_variants("step", "tf32") == every[1]  # the AOT plan covers every config regardless
    monkeypatch.setenv("PCDEQ_TRITON_AUTOTUNE", "off")
    with pytest.raises(ValueError, match="PCDEQ_TRITON_AUTOTUNE must be 0 or 1"):
        dense._prune_tiles(dense.STEP_CONFIGS, named)



def test_autotuners_time_nothing_when_autotuning_is_off(monkeypatch):
    """Every autotuner times its configs with ``launch.benchmark``: with autotuning off it neither runs nor
    times the lone config left (Triton 3.6 would time it: seconds per test run, minutes under
    compute-sanitizer); on, it hands the launch to Triton's own timer."""
    from pcdeq_kernels.triton import conv

    kernels = [dense._solve_onchip_kernel, dense._solve_scratch_kernel, dense._step_kernel,
               conv._solve_scratch_kernel, conv._step_kernel]
    assert all(kernel.do_bench is launch.benchmark for kernel in kernels)

    def run():
        raise AssertionError("the lone config was run for timing")

    monkeypatch.setenv("PCDEQ_TRITON_AUTOTUNE", "0")
    assert launch.benchmark(run, (0.5, 0.2, 0.8)) == [0.0, 0.0, 0.0]

    timed = []

    class Driver:  # stands in for Triton's GPU driver, whose benchmarker is triton.testing.do_bench
        class active:
            @staticmethod
            def get_benchmarker():
                return lambda call, quantiles: timed.append((call, quantiles)) or [1.0, 0.9, 1.1]

    monkeypatch.setattr(launch, "driver", Driver)
    monkeypatch.setenv("PCDEQ_TRITON_AUTOTUNE", "1")
    assert launch.benchmark(run, (0.5, 0.2, 0.8)) == [1.0, 0.9, 1.1]
    assert timed == [(run, (0.5, 0.2, 0.8))]


def test_stepwise_state_planes_start_aligned():
    """Both planes start 128 bytes apart at least (Triton specialises a launch on 16-byte aligned
    pointers: misaligned odd planes would compile every step kernel twice), whatever the shape."""
    for shape in [(3, 5), (37, 100), (1, 1), (2, 7, 5, 3)]:
        x = launch.state_planes(shape, DEVICE)
        assert x.shape == (2, *shape) and x.dtype == torch.float32
        assert x[0].is_contiguous() and x[1].is_contiguous()
        assert (x[1].data_ptr() - x[0].data_ptr()) % 128 == 0 and x[1].data_ptr() - x[0].data_ptr() >= x[0].numel() * 4


def test_empty_batch_is_answered_by_the_op_layer():
    """An empty batch never reaches a backend (the op layer answers it); a launcher given one says so
    rather than launching an empty grid."""
    u, w = _problem(0, 8, "tanh")
    z, stats = pk.fixed_point(u, w, "tanh", backend="triton")
    assert z.shape == (0, 8) and stats.forward_iterations.shape == (0,)
    with pytest.raises(ValueError, match="empty batch is answered by the op layer"):
        dense.forward_solve(u, w, None, SolveSpec())
    with pytest.raises(ValueError, match="empty batch is answered by the op layer"):
        dense.adjoint_step(u, u, w, u)


# ------------------------------------------------------------------------------------ path & options


def test_choose_path(monkeypatch):
    monkeypatch.delenv("PCDEQ_TRITON_PATH", raising=False)
    monkeypatch.setattr(launch, "num_sms", lambda device: 132)
    assert dense.choose_path(64, 80) == "single"  # on chip
    assert dense.choose_path(64, 4096) == "stepwise"  # 4 row blocks cannot fill 132 SMs
    assert dense.choose_path(16 * 132, 4096) == "single"  # the row blocks alone fill them
    assert dense.choose_path(64, 80, stop="batch") == "stepwise"
    assert dense.choose_path(64, 4096, path="single") == "single"
    monkeypatch.setenv("PCDEQ_TRITON_PATH", "stepwise")
    assert dense.choose_path(64, 80) == "stepwise"
    with pytest.raises(ValueError, match="stop='batch' needs the stepwise path"):
        dense.choose_path(64, 80, stop="batch", path="single")
    with pytest.raises(ValueError, match="Triton solve path must be one of"):
        dense.choose_path(64, 80, path="fast")
    assert dense.choose_path(64, 80, stop="batch", path="split") == "split"
    assert dense.choose_path(16 * 132, 4096, path="auto") != "split"  # only when asked for, until measured


def test_split_path_matmul_follows_torch_precision(monkeypatch):
    """The split path's matmul is torch.mm: a precision other than torch's setting is an error, not
    silently ignored; conv problems have no split path."""
    from pcdeq_kernels.triton import conv

    monkeypatch.delenv("PCDEQ_TRITON_PRECISION", raising=False)
    u, w = _problem(5, 20, "tanh")
    assert torch.get_float32_matmul_precision() == "highest"
    with pytest.raises(ValueError, match="set torch's precision instead"):
        dense.forward_solve(u, w, None, SolveSpec(), path="split", precision="tf32")
    out = dense.forward_solve(u, w, None, spec("tanh", 1e-4, 200, "batch"), path="split")
    ref = reference.forward_solve(u, w, "tanh", tol=1e-4, max_iter=200, stop="batch")
    history = _batch_residual_history(lambda z: torch.tanh(z @ w.T + u), torch.zeros_like(u), 200)
    _assert_solve_matches(out, ref, history, 1e-4, 2e-6)
    assert out[3].all()
    uc, wc = make_problem(2, 3, "tanh", conv_hw=(4, 5), dtype=torch.float32)
    with pytest.raises(ValueError, match="for dense problems"):
        conv.forward_solve(uc.to(DEVICE), wc.to(DEVICE), None, SolveSpec(), path="split")


def test_split_path_is_torch_mm_then_the_epilogue(monkeypatch):
    """The split path really splits: one torch.mm per step, and every step launch reads its product
    (FUSED_MATMUL=False); the stepwise path never calls torch.mm. Otherwise a silent fallback to the
    fused kernel would pass every other split test."""
    mms, launches, real_mm, real_launch = [], [], torch.mm, dense._launch_step
    monkeypatch.setattr(torch, "mm", lambda *a, **k: mms.append(1) or real_mm(*a, **k))

    def launch_step(*args, **kwargs):
        call = inspect.signature(real_launch).bind(*args, **kwargs)
        call.apply_defaults()
        launches.append((call.arguments["compute"], call.arguments["pre"] is not None))
        return real_launch(*args, **kwargs)

    monkeypatch.setattr(dense, "_launch_step", launch_step)
    u, w = _problem(9, 40, "tanh")
    _, its, _, _ = dense.forward_solve(u, w, None, spec("tanh", 1e-4, 200, "sample"), path="split", check_every=1)
    computing = [reads_pre for compute, reads_pre in launches if compute]
    assert len(mms) == len(computing) == int(its.max()) + 1 and all(computing)
    mms.clear()
    launches.clear()
    dense.forward_solve(u, w, None, spec("tanh", 1e-4, 200, "sample"), path="stepwise")
    assert not mms and launches and not any(reads_pre for _, reads_pre in launches)


def test_split_path_takes_a_weight_that_requires_grad():
    """torch.mm(out=) refuses operands that require grad: the split path detaches its own (the solve
    is below autograd; the gradient is the adjoint solve's business)."""
    u, w = _problem(9, 40, "tanh")
    w = w.clone().requires_grad_()
    split = dense.forward_solve(u, w, None, spec("tanh", 1e-4, 200, "sample"), path="split")
    stepwise = dense.forward_solve(u, w.detach(), None, spec("tanh", 1e-4, 200, "sample"), path="stepwise")
    assert torch.equal(split[1], stepwise[1])
    _assert_close_rel(split[0], stepwise[0], 2e-6)


def test_precision_reads_either_of_torchs_apis(monkeypatch):
    """torch's newer TF32 switch (torch.backends.cuda.matmul.fp32_precision) makes the legacy getter
    raise: the Triton backend reads the newer one, which the legacy setter writes as well."""
    from pcdeq_kernels.precision import torch_matmul_precision

    monkeypatch.delenv("PCDEQ_TRITON_PRECISION", raising=False)
    assert torch_matmul_precision() == dense.resolve_precision() == "ieee"  # torch's default
    with cuda_matmul_fp32_precision("tf32"):
        with pytest.raises(RuntimeError):
            torch.get_float32_matmul_precision()  # why the legacy getter cannot be used
        assert torch_matmul_precision() == dense.resolve_precision() == "tf32"
        u, w = _problem(5, 20, "tanh")
        z, _, _, conv = dense.forward_solve(u, w, None, spec("tanh", 1e-4, 200, "sample"), path="split",
                                            precision="tf32")
        assert conv.all()
        with pytest.raises(ValueError, match=r"torch's float32 matmul precision \('tf32' now\)"):
            dense.forward_solve(u, w, None, SolveSpec(), path="split", precision="ieee")
    assert torch.get_float32_matmul_precision() == "highest"  # restored: the legacy getter works again
    with float32_matmul_precision("medium"):
        assert torch_matmul_precision() == "tf32"


def test_precision_follows_torch_unless_overridden(monkeypatch):
    monkeypatch.delenv("PCDEQ_TRITON_PRECISION", raising=False)
    with float32_matmul_precision("highest"):
        assert dense.resolve_precision() == "ieee"
    with float32_matmul_precision("high"):
        assert dense.resolve_precision() == "tf32"
        assert dense.resolve_precision("ieee") == "ieee"
        monkeypatch.setenv("PCDEQ_TRITON_PRECISION", "ieee")
        assert dense.resolve_precision() == "ieee"
    with pytest.raises(ValueError, match="input precision must be one of"):
        dense.resolve_precision("fp8")


def test_bad_inputs_raise_clear_errors(monkeypatch):
    """What the launchers check themselves: the options are the SolveSpec's (validated when it is
    built), the rest is what the kernels need (dtypes, shapes, 32-bit counts and offsets)."""
    u, w = _problem(4, 6, "tanh")
    tanh = SolveSpec()
    with pytest.raises(TypeError, match="does not take float64.*backend='reference'"):
        dense.forward_solve(u.double(), w.double(), None, tanh)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        dense.forward_solve(u.int(), w, None, tanh)
    with pytest.raises(ValueError, match=r"need x \(B, d\) and weight \(d, d\)"):
        dense.forward_solve(u, w[:5], None, tanh)
    with pytest.raises(ValueError, match="z0 has shape"):
        dense.forward_solve(u, w, u[:2], tanh)
    with pytest.raises(ValueError, match="check_every must be"):
        dense.forward_solve(u, w, None, tanh, path="stepwise", check_every=0)
    # a spec may ask for up to 2**63 - 1 steps; the kernels count in 32 bits
    with pytest.raises(ValueError, match="32-bit step counter"):
        dense.forward_solve(u, w, None, spec("tanh", 1e-4, limits.MAX_ITER + 1, "sample"))
    with pytest.raises(ValueError, match="32-bit step counter"):
        dense.adjoint_solve(u, w, u, adjoint_spec(1e-4, limits.MAX_ITER + 1, "sample"))
    with pytest.raises(TypeError, match="take a pcdeq_kernels.SolveSpec, got str"):
        dense.forward_solve(u, w, None, "tanh")  # the launchers' old signature
    with pytest.raises(ValueError, match="unknown activation"):
        dense.forward_step(u, u, w, "gelu")  # the single-step helpers take an activation's name
    monkeypatch.setattr(limits, "MAX_DIM", 5)
    with pytest.raises(ValueError, match="32-bit indexing"):
        dense.forward_solve(u, w, None, tanh)


def test_an_unknown_map_id_is_refused_before_anything_launches(monkeypatch):
    """Every launcher, dense and conv, solves and single steps, forward and adjoint, checks its map id
    against the table (``launch.map_id``) before any kernel compiles or runs: here the table's lookup
    is made to return an id outside it, as a wrongly edited entry would."""
    from pcdeq_kernels.triton import conv

    ran = []
    for module in (dense, conv):
        for kernel in module.KERNELS.values():
            monkeypatch.setattr(kernel, "run", lambda *args, **kwargs: ran.append(args))
    u, w = _problem(5, 20, "tanh")
    uc, wc = (t.to(DEVICE) for t in make_problem(2, 3, "tanh", conv_hw=(4, 5), dtype=torch.float32))
    tanh = SolveSpec()
    forward = [lambda path=path: dense.forward_solve(u, w, None, tanh, path=path)
               for path in ("single", "stepwise", "split")]
    forward += [lambda path=path: conv.forward_solve(uc, wc, None, tanh, path=path) for path in ("single", "stepwise")]
    forward += [lambda: dense.forward_step(u, u, w, "tanh"), lambda: conv.forward_step(uc, uc, wc, "tanh")]
    adjoint = [lambda path=path: dense.adjoint_solve(u, w, u, tanh, path=path) for path in ("single", "stepwise")]
    adjoint += [lambda path=path: conv.adjoint_solve(uc, wc, uc, tanh, path=path) for path in ("single", "stepwise")]
    adjoint += [lambda: dense.adjoint_step(u, u, w, u), lambda: conv.adjoint_step(uc, uc, wc, uc)]
    stray = max(map_ids().values()) + 1
    monkeypatch.setattr(launch, "get_activation", lambda name: dataclasses.replace(ACTIVATIONS[name], kernel_id=stray))
    monkeypatch.setattr(launch, "ADJOINT_ID", min(map_ids().values()) - 1)
    for call in forward + adjoint:
        with pytest.raises(ValueError, match="unknown map id"):
            call()
    with pytest.raises(ValueError, match="unknown map id"):
        launch.Iteration(stray, 1e-4, 10, "sample")
    assert not ran


def test_backend_module_interface(monkeypatch):
    assert triton_backend.NAME == "triton" and pk.available_backends()["triton"]
    for kind in ("dense", "conv"):
        assert triton_backend.unsupported_reason(SolveSpec(), Problem(kind, DEVICE, torch.float32, 6)) == ""
    u, w = _problem(6, 10, "tanh")
    with pytest.raises(ValueError, match="float64"):
        pk.fixed_point(u.double(), w.double(), backend="triton")
    z, its, res, conv = triton_backend.forward_solve(u, w, None, spec("tanh", 1e-4, 200, "sample"))
    assert conv.all() and z.dtype == u.dtype
    # without a GPU and without the interpreter the backend says how to get one
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(triton_backend, "_cuda", lambda: False)
    assert not triton_backend.is_available()
    assert triton_backend.unsupported_reason(SolveSpec(), Problem("dense", "cpu", torch.float32, 6))
    assert "TRITON_INTERPRET=1" in triton_backend.unavailable_reason()
    monkeypatch.setattr(triton_backend, "_triton_installed", lambda: False)
    assert "pip install triton" in triton_backend.unavailable_reason()


def test_every_launch_is_serialised_and_made_on_the_tensors_device(monkeypatch):
    """Each autotuned kernel (dense and conv) launches inside ``launch.launching``: holding the launch
    lock (the autotuner's state is shared by every caller) and, for CUDA tensors, with their device
    current (Triton launches on the current device). The device half is checked on a stand-in."""
    from pcdeq_kernels.triton import conv

    launches = []
    for module in (dense, conv):
        for name, kernel in module.KERNELS.items():
            def run(*args, _run=kernel.run, _name=f"{module.__name__}.{name}", **kwargs):
                assert launch.LAUNCH_LOCK.locked(), f"{_name} launched outside launch.launching"
                launches.append(_name)
                return _run(*args, **kwargs)

            monkeypatch.setattr(kernel, "run", run)
    u, w = _problem(5, 20, "tanh")
    for path in ("single", "stepwise"):
        dense.forward_solve(u, w, None, SolveSpec(), path=path)
    dense.forward_solve(*_problem(3, 140, "tanh"), None, SolveSpec(), path="single")
    uc, wc = make_problem(2, 3, "tanh", conv_hw=(4, 5), dtype=torch.float32)
    for path in ("single", "stepwise"):
        conv.forward_solve(uc.to(DEVICE), wc.to(DEVICE), None, SolveSpec(), path=path)
    assert {n.rsplit(".", 1)[1] for n in launches} == {"onchip", "scratch", "step"}
    assert sum(n.startswith(conv.__name__) for n in launches) >= 2

    entered = []
    monkeypatch.setattr(torch.cuda, "device", lambda device: entered.append(device) or contextlib.nullcontext())
    with launch.launching(torch.device("cuda", 1)):
        assert launch.LAUNCH_LOCK.locked()
    assert entered == [torch.device("cuda", 1)] and not launch.LAUNCH_LOCK.locked()


@GPU
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_another_gpu_than_the_current_one():
    u, w = (t.to("cuda:1") for t in _problem(37, 100, "tanh"))
    with torch.cuda.device(0):
        for path in ("single", "stepwise"):
            z, its, *_ = dense.forward_solve(u, w, None, SolveSpec(), path=path, precision="ieee")
            ref = reference.forward_solve(u, w, "tanh")
            assert z.device == u.device and torch.equal(its, ref[1])


# -------------------------------------------------------------------------------- fixed_point & grads


@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
@pytest.mark.parametrize("shape,stop", [((24, 30), "sample"), ((9, 140), "sample"), ((24, 30), "batch")])
def test_fixed_point_gradients_match_reference(activation, shape, stop):
    u, w = _problem(*shape, activation)
    results = {}
    for backend in ("triton", "reference"):
        uu, ww = u.clone().requires_grad_(), w.clone().requires_grad_()
        z, stats = pk.fixed_point(uu, ww, activation, tol=1e-5, max_iter=300, stop=stop, backend=backend)
        probe = torch.linspace(-1, 1, z.numel(), device=DEVICE).view_as(z)
        (z * probe).sum().backward()
        results[backend] = (z.detach(), uu.grad, ww.grad, stats)
    (z, gu, gw, stats), (rz, rgu, rgw, rstats) = results["triton"], results["reference"]
    assert stats.backend == "triton"
    assert torch.equal(stats.forward_iterations.cpu(), rstats.forward_iterations.cpu())
    assert (stats.backward_iterations - rstats.backward_iterations).abs().max() <= 1
    _assert_close_rel(z, rz, 5e-6)
    _assert_close_rel(gu, rgu, 2e-5)
    _assert_close_rel(gw, rgw, 2e-5)


# ----------------------------------------------------------------------------------- GPU-only checks


@GPU
@pytest.mark.parametrize("kernel", list(KERNEL_ROUTES))
def test_bfloat16_on_gpu(kernel):
    path, precision = KERNEL_ROUTES[kernel]
    u, w = _problem(*SHAPES[kernel], "tanh", torch.bfloat16)
    out = dense.forward_solve(u, w, None, spec("tanh", 1e-4, 200, "sample"), path=path, precision=precision)
    ref = reference.forward_solve(u, w, "tanh", tol=1e-4, max_iter=200)
    assert out[0].dtype == torch.bfloat16 and out[3].all()
    assert (out[1] - ref[1]).abs().max() <= 1
    _assert_close_rel(out[0], ref[0], float(torch.finfo(torch.bfloat16).eps))


@GPU
@pytest.mark.parametrize("kernel", list(KERNEL_ROUTES))
def test_tf32_on_gpu(kernel):
    """tf32 rounds the state to 10 mantissa bits in the matmul: close to, not equal to, the ieee solve
    (equal would mean tf32 was not used)."""
    path, _ = KERNEL_ROUTES[kernel]
    u, w = _problem(*SHAPES[kernel], "tanh")
    with cuda_matmul_fp32_precision("tf32"):  # tf32 in torch.mm too (the split path's matmul)
        out = dense.forward_solve(u, w, None, spec("tanh", 1e-4, 200, "sample"), path=path, precision="tf32")
    ieee = dense.forward_solve(u, w, None, spec("tanh", 1e-4, 200, "sample"), path=path, precision="ieee")
    ref = reference.forward_solve(u, w, "tanh", tol=1e-4, max_iter=200)
    assert out[3].all() and (out[1] - ref[1]).abs().max() <= 3
    _assert_close_rel(out[0], ref[0], 2e-3)
    assert not torch.equal(out[0], ieee[0])


@GPU
def test_single_launch_beats_the_reference_loop_on_gpu():
    """At the paper's size (B=64, d=80) the reference pays launches and host reads per iteration."""
    u, w = _problem(64, 80, "tanh")

    def best_of(fn, n=20):
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return min(times)

    fused = best_of(lambda: dense.forward_solve(u, w, None, SolveSpec()))
    loop = best_of(lambda: reference.forward_solve(u, w, "tanh"))
    print(f"B=64 d=80 tanh forward solve: triton {fused * 1e3:.3f} ms, reference {loop * 1e3:.3f} ms")
    assert fused < loop


# ------------------------------------------------------------------------------ ahead-of-time compiles

@pytest.mark.skipif(not aot.cuobjdump_available(), reason=NO_NVIDIA_TOOLS)
def test_every_kernel_configuration_compiles_for_sm80_and_sm90_without_spills():
    """Compile every configuration (dense.aot_plan; PCDEQ_AOT_FULL=1 for the whole product) with the
    real compiler, outside the interpreter, two processes in parallel; check spills and shared memory."""
    results = aot.compile_plan_in_workers("dense", full=AOT_FULL)
    kernels = {(r["kernel"], r["precision"], r["capability"], r["aligned"]) for r in results}
    assert len(kernels) == 3 * 2 * 2 * 2 and len(results) > 200  # kernels, precisions, targets, alignments
    assert {r["has_x0"] for r in results if r["kernel"] != "step"} == {False, True}
    assert_compiles_fit(results)


def assert_compiles_fit(results):
    """The AOT compiles (``aot.compile_plan_in_workers``) cover every map of the table, spill nothing
    beyond ptxas's occupancy trade (``aot.spills_accepted``) and fit in shared memory."""
    assert {r["act_id"] for r in results} == set(map_ids().values())
    spilled = [r for r in results if not aot.spills_accepted(r)]
    assert not spilled, "register spills:\n" + "\n".join(map(str, spilled))
    too_big = [r for r in results if r["shared"] > aot.SHARED_MEMORY_LIMIT[r["capability"]]]
    assert not too_big, "shared memory over the limit:\n" + "\n".join(map(str, too_big))
    worst = max(results, key=lambda r: r["registers"])
    traded = sum(r["spill_bytes"] != 0 for r in results)
    print(f"{len(results)} compiles, {traded} with ptxas's occupancy spill; most registers: {worst['registers']} "
          f"({worst['kernel']} {worst['config']})")
