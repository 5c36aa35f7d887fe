"""The compiled C++ CPU backend: the whole solve loop in ``pcdeq_kernels._C`` (csrc/cpu/solver.cpp).

Per iteration one BLAS matmul (torch's, into a preallocated buffer) and one fused, multithreaded pass
that applies the activation (or the multiply by D), writes the next state and reduces each row's
residual; samples that meet the stopping rule leave the active set, so the matmul shrinks with it.
No host round trip per iteration. Dense problems only; semantics of ``pcdeq_kernels.reference``.

The ops are ``torch.ops.pcdeq_C.forward_solve(u, weight, z0, activation_id, tol, max_iter,
batch_stop)`` and ``torch.ops.pcdeq_C.adjoint_solve(v, weight, D, tol, max_iter, batch_stop)``;
their fake kernels are registered here.
"""

from __future__ import annotations

import torch

from ..activations import get_activation

NAME = "cpu"
KINDS = ("dense",)
STOP_RULES = ("sample", "batch")

try:
    from .. import _C  # noqa: F401  (loading the library registers torch.ops.pcdeq_C)

    _IMPORT_ERROR: Exception | None = None
except (ImportError, OSError) as err:  # not built, or built against another torch
    _IMPORT_ERROR = err


def _ops_registered() -> bool:
    try:
        torch.ops.pcdeq_C.forward_solve
        torch.ops.pcdeq_C.adjoint_solve
    except (AttributeError, RuntimeError):
        return False
    return True


_AVAILABLE = _IMPORT_ERROR is None and _ops_registered()


def is_available() -> bool:
    return _AVAILABLE


def unavailable_reason() -> str:
    if _AVAILABLE:
        return ""
    how = (
        "build the C++ extension with a C++ compiler and torch installed: "
        "`pip install --no-build-isolation -e .` in the pcdeq_kernels checkout"
    )
    if _IMPORT_ERROR is not None:
        return f"{how} (importing pcdeq_kernels._C failed: {_IMPORT_ERROR})"
    return f"{how} (pcdeq_kernels._C imported but did not register the pcdeq_C ops)"


def supports(device_type: str, kind: str) -> bool:
    return device_type == "cpu" and kind in KINDS


def _batch_stop(stop: str) -> bool:
    if stop not in STOP_RULES:
        raise ValueError(f"stop must be one of {STOP_RULES}, got {stop!r}")
    return stop == "batch"


def forward_solve(u, weight, z0, activation, tol, max_iter, stop):
    kernel_id = get_activation(activation).kernel_id
    return torch.ops.pcdeq_C.forward_solve(u, weight, z0, kernel_id, float(tol), int(max_iter), _batch_stop(stop))


def adjoint_solve(v, weight, D, tol, max_iter, stop):
    return torch.ops.pcdeq_C.adjoint_solve(v, weight, D, float(tol), int(max_iter), _batch_stop(stop))


def _fake_stats(x: torch.Tensor):
    batch = x.shape[0]
    residual_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (
        x.new_empty(batch, dtype=torch.int32),
        x.new_empty(batch, dtype=residual_dtype),
        x.new_empty(batch, dtype=torch.bool),
    )


if _AVAILABLE:

    @torch.library.register_fake("pcdeq_C::forward_solve")
    def _(u, weight, z0, activation, tol, max_iter, batch_stop):
        return (torch.empty_like(u), *_fake_stats(u))

    @torch.library.register_fake("pcdeq_C::adjoint_solve")
    def _(v, weight, D, tol, max_iter, batch_stop):
        return (torch.empty_like(v), *_fake_stats(v))
