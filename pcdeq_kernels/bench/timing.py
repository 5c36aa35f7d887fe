"""Wall-clock timing that is honest on CPU and GPU: warm-up first; on CUDA every measured call ends
with a synchronize, so queued kernels are inside the measured time."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def measure(fn: Callable[[], object], device_type: str, *, warmup: int = 2, min_seconds: float = 0.3, max_reps: int = 200, min_reps: int = 3) -> dict:
    """Median and interquartile range of ``fn()`` in milliseconds, over at least ``min_reps`` calls and
    until ``min_seconds`` have passed (at most ``max_reps``)."""
    sync = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < min_seconds and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"median_ms": statistics.median(times), "iqr_ms": q[2] - q[0], "reps": len(times)}
