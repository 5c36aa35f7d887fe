"""The reference backend: the specification (``pcdeq_kernels.reference``) used as a backend.

Runs on any device and dtype torch supports; one host read per iteration. It is what ``"auto"`` falls
back to when no faster backend serves the tensors, and what every other backend is tested against.
"""

from __future__ import annotations

from .. import reference

NAME = "reference"
KINDS = ("dense", "conv")


def is_available() -> bool:
    return True


def unavailable_reason() -> str:
    return ""


def supports(device_type: str, kind: str) -> bool:
    return kind in KINDS


def forward_solve(u, weight, z0, activation, tol, max_iter, stop):
    return reference.forward_solve(u, weight, activation, tol=tol, max_iter=max_iter, stop=stop, z0=z0)


def adjoint_solve(v, weight, D, tol, max_iter, stop):
    return reference.adjoint_solve(v, weight, D, tol=tol, max_iter=max_iter, stop=stop)
