"""python -m pcdeq_kernels.bench.threads_under_load: the cpu backend with 1 and 2 threads, on an idle
machine and beside one busy process.

For each shape, the compiled forward op (``torch.ops.pcdeq_C.forward_solve``, tanh, tol 1e-4, the
problem of ``call_path``) is timed for at least a second per point with ``torch.set_num_threads(1)``
and ``(2)``, first idle, then while a second Python process spins (``while True: pass``, not pinned).
Prints medians, means and 90th percentiles in microseconds (contention shows in the mean and the tail). Run it with and without ``OMP_WAIT_POLICY=PASSIVE``
in the environment to see what OpenMP's spinning waits cost under load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

from .call_path import _problem
from .report import machine_info, write_json


def _time(fn, seconds: float) -> dict:
    for _ in range(3):
        fn()
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 20:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    times.sort()
    return {"median_us": statistics.median(times), "mean_us": statistics.fmean(times),
            "p90_us": times[int(0.9 * len(times))], "calls": len(times)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pcdeq_kernels.bench.threads_under_load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="64x80,256x256,1024x256", help="comma-separated B x d")
    p.add_argument("--seconds", type=float, default=1.0, help="time per point")
    p.add_argument("--out", help="a JSON file to write the figures to")
    args = p.parse_args(argv)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    op = torch.ops.pcdeq_C.forward_solve
    figures = {}
    for load in ("idle", "busy"):
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load == "busy" else None
        try:
            time.sleep(0.5 if hog else 0.0)
            for batch, dim in shapes:
                u, weight, _ = _problem(batch, dim, "tanh")
                for threads in (1, 2):
                    torch.set_num_threads(threads)
                    f = _time(lambda: op(u, weight, None, 0, 1e-4, 200, False), args.seconds)
                    figures[f"{load} {batch}x{dim} threads={threads}"] = f
                    print(f"{load:4s} {batch}x{dim} threads={threads}: median {f['median_us']:8.0f} us  "
                          f"mean {f['mean_us']:8.0f} us  p90 {f['p90_us']:8.0f} us", flush=True)
        finally:
            if hog:
                hog.kill()
    if args.out:
        result = {
            "command": "python -m pcdeq_kernels.bench.threads_under_load " + " ".join(sys.argv[1:] if argv is None else argv),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "machine": machine_info("cpu"), "figures": figures,
        }
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
