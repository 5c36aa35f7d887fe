"""python -m pcdeq_kernels.bench.contraction: how tight ``stats.contraction_bound`` is, and what it costs.

On each problem, per sample: the global rate ``max_i (1 - act(u)_i / z*_i)`` (the bound before
Collatz-Wielandt), the bound from ``z*`` alone and the bound with two power steps (what the stats
report), the true spectral radius ``rho(J)`` of the Jacobian at ``z*`` (dense float64 eigenvalues, on
the first ``--eig-samples`` samples) and the observed rate: the forward residual's per-step ratio at
the end of a long float64 reference solve, ``(r_K / r_(K-10))^(1/10)``, which tends to ``rho(J)``.
Tightness is stated as ``(1 - rho) / (1 - bound)``: the factor by which the bound underestimates the
spectral gap (1.0: exact), which is what sets the iteration count.

Problems: the benchmark's trained-layer regime (``paths.make_problem``: W row sums 0.9, softplus
injection) at B=64 with d = 80 and 256 (``--dims``), and the demo's layer after training (``LinearPCDEQNet``,
d = 80, on the digits' test images, ``--epochs`` epochs of ``examples/train_digits.py``'s recipe).
The cost is the bound's time (its three float64 matmuls) against the cpu backend's solve of the
same batch, both timed here.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from .. import fixed_point
from ..activations import get_activation
from ..reference import contraction_bound, global_contraction_rate, linear_map, relative_residual
from . import paths
from .report import machine_info, write_json


def _observed_rate(u, w, activation, steps: int = 10, max_iter: int = 5000) -> torch.Tensor:
    """Per-sample ``(r_K / r_(K - steps))^(1 / steps)`` of the float64 forward iteration from 0, K the
    first step at which every sample's residual is below 1e-12 (or max_iter)."""
    act = get_activation(activation).fn
    z = torch.zeros_like(u)
    history = []
    for _ in range(max_iter):
        z_next = act(linear_map(z, w) + u)
        r = relative_residual(z_next, z)
        history.append(r)
        z = z_next
        if len(history) > steps and (r < 1e-12).all():
            break
    return (history[-1] / history[-1 - steps]) ** (1.0 / steps), z


def _spectral_radius(z, u, w, activation, b: int) -> float:
    act = get_activation(activation).fn
    f = lambda x: act(linear_map(x[None], w) + u[b : b + 1])[0].flatten()  # noqa: E731
    J = torch.autograd.functional.jacobian(f, z[b]).reshape(z[b].numel(), z[b].numel())
    return torch.linalg.eigvals(J).abs().max().item()


def _time(fn, repeat: int = 20) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def trained_demo_layer(epochs: int, seed: int = 0):
    """The demo's linear pcDEQ-1 net (d = 80, tanh) trained on the digits as examples/train_digits.py
    trains it; returns (u, W) of its pcDEQ layer on the test images, in float64."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from ..models import LinearPCDEQNet
    from ..modules import INJECTIONS

    torch.manual_seed(seed)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).reshape(-1, 64) / 16.0
    y = torch.tensor(digits.target)
    train, test = train_test_split(range(len(y)), test_size=0.2, random_state=seed, stratify=y)
    model = LinearPCDEQNet(64, features=80, activation="tanh", backend="auto")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    for _ in range(epochs):
        order = torch.tensor(train)[torch.randperm(len(train))]
        for start in range(0, len(order), 64):
            idx = order[start : start + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            model.project_()
    model.eval()
    layer = model.pcdeq_layers()[0]
    captured = {}
    hook = layer.register_forward_hook(lambda mod, inputs, out: captured.setdefault("x", inputs[0]))
    with torch.no_grad():
        model(x[test])
    hook.remove()
    u = INJECTIONS[layer.injection](captured["x"])
    return u.double(), layer.weight.detach().double()


def measure(name: str, u, w, activation: str, eig_samples: int) -> dict:
    observed, z = _observed_rate(u, w, activation)
    bound = contraction_bound(z, u, w, activation)
    from_z = contraction_bound(z, u, w, activation, power_steps=0)
    rate = global_contraction_rate(z, u, activation)
    rho = [_spectral_radius(z, u, w, activation, b) for b in range(min(eig_samples, len(u)))]
    u32, w32 = u.float(), w.float()
    solve_s = _time(lambda: fixed_point(u32, w32, activation, backend="cpu"))
    bound_s = _time(lambda: contraction_bound(z.float(), u32, w32, activation))
    gaps = [(1 - r) / (1 - bound[b].item()) for b, r in enumerate(rho)]
    row = {
        "problem": name, "shape": list(u.shape), "activation": activation,
        "global_rate_median": rate.median().item(), "bound_from_z_median": from_z.median().item(),
        "bound_median": bound.median().item(), "bound_max": bound.max().item(),
        "observed_rate_median": observed.median().item(),
        "spectral_radius": rho, "bound_at_those_samples": bound[: len(rho)].tolist(),
        "gap_factor_max": max(gaps), "gap_factor_median": statistics.median(gaps),
        "bound_below_rho_anywhere": any(bound[b].item() < r for b, r in enumerate(rho)),
        "bound_ms": bound_s * 1e3, "cpu_solve_ms": solve_s * 1e3, "cost_fraction": bound_s / solve_s,
    }
    print(f"{name:28s} global rate {row['global_rate_median']:.4f}  from z* {row['bound_from_z_median']:.4f}  "
          f"bound {row['bound_median']:.4f}  rho {statistics.median(rho):.4f}  observed {row['observed_rate_median']:.4f}  "
          f"(1-rho)/(1-bound) {row['gap_factor_median']:.3f} (max {row['gap_factor_max']:.3f})  "
          f"cost {bound_s * 1e3:.2f} ms = {100 * row['cost_fraction']:.0f}% of a {solve_s * 1e3:.2f} ms cpu solve", flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pcdeq_kernels.bench.contraction", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=10, help="training epochs of the demo's layer")
    p.add_argument("--eig-samples", type=int, default=8, help="samples whose rho(J) is computed densely")
    p.add_argument("--dims", default="80,256", help="comma-separated d of the benchmark problems (B=64)")
    p.add_argument("--out", help="a JSON file to write the figures to")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for dim in (int(d) for d in args.dims.split(",")):
        for activation in ("tanh", "sigmoid"):
            u, w = paths.make_problem(64, dim, dtype=torch.float64, activation=activation)
            rows.append(measure(f"benchmark B=64 d={dim}", u, w, activation, args.eig_samples))
    u, w = trained_demo_layer(args.epochs)
    rows.append(measure(f"demo layer, {args.epochs} epochs", u, w, "tanh", args.eig_samples))
    if args.out:
        result = {
            "command": "python -m pcdeq_kernels.bench.contraction " + " ".join(sys.argv[1:] if argv is None else argv),
            "machine": machine_info("cpu"), "threads": 1, "rows": rows,
        }
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
