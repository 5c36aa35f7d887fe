"""Random well-posed pcDEQ problems and the unrolled ground truth, shared by tests and benchmarks."""

import torch
import torch.nn.functional as F

from pcdeq_kernels import reference
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


# --- comparing a backend's solve with the reference's -------------------------------------------
# Tolerances, for backends that differ from the reference only in summation order (exact fp32/fp64
# arithmetic), each with its reason:
# - float64 solves use tol 1e-9: iterates then agree to rounding (1e-12 relative), and iteration
#   counts are equal unless a residual sits within 1e-6 relative of tol (then a rounding difference
#   may decide the step: off by one is allowed there, and only there).
# - float32 solves use tol 1e-4 (the default). The residual r = ||x_next - x|| / ||x_next|| moves by a
#   few eps (absolute) when the iterates move by an ulp, i.e. by ~5e-3 relative at r ~ tol = 1e-4:
#   off by one is allowed where r is within 1e-2 relative of tol; iterates agree to 1e-5 (a few ulps
#   amplified by 1/(1-c)).
# - Residuals agree to 1e-3 relative plus 16 eps absolute, for the same reason.
TOL = {torch.float64: 1e-9, torch.float32: 1e-4}
NEAR_TOL = {torch.float64: 1e-6, torch.float32: 1e-2}  # relative band around tol
STATE_RTOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def forward_map(u, weight, activation):
    """x -> act(L(x) + u), the forward map as the reference applies it."""
    act = get_activation(activation).fn
    return lambda z: act(linear_map(z, weight) + u)


def adjoint_map(v, weight, D):
    """x -> D * (L^T(x) + v), the adjoint map as the reference applies it."""
    return lambda h: D * (reference.adjoint_map(h, weight) + v)


def adjoint_problem(batch, dim, activation, dtype, *, seed=0, conv_hw=None, device="cpu"):
    """(v, W, D): D at the forward fixed point of a make_problem problem (solved in float64)."""
    u, w = make_problem(batch, dim, activation, dtype=torch.float64, seed=seed, conv_hw=conv_hw)
    z, *_ = reference.forward_solve(u, w, activation, tol=1e-13, max_iter=2000)
    D = reference.activation_derivative_at(z, u, w, activation)
    v = torch.randn(u.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return tuple(t.to(device=device, dtype=dtype) for t in (v, w, D))


def step_residuals(step_fn, x0, steps, stop):
    """The reference's residual after exactly `steps` applications of the map, with no early exit:
    per sample (stop="sample") or the whole-batch ratio broadcast to every sample ("batch")."""
    x = x0
    for _ in range(steps - 1):
        x = step_fn(x)
    x_next = step_fn(x)
    if stop == "batch":
        return reference.batch_relative_residual(x_next, x).expand(x0.shape[0])
    return reference.relative_residual(x_next, x)


def check_against_reference(got, want, step_fn, x0, tol, stop, dtype, *, state_rtol=None, residual_rtol=1e-3):
    """Counts equal except off by one at a residual near tol; states, residuals, flags agree (the
    tolerances above; a caller with another summation scheme may widen ``state_rtol`` and
    ``residual_rtol``, saying why). ``got`` is compared on ``want``'s device."""
    state_rtol = STATE_RTOL[dtype] if state_rtol is None else state_rtol
    x, its, res, conv = (t.to(want[0].device) for t in got)
    x_ref, its_ref, res_ref, conv_ref = want
    assert x.dtype == x_ref.dtype and its.dtype == torch.int32 and conv.dtype == torch.bool
    assert res.dtype == res_ref.dtype and x.shape == x_ref.shape and its.shape == its_ref.shape
    differ = its != its_ref
    if differ.any():
        assert ((its - its_ref).abs() <= 1).all(), (its, its_ref)
        # at the earlier of the two counts one side stopped and the other did not: r must sit at tol
        for b in differ.nonzero().flatten().tolist():
            k = int(min(its[b], its_ref[b]))
            r = step_residuals(step_fn, x0, k, stop)[b].item()
            assert abs(r - tol) <= NEAR_TOL[dtype] * tol, (b, k, r, tol)
    same = ~differ
    torch.testing.assert_close(x[same], x_ref[same], rtol=state_rtol, atol=state_rtol)
    torch.testing.assert_close(x[differ], x_ref[differ], rtol=10 * tol, atol=10 * tol)  # one step apart
    # r = ||x_next - x|| / ||x_next||: rounding every entry of the iterates by an ulp moves r by a few
    # eps in absolute terms, whatever r is
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(res[same], res_ref[same], rtol=residual_rtol, atol=16 * eps)
    assert torch.equal(conv, conv_ref)
