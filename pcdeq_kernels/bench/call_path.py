"""python -m pcdeq_kernels.bench.call_path: what the library's call path costs on top of the compiled ops.

Times, interleaved in one run (one call of each per round, so that a change in the machine's load
touches all alike), the same solve made three ways:

    op          the compiled op alone: ``torch.ops.pcdeq_C.forward_solve`` with its raw arguments
    fixed_point ``pk.fixed_point(u, W, spec=spec)`` without gradients (what inference runs)

and for forward + backward, the minimum a hand-written eager training step needs

    ops         forward op, ``D = act'(z W^T + u)``, the adjoint op, ``dL/dW = h^T z``
    fixed_point ``pk.fixed_point`` with u and W requiring grad, then ``torch.autograd.grad``

with the loss ``sum(z * g)`` for a fixed random ``g``. The figure of merit is the ratio of medians,
``fixed_point / op`` (the call path's overhead), at the paper's size by default (B=64, d=80, tanh).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from .. import SolveSpec, fixed_point
from ..activations import get_activation
from ..reference import activation_derivative_at, weight_grad
from .report import machine_info, write_json


def _problem(batch: int, dim: int, activation: str, seed: int = 0):
    """A pcDEQ problem of the paper's kind: W >= 0 with row sums 0.9, u = softplus(beta=5) of Gaussians."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.rand(dim, dim, generator=gen)
    weight = 0.9 * weight / weight.sum(dim=1, keepdim=True)
    u = torch.nn.functional.softplus(torch.randn(batch, dim, generator=gen), beta=5)
    g = torch.randn(batch, dim, generator=gen)
    return u, weight, g


def callables(batch: int, dim: int, activation: str, tol: float, backend: str) -> dict:
    """The timed calls, by name: ``forward/op``, ``forward/fixed_point``, ``train/ops``,
    ``train/fixed_point``."""
    u, weight, g = _problem(batch, dim, activation)
    spec = SolveSpec(activation=activation, tol=tol, backend=backend)
    kernel_id = get_activation(activation).kernel_id
    forward_op = torch.ops.pcdeq_C.forward_solve
    adjoint_op = torch.ops.pcdeq_C.adjoint_solve

    def op_forward():
        return forward_op(u, weight, None, kernel_id, tol, spec.max_iter, False)[0]

    def library_forward():
        return fixed_point(u, weight, spec=spec)[0]

    def ops_train():
        z = forward_op(u, weight, None, kernel_id, tol, spec.max_iter, False)[0]
        D = activation_derivative_at(z, u, weight, activation)
        h = adjoint_op(g, weight, D, tol, spec.max_iter, False)[0]
        return h, weight_grad(h, z, weight)

    u_leaf, w_leaf = u.clone().requires_grad_(), weight.clone().requires_grad_()

    def library_train():
        z, _ = fixed_point(u_leaf, w_leaf, spec=spec)
        return torch.autograd.grad(z, (u_leaf, w_leaf), g)

    # the answers must agree before anything is timed
    torch.testing.assert_close(library_forward(), op_forward())
    for got, want in zip(library_train(), ops_train()):
        torch.testing.assert_close(got, want)
    return {
        "forward/op": op_forward, "forward/fixed_point": library_forward,
        "train/ops": ops_train, "train/fixed_point": library_train,
    }


def measure_interleaved(calls: dict, rounds: int) -> dict:
    """Median and quartiles (microseconds) of each call over ``rounds`` rounds of one call each."""
    for fn in calls.values():  # warm-up
        for _ in range(5):
            fn()
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e6)
    out = {}
    for name, ts in times.items():
        q1, median, q3 = statistics.quantiles(ts, n=4)
        out[name] = {"median_us": median, "q1_us": q1, "q3_us": q3}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pcdeq_kernels.bench.call_path", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dim", type=int, default=80)
    p.add_argument("--activation", default="tanh")
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--backend", default="cpu", choices=("cpu",), help="the compiled backend whose op is timed")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--rounds", type=int, default=2000)
    p.add_argument("--out", help="a JSON file to write the figures to")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    calls = callables(args.batch, args.dim, args.activation, args.tol, args.backend)
    figures = measure_interleaved(calls, args.rounds)
    ratios = {
        "forward": figures["forward/fixed_point"]["median_us"] / figures["forward/op"]["median_us"],
        "train": figures["train/fixed_point"]["median_us"] / figures["train/ops"]["median_us"],
    }
    for name, f in figures.items():
        print(f"{name:22s} median {f['median_us']:8.1f} us   (quartiles {f['q1_us']:.1f} .. {f['q3_us']:.1f})")
    for name, r in ratios.items():
        print(f"ratio {name:16s} {r:.2f}x")
    if args.out:
        result = {
            "command": "python -m pcdeq_kernels.bench.call_path " + " ".join(sys.argv[1:] if argv is None else argv),
            "shape": [args.batch, args.dim], "activation": args.activation, "tol": args.tol, "backend": args.backend,
            "threads": args.threads, "rounds": args.rounds, "machine": machine_info("cpu"),
            "figures": figures, "ratios": ratios,
        }
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
