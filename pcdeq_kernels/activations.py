"""The map table: the one place that defines each activation and the id every kernel knows it by.

A solve iterates one of these maps, each picked in the kernels by a compile-time id:

    forward   x <- act(L(x) + u)        id: the activation's ``kernel_id`` (0, 1, 2, ...)
    adjoint   x <- D * (L^T(x) + v)     id: ``ADJOINT_ID`` (-1: it cannot collide with an activation)

Every backend reads this table: the reference calls ``fn``/``derivative`` directly; the Triton kernels
take their ids from ``map_ids()``; the C++/CUDA code includes ``csrc/include/pcdeq/map_ids.h``, which is
generated from this table (``scripts/generate_map_ids.py``; a test fails when the two disagree) and
whose ``PCDEQ_FOR_EACH_ACTIVATION`` list generates every switch over ids.

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


ADJOINT_ID = -1  # the adjoint map's epilogue id; activation ids are >= 0, so the two cannot collide


def map_ids() -> dict[str, int]:
    """Every map a solve can iterate, by name: ``{"adjoint": -1, "tanh": 0, ...}``, in id order."""
    return {"adjoint": ADJOINT_ID, **{a.name: a.kernel_id for a in sorted(ACTIVATIONS.values(), key=lambda a: a.kernel_id)}}


def check_map_id(map_id: int) -> int:
    """``map_id`` if it is in the table, else a ValueError (what launchers call before compiling a kernel)."""
    if isinstance(map_id, bool) or map_id not in map_ids().values():
        raise ValueError(f"unknown map id {map_id!r}: the map table (pcdeq_kernels.activations) has {map_ids()}")
    return map_id


def c_header() -> str:
    """The text of ``csrc/include/pcdeq/map_ids.h``: the table's ids for the C++ and CUDA code."""
    acts = sorted(ACTIVATIONS.values(), key=lambda a: a.kernel_id)
    enum = "\n".join(f"  {a.name.upper()} = {a.kernel_id}," for a in acts)
    each = " ".join(f"X({a.name.upper()}, {a.kernel_id})" for a in acts)
    return f"""// Generated from pcdeq_kernels/activations.py by scripts/generate_map_ids.py: do not edit.
// tests/test_activations.py fails when this file and the table disagree.
//
// The ids of the maps a solve iterates: an activation's id selects the forward map act(L(x) + u),
// kAdjoint the adjoint map D * (L^T(x) + v). Activation ids are >= 0 and kAdjoint is < 0, so the
// two cannot collide. Switches over ids are generated from PCDEQ_FOR_EACH_ACTIVATION (X(NAME, ID)
// per activation, in id order), so a new table entry reaches every switch; an id without a formula
// in activations.h is a compile-time error there.
#pragma once

namespace pcdeq {{

enum Activation : int {{
{enum}
}};

constexpr int kNumActivations = {len(acts)};
constexpr int kAdjoint = {ADJOINT_ID};

}}  // namespace pcdeq

#define PCDEQ_FOR_EACH_ACTIVATION(X) {each}
"""


def get_activation(name: str) -> Activation:
    """Look an activation up by name; unknown names raise a ValueError that lists the valid ones."""
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(
            f"unknown activation {name!r}: pcDEQ supports {sorted(ACTIVATIONS)} "
            "(nondecreasing, concave and bounded on [0, inf))"
        )
    return ACTIVATIONS[name]
