"""Random well-posed pcDEQ problems and the unrolled ground truth, shared by tests and benchmarks."""

import torch
import torch.nn.functional as F

from pcdeq_kernels.activations import ACTIVATIONS, get_activation
from pcdeq_kernels.reference import linear_map

ALL_ACTIVATIONS = sorted(ACTIVATIONS)


def make_problem(batch, dim, activation, *, dtype=torch.float64, weight_scale=0.5, conv_hw=None, seed=0, u_scale=1.0, u_offset=0.0):
    """A random well-posed pcDEQ problem: W >= 0 with row sums about ``weight_scale`` (so the map is a
    contraction of moderate strength), u from the injection the activation's family uses.
    ``conv_hw=(H, W)`` gives a convolutional problem with ``dim`` channels."""
    g = torch.Generator().manual_seed(seed)
    if conv_hw is None:
        weight = torch.rand(dim, dim, generator=g, dtype=torch.float64) * (2 * weight_scale / dim)
        x = torch.randn(batch, dim, generator=g, dtype=torch.float64) * u_scale + u_offset
    else:
        weight = torch.rand(dim, dim, 3, 3, generator=g, dtype=torch.float64) * (2 * weight_scale / (9 * dim))
        x = torch.randn(batch, dim, *conv_hw, generator=g, dtype=torch.float64) * u_scale + u_offset
    u = F.relu(x) if get_activation(activation).family == "pcDEQ-2" else F.softplus(x, beta=5)
    return u.to(dtype), weight.to(dtype)


def unrolled_fixed_point(u, weight, activation, steps):
    """``steps`` applications of the map from 0 with full autograd: the ground truth for gradients."""
    act = get_activation(activation).fn
    z = torch.zeros_like(u)
    for _ in range(steps):
        z = act(linear_map(z, weight) + u)
    return z
