"""What the two compiled backends (``cpu``, ``cuda``) share: the extension ``pcdeq_kernels._C``.

Loading it registers ``pcdeq_C::forward_solve(u, weight, z0, activation_id, tol, max_iter,
batch_stop)`` and ``pcdeq_C::adjoint_solve(v, weight, D, tol, max_iter, batch_stop)``: one schema, a
CPU kernel (csrc/cpu/) and, in a CUDA build, a CUDA kernel (csrc/cuda/); the tensors' device picks
which runs. Activation ids are the map table's (``activations.py``, ``csrc/include/pcdeq/map_ids.h``).
Their fake kernels are registered here, once; ``forward_solve``/``adjoint_solve`` below are the
backend interface both compiled backends share (a ``SolveSpec`` in, the op's arguments out).
"""

from __future__ import annotations

import torch

from ..activations import get_activation
from ..problem import empty_outputs

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


def forward_solve(u, weight, z0, spec):
    kernel_id = get_activation(spec.activation).kernel_id
    return torch.ops.pcdeq_C.forward_solve(u, weight, z0, kernel_id, spec.tol, spec.max_iter, spec.batch_stop)


def adjoint_solve(v, weight, D, spec):
    return torch.ops.pcdeq_C.adjoint_solve(v, weight, D, spec.backward_tol, spec.backward_max_iter, spec.batch_stop)


if IMPORT_ERROR is None and hasattr(torch.ops.pcdeq_C, "forward_solve"):

    # The compiled kernels return the state in problem.state_format of their input (as the op layer does).
    @torch.library.register_fake("pcdeq_C::forward_solve")
    def _(u, weight, z0, activation, tol, max_iter, batch_stop):
        return empty_outputs(u)

    @torch.library.register_fake("pcdeq_C::adjoint_solve")
    def _(v, weight, D, tol, max_iter, batch_stop):
        return empty_outputs(v)
