"""The compiled CUDA backend (pcdeq_kernels._C built with csrc/cuda/, backend="cuda") against the reference.

Two kinds of tests:

- GPU tests (skipped, with the reason, where the backend cannot run: no GPU, or an extension built
  without its CUDA kernels). Both loops are tested on every shape: the single-launch solve and the
  stepwise one, forced with PCDEQ_CUDA_PATH; shapes B in {1, 7, 33, 300}, d in {1, 5, 80, 131, 300,
  1100} cover one and many row blocks, ragged tiles and d beyond what the single launch holds in
  shared memory (where it falls back to the stepwise loop).
- A compile test that needs no GPU: nvcc builds csrc/cuda/*.cu for sm_80 and sm_90 with -Xptxas -v,
  and no kernel may spill. Skipped only without nvcc or without torch's CUDA headers.

Tolerances, each with its reason:

- float64 (CUDA cores) and float32 with torch's default "highest" matmul precision (exact fp32 on CUDA
  cores) are held to the CPU backend's rules (tests/test_backend_cpu.py): only the summation order
  differs from the reference's cuBLAS matmul, so iterates agree to 1e-12 (float64, tol 1e-9) and 1e-5
  (float32, tol 1e-4), and iteration counts are equal except off by one where the residual sits
  within 1e-6 (float64) or 1e-2 (float32) relative of tol at the earlier count.
- tf32 (float32 with matmul precision "high"), float16, bfloat16: the matmul sees the state (and W,
  for tf32) rounded to the operand type, unit roundoff u = 2^-11 (tf32: 10-bit mantissa; fp16) or
  2^-8 (bf16), accumulating in fp32; half inputs are otherwise solved in float32 as the reference
  solves them. A relative perturbation of at most ~2u per product moves the fixed point by at most
  2u / (1 - c), c the sample's contraction bound (reference.global_contraction_rate: large when W's row sum
  is near 1, as in some d = 1 problems). Allowed, per sample (per batch, Frobenius, for stop="batch"):
  ||x - x_ref|| <= (4u + 2 tol) / (1 - c) ||x_ref||, the 2 tol for the two solves' stopping errors,
  plus 4 * 2^-24 / (1 - c) per entry for fp16 (its subnormal spacing: tiny injections give entries
  near 1e-6, where fp16 has no relative precision left). Against the float64 solution (tf32) or the
  reference's float32 solve of the same half inputs (fp16/bf16). A simulation of these iterations
  in PyTorch (operands rounded as the kernels round them) stays below 0.4 of this bound on every
  shape, activation and stop rule here.
- With rounded operands the counts cannot match the exact ones step for step (the rounded iteration
  becomes stationary, residual exactly 0, once the state stops changing at the operand's precision):
  a rounded solve never takes more than 25% + 2 more steps than the exact one.
"""

import functools
import math
import os
import re
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

import pcdeq_kernels as pk
from pcdeq_kernels import backends, reference
from pcdeq_kernels.backends import cuda
from pcdeq_kernels.problem import Problem

from problems import (
    ALL_ACTIVATIONS,
    adjoint_spec,
    assert_within_rounding,
    check_activation_accuracy,
    check_adjoint_solve,
    check_bad_inputs_raise_clear_errors,
    check_empty_batch,
    check_forward_solve,
    check_gradients_match_the_reference_backend,
    check_inputs_not_modified_and_strides_do_not_matter,
    check_max_iter_cap,
    check_nan_residual_never_counts_as_converged,
    check_ragged_convergence,
    check_z0_is_the_starting_point,
    cuda_matmul_fp32_precision,
    float32_matmul_precision,
    make_problem,
    not_slower,
    opcheck_both_ops,
    ragged_problem,
    spec,
)

ROOT = Path(__file__).parents[1]
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))

gpu = pytest.mark.skipif(
    not cuda.is_available(), reason=f"the CUDA backend cannot run here: {cuda.unavailable_reason()}"
)

