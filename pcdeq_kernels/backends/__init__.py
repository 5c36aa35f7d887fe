"""The dispatcher: the only place that decides which backend solves a problem.

A backend is a module with

    NAME                                    its name in ``spec.BACKENDS``
    is_available() -> bool                  its compiled code or package is there (and a device for it)
    unavailable_reason() -> str             why not, and how to get it ("" when available)
    unsupported_reason(spec, problem) -> str
                                            why it cannot solve this spec on these tensors ("" when it can)
    STOP_RULES (optional)                   the stopping rules it implements (default "sample" and "batch")
    forward_solve(u, weight, z0, spec)      -> (z*, iterations int32 (B,), residual (B,), converged bool (B,))
    adjoint_solve(v, weight, D, spec)       -> (h*, ...): the adjoint's stopping rule is spec.backward_*

with the semantics of ``pcdeq_kernels.reference``; ``spec`` is a ``SolveSpec`` and ``problem`` a
``problem.Problem`` (kind, device type, dtype, batch). Empty batches never reach a backend (the ops
answer them). A backend may also offer

    eager_solve(u, weight, z0, spec)        -> forward_solve's outputs, the backward's iterations and
                                               residual, a status (see backends/compiled.py)

the whole eager call in compiled code: the input checks, the forward solve, its implicit gradient
attached by a compiled autograd node (the cpu backend: C++) and the forward's report; ``functional``
uses it for plain eager calls in place of the ops and the Python ``autograd.Function``.

``"auto"`` takes the first backend in ``AUTO_ORDER`` that is available and can solve the spec on the
problem's tensors; the reference solves everything, so ``"auto"`` never fails.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import NamedTuple

from ..problem import Problem
from ..spec import BACKENDS, SolveSpec
from . import reference

BACKEND_NAMES = BACKENDS[1:]  # the concrete ones ("auto" is a choice among them)
_BACKENDS: dict[str, ModuleType] = {"reference": reference}
# Optional backends live in modules of the same name (backends/cpu.py, cuda.py, triton.py); each
# reports through is_available()/unavailable_reason() whether its compiled code or package is there.
for _name in BACKEND_NAMES[1:]:
    _BACKENDS[_name] = importlib.import_module(f".{_name}", __name__)
# Fastest first, per device type.
AUTO_ORDER: dict[str, tuple[str, ...]] = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}


def available_backends() -> dict[str, bool]:
    """Which backends this installation can run: ``{"reference": True, "cpu": ..., "cuda": ..., "triton": ...}``
    (``backend_status`` says why one cannot, and how to get it)."""
    return {name: _BACKENDS[name].is_available() for name in BACKEND_NAMES}


class BackendStatus(NamedTuple):
    """Whether a backend can run here, and if not, why not and how to get it (``reason``, else "")."""

    available: bool
    reason: str

    def __str__(self) -> str:
        return "available" if self.available else f"unavailable: {self.reason}"


def backend_status() -> dict[str, BackendStatus]:
    """Every backend with whether this installation can run it and, when not, the reason and the fix:
    ``{"reference": BackendStatus(True, ""), "cpu": ..., "cuda": BackendStatus(False, "no CUDA GPU ..."), ...}``.
    ``str()`` of one reads "available" or "unavailable: <reason>"."""
    status = {}
    for name in BACKEND_NAMES:
        backend = _BACKENDS[name]
        available = backend.is_available()
        status[name] = BackendStatus(available, "" if available else backend.unavailable_reason())
    return status


def _unsupported_reason(backend: ModuleType, spec: SolveSpec, problem: Problem) -> str:
    """Why ``backend`` cannot solve ``spec`` on ``problem``'s tensors ("" when it can): its stopping rules,
    then its own reason."""
    if spec.stop not in getattr(backend, "STOP_RULES", ("sample", "batch")):
        able = [n for n, b in _BACKENDS.items() if spec.stop in getattr(b, "STOP_RULES", ("sample", "batch"))]
        return f"stop={spec.stop!r} is implemented by the {' and '.join(able)} backend(s) only"
    return backend.unsupported_reason(spec, problem)


def resolve(spec: SolveSpec, problem: Problem) -> str:
    """The concrete backend that will solve ``spec`` on ``problem``'s tensors: ``spec.backend``
    itself (an error, with the reason and the fix, if it is unavailable or cannot), or for ``"auto"``
    the first backend of ``AUTO_ORDER`` that can."""
    name = spec.backend
    if name == "auto":
        for candidate in AUTO_ORDER.get(problem.device_type, ("reference",)):
            backend = _BACKENDS[candidate]
            if backend.is_available() and not _unsupported_reason(backend, spec, problem):
                return candidate
        return "reference"
    backend = _BACKENDS[name]  # spec.backend is one of BACKENDS: SolveSpec checked it
    if not backend.is_available():
        raise RuntimeError(f"backend {name!r} is not available: {backend.unavailable_reason()}")
    reason = _unsupported_reason(backend, spec, problem)
    if reason:
        able = [n for n, b in _BACKENDS.items() if b.is_available() and not _unsupported_reason(b, spec, problem)]
        raise ValueError(
            f"backend {name!r} cannot solve this problem ({problem.kind}, {problem.dtype} on {problem.device_type}): "
            f"{reason}; use backend='auto' or one of {able}"
        )
    return name


def get(name: str) -> ModuleType:
    """The backend module for a concrete (already resolved) name."""
    return _BACKENDS[name]
