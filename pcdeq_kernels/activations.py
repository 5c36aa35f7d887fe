"""The activation table: the one place that defines each concave activation.

Every backend reads this table: the reference calls ``fn``/``derivative`` directly, kernels use
``kernel_id`` as a compile-time constant, and the C++/CUDA header ``csrc/include/pcdeq/activations.h``
uses the same ids (a test checks the two agree).

A pcDEQ activation ``act`` must be nondecreasing and concave on ``[0, inf)`` with
``act([0, inf)) ⊆ [0, inf)``; all four below also are bounded, which makes a fixed point exist.

    name      act(x)                 act'(x)                    act(0)  sup     family
    tanh      tanh(x)                1 - tanh(x)^2              0       1       pcDEQ-1
    softsign  x / (1 + |x|)          1 / (1 + |x|)^2            0       1       pcDEQ-1
    relu6     min(max(x, 0), 6)      1 if 0 < x < 6 else 0      0       6       pcDEQ-1
    sigmoid   1 / (1 + exp(-x))      s(x) (1 - s(x))            1/2     1       pcDEQ-2

``relu6``'s derivative at the kinks (0 and 6) is 0, as in torch's autograd, so kernels and float64
autograd agree bit for bit on which entries are "active".
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import Tensor


@dataclasses.dataclass(frozen=True)
class Activation:
    name: str
    kernel_id: int  # constexpr id shared with the kernels and csrc/include/pcdeq/activations.h
    fn: Callable[[Tensor], Tensor]
    derivative: Callable[[Tensor], Tensor]  # act'(pre-activation)
    value_at_zero: float
    supremum: float  # act is bounded: act(x) < supremum (<= for relu6) on [0, inf)
    family: str  # "pcDEQ-1" (needs u > 0) or "pcDEQ-2" (act(0) > 0, so u >= 0 suffices)
    concave_on_nonnegatives: bool = True
    nondecreasing: bool = True

    @property
    def bounded(self) -> bool:
        return self.supremum < float("inf")


def _tanh_derivative(x: Tensor) -> Tensor:
    t = torch.tanh(x)
    return 1 - t * t


def _softsign_derivative(x: Tensor) -> Tensor:
    return (1 + x.abs()).reciprocal().square()


def _relu6(x: Tensor) -> Tensor:
    return x.clamp(0, 6)


def _relu6_derivative(x: Tensor) -> Tensor:
    return ((x > 0) & (x < 6)).to(x.dtype)


def _sigmoid_derivative(x: Tensor) -> Tensor:
    s = torch.sigmoid(x)
    return s * (1 - s)


ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in (
        Activation("tanh", 0, torch.tanh, _tanh_derivative, 0.0, 1.0, "pcDEQ-1"),
        Activation("softsign", 1, torch.nn.functional.softsign, _softsign_derivative, 0.0, 1.0, "pcDEQ-1"),
        Activation("relu6", 2, _relu6, _relu6_derivative, 0.0, 6.0, "pcDEQ-1"),
        Activation("sigmoid", 3, torch.sigmoid, _sigmoid_derivative, 0.5, 1.0, "pcDEQ-2"),
    )
}


def get_activation(name: str) -> Activation:
    """Look an activation up by name; unknown names raise a ValueError that lists the valid ones."""
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(
            f"unknown activation {name!r}: pcDEQ supports {sorted(ACTIVATIONS)} "
            "(nondecreasing, concave and bounded on [0, inf))"
        )
    return ACTIVATIONS[name]