SHAPES = [(b, d) for b in (1, 7, 33, 300) for d in (1, 5, 80, 131, 300, 1100)]
PATHS = ("single", "stepwise")
TF32_RTOL = 5e-3  # c ~ 0.5 problems: (4u + 2 tol) / (1 - c) ~ 4e-3


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """Force the single-launch or the stepwise loop (read by the C++ side at every call)."""
    monkeypatch.setenv("PCDEQ_CUDA_PATH", request.param)
    return request.param


@pytest.fixture
def fp32_highest():
    """torch's default: exact fp32 matmuls (the CUDA backend then uses CUDA cores)."""
    with float32_matmul_precision("highest"):
        yield


@pytest.fixture
def fp32_tf32():
    """tf32 matmuls for float32 (precision "high")."""
    with float32_matmul_precision("high"):
        yield


def _gpu(*tensors):
    return tuple(t.cuda() for t in tensors)


@functools.lru_cache(maxsize=None)
def _adjoint_problem_f64(batch, dim, activation, seed):
    """(v, W, D) in float64 on the GPU: D at the forward fixed point (solved there, once per problem)."""
    u, w = _gpu(*make_problem(batch, dim, activation, dtype=torch.float64, seed=seed))
    z, *_ = reference.forward_solve(u, w, activation, tol=1e-13, max_iter=2000)
    D = reference.activation_derivative_at(z, u, w, activation)
    v = torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return v.cuda(), w, D


def _adjoint_problem(batch, dim, activation, dtype, seed=0):
    return tuple(t.to(dtype) for t in _adjoint_problem_f64(batch, dim, activation, seed))


def _sample_rel_err(x, x_ref):
    x, x_ref = x.double(), x_ref.double()
    return ((x - x_ref).norm(dim=1) / x_ref.norm(dim=1).clamp_min(1e-30)).max().item()


# --- exact arithmetic: float64 and float32 at "highest" ------------------------------------------


