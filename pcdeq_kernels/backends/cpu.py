"""The compiled C++ CPU backend: the whole solve loop in ``pcdeq_kernels._C`` (csrc/cpu/).

Dense problems (solver.cpp): per iteration one matmul (a packed SIMD kernel for d <= 1024, BLAS above)
and one fused, multithreaded pass that applies the activation (or the multiply by D), writes the next
state and reduces each row's residual; samples that meet the stopping rule leave the active set, so
the matmul shrinks with it. Convolutional problems (conv_solver.cpp): the same fused pass after one
channels-last oneDNN convolution of the unfinished images. No host round trip per iteration;
semantics of ``pcdeq_kernels.reference``.

The ops are ``torch.ops.pcdeq_C.forward_solve(u, weight, z0, activation_id, tol, max_iter,
batch_stop)`` and ``torch.ops.pcdeq_C.adjoint_solve(v, weight, D, tol, max_iter, batch_stop)``;
their fake kernels are registered in ``compiled.py``. Solves every spec and dtype of CPU tensors.
"""

from __future__ import annotations

import torch

from . import compiled
from .compiled import adjoint_solve, forward_solve  # noqa: F401  (the backend interface)

if compiled.has_kernels("CPU") and hasattr(torch.ops.pcdeq_C, "eager_solve"):
    # The optional third entry point (see backends/__init__.py): the whole eager call in one C++ op,
    # its gradient attached by a C++ autograd node.
    from .compiled import eager_solve  # noqa: F401

NAME = "cpu"
_AVAILABLE = compiled.has_kernels("CPU")


def is_available() -> bool:
    return _AVAILABLE


def unavailable_reason() -> str:
    if _AVAILABLE:
        return ""
    how = (
        "build the C++ extension with a C++ compiler and torch installed: "
        "`pip install --no-build-isolation -e .` in the pcdeq_kernels checkout"
    )
    if compiled.IMPORT_ERROR is not None:
        return f"{how} (importing pcdeq_kernels._C failed: {compiled.IMPORT_ERROR})"
    return f"{how} (pcdeq_kernels._C imported but did not register the pcdeq_C ops)"


def unsupported_reason(spec, problem) -> str:
    if problem.device_type != "cpu":
        return f"the cpu backend solves CPU tensors, not {problem.device_type} ones"
    return ""


def thread_backoff_seconds() -> float:
    """Seconds left during which the cpu backend solves on one thread because its recent multithreaded
    solves found the cores busy with other work (0.0: solves get the threads their size allows). See
    docs/backends.md ("cpu": threads under contention)."""
    if not _AVAILABLE:
        raise RuntimeError(f"backend 'cpu' is not available: {unavailable_reason()}")
    return torch.ops.pcdeq_C.thread_backoff_seconds()
