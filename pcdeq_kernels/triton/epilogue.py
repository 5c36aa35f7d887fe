"""Triton device helpers shared by the dense (``dense.py``) and convolutional (``conv.py``) kernels.

Every pcDEQ kernel ends its tile the same way: add the bias (u, or v for the adjoint), apply the
activation (or multiply by D for the adjoint), and reduce the squared norms that the stopping rule
``||x_{k+1} - x_k|| / (||x_{k+1}|| + 1e-5) < tol`` needs. Those pieces live here, once, so that the
two kernel families cannot drift apart; the kernels pick the map with a ``tl.constexpr`` epilogue id:
an activation's ``kernel_id`` (``activations.py``) for the forward map, ``ADJOINT`` for the adjoint.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..reference import RESIDUAL_EPS

ADJOINT = -1  # epilogue id of the adjoint map D * (.); activations use their kernel_id >= 0
_EPS = tl.constexpr(RESIDUAL_EPS)  # the stopping rule's denominator guard, shared with the reference


@triton.jit
def _activation(x, ACT: tl.constexpr):
    """act(x) in float32 for ``kernel_id`` ACT: 0 tanh, 1 softsign, 2 relu6, 3 sigmoid.

    No libdevice (the interpreter has none): tanh and sigmoid come from ``exp``. For ``|x| >= 0.625``
    ``tanh|x| = (1 - e) / (1 + e)`` with ``e = exp(-2|x|) <= 0.29`` (no overflow, and the cancellation
    in ``1 - e`` at most doubles exp's error, which is a few ulp on GPUs: ``ex2.approx``). Below 0.625
    that cancellation grows without bound as ``x -> 0``, so ``tanh x = x + x^3 P(x^2)`` there, with P of
    degree 5 fitted for this project (weighted least squares of ``(tanh(x)/x - 1)/x^2`` on [0, 0.625]
    in float64): relative error 2e-10 in exact arithmetic, about 1 ulp evaluated in float32.
    """
    if ACT == 0:
        ax = tl.abs(x)
        xs = tl.minimum(tl.maximum(x, -0.625), 0.625)  # the polynomial's range (no overflow outside it)
        z = xs * xs
        p = 0.0021536143280329644
        p = p * z - 0.00818997083729613
        p = p * z + 0.02170626131393174
        p = p * z - 0.05394789002143328
        p = p * z + 0.1333321614999511
        p = p * z - 0.33333331108468517
        t_small = xs + xs * z * p
        e = tl.exp(-2.0 * ax)
        t_big = (1.0 - e) / (1.0 + e)
        t_big = tl.where(x < 0.0, -t_big, t_big)
        y = tl.where(ax < 0.625, t_small, t_big)
    elif ACT == 1:
        y = x / (1.0 + tl.abs(x))
    elif ACT == 2:
        y = tl.minimum(tl.maximum(x, 0.0), 6.0)
    else:
        y = 1.0 / (1.0 + tl.exp(-x))
    return y


@triton.jit
def _epilogue(acc, bias, scale, ACT: tl.constexpr):
    """The map's elementwise tail: ``act(acc + bias)``, or ``scale * (acc + bias)`` for the adjoint."""
    if ACT == -1:  # ADJOINT (a literal: jit code reads only constexpr globals)
        y = scale * (acc + bias)
    else:
        y = _activation(acc + bias, ACT)
    return y


@triton.jit
def _relative_residual(diff_sq, norm_sq):
    """``||x_{k+1} - x_k|| / (||x_{k+1}|| + 1e-5)`` from the two squared norms."""
    return tl.sqrt(diff_sq) / (tl.sqrt(norm_sq) + _EPS)


@triton.jit
def _any(mask):
    """Whether any entry of a boolean vector is set (a scalar the loop conditions can test)."""
    return tl.max(mask.to(tl.int32), axis=0) > 0
