"""Forward solve and forward+backward step: every backend that runs on this machine's CPU against
the official algorithm's loop, on the same data. CPU only here (the Triton interpreter is never timed).

    python -m pytest benchmarks --benchmark-enable --benchmark-group-by=param:shape,param:step
"""

import pytest
import torch

import pcdeq_kernels as pk
from pcdeq_kernels.official import official_fixed_point

from problems import make_problem

SHAPES = {"paper B=64 d=80": (64, 80), "B=1024 d=256": (1024, 256)}
CPU_BACKENDS = [b for b in ("reference", "cpu") if pk.available_backends()[b]]
PATHS = ["official"] + CPU_BACKENDS


def _problem(shape):
    batch, dim = SHAPES[shape]
    # row sums around 0.9: the regime trained pcDEQ layers reach (tens of iterations at tol 1e-4)
    return make_problem(batch, dim, "tanh", dtype=torch.float32, weight_scale=0.9, u_offset=0.5)


def _forward(path, u, w):
    if path == "official":
        with torch.no_grad():
            return official_fixed_point(u, w, "tanh")[0]
    return pk.fixed_point(u, w, "tanh", stop="batch", backend=path)[0]


def _train_step(path, u, w):
    u = u.detach().requires_grad_()
    w = w.detach().requires_grad_()
    z = official_fixed_point(u, w, "tanh")[0] if path == "official" else pk.fixed_point(u, w, "tanh", backend=path)[0]
    z.square().sum().backward()
    return u.grad, w.grad


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("path", PATHS)
def test_forward_solve(benchmark, shape, path):
    u, w = _problem(shape)
    z_official = _forward("official", u, w)
    z = benchmark(_forward, path, u, w)
    # both stop within tol=1e-4 of the fixed point (the official output is one step further)
    assert ((z - z_official).norm() / z_official.norm()).item() < 1e-3


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("path", PATHS)
def test_forward_backward_step(benchmark, shape, path):
    u, w = _problem(shape)
    want = _train_step("official", u, w)
    got = benchmark(_train_step, path, u, w)
    for g, e in zip(got, want):
        assert ((g - e).norm() / e.norm()).item() < 1e-2  # both solves stop at tol=1e-4
