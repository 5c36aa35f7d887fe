"""The reference backend: the specification (``pcdeq_kernels.reference``) used as a backend.

Runs on any device and dtype torch supports; one host read per iteration. It is what ``"auto"`` falls
back to when no faster backend serves the tensors, and what every other backend is tested against.
"""

from __future__ import annotations

from .. import reference

NAME = "reference"
STOP_RULES = ("sample", "batch", "official")


def is_available() -> bool:
    return True


def unavailable_reason() -> str:
    return ""


def unsupported_reason(spec, problem) -> str:
    return ""  # every spec, kind, device and dtype


def forward_solve(u, weight, z0, spec):
    return reference.forward_solve(u, weight, spec.activation, tol=spec.tol, max_iter=spec.max_iter, stop=spec.stop, z0=z0)


def adjoint_solve(v, weight, D, spec):
    return reference.adjoint_solve(v, weight, D, tol=spec.backward_tol, max_iter=spec.backward_max_iter, stop=spec.stop)
