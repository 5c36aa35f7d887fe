"""Run a benchmark grid, print the table, write JSON and PNG plots.

For each shape (B, d) (dense) or (B, C, H, W) (convolutional), mode (``forward``: the solve alone; ``train``: forward + backward) and path,
the median wall time after warm-up; speedups are ``official time / path time`` on the same data in
the same run. Roofline columns: ``flops = 2 B d^2 (forward + backward iterations)`` (the matmuls the
solve needs; ``2 B C^2 9 H W`` per iteration for a convolution), the achieved TFLOP/s, and on a GPU with a known peak the fraction of that peak and of
the no-overhead floor ``launch latency + flops / peak``.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
from pathlib import Path

import torch

from ..activations import get_activation
from ..precision import torch_conv_precision, torch_matmul_precision
from ..reference import activation_derivative_at, adjoint_map, contraction_bound, global_contraction_rate, linear_map, relative_residual
from . import paths
from .timing import measure

QUICK_SHAPES = [(64, 80), (256, 256), (1024, 256)]
FULL_SHAPES = [(64, 80)] + [(b, d) for b in (256, 1024, 8192) for d in (256, 1024, 4096)]
# The paper's convolutional layers at batch 64: single-conv MNIST (82 channels, 28x28) and CIFAR-10
# (125, 32x32); the multi-conv CIFAR-10 stages (20 at 32x32, 50 at 15x15, 80 at 7x7).
CONV_QUICK_SHAPES = [(64, 82, 28, 28)]
CONV_SHAPES = [(64, 82, 28, 28), (64, 125, 32, 32), (64, 20, 32, 32), (64, 50, 15, 15), (64, 80, 7, 7)]
# Dense tensor-core peaks (TFLOP/s) from NVIDIA's datasheets: tf32 for float32 where torch's setting for
# the grid's op (matmul for dense problems, convolution for conv ones) allows TF32, plain FP32 where it
# asks for exact float32; fp16 and bf16 share a peak.
GPU_PEAKS = {
    "H100 SXM": {"tf32": 494.7, "fp32": 66.9, "half": 989.4},
    "H100 PCIe": {"tf32": 378.0, "fp32": 51.2, "half": 756.0},
    "H100": {"tf32": 494.7, "fp32": 66.9, "half": 989.4},  # other H100 variants: the SXM figures
    "H200": {"tf32": 494.7, "fp32": 66.9, "half": 989.4},
    "A100": {"tf32": 156.0, "fp32": 19.5, "half": 312.0},
}
LAUNCH_LATENCY_S = 5e-6  # one kernel launch, the floor of any solve on a GPU


def cpu_model() -> dict:
    """The CPU's model name and whether it has AVX-512 (machines with and without it are about 4x apart
    per flop: a CPU ratio holds for the model it was measured on), from /proc/cpuinfo where there is one."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"cpu_model": platform.processor() or None, "avx512": None}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    return {"cpu_model": fields.get("model name"), "avx512": "avx512f" in fields.get("flags", "").split()}


def write_json(path: str | Path, result: dict) -> None:
    """Write a benchmark's result (its folder made as needed) and say where."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


def machine_info(device_type: str) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        **cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "float32_matmul_precision": torch_matmul_precision(),  # "ieee" or "tf32"
        "float32_conv_precision": torch_conv_precision(),  # the same for convolutions (cuDNN's switch)
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device_type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return info


def peak_tflops(gpu_name: str | None, dtype: torch.dtype, kinds=("dense",)) -> tuple[float | None, str]:
    """The GPU's peak for the grid: by dtype and, for float32, torch's precision setting for the op of
    the grid's ``kinds`` ("dense": matmuls, "conv": convolutions; None when they differ)."""
    if not gpu_name:
        return None, "no known peak for a CPU"
    for key, peaks in GPU_PEAKS.items():
        if key in gpu_name:
            if dtype in (torch.float16, torch.bfloat16):
                return peaks["half"], f"{key} fp16/bf16 tensor cores"
            settings = {kind: torch_conv_precision() if kind == "conv" else torch_matmul_precision() for kind in kinds}
            if len(set(settings.values())) > 1:
                return None, f"dense and conv shapes at different float32 precisions ({settings}): no single peak"
            (precision,) = set(settings.values())
            if precision == "ieee":
                return peaks["fp32"], f"{key} FP32 (torch's float32 {'/'.join(sorted(kinds))} precision 'ieee')"
            return peaks["tf32"], f"{key} tf32 tensor cores"
    return None, f"no peak on record for {gpu_name}"


