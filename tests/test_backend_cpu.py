"""The compiled C++ CPU backend (pcdeq_kernels._C, backend="cpu") against the reference solver.

Skipped as a whole only when the extension is not built (CI builds it: `pip install
--no-build-isolation -e .`). The tolerances and their reasons are with check_against_reference in
tests/problems.py: this backend differs from the reference only in summation order.
"""

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pcdeq_kernels as pk
from pcdeq_kernels import backends, reference
from pcdeq_kernels.activations import ACTIVATIONS
from pcdeq_kernels.backends import cpu
from pcdeq_kernels.problem import Problem

from problems import (
    ALL_ACTIVATIONS,
    adjoint_problem,
    adjoint_spec,
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
    gradcheck_fixed_point,
    make_problem,
    opcheck_both_ops,
    ragged_problem,
    setting,
    spec,
    unrolled_fixed_point,
)

if not cpu.is_available():
    pytest.skip(f"the C++ CPU backend is not built: {cpu.unavailable_reason()}", allow_module_level=True)

HEADER = Path(__file__).parents[1] / "csrc" / "include" / "pcdeq" / "activations.h"
SHAPES = [(b, d) for b in (1, 7, 33) for d in (1, 5, 80, 131)]


def intra_op_threads(n):
    """torch's intra-op thread count set to n inside the block, restored after."""
    return setting(torch.get_num_threads, torch.set_num_threads, n)


@pytest.fixture
def two_threads():
    """Two intra-op threads, so that the solver splits rows into blocks run by OpenMP workers."""
    with intra_op_threads(2):
        yield


# --- the activation table and the header --------------------------------------------------------


HEADER_PROGRAM = r"""
#include <cstdio>
#include <pcdeq/activations.h>
int main() {
  // ids outside the table (kAdjoint, past the end, 2^32 which an int would truncate to 0) reach no formula
  const auto none = [](auto) {};
  if (pcdeq::visit_activation(pcdeq::kAdjoint, none) || pcdeq::visit_activation(pcdeq::kNumActivations, none) ||
      pcdeq::visit_activation(int64_t{1} << 32, none) || !pcdeq::visit_map(pcdeq::kAdjoint, none)) {
    return 1;
  }
  double x;
  while (std::scanf("%lf", &x) == 1) {
    for (int id = 0; id < pcdeq::kNumActivations; ++id) {
      pcdeq::visit_activation(id, [x](auto act) {
        constexpr int kAct = decltype(act)::value;
        std::printf("%.17g %.17g ", pcdeq::activation<kAct>(x), pcdeq::activation_derivative<kAct>(x));
      });
    }
    std::printf("\n");
  }
}
"""


def test_header_scalar_math_matches_the_activation_table(tmp_path):
    # the scalar functions the CPU and CUDA code share, derivatives included, compiled on their own
    # (float64), each reached from its table id through the header's one dispatch (visit_activation),
    # which map_ids.h generates from the table (tests/test_activations.py checks that header)
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        pytest.skip("no C++ compiler")
    (tmp_path / "main.cpp").write_text(HEADER_PROGRAM)
    exe = tmp_path / "main"
    subprocess.run([compiler, "-std=c++17", f"-I{HEADER.parents[1]}", str(tmp_path / "main.cpp"), "-o", str(exe)], check=True)
    x = torch.cat([torch.linspace(-8, 8, 161, dtype=torch.float64), torch.tensor([0.0, 6.0, -40.0, 40.0], dtype=torch.float64)])
    out = subprocess.run([str(exe)], input="\n".join(map(repr, x.tolist())), capture_output=True, text=True, check=True)
    got = torch.tensor([list(map(float, line.split())) for line in out.stdout.splitlines()], dtype=torch.float64)
    eps = torch.finfo(torch.float64).eps
    for a in ACTIVATIONS.values():
        # libm and torch may round differently by an ulp; 1 - tanh^2 and s (1 - s) turn that into an
        # absolute error of a few eps in the derivative
        torch.testing.assert_close(got[:, 2 * a.kernel_id], a.fn(x), rtol=2 * eps, atol=0)
        torch.testing.assert_close(got[:, 2 * a.kernel_id + 1], a.derivative(x), rtol=2 * eps, atol=4 * eps)


