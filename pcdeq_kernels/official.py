"""The official pcDEQ algorithm, restated (not copied) from the authors' public code: the baseline
every benchmark compares against and the parity target of ``stop="batch"``.

Forward: under ``no_grad``, ``z_0 = 0``, ``z_{k+1} = act(L(z_k) + u)``; after each step read
``||z_{k+1} - z_k||_F`` and ``||z_{k+1}||_F`` (whole batch) to the host, stop when their ratio
(denominator ``+ 1e-5``) is below ``tol`` or after ``max_iter`` steps. Then apply the map once more with
autograd on: that application is the output and carries the gradient.

Backward: a hook on the output solves ``g = J^T g + grad`` by the same iteration and stopping rule,
from ``g_0 = grad``, each step one ``autograd.grad`` vector-Jacobian product through a retained graph
of one map application at the output.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import Tensor

from .activations import get_activation
from .reference import RESIDUAL_EPS, linear_map


@dataclasses.dataclass
class OfficialStats:
    forward_iterations: int = 0
    backward_iterations: int = 0
    pre_output: Tensor | None = None  # the last solver iterate, before the extra application


def official_iteration(f: Callable[[Tensor], Tensor], z0: Tensor, tol: float, max_iter: int) -> tuple[Tensor, int]:
    """Plain fixed-point iteration with two host reads per step; returns (last iterate, steps)."""
    z = z0
    for step in range(1, max_iter + 1):
        z_next = f(z)
        diff = (z_next - z).norm().item()
        scale = z_next.norm().item()
        z = z_next
        if diff / (scale + RESIDUAL_EPS) < tol:
            return z, step
    return z, max_iter


def official_fixed_point(
    u: Tensor, weight: Tensor, activation: str = "tanh", tol: float = 1e-4, max_iter: int = 200
) -> tuple[Tensor, OfficialStats]:
    """The official algorithm on ``z = act(L(z) + u)``: returns the output and its (mutable) stats."""
    act = get_activation(activation).fn
    stats = OfficialStats()

    def f(z: Tensor) -> Tensor:
        return act(linear_map(z, weight) + u)

    with torch.no_grad():
        z_star, stats.forward_iterations = official_iteration(f, torch.zeros_like(u), tol, max_iter)
    stats.pre_output = z_star
    z = f(z_star)
    if z.requires_grad:
        z_attached = z.detach().requires_grad_()
        f_attached = f(z_attached)

        def backward_hook(grad: Tensor) -> Tensor:
            def adjoint_step(g: Tensor) -> Tensor:
                return torch.autograd.grad(f_attached, z_attached, g, retain_graph=True)[0] + grad

            g, stats.backward_iterations = official_iteration(adjoint_step, grad, tol, max_iter)
            return g

        z.register_hook(backward_hook)
    return z, stats