def run_grid(shapes, *, device="cpu", dtype=torch.float32, activation="tanh", tol=1e-4, max_iter=200,
             modes=("forward", "train"), paths_to_run=None, min_seconds=0.3, progress=True) -> dict:
    """Time every available path on every shape; returns the JSON-ready result."""
    device_type = torch.device(device).type
    kinds = {"conv" if len(shape) == 4 else "dense" for shape in shapes}
    availability = {}
    for kind in sorted(kinds):  # a path runs the grid only if it runs every kind in it
        for p, why in paths.available_paths(device_type, kind, dtype).items():
            availability[p] = availability.get(p) or why
    # Forced solve loops run only when named: by default each backend runs as its dispatcher chooses.
    default = [p for p in availability if p not in paths.FORCED_LOOPS]
    chosen = [p for p in (paths_to_run or default) if availability.get(p) == ""]
    unknown = sorted(set(paths_to_run or ()) - set(availability))
    if unknown or (paths_to_run is not None and "official" not in paths_to_run):
        raise ValueError(
            f"paths must name 'official' (speedups are relative to it) and others of {sorted(availability)}; "
            f"got {paths_to_run}"
        )
    skipped = {p: why for p, why in availability.items() if why and p in (paths_to_run or default)}
    info = machine_info(device_type)
    peak, peak_source = peak_tflops(info.get("gpu"), dtype, sorted(kinds))
    jobs = [(shape, mode, path) for shape in shapes for mode in modes for path in chosen]
    bar = _progress(len(jobs), progress)
    rows = []
    for shape in shapes:
        u, w = paths.problem_for_shape(shape, device=device, dtype=dtype, activation=activation)
        name = "x".join(map(str, shape))
        runners = {p: paths.runner(p, u, w, activation, tol, max_iter) for p in chosen}
        _check_agreement(runners, u)
        for mode in modes:
            for path in chosen:
                bar.set_description(f"{name} {mode} {path}")
                r = runners[path]
                fn = r.forward if mode == "forward" else r.train_step
                timing = measure(fn, device_type, min_seconds=min_seconds)
                fwd_it, bwd_it = r.iterations()
                its = fwd_it + (bwd_it if mode == "train" and not math.isnan(bwd_it) else 0.0)
                flops = 2.0 * u.numel() * w[0].numel() * its  # multiply-adds of L per map application
                row = dict(shape=list(shape), mode=mode, path=path, **timing,
                           forward_iterations=fwd_it, backward_iterations=bwd_it if mode == "train" else None,
                           flops=flops, achieved_tflops=flops / (timing["median_ms"] * 1e-3) / 1e12)
                if peak:
                    floor_s = LAUNCH_LATENCY_S + flops / (peak * 1e12)
                    row["fraction_of_peak"] = row["achieved_tflops"] / peak
                    row["fraction_of_floor"] = floor_s / (timing["median_ms"] * 1e-3)
                rows.append(row)
                bar.update(1)
    bar.close()
    for row in rows:
        base = next(r for r in rows if r["shape"] == row["shape"] and r["mode"] == row["mode"] and r["path"] == "official")
        row["speedup_vs_official"] = base["median_ms"] / row["median_ms"]
    return dict(machine=info, device=device, dtype=str(dtype).replace("torch.", ""), activation=activation,
                tol=tol, max_iter=max_iter, peak_tflops=peak, peak_source=peak_source,
                skipped=skipped, results=rows)


def _check_agreement(runners: dict, u: torch.Tensor) -> None:
    """Every path must solve the same problem: forward outputs agree to the stopping tolerance."""
    z_official = runners["official"].forward().float()
    for name, r in runners.items():
        z = r.forward().float()
        err = ((z - z_official).norm() / z_official.norm()).item()
        if not err < 1e-2:
            raise RuntimeError(f"path {name!r} disagrees with the official solve: relative difference {err:.2e}")


class _NoBar:
    def set_description(self, *_):
        pass

    def update(self, *_):
        pass

    def close(self):
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, unit="run")


def format_table(result: dict) -> str:
    rows = result["results"]
    lines = [
        f"{result['machine'].get('gpu') or result['machine']['processor']} | torch {result['machine']['torch']} | "
        f"{result['dtype']} {result['activation']} tol {result['tol']:g} | {result['machine']['date']}",
        f"{'shape':>15} {'mode':>7} {'path':>18} {'median ms':>10} {'vs official':>11} {'fwd it':>7} {'bwd it':>7} {'TFLOP/s':>8}"
        + (f" {'%peak':>6}" if result["peak_tflops"] else ""),
    ]
    for r in rows:
        bwd = r["backward_iterations"]
        line = (f"{'x'.join(map(str, r['shape'])):>15} {r['mode']:>7} {r['path']:>18} {r['median_ms']:>10.3f} "
                f"{r['speedup_vs_official']:>10.2f}x {r['forward_iterations']:>7.1f} "
                f"{'' if bwd is None or math.isnan(bwd) else f'{bwd:.1f}':>7} {r['achieved_tflops']:>8.4f}")
        if result["peak_tflops"]:
            line += f" {100 * r['fraction_of_peak']:>5.1f}%"
        lines.append(line)
    for path, why in result["skipped"].items():
        lines.append(f"skipped {path}: {why}")
    return "\n".join(lines)