# Error bounds of the backend's formulas (csrc/cpu/vec_activations.h), in ulps of the result: float32
# tanh from exp or its series, 2; softsign, two rounded operations, 1.5; relu6 exact; sigmoid, a
# 1-ulp exp then a division (and for x < 0 a product), 2.5. float64 is compared with torch's float64,
# itself up to 1 ulp off the exact value, so 1 ulp is added there.
MAX_ULPS = {"tanh": 2.0, "softsign": 1.5, "relu6": 0.0, "sigmoid": 2.5}


@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_activation_accuracy(activation, dtype):
    bound = MAX_ULPS[activation] + (1.0 if dtype == torch.float64 else 0.0)
    check_activation_accuracy(activation, dtype, "cpu", bound)


# --- forward and adjoint solves against the reference ------------------------------------------


@pytest.mark.parametrize("stop", ["sample", "batch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
def test_forward_solve_matches_reference(activation, dtype, stop):
    for seed, (batch, dim) in enumerate(SHAPES):
        u, w = make_problem(batch, dim, activation, dtype=dtype, seed=seed, weight_scale=0.8)
        got, _ = check_forward_solve(cpu, u, w, activation, stop)
        assert got[3].all()


@pytest.mark.parametrize("stop", ["sample", "batch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
def test_adjoint_solve_matches_reference(activation, dtype, stop):
    for seed, (batch, dim) in enumerate(SHAPES):
        v, w, D = adjoint_problem(batch, dim, activation, dtype, seed=seed)
        check_adjoint_solve(cpu, v, w, D, stop)


@pytest.mark.parametrize("batch,dim", [(257, 131), (12, 1100)])  # the packed kernel; BLAS
@pytest.mark.parametrize("stop", ["sample", "batch"])
def test_ragged_convergence_and_thread_blocks(stop, batch, dim, two_threads):
    # rows with very different injections converge at very different steps, so the active lists of
    # the row groups (two threads) shrink many times; on the BLAS path the remaining rows are then
    # no longer consecutive and are gathered
    u, w = ragged_problem(batch, dim)
    check_ragged_convergence(cpu, u, w, stop)


# Both matmul paths of csrc/cpu/solver.cpp: the register-blocked kernel (d <= kMaxPackedDim = 1024;
# d = 200 is 13 AVX-512 float vectors, cut into 3 column chunks; 67 rows end in a partial row tile)
# and BLAS above it. With 2 threads the packed kernel's shapes are worth splitting (at least a 4-row
# tile and enough work per thread), so rows are iterated in groups handed out to the threads
# (stop="sample") or in one block per thread joined every step ("batch"); the BLAS path makes one call
# per step on all active rows from the calling thread and splits its fused pass over the threads (in
# chunks of at least 16384 elements: 40 rows of 1100 are three).
KERNEL_SHAPES = [(8, 200), (67, 48), (9, 1100), (40, 1100)]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("stop", ["sample", "batch"])
@pytest.mark.parametrize("batch,dim", KERNEL_SHAPES)
def test_matmul_paths_and_threads_match_reference(batch, dim, stop, threads):
    with intra_op_threads(threads):
        for dtype in (torch.float64, torch.float32):
            u, w = make_problem(batch, dim, "tanh", dtype=dtype, seed=dim, weight_scale=0.8)
            check_forward_solve(cpu, u, w, "tanh", stop)
            v, w, D = adjoint_problem(batch, dim, "tanh", dtype, seed=dim)
            check_adjoint_solve(cpu, v, w, D, stop)


def test_max_iter_cap_and_no_convergence():
    u, w = make_problem(9, 17, "tanh", weight_scale=0.9)
    check_max_iter_cap(cpu, u, w, "tanh", 6)


@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
@pytest.mark.parametrize("dim,conv_hw", [(6, None), (1100, None), (6, (4, 4))], ids=["packed", "blas", "conv"])
def test_nan_residual_never_counts_as_converged(activation, dim, conv_hw):
    # a sample whose residual is NaN stops at that step, unconverged; under "batch", the whole batch
    u, w = make_problem(4, dim, activation, conv_hw=conv_hw)
    u[(2, 3) if conv_hw is None else (2, 3, 1, 2)] = math.nan  # the op layer rejects this; the backend must still follow the rule
    check_nan_residual_never_counts_as_converged(cpu, u, w, activation)


# every loop: the packed kernel with one thread and with row groups on two, BLAS, the conv loop
SUM_PATHS = [(8, 200, None, 1), (67, 48, None, 2), (9, 1100, None, 2), (3, 4, (5, 6), 2)]


@pytest.mark.parametrize("stop", ["sample", "batch"])
@pytest.mark.parametrize("batch,dim,conv_hw,threads", SUM_PATHS, ids=["packed", "groups", "blas", "conv"])
def test_float32_squared_norms_do_not_overflow(batch, dim, conv_hw, threads, stop):
    # The adjoint map is linear in (h, v): v scaled by 2^70 scales every iterate exactly. Their squares
    # (2^140) overflow float32, and summed there the residual was inf/inf (never converged, or worse,
    # finite/inf = 0); summed in float64 it is the ratio of the unscaled solve (scale 2^20, where the
    # +1e-5 guard is as negligible): the same steps, and the state scaled.
    v, w, D = adjoint_problem(batch, dim, "tanh", torch.float32, seed=dim, conv_hw=conv_hw)
    with intra_op_threads(threads):
        h, its, res, conv = cpu.adjoint_solve(v * 2.0**20, w, D, adjoint_spec(1e-5, 300, stop))
        h_big, its_big, res_big, conv_big = cpu.adjoint_solve(v * 2.0**70, w, D, adjoint_spec(1e-5, 300, stop))
    assert conv.all() and (its > 3).all()
    assert torch.equal(its_big, its) and torch.equal(conv_big, conv) and torch.equal(h_big * 2.0**-50, h)
    torch.testing.assert_close(res_big, res, rtol=1e-6, atol=0)


def _ctrl_c_script(tmp_path):
    """A script that starts never-ending solves (the adjoint with W = I and D = 1 grows by v every step:
    r ~ 1/k never reaches 1e-30) on every CPU loop and both stop rules, sends itself SIGINT from a
    timer thread after 0.3 s, and prints how long each solve took to raise; then checks that the next
    solve runs."""
    script = tmp_path / "ctrl_c.py"
    script.write_text(
        r"""
import faulthandler, os, signal, sys, threading, time
import torch
faulthandler.dump_traceback_later(100, exit=True)  # a hang shows where it is, before the test's timeout
# Python leaves SIGINT alone when it starts ignored, as it does under a shell's background job (a CI
# runner's, say): then no KeyboardInterrupt is ever raised. Ctrl-C's own handler, whatever came in.
signal.signal(signal.SIGINT, signal.default_int_handler)
import pcdeq_kernels  # noqa: F401
from pcdeq_kernels.backends import cpu
from pcdeq_kernels.spec import SolveSpec

for batch, dim, conv, threads in [(8, 16, False, 1), (256, 16, False, 2), (4, 1100, False, 2), (4, 3, True, 2)]:
    torch.set_num_threads(threads)
    shape = (batch, dim, 5, 5) if conv else (batch, dim)
    w = torch.zeros(dim, dim, 3, 3, dtype=torch.float64) if conv else torch.eye(dim, dtype=torch.float64)
    if conv:
        w[:, :, 1, 1] = torch.eye(dim, dtype=torch.float64)
    v = torch.rand(shape, dtype=torch.float64) + 0.1
    D = torch.ones_like(v)
    for stop in ("sample", "batch"):
        sent = []
        def interrupt():
            sent.append(time.perf_counter())
            os.kill(os.getpid(), signal.SIGINT)
        threading.Timer(0.3, interrupt).start()
        try:
            cpu.adjoint_solve(v, w, D, SolveSpec(backward_tol=1e-30, backward_max_iter=10**9, stop=stop))
            print("no interrupt")
        except KeyboardInterrupt:
            print(f"interrupted {time.perf_counter() - sent[0]:.3f}", batch, dim, conv, threads, stop, flush=True)
        h, its, res, converged = cpu.adjoint_solve(v, w, D, SolveSpec(backward_tol=1e-2, backward_max_iter=500, stop=stop))
        print("next", bool(converged.all()), int(its.max()), flush=True)
"""
    )
    return script


def test_ctrl_c_stops_a_long_solve(tmp_path):
    # The solves poll for Python signals (csrc/cpu/interrupt.h): SIGINT stops each loop within a poll
    # interval (50 ms), plus scheduling on a loaded machine, and raises KeyboardInterrupt itself, with
    # nothing left behind: the next solve runs and converges.
    script = _ctrl_c_script(tmp_path)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr  # (a hang: the stacks, after the cases that ran)
    lines = out.stdout.split("\n")
    interrupted = [float(line.split()[1]) for line in lines if line.startswith("interrupted")]
    assert len(interrupted) == 8 and max(interrupted) < 1.0, out.stdout
    assert lines.count("next True 99") == 8, out.stdout


@pytest.mark.parametrize("conv_hw", [None, (4, 4)], ids=["dense", "conv"])
def test_tensors_on_other_devices_are_refused(conv_hw):
    # A meta tensor among CPU ones sends the call to the fake kernel, which must refuse it rather than
    # return uninitialised outputs as the answer; every tensor's device is checked, by name.
    u, w = make_problem(3, 4, "tanh", conv_hw=conv_hw)
    meta = torch.device("meta")
    fwd, adj = torch.ops.pcdeq_C.forward_solve, torch.ops.pcdeq_C.adjoint_solve
    with pytest.raises(RuntimeError, match="u is on meta but weight is on cpu"):
        fwd(u.to(meta), w, None, 0, 1e-4, 10, False)
    with pytest.raises(RuntimeError, match="u is on cpu but weight is on meta"):
        fwd(u, w.to(meta), None, 0, 1e-4, 10, False)
    with pytest.raises(RuntimeError, match="z0 is on meta but u is on cpu"):
        fwd(u, w, u.to(meta), 0, 1e-4, 10, False)
    with pytest.raises(RuntimeError, match="v is on meta but weight is on cpu"):
        adj(u.to(meta), w, u, 1e-4, 10, False)
    with pytest.raises(RuntimeError, match="D is on meta but v is on cpu"):
        adj(u, w, u.to(meta), 1e-4, 10, False)
    # all on meta: the fake kernel's shapes, as before
    z, its, res, conv = fwd(u.to(meta), w.to(meta), None, 0, 1e-4, 10, False)
    assert z.device == meta and z.shape == u.shape and its.shape == (3,)


@pytest.mark.parametrize("stop", ["sample", "batch"])
def test_z0_is_the_starting_point(stop):
    u, w = make_problem(7, 80, "relu6", weight_scale=0.8)
    z0 = torch.rand_like(u) * 3
    check_z0_is_the_starting_point(cpu, u, w, "relu6", z0, stop)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_is_solved_in_float32(dtype):
    u, w = make_problem(7, 33, "tanh", dtype=dtype)
    z0 = torch.rand_like(u)
    z, its, res, conv = cpu.forward_solve(u, w, z0, spec("tanh", 1e-4, 200, "sample"))
    z_ref, its_ref, res_ref, conv_ref = reference.forward_solve(u, w, "tanh", tol=1e-4, max_iter=200, z0=z0)
    assert z.dtype == dtype and res.dtype == torch.float32 and conv.all()
    # both solve in float32 (1e-5 apart); rounding that to the half dtype can flip one half-ulp
    torch.testing.assert_close(z, z_ref, rtol=torch.finfo(dtype).eps, atol=0)
    v, w64, D = adjoint_problem(7, 33, "tanh", torch.float64)
    h, *_ = cpu.adjoint_solve(v.to(dtype), w64.to(dtype), D.to(dtype), adjoint_spec(1e-4, 200, "sample"))
    h_ref, *_ = reference.adjoint_solve(v.to(dtype), w64.to(dtype), D.to(dtype), tol=1e-4, max_iter=200)
    assert h.dtype == dtype
    torch.testing.assert_close(h, h_ref, rtol=torch.finfo(dtype).eps, atol=torch.finfo(dtype).eps)


def test_inputs_are_not_modified_and_strides_do_not_matter():
    u, w = make_problem(12, 40, "tanh")
    check_inputs_not_modified_and_strides_do_not_matter(cpu, u, w, adjoint_problem(12, 40, "tanh", torch.float64))


def test_empty_batch():
    check_empty_batch(torch.zeros(0, 5), torch.rand(5, 5) * 0.1)


def test_bad_inputs_raise_clear_errors():
    u, w = make_problem(3, 4, "tanh")
    check_bad_inputs_raise_clear_errors(u, w)


# --- through fixed_point: dispatch, gradients, custom-op checks ---------------------------------


def test_auto_picks_cpu_for_cpu_problems():
    u, w = make_problem(3, 4, "tanh")
    assert pk.available_backends()["cpu"]
    assert backends.resolve(pk.SolveSpec(), Problem("dense", "cpu", torch.float32, 1)) == "cpu"
    assert backends.resolve(pk.SolveSpec(), Problem("conv", "cpu", torch.float32, 1)) == "cpu"
    assert pk.fixed_point(u, w)[1].backend == "cpu"
    uc, wc = make_problem(2, 3, "tanh", conv_hw=(4, 4))
    assert pk.fixed_point(uc, wc)[1].backend == "cpu"


@pytest.mark.parametrize("stop", ["sample", "batch"])
@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
def test_gradients_match_the_reference_backend_float64(activation, stop):
    u, w = make_problem(6, 37, activation, weight_scale=0.7)
    check_gradients_match_the_reference_backend("cpu", u, w, activation, stop)


@pytest.mark.parametrize("batch,dim", [(64, 80), (8, 1100)])  # the packed kernel; BLAS
def test_thread_blocks_see_the_callers_autograd_and_inference_state(batch, dim, two_threads):
    # the packed kernel's rows are split over two threads; on the BLAS path the matmul is a dispatcher
    # call, which must run below autograd (weight requires grad here) and in inference mode when the
    # caller is in it
    u, w = make_problem(batch, dim, "tanh", weight_scale=0.8)
    uu, ww = u.clone().requires_grad_(), w.clone().requires_grad_()
    z, stats = pk.fixed_point(uu, ww, "tanh", tol=1e-12, backend="cpu")
    gu, gw = torch.autograd.grad(z.square().sum(), (uu, ww))
    z_ref, _ = pk.fixed_point(u, w, "tanh", tol=1e-12, backend="reference")
    torch.testing.assert_close(z, z_ref, rtol=1e-12, atol=1e-12)
    assert gu.isfinite().all() and gw.isfinite().all() and (stats.backward_iterations > 0).all()
    with torch.inference_mode():
        z_inf, _ = pk.fixed_point(u, w, "tanh", tol=1e-12, backend="cpu")
    torch.testing.assert_close(z_inf, z_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
def test_gradcheck_float64(activation):
    # u away from 0 (so the -eps probes stay valid, u >= 0) and a light W keep relu6's pre-activations
    # off its kinks at 0 and 6; d = 17 runs both the full vectors and the masked last vector of the fused pass
    u, w = make_problem(3, 17, activation, weight_scale=0.3, u_offset=1.0, u_scale=0.3)
    gradcheck_fixed_point(u, w, activation, "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck_both_ops(dtype):
    u, w = make_problem(3, 5, "tanh", dtype=dtype)
    opcheck_both_ops([u], w, [None, torch.rand_like(u)], adjoint_problem(3, 5, "tanh", dtype))


# --- convolutional problems (csrc/cpu/conv_solver.cpp) ------------------------------------------
# Ragged spatial sizes and channel counts; (2, 3, 1x1) has no neighbours inside the image, (5, 9, 4x13)
# is wider than tall. The loop's convolution is torch's (oneDNN for float32, whose summation order
# differs from the reference's NCHW call: the same rounding-level tolerances as the dense tests).
CONV_SHAPES = [(3, 5, (7, 6)), (4, 17, (9, 11)), (2, 3, (1, 1)), (5, 9, (4, 13))]


@pytest.mark.parametrize("stop", ["sample", "batch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
def test_conv_forward_and_adjoint_match_reference(activation, dtype, stop):
    for seed, (batch, channels, hw) in enumerate(CONV_SHAPES):
        u, w = make_problem(batch, channels, activation, dtype=dtype, seed=seed, weight_scale=0.8, conv_hw=hw)
        got, _ = check_forward_solve(cpu, u, w, activation, stop)
        assert got[3].all()
        v, w, D = adjoint_problem(batch, channels, activation, dtype, seed=seed, conv_hw=hw)
        check_adjoint_solve(cpu, v, w, D, stop)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("stop", ["sample", "batch"])
def test_conv_per_image_early_exit(stop, threads):
    # images with injections spread over four decades converge at very different steps, so the
    # working set is compacted many times (first out of the result, then in place); with few images
    # and 2 threads the fused pass also cuts images into runs
    with intra_op_threads(threads):
        for batch, channels, hw in ((19, 6, (10, 9)), (1, 40, (30, 31))):
            u, w = ragged_problem(batch, channels, conv_hw=hw)
            check_ragged_convergence(cpu, u, w, stop)


def test_conv_layouts_z0_half_precision_and_max_iter():
    u, w = make_problem(4, 6, "tanh", conv_hw=(5, 7), weight_scale=0.8)
    want = cpu.forward_solve(u, w, None, spec("tanh", 1e-9, 500, "sample"))
    # a channels-last input gives the same answer and gets a channels-last state back (as empty_like)
    u_cl = u.contiguous(memory_format=torch.channels_last)
    got = cpu.forward_solve(u_cl, w, None, spec("tanh", 1e-9, 500, "sample"))
    assert got[0].is_contiguous(memory_format=torch.channels_last) and want[0].is_contiguous()
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=1e-13, atol=1e-13)
    assert torch.equal(u_cl, u)  # the input is only read
    # z0 is the starting point: the solve from it is the reference's, one step is one map application
    check_z0_is_the_starting_point(cpu, u, w, "tanh", torch.rand_like(u) * 3, "sample")
    # the cap: no convergence after 3 steps at tol 1e-30, as the reference
    check_max_iter_cap(cpu, u, w, "tanh", 3)
    # half precision is solved in float32 (as the reference)
    for dtype in (torch.float16, torch.bfloat16):
        z, its, res, conv = cpu.forward_solve(u.to(dtype), w.to(dtype), None, spec("tanh", 1e-4, 200, "sample"))
        z_ref, *_ = reference.forward_solve(u.to(dtype), w.to(dtype), "tanh", tol=1e-4, max_iter=200)
        assert z.dtype == dtype and res.dtype == torch.float32 and conv.all()
        torch.testing.assert_close(z, z_ref, rtol=torch.finfo(dtype).eps, atol=0)


def test_conv_bad_inputs_raise_clear_errors():
    u, w = make_problem(2, 3, "tanh", conv_hw=(4, 4))
    check_bad_inputs_raise_clear_errors(u, w)


@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
def test_conv_gradcheck_float64(activation):
    # u away from relu6's kinks as in test_gradcheck_float64; 5 channels on a ragged 3x4 image
    u, w = make_problem(2, 5, activation, weight_scale=0.3, u_offset=1.0, u_scale=0.3, conv_hw=(3, 4))
    gradcheck_fixed_point(u, w, activation, "cpu")


def test_conv_gradients_match_unrolled_autograd():
    # against float64 autograd through the unrolled iteration (the ground truth), channels-last input
    u, w = make_problem(3, 7, "tanh", weight_scale=0.6, conv_hw=(6, 5))
    u = u.contiguous(memory_format=torch.channels_last)
    weights = torch.randn(u.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    grads = {}
    for name in ("cpu", "unrolled"):
        uu, ww = u.clone().requires_grad_(), w.clone().requires_grad_()
        if name == "cpu":
            z, stats = pk.fixed_point(uu, ww, "tanh", tol=1e-13, max_iter=5000, backend="cpu")
        else:
            z = unrolled_fixed_point(uu, ww, "tanh", 200)
        grads[name] = torch.autograd.grad((z * weights).sum(), (uu, ww))
    assert stats.backend == "cpu" and (stats.backward_iterations > 0).all()
    for got, want in zip(grads["cpu"], grads["unrolled"]):
        assert ((got - want).norm() / want.norm()).item() < 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_conv_opcheck_both_ops(dtype):
    u, w = make_problem(2, 3, "tanh", dtype=dtype, conv_hw=(4, 5))
    u_cl = u.contiguous(memory_format=torch.channels_last)
    opcheck_both_ops([u, u_cl], w, [None], adjoint_problem(2, 3, "tanh", dtype, conv_hw=(4, 5)))


def test_ops_ignore_autocast_when_called_directly():
    # the kernels exclude autocast for their own convolutions and matmuls (csrc/include/pcdeq/op_checks.h):
    # called straight through torch.ops under autocast they give the plain float32 answer
    for conv_hw in (None, (5, 6)):
        u, w = make_problem(3, 6, "tanh", dtype=torch.float32, conv_hw=conv_hw)
        plain = torch.ops.pcdeq_C.forward_solve(u, w, None, 0, 1e-4, 100, False)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = torch.ops.pcdeq_C.forward_solve(u, w, None, 0, 1e-4, 100, False)
        for g, e in zip(got, plain):
            assert torch.equal(g, e)



def test_solves_from_several_threads_at_once_and_in_a_forked_child(tmp_path):
    # Solves on several Python threads at once give the answers of one alone. A child forked after the
    # parent ran parallel CPU work solves once it is single-threaded, as DataLoader workers are: with
    # more threads it would hang in its first parallel region, as torch's own CPU ops do (libgomp
    # after fork).
    script = tmp_path / "threads_and_fork.py"
    script.write_text(
        r"""
import faulthandler, os, threading
import torch
faulthandler.dump_traceback_later(100, exit=True)
import pcdeq_kernels  # noqa: F401
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
w = torch.rand(96, 96, generator=g, dtype=torch.float64) * (1.8 / 96)
u = torch.nn.functional.softplus(torch.randn(256, 96, generator=g, dtype=torch.float64), beta=5)
solve = lambda: torch.ops.pcdeq_C.forward_solve(u, w, None, 0, 1e-10, 500, False)
z = solve()[0]
results = [None] * 4
def run(i):
    results[i] = solve()[0]
threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
for t in threads: t.start()
for t in threads: t.join()
print("threads", all(torch.equal(r, z) for r in results))
pid = os.fork()
if pid == 0:
    torch.set_num_threads(1)
    os._exit(0 if torch.equal(solve()[0], z) else 3)
_, status = os.waitpid(pid, 0)
print("child", os.waitstatus_to_exitcode(status))
"""
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.split() == ["threads", "True", "child", "0"], out.stdout


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs os.sched_setaffinity (Linux) to pin to one core")
def test_contended_threads_back_off_to_one_with_the_same_answers(tmp_path):
    # Two torch threads on one core: a two-thread solve's caller spends about half its time off the CPU,
    # which is contention (csrc/cpu/thread_budget.h): the solves after it run on one thread for a while,
    # with answers equal bit for bit to one thread's.
    script = tmp_path / "contention.py"
    script.write_text(
        r"""
import faulthandler, os
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # before torch starts a thread (they inherit it)
import torch
faulthandler.dump_traceback_later(100, exit=True)
from pcdeq_kernels.backends import cpu
g = torch.Generator().manual_seed(0)
w = torch.rand(256, 256, generator=g) * (1.8 / 256)
u = torch.nn.functional.softplus(torch.randn(256, 256, generator=g), beta=5)
solve = lambda: torch.ops.pcdeq_C.forward_solve(u, w, None, 0, 1e-6, 500, False)[0]
torch.set_num_threads(1)
alone = solve()
print("idle", cpu.thread_backoff_seconds())
torch.set_num_threads(2)
answers, backed_off = [], []
for _ in range(20):  # (a probe whose other thread happens not to run in it looks uncontended)
    answers.append(solve())
    backed_off.append(cpu.thread_backoff_seconds() > 0)
print("backoff", any(backed_off))
print("equal", all(torch.equal(z, alone) for z in answers))
"""
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.split() == ["idle", "0.0", "backoff", "True", "equal", "True"], out.stdout


def test_eager_solve_op_refuses_malformed_calls_and_reports_invalid_inputs():
    """pcdeq_C::eager_solve (the cpu backend's eager path) checks its arguments as forward_solve does, and
    the backward's options at once; inputs that are negative or non-finite come back unsolved with
    status 4, which the op layer turns into the worded error."""
    u, w = make_problem(3, 5, "tanh", dtype=torch.float32)
    op = torch.ops.pcdeq_C.eager_solve.default
    good = dict(z0=None, activation=0, tol=1e-4, max_iter=50, batch_stop=False, backward_tol=1e-4,
                backward_max_iter=50, jfb=False, spec=pk.SolveSpec(backend="cpu").key)

    def call(u_, w_, **changes):
        args = {**good, **changes}
        return op(u_, w_, *args.values())

    z, its, res, conv, bits, bres, status = call(u, w)
    assert status == 0 and conv.all() and (bits == 0).all() and bres.isnan().all()
    torch.testing.assert_close(z, torch.ops.pcdeq_C.forward_solve(u, w, None, 0, 1e-4, 50, False)[0], rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="unknown activation id 1099511627776"):
        call(u, w, activation=2**40)
    with pytest.raises(RuntimeError, match="the cpu backend needs CPU tensors; got u on cpu and weight on meta"):
        call(u, w.to("meta"))
    with pytest.raises(RuntimeError, match=r"backward's options\): tol must be a positive finite number"):
        call(u, w, backward_tol=float("nan"))
    with pytest.raises(RuntimeError, match=r"backward's options\): max_iter must be >= 1, got 0"):
        call(u, w, backward_max_iter=0)
    with pytest.raises(RuntimeError, match="an empty batch is the op layer's to answer"):
        call(u[:0], w)
    negative = w.clone()
    negative[0, 0] = -1.0
    *outputs, status = call(u, negative)
    assert status == 4 and all(t is None for t in outputs)  # nothing solved
    with pytest.raises(ValueError, match="weight has negative entries"):
        pk.fixed_point(u, negative, backend="cpu")
