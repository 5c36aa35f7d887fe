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

from ..activations import ACTIVATIONS, get_activation, map_ids
from ..problem import check_like, describe, empty_outputs

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


def eager_solve(u, weight, z0, spec):
    """The whole eager solve in one compiled call (``pcdeq_C::eager_solve``, csrc/cpu/eager_solve.h):
    the input checks, ``forward_solve`` with the implicit gradient attached by a C++ autograd node, and
    the forward's report. CPU tensors, a nonempty batch, eager mode only. Returns the forward's four
    outputs, the backward's iterations and residual (filled in when the gradient is computed) and a
    status (``INVALID_INPUTS``, nothing solved; else ``solve_report``'s bits)."""
    kernel_id = get_activation(spec.activation).kernel_id
    return torch.ops.pcdeq_C.eager_solve.default(
        u, weight, z0, kernel_id, spec.tol, spec.max_iter, spec.batch_stop,
        spec.backward_tol, spec.backward_max_iter, spec.backward == "jfb", spec.key,
    )


INVALID_INPUTS = 4  # eager_solve's status when the inputs were refused (csrc/cpu/eager_solve.h)


def _check_fake_call(op, x_name, x, weight, other_name, other, activation=None):
    """What the kernels check (csrc/include/pcdeq/op_checks.h), for the calls that reach the fake
    kernels instead: torch.compile's, and any call with a meta tensor among its arguments (one sends
    the whole call here), which must be refused rather than answered with uninitialised outputs."""
    if x.device != weight.device:
        raise RuntimeError(
            f"pcdeq_C::{op}: {x_name} is on {x.device} but weight is on {weight.device}; move them to one device"
        )
    if other is not None and other.device != x.device:
        raise RuntimeError(
            f"pcdeq_C::{op}: {other_name} is on {other.device} but {x_name} is on {x.device}; move them to one device"
        )
    describe(x, weight, x_name)
    check_like(other_name, other, x, x_name)
    if activation is not None and activation not in {a.kernel_id for a in ACTIVATIONS.values()}:
        raise RuntimeError(f"pcdeq_C::{op}: unknown activation id {activation} ({map_ids()})")


if IMPORT_ERROR is None and hasattr(torch.ops.pcdeq_C, "forward_solve"):

    # The compiled kernels return the state in problem.state_format of their input (as the op layer does).
    @torch.library.register_fake("pcdeq_C::forward_solve")
    def _(u, weight, z0, activation, tol, max_iter, batch_stop):
        _check_fake_call("forward_solve", "u", u, weight, "z0", z0, activation)
        return empty_outputs(u)

    @torch.library.register_fake("pcdeq_C::adjoint_solve")
    def _(v, weight, D, tol, max_iter, batch_stop):
        _check_fake_call("adjoint_solve", "v", v, weight, "D", D)
        return empty_outputs(v)