def convergence_history(batch=64, dim=80, *, activation="tanh", steps=40, seed=0) -> dict:
    """Per-iteration forward and adjoint errors of one sample against two rates: its global
    contraction rate ``c`` (forward ``max_i |z_k - z*|_i / z*_i`` and adjoint ``sum_i z*_i |g_k - g*|_i``,
    normalised, are both proven to be at most ``c^k`` at every k) and ``rho``, the stats'
    ``contraction_bound`` (an upper bound on the spectral radius of the Jacobian: the rate at which
    both errors shrink once k is large), drawn as ``rho^k`` through the forward error at k = 1. The
    sample shown is the one with the smallest global rate."""
    u, w = paths.make_problem(batch, dim, dtype=torch.float64, activation=activation, seed=seed)
    act = get_activation(activation).fn
    z_star = torch.zeros_like(u)
    for _ in range(2000):
        z_star = act(linear_map(z_star, w) + u)
    c = global_contraction_rate(z_star, u, activation)
    rho = contraction_bound(z_star, u, w, activation)
    b = int(c.argmin())
    D = activation_derivative_at(z_star, u, w, activation)
    v = torch.randn(u.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=u.dtype)
    g_star = v.clone()
    for _ in range(2000):
        g_star = adjoint_map(D * g_star, w) + v
    z, g = torch.zeros_like(u), v.clone()
    hist = {"k": [], "forward_error": [], "forward_residual": [], "adjoint_error": [], "bound": [], "asymptotic": []}
    e0 = (z_star[b] * (g[b] - g_star[b]).abs()).sum()
    for k in range(1, steps + 1):
        z_next = act(linear_map(z, w) + u)
        hist["forward_residual"].append(relative_residual(z_next, z)[b].item())
        z = z_next
        g = adjoint_map(D * g, w) + v
        hist["k"].append(k)
        hist["forward_error"].append(((z[b] - z_star[b]).abs() / z_star[b]).max().item())
        hist["adjoint_error"].append(((z_star[b] * (g[b] - g_star[b]).abs()).sum() / e0).item())
        hist["bound"].append(c[b].item() ** k)
        hist["asymptotic"].append(hist["forward_error"][0] * rho[b].item() ** (k - 1))
    hist["global_rate"] = c[b].item()
    hist["global_rate_max_over_batch"] = c.max().item()
    hist["contraction_bound"] = rho[b].item()
    hist["contraction_bound_max_over_batch"] = rho.max().item()
    return hist


def write_outputs(result: dict, history: dict | None, out_dir: str | Path) -> list[Path]:
    """The JSON (with ``history``, the dense convergence illustration, when given), the speedup plot
    and, with a history, the convergence plot."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = (result["machine"].get("gpu") or "cpu").replace(" ", "_")
    kind = "conv" if all(len(r["shape"]) == 4 for r in result["results"]) else "dense"
    stem = f"bench-{device}-{kind}-{result['dtype']}-{result['machine']['date'][:10]}"
    json_path = out / f"{stem}.json"
    json_path.write_text(json.dumps(dict(result, convergence=history), indent=1))
    written = [json_path]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    rows = result["results"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    shapes = sorted({tuple(r["shape"]) for r in rows})
    path_names = list(dict.fromkeys(r["path"] for r in rows))
    width = 0.8 / max(len(path_names), 1)
    for ax, mode in zip(axes, ("forward", "train")):
        for j, p in enumerate(path_names):
            ys = [next((r["speedup_vs_official"] for r in rows if tuple(r["shape"]) == s and r["mode"] == mode and r["path"] == p), 0) for s in shapes]
            ax.bar([i + j * width for i in range(len(shapes))], ys, width, label=p)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))], ["x".join(map(str, s)) for s in shapes])
        ax.axhline(1, color="k", lw=0.8)
        ax.set_title(f"{mode}: speedup vs official (B x d, or B x C x H x W)")
        ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{result['machine'].get('gpu') or result['machine']['processor']}, {result['dtype']}, {result['activation']}")
    fig.tight_layout()
    speed_path = out / f"{stem}-speedup.png"
    fig.savefig(speed_path, dpi=110)
    plt.close(fig)
    if history is None:
        return written + [speed_path]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for key, style in (("forward_error", "-"), ("forward_residual", ":"), ("adjoint_error", "--")):
        ax.semilogy(history["k"], history[key], style, label=key.replace("_", " "))
    ax.semilogy(history["k"], history["bound"], "k-", lw=0.8, label=f"c^k (proven), global rate c = {history['global_rate']:.3f}")
    ax.semilogy(history["k"], history["asymptotic"], "k--", lw=0.8,
                label=f"slope rho^k, contraction_bound rho = {history['contraction_bound']:.3f}")
    ax.set_xlabel("iteration k")
    ax.set_title("convergence vs the global rate and the contraction bound (B=64, d=80)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    conv_path = out / f"{stem}-convergence.png"
    fig.savefig(conv_path, dpi=110)
    plt.close(fig)
    return written + [speed_path, conv_path]
