"""The compiled CUDA backend: dense and convolutional solves in ``pcdeq_kernels._C`` (csrc/cuda/).

Same ops as the CPU backend (``torch.ops.pcdeq_C.forward_solve`` / ``adjoint_solve``), registered
for the CUDA dispatch key when the extension was built with CUDA. Per solve, either

- one launch that iterates every block of 16 rows to the end in shared memory (no host round trip at
  all), when the block's state fits in shared memory and W is small enough to stream from L2 each
  step (always the case at the paper's sizes); or
- a stepwise loop for large W and for ``stop="batch"`` with more than 16 rows: per step one fused
  tile kernel (matmul, epilogue, per-row residual) and one small kernel that updates the per-row
  counts and stop flags on the device; the host reads the number of active rows every 8 steps.

Matmuls: float32 on tf32 tensor cores when torch's fp32 matmul precision allows tf32 (as for torch's
own matmuls), otherwise exact float32 on CUDA cores; float16/bfloat16 are solved in float32 with the
state rounded to the input dtype for the tensor-core matmul; float64 on CUDA cores. Needs a GPU of
compute capability 8.0 or newer. ``PCDEQ_CUDA_PATH=single|stepwise`` forces one of the two loops
(for tests and benchmarks).

Convolutional problems (csrc/cuda/conv_solve.cu): per step one cuDNN convolution of the unfinished
images (channels-last) and one fused epilogue kernel (activation or multiply by D, next state,
per-image residual, freeze flags on the device); the host reads a status block only at check steps
(adaptive by default, ``PCDEQ_CUDA_CHECK_EVERY=k`` for every k steps) and then compacts the working
set to the unfinished images. Semantics of ``pcdeq_kernels.reference``.
The fake kernels of the shared op names are registered in ``backends/compiled.py``.
"""

from __future__ import annotations

import torch

from . import compiled
from .compiled import adjoint_solve, forward_solve  # noqa: F401  (the backend interface)

NAME = "cuda"
MIN_CAPABILITY = (8, 0)

_HOW_TO_BUILD = (
    "build the extension with a CUDA build of torch and the CUDA toolkit (nvcc) it was built with: "
    "`CUDA_HOME=/path/to/cuda pip install --no-build-isolation -e .` in the pcdeq_kernels checkout "
    "(PCDEQ_FORCE_CUDA=1 builds the CUDA kernels even where torch sees no GPU)"
)

_REGISTERED = compiled.has_kernels("CUDA")


_CAPABILITY_REASON: dict[int, str] = {}  # per device index: the dispatcher asks on every call


def _gpu_reason() -> str:
    """Why the current GPU cannot run the kernels ("" when it can)."""
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    index = torch.cuda.current_device()
    reason = _CAPABILITY_REASON.get(index)
    if reason is None:
        capability = torch.cuda.get_device_capability(index)
        reason = ""
        if capability < MIN_CAPABILITY:
            reason = (
                f"the GPU ({torch.cuda.get_device_name(index)}) has compute capability {capability[0]}.{capability[1]}; "
                "the CUDA kernels need 8.0 or newer (use backend='triton' or 'reference')"
            )
        _CAPABILITY_REASON[index] = reason
    return reason


def is_available() -> bool:
    return _REGISTERED and _gpu_reason() == ""


def unavailable_reason() -> str:
    if compiled.IMPORT_ERROR is not None:
        return f"{_HOW_TO_BUILD} (importing pcdeq_kernels._C failed: {compiled.IMPORT_ERROR})"
    if not _REGISTERED:
        return f"pcdeq_kernels._C was built without its CUDA kernels (a CPU-only build): {_HOW_TO_BUILD}"
    return _gpu_reason()


def unsupported_reason(spec, problem) -> str:
    if problem.device_type != "cuda":
        return f"the cuda backend solves CUDA tensors, not {problem.device_type} ones"
    return ""
