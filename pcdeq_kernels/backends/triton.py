"""The Triton backend: fused solves behind the backend interface, dense (``pcdeq_kernels.triton.dense``)
and convolutional (``pcdeq_kernels.triton.conv``: implicit-GEMM 3x3 convolution, channels-last).

On CUDA tensors, or, when ``TRITON_INTERPRET=1``, on CPU tensors only (Triton's interpreter: slow, for
testing the kernels on machines without a GPU). Computes in float32: float16, bfloat16 and float32
inputs are solved exactly as ``reference.py`` solves them; float64 problems are not its to solve
(``unsupported_reason``: "auto" passes them on, an explicit request says to use the cpu or reference
backend).

Triton itself is imported on the first solve, not when ``pcdeq_kernels`` is imported.
"""

from __future__ import annotations

import importlib.util
import os

from ..triton import limits

NAME = "triton"


# Looked up once: torch.compile traces the dispatcher's availability checks, and Dynamo (torch 2.11)
# refuses to trace importlib's find_spec.
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def _triton_installed() -> bool:
    return _TRITON_FOUND


def _interpreting() -> bool:
    """TRITON_INTERPRET as Triton reads it. The kernels module records the value it was defined under."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def is_available() -> bool:
    return _triton_installed() and (_cuda() or _interpreting())


def unavailable_reason() -> str:
    if not _triton_installed():
        return (
            "Triton is not installed: `pip install triton` (with a CUDA GPU), or set TRITON_INTERPRET=1 "
            "to test on CPU"
        )
    if not (_cuda() or _interpreting()):
        return "no CUDA GPU is visible; the Triton kernels need one (or TRITON_INTERPRET=1 to run them slowly on CPU)"
    return ""


def unsupported_reason(spec, problem) -> str:
    """CUDA tensors with compiled kernels, or CPU tensors under the interpreter (never both: "auto"
    must not send CUDA tensors through the slow interpreter); float16, bfloat16 and float32;
    at most ``limits.MAX_ITER`` steps (a 32-bit counter)."""
    if _interpreting():
        if problem.device_type != "cpu":
            return "under TRITON_INTERPRET=1 the Triton backend runs CPU tensors only (the interpreter)"
    elif problem.device_type != "cuda":
        return f"the Triton backend solves CUDA tensors, not {problem.device_type} ones"
    if problem.dtype not in limits.KERNEL_DTYPES:
        return (f"the Triton kernels compute in float32 and take float16, bfloat16 or float32, not {problem.dtype}; "
                "use backend='cpu' or 'reference' for float64, or cast to float32")
    longest = max(spec.max_iter, spec.backward_max_iter)
    if longest > limits.MAX_ITER:
        return f"the Triton kernels count steps in 32 bits: max_iter and backward_max_iter <= 2**30, got {longest}"
    return ""


def _kernels(weight):
    """The kernel module for the problem: a (C, C, 3, 3) weight is convolutional."""
    if weight.dim() == 4:
        from ..triton import conv

        return conv
    from ..triton import dense

    return dense


def forward_solve(u, weight, z0, spec):
    return _kernels(weight).forward_solve(u, weight, z0, spec)


def adjoint_solve(v, weight, D, spec):
    return _kernels(weight).adjoint_solve(v, weight, D, spec)