@gpu
@pytest.mark.parametrize("stop", ["sample", "batch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
def test_forward_solve_matches_reference(activation, dtype, stop, path, fp32_highest):
    for seed, (batch, dim) in enumerate(SHAPES):
        u, w = _gpu(*make_problem(batch, dim, activation, dtype=dtype, seed=seed, weight_scale=0.8))
        got, _ = check_forward_solve(cuda, u, w, activation, stop)
        assert got[3].all()


@gpu
@pytest.mark.parametrize("stop", ["sample", "batch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
def test_adjoint_solve_matches_reference(activation, dtype, stop, path, fp32_highest):
    for seed, (batch, dim) in enumerate(SHAPES):
        v, w, D = _adjoint_problem(batch, dim, activation, dtype, seed=seed)
        check_adjoint_solve(cuda, v, w, D, stop)


@gpu
@pytest.mark.parametrize("stop", ["sample", "batch"])
def test_ragged_convergence(stop, path):
    # rows with very different injections stop at very different steps: frozen rows must keep their
    # state and count while the others go on (in shared memory, or between the two global buffers)
    u, w = _gpu(*ragged_problem(300, 131))
    check_ragged_convergence(cuda, u, w, stop)


@gpu
def test_max_iter_cap_and_no_convergence(path):
    for batch, dim in ((9, 17), (70, 200)):
        u, w = _gpu(*make_problem(batch, dim, "tanh", weight_scale=0.9))
        for max_iter in (1, 6, 9, 17):  # around the stepwise loop's every-8-steps host read
            check_max_iter_cap(cuda, u, w, "tanh", max_iter)


@gpu
@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
def test_nan_residual_never_counts_as_converged(path, activation):
    u, w = make_problem(40, 6, activation)
    u[2, 3] = math.nan  # the op layer above rejects this; the backend must still follow the rule
    u, w = _gpu(u, w)
    check_nan_residual_never_counts_as_converged(cuda, u, w, activation)


@gpu
@pytest.mark.parametrize("stop", ["sample", "batch"])
def test_float32_squared_norms_do_not_overflow(stop, path, fp32_highest):
    # As in tests/test_backend_cpu.py: v scaled by 2^70 scales every adjoint iterate exactly, and their
    # squares (2^140) overflow float32; the per-row sums are kept in double, so the residual is that of
    # the solve at 2^20 (where the +1e-5 guard is as negligible): the same steps, the state scaled.
    # 12 rows: one CTA, so that the single launch also runs the batch rule.
    v, w, D = _adjoint_problem(12, 80, "tanh", torch.float32)
    h, its, res, conv = cuda.adjoint_solve(v * 2.0**20, w, D, adjoint_spec(1e-5, 300, stop))
    h_big, its_big, res_big, conv_big = cuda.adjoint_solve(v * 2.0**70, w, D, adjoint_spec(1e-5, 300, stop))
    assert conv.all() and (its > 3).all()
    assert torch.equal(its_big, its) and torch.equal(conv_big, conv) and torch.equal(h_big * 2.0**-50, h)
    torch.testing.assert_close(res_big, res, rtol=1e-6, atol=0)


@gpu
@pytest.mark.parametrize("stop", ["sample", "batch"])
def test_z0_is_the_starting_point(stop, path):
    u, w = make_problem(7, 80, "relu6", weight_scale=0.8)
    z0 = torch.rand_like(u) * 3
    u, w, z0 = _gpu(u, w, z0)
    check_z0_is_the_starting_point(cuda, u, w, "relu6", z0, stop)


# --- rounded operands: tf32, float16, bfloat16 -----------------------------------------------------
# The module docstring's bound and step-count rule: assert_within_rounding and not_slower (tests/problems.py).


@gpu
@pytest.mark.parametrize("stop", ["sample", "batch"])
@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
def test_tf32_forward_and_adjoint(activation, stop, path, fp32_tf32):
    for seed, (batch, dim) in enumerate(SHAPES):
        u, w = _gpu(*make_problem(batch, dim, activation, dtype=torch.float64, seed=seed))
        its64 = reference.forward_solve(u, w, activation, tol=1e-4, max_iter=500, stop=stop)[1]
        z_star = reference.forward_solve(u, w, activation, tol=1e-13, max_iter=3000)[0]
        c = reference.global_contraction_rate(z_star, u, activation)
        z, its, res, conv = cuda.forward_solve(u.float(), w.float(), None, spec(activation, 1e-4, 500, stop))
        assert z.dtype == torch.float32 and res.dtype == torch.float32
        assert conv.all(), (batch, dim)  # from z0 = 0 the rounded iteration is monotone: it must stop
        assert_within_rounding(z, z_star, c, "tf32", stop)
        assert not_slower(its, its64), (batch, dim, its, its64)
        v, w64, D = _adjoint_problem(batch, dim, activation, torch.float64, seed=seed)
        h_star = reference.adjoint_solve(v, w64, D, tol=1e-13, max_iter=3000)[0]
        h, *_ = cuda.adjoint_solve(v.float(), w64.float(), D.float(), adjoint_spec(1e-4, 500, stop))
        assert_within_rounding(h, h_star, c, "tf32", stop)


# torch's two ways to ask for exact or tf32 float32 matmuls: the legacy global setting and the newer
# per-backend attribute (torch >= 2.9), after which the legacy getter raises; ops_cuda.cu reads either.
PRECISION_APIS = {
    "legacy": {"exact": lambda: float32_matmul_precision("highest"), "tf32": lambda: float32_matmul_precision("high")},
    "fp32_precision": {"exact": lambda: cuda_matmul_fp32_precision("ieee"), "tf32": lambda: cuda_matmul_fp32_precision("tf32")},
}


@gpu
@pytest.mark.parametrize("api", sorted(PRECISION_APIS))
def test_fp32_precision_setting_picks_the_engine(api):
    # the same float32 problem: exact to 1e-5 at "highest", tf32-perturbed (but within 5e-3) at "high"
    u, w = _gpu(*make_problem(33, 300, "tanh", dtype=torch.float64, weight_scale=0.5))
    z_star = reference.forward_solve(u, w, "tanh", tol=1e-13, max_iter=2000)[0]
    with PRECISION_APIS[api]["exact"]():
        exact = cuda.forward_solve(u.float(), w.float(), None, spec("tanh", 1e-7, 500, "sample"))[0]
    with PRECISION_APIS[api]["tf32"]():
        tf32 = cuda.forward_solve(u.float(), w.float(), None, spec("tanh", 1e-7, 500, "sample"))[0]
    assert _sample_rel_err(exact, z_star) < 1e-5
    assert 1e-6 < _sample_rel_err(tf32, z_star) <= TF32_RTOL


@gpu
@pytest.mark.parametrize("stop", ["sample", "batch"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
def test_half_precision_forward_and_adjoint(activation, dtype, stop, path):
    for seed, (batch, dim) in enumerate(SHAPES):
        u, w = _gpu(*make_problem(batch, dim, activation, dtype=dtype, seed=seed))
        z, its, res, conv = cuda.forward_solve(u, w, None, spec(activation, 1e-4, 500, stop))
        z_ref, its_ref, *_ = reference.forward_solve(u, w, activation, tol=1e-4, max_iter=500, stop=stop)
        c = reference.global_contraction_rate(reference.forward_solve(u, w, activation, tol=1e-6, max_iter=3000)[0], u, activation)
        assert z.dtype == dtype and res.dtype == torch.float32 and its.dtype == torch.int32
        assert conv.all(), (batch, dim)
        assert_within_rounding(z, z_ref, c, dtype, stop)
        assert not_slower(its, its_ref), (batch, dim, its, its_ref)
        v, w64, D = _adjoint_problem(batch, dim, activation, torch.float64, seed=seed)
        v, wh, D = v.to(dtype), w64.to(dtype), D.to(dtype)
        h, *_ = cuda.adjoint_solve(v, wh, D, adjoint_spec(1e-4, 500, stop))
        h_ref, *_ = reference.adjoint_solve(v, wh, D, tol=1e-4, max_iter=500, stop=stop)
        assert h.dtype == dtype
        assert_within_rounding(h, h_ref, c, dtype, stop)


# --- the epilogue's activation math ---------------------------------------------------------------


# CUDA's libdevice bounds (CUDA C Programming Guide, mathematical functions): tanhf 2 ulp, expf 2 ulp,
# IEEE division and sqrt (no --use_fast_math); float64 tanh and exp 1 ulp. softsign is two rounded
# operations (1.5); relu6 exact; sigmoid is exp then up to three rounded operations (x < 0: e / (1+e)
# as e * (1 / (1 + e))): 2 + 1.5 in float32, 1 + 1.5 in float64. float64 is compared with torch's own
# float64, itself up to 1 ulp off the exact value, so 1 ulp is added there.
MAX_ULPS = {
    torch.float32: {"tanh": 2.0, "softsign": 1.5, "relu6": 0.0, "sigmoid": 3.5},
    torch.float64: {"tanh": 2.0, "softsign": 2.5, "relu6": 0.0, "sigmoid": 3.5},
}


@gpu
@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_activation_accuracy(activation, dtype, path, fp32_highest):
    check_activation_accuracy(activation, dtype, "cuda", MAX_ULPS[dtype][activation])


# --- inputs, errors, dispatch ------------------------------------------------------------------------


@gpu
def test_inputs_are_not_modified_and_strides_do_not_matter(path):
    u, w = _gpu(*make_problem(12, 40, "tanh"))
    check_inputs_not_modified_and_strides_do_not_matter(cuda, u, w, _adjoint_problem(12, 40, "tanh", torch.float64))


@gpu
def test_empty_batch():
    check_empty_batch(torch.zeros(0, 5, device="cuda"), torch.rand(5, 5, device="cuda") * 0.1)


@gpu
def test_bad_inputs_raise_clear_errors():
    u, w = _gpu(*make_problem(3, 4, "tanh"))
    check_bad_inputs_raise_clear_errors(u, w)
    with pytest.raises(RuntimeError, match="the cuda backend needs CUDA tensors"):
        torch.ops.pcdeq_C.forward_solve(u, w.cpu(), None, 0, 1e-4, 10, False)


@gpu
def test_bad_path_variable(monkeypatch):
    u, w = _gpu(*make_problem(3, 4, "tanh"))
    monkeypatch.setenv("PCDEQ_CUDA_PATH", "fastest")
    with pytest.raises(RuntimeError, match="PCDEQ_CUDA_PATH=fastest: choose auto, single or stepwise"):
        torch.ops.pcdeq_C.forward_solve(u, w, None, 0, 1e-4, 10, False)


@gpu
def test_forced_single_launch_that_cannot_run_says_so(monkeypatch):
    """PCDEQ_CUDA_PATH=single where one launch cannot solve the problem (the batch rule over several row
    blocks; a row block's state beyond shared memory) runs the stepwise loop, with a warning that says why."""
    monkeypatch.setenv("PCDEQ_CUDA_PATH", "single")
    u, w = _gpu(*make_problem(40, 8, "tanh"))
    with pytest.warns(UserWarning, match="stop='batch' over more than one 16-row block"):
        z, its, _, conv = torch.ops.pcdeq_C.forward_solve(u, w, None, 0, 1e-9, 200, True)
    z_ref = reference.forward_solve(u, w, "tanh", tol=1e-9, max_iter=200, stop="batch")[0]
    assert conv.all() and len(set(its.tolist())) == 1
    torch.testing.assert_close(z, z_ref, rtol=1e-10, atol=1e-12)
    u, w = _gpu(*make_problem(3, 2000, "tanh"))  # float64: 16 x 2004 x 8 bytes x 2 buffers = 513 KB
    with pytest.warns(UserWarning, match="bytes of shared memory"):
        torch.ops.pcdeq_C.forward_solve(u, w, None, 0, 1e-9, 200, False)


@gpu
def test_auto_picks_cuda_for_dense_cuda_problems():
    assert pk.available_backends()["cuda"]
    assert backends.resolve(pk.SolveSpec(), Problem("dense", "cuda", torch.float32, 1)) == "cuda"
    u, w = _gpu(*make_problem(3, 4, "tanh"))
    assert pk.fixed_point(u, w)[1].backend == "cuda"  # conv: tests/test_backend_cuda_conv.py


@gpu
@pytest.mark.parametrize("stop", ["sample", "batch"])
@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
def test_gradients_match_the_reference_backend_float64(activation, stop, path):
    u, w = _gpu(*make_problem(6, 37, activation, weight_scale=0.7))
    check_gradients_match_the_reference_backend("cuda", u, w, activation, stop)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gradients_in_lower_precision(dtype, fp32_tf32):
    # a training-like call (paper size, tf32 or bf16): gradients close to the float64 ones
    u, w = make_problem(64, 80, "tanh", weight_scale=0.5)
    weights = torch.randn(64, 80, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    u, w, weights = _gpu(u, w, weights)
    grads = {}
    for backend, dt in (("cuda", dtype), ("reference", torch.float64)):
        uu, ww = u.to(dt).requires_grad_(), w.to(dt).requires_grad_()
        z, _ = pk.fixed_point(uu, ww, "tanh", tol=1e-6 if dt == torch.float64 else 1e-4, backend=backend)
        grads[backend] = [g.double() for g in torch.autograd.grad((z.double() * weights).sum(), (uu, ww))]
    rtol = 4e-2 if dtype == torch.bfloat16 else 1e-2  # (4u + 2 tol) / (1 - c), c ~ 0.5, and its effect on D
    for got, want in zip(grads["cuda"], grads["reference"]):
        assert ((got - want).norm() / want.norm()).item() < rtol


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck_both_ops(dtype):
    u, w = _gpu(*make_problem(3, 5, "tanh", dtype=dtype))
    opcheck_both_ops([u], w, [None, torch.rand_like(u)], _adjoint_problem(3, 5, "tanh", dtype))


# --- compiling the kernels without a GPU ---------------------------------------------------------------


def _toolkit():
    """A CUDA toolkit root with nvcc and the runtime headers (not a wrapper script named nvcc)."""
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda-13.0", "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").exists() and (Path(root) / "include" / "cuda_runtime.h").exists():
            return Path(root)
    return None


def _torch_include_dirs():
    from torch.utils import cpp_extension

    try:  # torch >= 2.6
        return cpp_extension.include_paths(device_type="cuda")
    except TypeError:
        return cpp_extension.include_paths(cuda=True)
    except OSError:  # torch found no CUDA_HOME of its own: its headers are enough, the toolkit's are added
        return cpp_extension.include_paths()


# every kernel is on the hot path of some solve
HOT_KERNELS = (
    "dense_solve_block_kernel", "dense_step_kernel", "dense_finalize_kernel", "dense_gather_kernel",
    "conv_epilogue_kernel", "conv_status_init_kernel",
)


def _ptxas_report(text):
    """{(kernel, arch): (registers, spill stores, spill loads, smem bytes)} from nvcc -Xptxas -v output."""
    report = {}
    current = None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\w+)' for '(sm_\d+)'", line)
        if m:
            current = m.groups()
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current:
            report.setdefault(current, [0, 0, 0, 0])[1:3] = [int(m.group(1)), int(m.group(2))]
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and current:
            smem = re.search(r"(\d+) bytes smem", line)
            entry = report.setdefault(current, [0, 0, 0, 0])
            entry[0] = int(m.group(1))
            entry[3] = int(smem.group(1)) if smem else 0
    return {k: tuple(v) for k, v in report.items()}


def test_cuda_sources_compile_for_sm80_and_sm90_without_spills(tmp_path):
    toolkit = _toolkit()
    if toolkit is None:
        pytest.skip("no CUDA toolkit (nvcc and its headers) under CUDA_HOME, CUDA_PATH or /usr/local/cuda*")
    torch_dirs = _torch_include_dirs()
    # a CPU build of torch ships c10/cuda/*.h but not the configured c10/cuda/impl/cuda_cmake_macros.h
    if not any((Path(d) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists() for d in torch_dirs):
        pytest.skip(f"torch {torch.__version__} is not a CUDA build: its CUDA headers are incomplete")
    aten = next(Path(d) / "ATen" / "ATen.h" for d in torch_dirs if (Path(d) / "ATen" / "ATen.h").exists())
    std = "c++20" if "C++20 or later" in aten.read_text() else "c++17"
    flags = [
        f"-std={std}", "-O3", "-lineinfo", "-Xptxas", "-v", "--expt-relaxed-constexpr",
        "--compiler-options", "-fPIC",
        # as torch's BuildExtension compiles CUDA sources
        "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-D__CUDA_NO_HALF2_OPERATORS__", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
    ]
    includes = [ROOT / "csrc" / "include", ROOT / "csrc", toolkit / "include", *torch_dirs, sysconfig.get_paths()["include"]]
    flags += [f"-I{d}" for d in includes]
    assert CUDA_SOURCES, "no csrc/cuda/*.cu"
    jobs = max(1, min(len(CUDA_SOURCES), os.cpu_count() or 1))
    outputs = {}
    pending = list(CUDA_SOURCES)
    running = []
    while pending or running:
        while pending and len(running) < jobs:
            src = pending.pop(0)
            cmd = [str(toolkit / "bin" / "nvcc"), "-c", str(src), "-o", str(tmp_path / (src.stem + ".o")), *flags]
            running.append((src, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
        src, proc = running.pop(0)
        out, _ = proc.communicate()
        assert proc.returncode == 0, f"nvcc failed on {src.name}:\n{out[-6000:]}"
        outputs[src.name] = out
    report = _ptxas_report("\n".join(outputs.values()))
    hot = {key: value for key, value in report.items() if any(name in key[0] for name in HOT_KERNELS)}
    for arch in ("sm_80", "sm_90"):
        for name in HOT_KERNELS:
            assert any(name in k and a == arch for k, a in hot), (name, arch, sorted(report))
    spilling = {key: value for key, value in hot.items() if value[1] or value[2]}
    assert not spilling, f"kernels spill registers: {spilling}"
    # the step kernel's static shared memory stays under the 48 KB default (no opt-in needed)
    assert all(value[3] <= 48 * 1024 for key, value in hot.items() if "dense_step_kernel" in key[0])
