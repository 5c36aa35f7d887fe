"""Small solves through every GPU kernel, for NVIDIA's compute-sanitizer (races, barriers, memory):

    compute-sanitizer --tool racecheck --error-exitcode 1 python scripts/sanitize_kernels.py
    compute-sanitizer --tool synccheck --error-exitcode 1 python scripts/sanitize_kernels.py
    compute-sanitizer --tool memcheck  --error-exitcode 1 python scripts/sanitize_kernels.py

(``benchmarks/gpu_suite.sh OUT build sanitize-racecheck sanitize-synccheck sanitize-memcheck`` runs the
three, with ``PCDEQ_TRITON_AUTOTUNE=0``). Each backend that is available (cuda, triton) runs both of
its loops, forward and adjoint solves (fixed_point with a backward pass), dense and convolutional, with ragged shapes (B, d, C, H, W not multiples of any block) and a few steps only: the
sanitizers slow kernels down a hundredfold. Also checks each result against the reference, so a run
that the sanitizer passes but that computes garbage fails too.
"""

from __future__ import annotations

import os
import sys

import torch

import pcdeq_kernels as pk
from pcdeq_kernels import reference

# (u shape, weight shape): dense ragged, dense over the CUDA single-launch/Triton on-chip limit, conv ragged
PROBLEMS = [((33, 131), (131, 131)), ((20, 45), (45, 45)), ((3, 5, 7, 6), (5, 5, 3, 3))]
DTYPES = {"cuda": (torch.float32, torch.bfloat16, torch.float64), "triton": (torch.float32, torch.bfloat16)}
LOOPS = ("single", "stepwise")


def solve_and_check(backend: str, u: torch.Tensor, w: torch.Tensor) -> None:
    uu = u.clone().requires_grad_()
    z, stats = pk.fixed_point(uu, w, "tanh", tol=1e-4, max_iter=12, backend=backend, on_nonconvergence="ignore")
    (grad,) = torch.autograd.grad(z.float().square().sum(), uu)
    z_ref = reference.forward_solve(u.double(), w.double(), "tanh", tol=1e-4, max_iter=12)[0]
    err = ((z.double() - z_ref).norm() / z_ref.norm()).item()
    bound = 1e-2 if u.dtype == torch.bfloat16 else 1e-3
    if not (err < bound and torch.isfinite(grad).all()):
        raise SystemExit(f"{backend} {tuple(u.shape)} {u.dtype}: relative error {err:.2e} or non-finite gradient")


def main() -> int:
    torch.manual_seed(0)
    ran = 0
    for backend in ("cuda", "triton"):
        if not pk.available_backends()[backend]:
            print(f"skip {backend}: not available", flush=True)
            continue
        for loop in LOOPS:
            os.environ[f"PCDEQ_{backend.upper()}_PATH"] = loop
            for u_shape, w_shape in PROBLEMS:
                for dtype in DTYPES[backend]:
                    w = torch.rand(w_shape) * (0.9 / (w_shape[0] * (9 if len(w_shape) == 4 else 1)))
                    u = torch.nn.functional.softplus(torch.randn(u_shape) + 0.5, beta=5)
                    solve_and_check(backend, u.to("cuda", dtype), w.to("cuda", dtype))
                    ran += 1
            print(f"{backend} {loop}: done", flush=True)
    torch.cuda.synchronize()
    print(f"{ran} solves")
    return 0 if ran else 1


if __name__ == "__main__":
    sys.exit(main())
