"""Ways to keep a pcDEQ weight nonnegative. Each is a module whose ``forward()`` returns the effective
``W >= 0`` and whose ``project_()`` restores the constraint after an optimizer step.

    weight_norm  W = g * v / ||v||  (norm per output row / channel), v >= 0, g >= 0: the paper's way.
                 ``project_()`` clamps v and g to >= 0 and must follow every optimizer step.
    softplus     W = softplus(V): nonnegative by construction; ``project_()`` does nothing.
    clamp        W itself is the parameter; ``project_()`` clamps it to >= 0.

All start from the paper's init ``W0 = U[0, 1) * sqrt(1e-4) / sqrt(shape[0] + shape[1])`` (the kernel
size of a conv weight does not enter).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PARAMETRIZATIONS = ("weight_norm", "softplus", "clamp")


def paper_init(shape: tuple[int, ...]) -> Tensor:
    return torch.rand(shape) * (math.sqrt(1e-4) / math.sqrt(shape[0] + shape[1]))


def _row_norm(v: Tensor) -> Tensor:
    return v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))


class NonnegativeWeightNorm(nn.Module):
    """``W = g * v / ||v||`` with ``v, g >= 0`` (weight norm with dim=0, as ``torch.nn.utils.weight_norm``).

    A row of ``v`` clamped to all zeros yields a zero row of ``W`` rather than NaN.
    """

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        v = paper_init(shape)
        self.v = nn.Parameter(v)
        self.g = nn.Parameter(_row_norm(v))

    def forward(self) -> Tensor:
        return self.g * self.v / _row_norm(self.v).clamp_min(torch.finfo(self.v.dtype).tiny)

    @torch.no_grad()
    def project_(self) -> None:
        self.v.clamp_(min=0)
        self.g.clamp_(min=0)


class SoftplusWeight(nn.Module):
    """``W = softplus(V)``: always nonnegative, so no projection is needed."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        w0 = paper_init(shape).clamp_min(1e-12)
        self.raw = nn.Parameter(torch.log(torch.expm1(w0)))  # softplus^{-1}(W0)

    def forward(self) -> Tensor:
        return F.softplus(self.raw)

    def project_(self) -> None:
        pass


class ClampedWeight(nn.Module):
    """``W`` is the parameter itself; ``project_()`` clamps it to ``>= 0``."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.weight = nn.Parameter(paper_init(shape))

    def forward(self) -> Tensor:
        return self.weight

    @torch.no_grad()
    def project_(self) -> None:
        self.weight.clamp_(min=0)


def make_parametrization(name: str, shape: tuple[int, ...]) -> nn.Module:
    classes = {"weight_norm": NonnegativeWeightNorm, "softplus": SoftplusWeight, "clamp": ClampedWeight}
    if name not in classes:
        raise ValueError(f"unknown parametrization {name!r}: choose one of {PARAMETRIZATIONS}")
    return classes[name](shape)
