"""What the two compiled backends (``cpu``, ``cuda``) share: the extension ``pcdeq_kernels._C``.

Loading it registers ``pcdeq_C::forward_solve(u, weight, z0, activation_id, tol, max_iter,
batch_stop)`` and ``pcdeq_C::adjoint_solve(v, weight, D, tol, max_iter, batch_stop)``: one schema, a
CPU kernel (csrc/cpu/) and, in a CUDA build, a CUDA kernel (csrc/cuda/); the tensors' device picks
which runs. Their fake kernels are registered here, once.
"""

from __future__ import annotations

import torch

from ..activations import get_activation

STOP_RULES = ("sample", "batch")
OPS = ("forward_solve", "adjoint_solve")

try:
    from .. import _C  # noqa: F401  (loading the library registers torch.ops.pcdeq_C)

    IMPORT_ERROR: Exception | None = None
except (ImportError, OSError) as err:  # not built, or built against another torch
    IMPORT_ERROR = err


def has_kernels(dispatch_key: str) -> bool:
    """Whether the extension loaded and registered both ops for ``dispatch_key`` ("CPU", "CUDA")."""
    if IMPORT_ERROR is not None:
        return False
    try:
        return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"pcdeq_C::{op}", dispatch_key) for op in OPS)
    except RuntimeError:  # the ops themselves are not defined
        return False


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


if IMPORT_ERROR is None and hasattr(torch.ops.pcdeq_C, "forward_solve"):

    # The compiled kernels return the state in ops.state_format of their input (as the op layer does).
    @torch.library.register_fake("pcdeq_C::forward_solve")
    def _(u, weight, z0, activation, tol, max_iter, batch_stop):
        from ..ops import empty_state

        return (empty_state(u), *_fake_stats(u))

    @torch.library.register_fake("pcdeq_C::adjoint_solve")
    def _(v, weight, D, tol, max_iter, batch_stop):
        from ..ops import empty_state

        return (empty_state(v), *_fake_stats(v))
