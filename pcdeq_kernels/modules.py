"""Drop-in pcDEQ layers: ``PCDEQLinear`` and ``PCDEQConv2d``.

A layer maps its input ``x`` to ``z*``, the fixed point of ``z = act(L(z) + u)`` with the injection
``u = phi(x)`` computed once:

    pcDEQ-1: phi = softplus(beta=5) (u > 0), act in {tanh, softsign, relu6}
    pcDEQ-2: phi = relu (u >= 0),             act = sigmoid

``L`` is ``z @ W.T`` (``PCDEQLinear``) or a 3x3 convolution with padding 1 (``PCDEQConv2d``), with
``W >= 0`` kept by the chosen parametrization (``parametrizations.py``). After each optimizer step call
``layer.project_()`` (or ``project_(model)`` for a whole network), as the paper does.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activations import get_activation
from . import functional
from .functional import SolverStats
from .parametrizations import make_parametrization
from .spec import SolveSpec, with_solve_options

INJECTIONS = {
    "softplus": lambda x: F.softplus(x, beta=5),  # pcDEQ-1: strictly positive
    "relu": F.relu,  # pcDEQ-2: nonnegative, can be 0
}


def default_injection(activation: str) -> str:
    """The paper's pairing: relu for pcDEQ-2 (sigmoid), softplus(beta=5) for pcDEQ-1."""
    return "relu" if get_activation(activation).family == "pcDEQ-2" else "softplus"


def _check_pair(activation: str, injection: str) -> None:
    if injection not in INJECTIONS:
        raise ValueError(f"unknown injection {injection!r}: choose one of {sorted(INJECTIONS)}")
    if injection == "relu" and get_activation(activation).value_at_zero <= 0:
        raise ValueError(
            f"activation {activation!r} has {activation}(0) = 0, so with the relu injection (u can be 0) "
            "the map can fix z = 0 and the pcDEQ guarantees are lost; use injection='softplus' "
            "(pcDEQ-1) or activation='sigmoid' (pcDEQ-2)"
        )


class _PCDEQLayer(nn.Module):
    """What the dense and conv layers share: injection, weight constraint, solve spec, stats.

    ``spec`` (a ``SolveSpec``) holds the activation and every solve option, validated at construction;
    ``activation``, ``injection`` and ``backend`` may be changed afterwards (validated again), and
    ``layer.spec = layer.spec.replace(tol=1e-6)`` changes any other option.
    """

    def __init__(self, weight_shape: tuple[int, ...], activation: str, injection: Optional[str],
                 parametrization: str, options: dict):
        super().__init__()
        spec = SolveSpec.from_options(type(self).__name__, activation=activation, **options)
        injection = default_injection(activation) if injection is None else injection
        _check_pair(activation, injection)
        self.spec = spec
        self._injection = injection
        self.parametrization = parametrization
        self.weight_param = make_parametrization(parametrization, weight_shape)
        self.stats: Optional[SolverStats] = None

    @property
    def activation(self) -> str:
        return self.spec.activation

    @activation.setter
    def activation(self, name: str) -> None:
        spec = self.spec.replace(activation=name)
        _check_pair(name, self.injection)
        self.spec = spec

    @property
    def injection(self) -> str:
        return self._injection

    @injection.setter
    def injection(self, name: str) -> None:
        _check_pair(self.activation, name)
        self._injection = name

    @property
    def backend(self) -> str:
        return self.spec.backend

    @backend.setter
    def backend(self, name: str) -> None:
        self.spec = self.spec.replace(backend=name)

    @property
    def weight(self) -> Tensor:
        """The effective nonnegative weight ``W``, whatever the parametrization."""
        return self.weight_param()

    def project_(self) -> None:
        """Restore ``W >= 0`` after an optimizer step (the paper's projection)."""
        self.weight_param.project_()

    def clamp(self) -> None:
        """``project_()`` under the official blocks' name."""
        self.weight_param.project_()

    def solve(self, u: Tensor) -> Tensor:
        weight = self.weight
        if weight.dtype != u.dtype and torch.is_autocast_enabled(u.device.type):
            # Under autocast the layer's input arrives in the autocast dtype while W stays float32: the
            # layer then runs with W in the input's dtype, as autocast runs a linear or conv layer (the
            # solve itself still iterates in float32, as for any half-precision input).
            weight = weight.to(u.dtype)
        z, self.stats = functional.solve(u, weight, self.spec)
        return z

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"{type(self).__name__} cannot be compiled by torch.jit.script: its solve runs Python (the solve "
            "specification, the backend dispatch, the implicit gradient). Use torch.compile, which captures the "
            "solve as one custom op, or torch.export"
        )

    def extra_repr(self) -> str:
        return (
            f"activation={self.activation!r}, injection={self.injection!r}, "
            f"parametrization={self.parametrization!r}, backend={self.backend!r}, "
            f"tol={self.spec.tol:g}, max_iter={self.spec.max_iter}"
        )


@with_solve_options
class PCDEQLinear(_PCDEQLayer):
    """Dense pcDEQ layer: input ``(..., features)``, output ``z*`` of the same shape.

    Args:
        features: width d of the state (W is d x d).
        activation: "tanh", "softsign", "relu6" (pcDEQ-1) or "sigmoid" (pcDEQ-2).
        injection: "softplus" (beta=5) or "relu"; default: the paper's pairing for the activation.
        parametrization: "weight_norm" (paper), "softplus" or "clamp" (see parametrizations.py).
        **options: the solve options of ``fixed_point`` (the fields of ``SolveSpec``).
    """

    def __init__(self, features: int, activation: str = "tanh", injection: Optional[str] = None, *,
                 parametrization: str = "weight_norm", **options):
        _check_size("features", features)
        super().__init__((features, features), activation, injection, parametrization, options)
        self.features = features

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 1 or x.shape[-1] != self.features:
            raise ValueError(f"PCDEQLinear({self.features}) expects input (..., {self.features}), got {tuple(x.shape)}")
        u = INJECTIONS[self.injection](x.reshape(-1, self.features))
        return self.solve(u).reshape(x.shape)


@with_solve_options
class PCDEQConv2d(_PCDEQLayer):
    """Convolutional pcDEQ layer (3x3 kernel, padding 1): input and output ``(B, C, H, W)``.

    Same arguments as ``PCDEQLinear`` with ``channels`` in place of ``features``.
    """

    def __init__(self, channels: int, activation: str = "tanh", injection: Optional[str] = None, *,
                 parametrization: str = "weight_norm", **options):
        _check_size("channels", channels)
        super().__init__((channels, channels, 3, 3), activation, injection, parametrization, options)
        self.channels = channels

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"PCDEQConv2d({self.channels}) expects input (B, {self.channels}, H, W), got {tuple(x.shape)}")
        return self.solve(INJECTIONS[self.injection](x))


def _check_size(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def pcdeq_layers(model: nn.Module) -> Iterator[_PCDEQLayer]:
    return (m for m in model.modules() if isinstance(m, _PCDEQLayer))


def project_(model: nn.Module) -> None:
    """Project every pcDEQ layer of ``model`` back to ``W >= 0``; call after each optimizer step."""
    for layer in pcdeq_layers(model):
        layer.project_()
