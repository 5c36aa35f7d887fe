"""pytest-benchmark microbenchmarks: forward solve and forward+backward step, every path of
``pcdeq_kernels.bench.paths`` (project backends, the official loop, torchdeq) on the same data.

    python -m pytest benchmarks --benchmark-enable --benchmark-group-by=param:shape,param:mode
    python -m pytest benchmarks --benchmark-enable --benchmark-group-by=param:shape -k "64x80"
    PCDEQ_BENCH_SHAPES=full python -m pytest benchmarks --benchmark-enable     # on a GPU: the large grid too

On CUDA machines the GPU is benchmarked (the timed function synchronizes); on CPU machines the CPU
paths are (the Triton interpreter is never timed). In CI the benchmarks run once each
(``--benchmark-disable``) as correctness checks: every path must agree with the official answer.
"""

import os

import pytest
import torch

from pcdeq_kernels.bench import paths

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (B, d) dense, (B, C, H, W) convolutional; small enough to run in CI (and in a GPU machine's test run)
# as correctness checks. PCDEQ_BENCH_SHAPES=full on a GPU adds the report's grid and the paper's conv
# layers: about 700 benchmarks, each autotuning its Triton kernels on first use.
GRID = os.environ.get("PCDEQ_BENCH_SHAPES") or "small"
if GRID not in ("small", "full"):
    raise ValueError(f"PCDEQ_BENCH_SHAPES must be small (the default) or full, got {GRID!r}")
SHAPES = {"64x80": (64, 80), "1024x256": (1024, 256), "16x24x14x14": (16, 24, 14, 14)}
if DEVICE == "cuda" and GRID == "full":
    SHAPES.update({f"{b}x{d}": (b, d) for b in (256, 1024, 8192) for d in (256, 1024, 4096)})
    SHAPES.update({"64x82x28x28": (64, 82, 28, 28), "64x125x32x32": (64, 125, 32, 32)})
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])
AVAILABLE = {(kind, dtype): paths.available_paths(DEVICE, kind, dtype) for kind in ("dense", "conv") for dtype in DTYPES}
ALL_PATHS = list(paths.PEERS) + [p for p in AVAILABLE["dense", torch.float32] if p not in paths.PEERS]
# Agreement with the official loop (relative, z* and the gradients), which iterates in the problem's
# dtype while the project solves in float32 and rounds once: in float32 within the stopping tolerance
# (1e-4, amplified by the contraction; the gradients compound forward and adjoint), in bfloat16 within
# its rounding (2^-8 per operation, amplified likewise: measured on CPU, 1.7e-3 for z*, up to 6.8e-3
# for the gradients).
AGREEMENT = {torch.float32: 1e-3, torch.bfloat16: 1e-2}
GRAD_AGREEMENT = {torch.float32: 1e-2, torch.bfloat16: 3e-2}


def _runner(path, shape, dtype):
    why = AVAILABLE["conv" if len(SHAPES[shape]) == 4 else "dense", dtype][path]
    if why:
        pytest.skip(f"{path}: {why}")
    u, w = paths.problem_for_shape(SHAPES[shape], device=DEVICE, dtype=dtype)
    return paths.runner(path, u, w), paths.runner("official", u, w)


def _sync(fn):
    def timed():
        out = fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    return timed


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("mode", ["forward"])
def test_forward_solve(benchmark, mode, path, shape, dtype):
    run, official = _runner(path, shape, dtype)
    z = benchmark(_sync(run.forward))
    assert _rel(z, official.forward()) < AGREEMENT[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("mode", ["train"])
def test_forward_backward_step(benchmark, mode, path, shape, dtype):
    run, official = _runner(path, shape, dtype)
    grads = benchmark(_sync(run.train_step))
    for got, want in zip(grads, official.train_step()):
        assert _rel(got, want) < GRAD_AGREEMENT[dtype]
