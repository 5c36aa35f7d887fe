"""python -m pcdeq_kernels: what this installation can run, each usable backend checked by a solve.

Prints the versions (pcdeq_kernels, torch and its CUDA, Python), the GPU if one is visible, every
backend with whether it runs here (and if not why and how to get it), then, on each usable backend,
a dense and a convolutional float32 solve with their gradients (on the GPU for cuda and triton when
there is one) compared with the float64 reference. Exits 1 if a usable backend gets a wrong answer,
0 otherwise: the one-line check after installing a wheel on a GPU node.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from . import __version__, backend_status, fixed_point

# float32 solves to tol 1e-6 against float64 ones to 1e-12: both are within about 1e-6 (relative) of
# z*, and the gradient within about 1e-5; TF32 matmuls (the GPU backends' default for float32 when
# torch's precision setting allows it) add about 1e-3.
RTOL = {"cpu": 1e-4, "reference": 1e-4, "cuda": 5e-3, "triton": 5e-3}


def _problem(kind: str, device: str):
    g = torch.Generator().manual_seed(0)
    if kind == "dense":
        w = torch.rand(32, 32, generator=g, dtype=torch.float64) * (1.8 / 32)
        x = torch.randn(8, 32, generator=g, dtype=torch.float64)
    else:
        w = torch.rand(4, 4, 3, 3, generator=g, dtype=torch.float64) * (1.8 / 36)
        x = torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64)
    u = F.softplus(x + 0.5, beta=5)
    return u.to(device), w.to(device)


def _solve_and_grads(u, w, backend, tol):
    u, w = u.clone().requires_grad_(), w.clone().requires_grad_()
    z, stats = fixed_point(u, w, "tanh", tol=tol, max_iter=2000, backward_tol=tol, backend=backend)
    g_u, g_w = torch.autograd.grad((z * z).sum(), (u, w))
    return z.detach(), g_u, g_w, stats


def _rel(a, b) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


def check(backend: str, device: str) -> tuple[bool, str]:
    """A dense and a conv solve on ``backend`` (tensors on ``device``) against the float64 reference."""
    worst, start = 0.0, time.perf_counter()
    for kind in ("dense", "conv"):
        u64, w64 = _problem(kind, "cpu")
        want = _solve_and_grads(u64, w64, "reference", 1e-12)[:3]
        u, w = _problem(kind, device)
        got = _solve_and_grads(u.float(), w.float(), backend, 1e-6)
        if not bool(got[3].converged.all()):
            return False, f"{kind}: did not converge"
        worst = max(worst, *(_rel(g.cpu(), x) for g, x in zip(got[:3], want)))
    ok = worst <= RTOL[backend]
    return ok, (f"{'ok' if ok else 'WRONG'}: dense and conv, z* and both gradients within {worst:.1e} of the float64 "
                f"reference (allowed {RTOL[backend]:g}), {time.perf_counter() - start:.2f} s on {device}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pcdeq_kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.parse_args(argv)
    import pcdeq_kernels

    print(f"pcdeq_kernels {__version__} ({pcdeq_kernels.__path__[0]})")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none: a CPU build'}), Python {sys.version.split()[0]}")
    gpu = torch.cuda.is_available()
    if gpu:
        name, (major, minor) = torch.cuda.get_device_name(), torch.cuda.get_device_capability()
        print(f"GPU: {name} (sm_{major}{minor}), {torch.cuda.device_count()} visible")
    else:
        print("GPU: none visible")
    failures = 0
    for backend, status in backend_status().items():
        if not status.available:
            print(f"  {backend:9s} {status}")
            continue
        device = "cuda" if backend in ("cuda", "triton") and gpu else "cpu"
        try:
            ok, line = check(backend, device)
        except Exception as err:  # a usable backend that fails to solve is what this check is for
            ok, line = False, f"FAILED: {type(err).__name__}: {err}"
        failures += not ok
        print(f"  {backend:9s} available; {line}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
