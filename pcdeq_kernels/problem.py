"""What a solve takes and returns: the static checks of its tensors, and the shape of its outputs.

    problem = describe(u, weight)      # Problem(kind="dense"|"conv", device_type, dtype, batch)

``describe`` is the one shape/dtype/device check of a problem (before any backend is chosen); the
output helpers give every solve, and the fake kernels, the same output layout.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KINDS = ("dense", "conv")


class Problem(NamedTuple):
    """The facts about a solve's tensors that decide which backend can run it."""

    kind: str  # "dense" (weight (d, d)) or "conv" (weight (C, C, 3, 3))
    device_type: str
    dtype: torch.dtype
    batch: int


def describe(x: Tensor, weight: Tensor, x_name: str = "u") -> Problem:
    """Check the shapes, dtypes and devices of ``x`` (u, or v for the adjoint) and ``weight``; return
    the problem they pose. Every error names the problem and the fix."""
    for name, t in ((x_name, x), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; pcDEQ solves float16, bfloat16, float32 or float64")
    if x.dtype != weight.dtype:
        raise TypeError(f"{x_name} is {x.dtype} but weight is {weight.dtype}; cast them to one dtype")
    if x.device != weight.device:
        raise ValueError(f"{x_name} is on {x.device} but weight is on {weight.device}; move them to one device")
    if weight.dim() > 0 and weight.shape[0] == 0:
        raise ValueError("weight has zero rows; a pcDEQ layer needs at least one feature or channel")
    if weight.dim() == 2:
        if x.dim() != 2 or weight.shape[0] != weight.shape[1] or x.shape[1] != weight.shape[0]:
            raise ValueError(
                f"dense pcDEQ needs {x_name} of shape (B, d) and weight (d, d); got {x_name} {tuple(x.shape)}, "
                f"weight {tuple(weight.shape)}"
            )
        kind = "dense"
    elif weight.dim() == 4:
        c = weight.shape[0]
        if tuple(weight.shape) != (c, c, 3, 3) or x.dim() != 4 or x.shape[1] != c:
            raise ValueError(
                f"convolutional pcDEQ needs {x_name} of shape (B, C, H, W) and weight (C, C, 3, 3); got {x_name} "
                f"{tuple(x.shape)}, weight {tuple(weight.shape)}"
            )
        if x.shape[0] > 0 and (x.shape[2] == 0 or x.shape[3] == 0):
            raise ValueError(
                f"convolutional pcDEQ needs images of at least one pixel; got {x_name} {tuple(x.shape)} (H or W is 0)"
            )
        kind = "conv"
    else:
        raise ValueError(
            f"weight must have shape (d, d) (dense) or (C, C, 3, 3) (conv); got {tuple(weight.shape)}"
        )
    return Problem(kind, x.device.type, x.dtype, x.shape[0])


def check_like(name: str, t: Optional[Tensor], x: Tensor, x_name: str) -> None:
    """``t`` (z0, or D for the adjoint) is a tensor of ``x``'s shape, dtype and device."""
    if t is None:
        return
    if not isinstance(t, Tensor) or t.shape != x.shape or t.device != x.device or t.dtype != x.dtype:
        got = f"{tuple(t.shape)} {t.dtype} on {t.device}" if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(
            f"{name} must be a tensor shaped like {x_name} {tuple(x.shape)}, {x.dtype} on {x.device}; got {got}"
        )


def state_format(x: Tensor) -> torch.memory_format:
    """The memory format of a solve's state output for input ``x`` (u or v): channels-last for a
    channels-last image batch (the convolutional kernels' layout), else contiguous. Every backend's
    output is brought to it, so the fake kernels (which torch.compile plans strides with) are exact."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def empty_state(x: Tensor) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=state_format(x))


def empty_stats(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Uninitialised per-sample outputs for input ``x``: iterations int32, residual (float64 for
    float64 problems, else float32), converged bool; each of shape (B,)."""
    batch = x.shape[0]
    residual_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (
        x.new_empty(batch, dtype=torch.int32),
        x.new_empty(batch, dtype=residual_dtype),
        x.new_empty(batch, dtype=torch.bool),
    )


def empty_outputs(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A solve's outputs for input ``x``, uninitialised (what the fake kernels return)."""
    return (empty_state(x), *empty_stats(x))
