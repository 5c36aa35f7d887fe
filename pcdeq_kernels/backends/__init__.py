"""The dispatcher: the only place that decides which backend solves a problem.

A backend is a module with ``NAME``, ``is_available()``, ``unavailable_reason()``,
``supports(device_type, kind)`` and the two solves ``forward_solve(u, weight, z0, activation, tol,
max_iter, stop)`` and ``adjoint_solve(v, weight, D, tol, max_iter, stop)``, each returning
``(state, iterations int32 (B,), residual (B,), converged bool (B,))`` with the semantics of
``pcdeq_kernels.reference``. ``kind`` is ``"dense"`` (weight (d, d)) or ``"conv"`` (weight (C, C, 3, 3)).

``"auto"`` takes the first backend in ``AUTO_ORDER`` that is available and supports the device and
kind; the reference serves everything, so ``"auto"`` never fails.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from . import reference

BACKEND_NAMES = ("reference", "cpu", "cuda", "triton")
_BACKENDS: dict[str, ModuleType] = {"reference": reference}
# Optional backends live in modules of the same name (backends/cpu.py, cuda.py, triton.py); each
# reports through is_available()/unavailable_reason() whether its compiled code or package is there.
for _name in BACKEND_NAMES[1:]:
    try:
        _BACKENDS[_name] = importlib.import_module(f".{_name}", __name__)
    except ModuleNotFoundError as _err:
        if _err.name != f"{__name__}.{_name}":
            raise
# Fastest first, per device type. Later backends register themselves here.
AUTO_ORDER: dict[str, tuple[str, ...]] = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}

_HOW_TO_GET = {
    "cpu": "the compiled C++ CPU backend is not part of this build yet",
    "cuda": "the compiled CUDA backend is not part of this build yet",
    "triton": "the Triton backend is not part of this build yet",
}


def available_backends() -> dict[str, bool]:
    """Which backends this installation can run: ``{"reference": True, "cpu": ..., "cuda": ..., "triton": ...}``."""
    return {name: name in _BACKENDS and _BACKENDS[name].is_available() for name in BACKEND_NAMES}


def _why_unavailable(name: str) -> str:
    if name in _BACKENDS:
        return _BACKENDS[name].unavailable_reason()
    return _HOW_TO_GET[name]


def resolve(name: str, device_type: str, kind: str) -> str:
    """Turn a requested backend name (or ``"auto"``) into the concrete backend that will run."""
    if name == "auto":
        for candidate in AUTO_ORDER.get(device_type, ("reference",)):
            backend = _BACKENDS.get(candidate)
            if backend is not None and backend.is_available() and backend.supports(device_type, kind):
                return candidate
        return "reference"
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {name!r}: choose one of {('auto',) + BACKEND_NAMES}")
    backend = _BACKENDS.get(name)
    if backend is None or not backend.is_available():
        raise RuntimeError(f"backend {name!r} is not available: {_why_unavailable(name)}")
    if not backend.supports(device_type, kind):
        raise ValueError(
            f"backend {name!r} does not support {kind} problems on {device_type} tensors; "
            f"use backend='auto' or one of {[n for n, b in _BACKENDS.items() if b.supports(device_type, kind)]}"
        )
    return name


def get(name: str) -> ModuleType:
    """The backend module for a concrete (already resolved) name."""
    return _BACKENDS[name]
