"""Random well-posed pcDEQ problems and the unrolled ground truth, shared by tests and benchmarks;
and the checks that several backends' tests (tests/test_backend_*.py) run alike, each taking what
differs between them: the backend, the problem (on the device under test), the comparison."""

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

import pcdeq_kernels as pk
from pcdeq_kernels import reference
from pcdeq_kernels.activations import ACTIVATIONS, get_activation
from pcdeq_kernels.reference import linear_map
from pcdeq_kernels.spec import SolveSpec

ALL_ACTIVATIONS = sorted(ACTIVATIONS)


@contextlib.contextmanager
def setting(get, set_, value):
    """A global setting (read with ``get()``, written with ``set_(value)``) changed inside the block and
    restored after."""
    before = get()
    set_(value)
    try:
        yield
    finally:
        set_(before)


def float32_matmul_precision(precision):
    """torch's float32 matmul precision set the legacy way (``torch.set_float32_matmul_precision``:
    "highest", "high" or "medium") inside the block."""
    return setting(torch.get_float32_matmul_precision, torch.set_float32_matmul_precision, precision)


def cuda_matmul_fp32_precision(value):
    """``torch.backends.cuda.matmul.fp32_precision`` (torch's newer API: "ieee" or "tf32") set to
    ``value`` inside the block (restored to "none", torch's default, unless set before)."""
    matmul = torch.backends.cuda.matmul
    return setting(lambda: matmul.fp32_precision, lambda v: setattr(matmul, "fp32_precision", v), value)


def cudnn_allow_tf32(allow):
    """torch's float32 convolution precision set the legacy way (``torch.backends.cudnn.allow_tf32``,
    default True) to ``allow`` inside the block."""
    cudnn = torch.backends.cudnn
    return setting(lambda: cudnn.allow_tf32, lambda v: setattr(cudnn, "allow_tf32", v), allow)


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


def spec(activation, tol, max_iter, stop):
    """The SolveSpec of a forward solve: what a backend's forward_solve takes."""
    return SolveSpec(activation=activation, tol=tol, max_iter=max_iter, stop=stop)


def adjoint_spec(tol, max_iter, stop):
    """The SolveSpec of an adjoint solve (its stopping rule is the spec's backward_tol and
    backward_max_iter): what a backend's adjoint_solve takes."""
    return SolveSpec(backward_tol=tol, backward_max_iter=max_iter, stop=stop)


# --- checks shared by the compiled backends' tests ------------------------------------------------
# ``backend`` is a compiled backend's module (pcdeq_kernels.backends.cpu or .cuda: forward_solve and
# adjoint_solve over the pcdeq_C ops), ``backend_name`` the name fixed_point takes. Problems come on
# the device under test; ``check`` is check_against_reference or a caller's version of it with its
# own tolerances (same arguments).


def check_forward_solve(backend, u, w, activation, stop, *, tol=None, max_iter=500, z0=None, check=check_against_reference):
    """``backend``'s forward solve of (u, w) from z0 (None: zeros) against the reference's, by ``check``
    (tol defaults to TOL of u's dtype). Returns (got, want) for further checks."""
    tol = TOL[u.dtype] if tol is None else tol
    got = backend.forward_solve(u, w, z0, spec(activation, tol, max_iter, stop))
    want = reference.forward_solve(u, w, activation, tol=tol, max_iter=max_iter, stop=stop, z0=z0)
    check(got, want, forward_map(u, w, activation), torch.zeros_like(u) if z0 is None else z0, tol, stop, u.dtype)
    return got, want


def check_adjoint_solve(backend, v, w, D, stop, *, tol=None, max_iter=500, check=check_against_reference):
    """``backend``'s adjoint solve of (v, w, D) against the reference's, by ``check`` (tol defaults to
    TOL of v's dtype). Returns (got, want)."""
    tol = TOL[v.dtype] if tol is None else tol
    got = backend.adjoint_solve(v, w, D, adjoint_spec(tol, max_iter, stop))
    want = reference.adjoint_solve(v, w, D, tol=tol, max_iter=max_iter, stop=stop)
    check(got, want, adjoint_map(v, w, D), D * v, tol, stop, v.dtype)
    return got, want


def ragged_problem(batch, dim, *, conv_hw=None):
    """A float64 softsign problem (W's row sums about 0.95) whose samples' injections are spread over
    four decades (1e-3 to 10), so that they converge at very different steps; on the CPU."""
    u, w = make_problem(batch, dim, "softsign", weight_scale=0.95, conv_hw=conv_hw)
    scale = torch.logspace(-3, 1, batch, dtype=torch.float64)
    if conv_hw is None:
        return u * scale[:, None], w
    return u * scale[:, None, None, None], w


def check_ragged_convergence(backend, u, w, stop, check=check_against_reference):
    """The forward solve of a ragged_problem (u, w) at tol 1e-10 (at most 1000 steps) is the
    reference's, by ``check``; with per-sample stopping and more than one sample, the reference's
    samples stop at more than five different steps (the point of the test). Returns (got, want)."""
    got, want = check_forward_solve(backend, u, w, "softsign", stop, tol=1e-10, max_iter=1000, check=check)
    if stop == "sample" and u.shape[0] > 1:
        assert want[1].unique().numel() > 5  # the point of the test
    return got, want


def check_max_iter_cap(backend, u, w, activation, max_iter):
    """At tol 1e-30 nothing converges: under both stop rules every sample runs exactly ``max_iter``
    steps and is not converged, as in the reference, with its states (1e-13) and residuals (1e-8
    relative). (u, w): a float64 problem."""
    for stop in ("sample", "batch"):
        z, its, res, conv = backend.forward_solve(u, w, None, spec(activation, 1e-30, max_iter, stop))
        z_ref, its_ref, res_ref, conv_ref = reference.forward_solve(u, w, activation, tol=1e-30, max_iter=max_iter, stop=stop)
        assert (its == max_iter).all() and not conv.any()
        assert torch.equal(its, its_ref) and torch.equal(conv, conv_ref)
        torch.testing.assert_close(z, z_ref, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(res, res_ref, rtol=1e-8, atol=0)


def check_nan_residual_never_counts_as_converged(backend, u, w, activation):
    """u has a NaN in sample 2 (the op layer above rejects this; the backend must still follow the
    rule): under the per-sample rule (tol 1e-6, 50 steps) that sample's residual is NaN at its first
    step, where it stops, unconverged, while the others go on; under the batch rule the batch residual
    is NaN and every sample stops after that one step, unconverged. Counts, flags and states (NaN where
    NaN) are the reference's."""
    for stop in ("sample", "batch"):
        z, its, res, conv = backend.forward_solve(u, w, None, spec(activation, 1e-6, 50, stop))
        z_ref, its_ref, res_ref, conv_ref = reference.forward_solve(u, w, activation, tol=1e-6, max_iter=50, stop=stop)
        assert torch.equal(its, its_ref) and torch.equal(conv, conv_ref)
        assert res[2].isnan() and not conv[2] and its[2] == 1
        if stop == "batch":
            assert (its == 1).all() and not conv.any()
        else:
            assert (its[torch.arange(len(its)) != 2] > 1).all()
        torch.testing.assert_close(z, z_ref, equal_nan=True)


def check_z0_is_the_starting_point(backend, u, w, activation, z0, stop, check=check_against_reference):
    """The solve of the float64 problem (u, w) from z0 is the reference's from z0 (tol 1e-9), by
    ``check``; and one step from z0 is one map application (1e-14): z0 really is where it starts."""
    check_forward_solve(backend, u, w, activation, stop, tol=1e-9, z0=z0, check=check)
    one = backend.forward_solve(u, w, z0, spec(activation, 1e-9, 1, stop))[0]
    torch.testing.assert_close(one, forward_map(u, w, activation)(z0), rtol=1e-14, atol=1e-14)


def check_inputs_not_modified_and_strides_do_not_matter(backend, u, w, adjoint):
    """A dense float64 tanh problem (u, w): a non-contiguous u and a W with transposed strides give the
    contiguous inputs' results (1e-13), and neither the forward solve nor the adjoint solve at
    ``adjoint`` = (v, W, D) writes to its inputs."""
    wide = u.new_zeros(u.shape[0], 2 * u.shape[1])
    wide[:, ::2] = u
    u_strided = wide[:, ::2]  # not contiguous
    w_t = w.t().contiguous().t()  # same values, transposed strides
    before = (u.clone(), w.clone())
    want = backend.forward_solve(u, w, None, spec("tanh", 1e-9, 500, "sample"))
    got = backend.forward_solve(u_strided, w_t, None, spec("tanh", 1e-9, 500, "sample"))
    assert torch.equal(u, before[0]) and torch.equal(w, before[1]) and torch.equal(wide[:, ::2], before[0])
    assert torch.equal(w_t, before[1])  # (a separate tensor: a write through it would miss w)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=1e-13, atol=1e-13)
    v, w_adj, D = adjoint
    saved = (v.clone(), w_adj.clone(), D.clone())
    backend.adjoint_solve(v, w_adj, D, adjoint_spec(1e-9, 500, "batch"))
    assert all(torch.equal(a, b) for a, b in zip((v, w_adj, D), saved))


def check_empty_batch(u, w):
    """pcdeq_C.forward_solve of a batch of no samples (u of shape (0, ...)) gives a state of u's shape
    and empty counts, residuals and flags, the state and counts on w's device; given a z0, a copy of
    it (an op's outputs never alias its inputs)."""
    z, its, res, conv = torch.ops.pcdeq_C.forward_solve(u, w, None, 0, 1e-4, 10, False)
    assert z.shape == u.shape and its.shape == res.shape == conv.shape == (0,)
    assert z.device == w.device and its.device == w.device
    z0 = torch.zeros_like(u)
    z = torch.ops.pcdeq_C.forward_solve(u, w, z0, 0, 1e-4, 10, False)[0]
    assert z.shape == u.shape and z.untyped_storage()._cdata != z0.untyped_storage()._cdata


def check_bad_inputs_raise_clear_errors(u, w):
    """Malformed calls to the pcdeq_C ops raise errors that say what is wrong. (u, w): a well-formed
    float64 tanh problem on the device under test, dense (W of shape (d, d)) or convolutional (W of
    shape (C, C, 3, 3)), of at least two samples. Checked: the shapes of u and v against W's (per
    kind), W's dtype against u's, an unsupported dtype, the activation id (64-bit, never truncated),
    z0's shape, max_iter < 1, tol not positive and finite, and D against v. (The stop rule's name is
    SolveSpec's to check, before any backend.)"""
    op = torch.ops.pcdeq_C.forward_solve
    f64 = dict(dtype=torch.float64, device=u.device)
    if w.dim() == 2:
        d = w.shape[0]
        with pytest.raises(RuntimeError, match="dense pcDEQ needs u of shape"):
            op(u, torch.rand(d + 1, d + 1, **f64), None, 0, 1e-4, 10, False)
        with pytest.raises(RuntimeError, match="dense pcDEQ needs v of shape"):
            torch.ops.pcdeq_C.adjoint_solve(u[:, :-1], w, u[:, :-1], 1e-4, 10, False)
    else:
        c = w.shape[0]
        shapes = r"convolutional pcDEQ needs u of shape \(B, C, H, W\) and weight \(C, C, 3, 3\)"
        with pytest.raises(RuntimeError, match=shapes):
            op(u, torch.rand(c + 1, c + 1, 3, 3, **f64), None, 0, 1e-4, 10, False)  # C differs
        with pytest.raises(RuntimeError, match=shapes):
            op(u, torch.rand(c, c, 5, 5, **f64), None, 0, 1e-4, 10, False)  # not 3x3
        with pytest.raises(RuntimeError, match=shapes):
            op(u[:, :, 0], w, None, 0, 1e-4, 10, False)  # u not 4-d
        with pytest.raises(RuntimeError, match="convolutional pcDEQ needs v of shape"):
            torch.ops.pcdeq_C.adjoint_solve(u[:, :, 0], w, u[:, :, 0], 1e-4, 10, False)  # v not 4-d
        with pytest.raises(RuntimeError, match="convolutional pcDEQ needs v of shape"):
            torch.ops.pcdeq_C.adjoint_solve(u[:, :-1], w, u[:, :-1], 1e-4, 10, False)  # C differs
    with pytest.raises(RuntimeError, match="but weight is"):
        op(u, w.float(), None, 0, 1e-4, 10, False)
    with pytest.raises(RuntimeError, match="pcDEQ solves float16, bfloat16, float32 or float64"):
        op(u.long(), w.long(), None, 0, 1e-4, 10, False)
    with pytest.raises(RuntimeError, match="unknown activation id 7"):
        op(u, w, None, 7, 1e-4, 10, False)
    with pytest.raises(RuntimeError, match="z0 must match u"):
        op(u, w, u[:-1], 0, 1e-4, 10, False)  # one sample short
    with pytest.raises(RuntimeError, match="unknown activation id 4294967296"):
        op(u, w, None, 2**32, 1e-4, 10, False)  # not truncated to id 0
    with pytest.raises(RuntimeError, match="max_iter must be >= 1, got 0"):
        op(u, w, None, 0, 1e-4, 0, False)
    for bad_tol in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(RuntimeError, match="tol must be a positive finite number"):
            op(u, w, None, 0, bad_tol, 10, False)
    with pytest.raises(RuntimeError, match="D must match v"):
        torch.ops.pcdeq_C.adjoint_solve(u, w, u.float(), 1e-4, 10, False)


def opcheck_both_ops(inputs, w, starts, adjoint):
    """torch.library.opcheck of pcdeq_C.forward_solve (tanh) at each u in ``inputs`` (say, one also
    in channels-last) with W ``w``, from each z0 in ``starts`` (None: zeros), and of
    pcdeq_C.adjoint_solve at ``adjoint`` = (v, W, D); both stop rules, tol 1e-6, 100 steps."""
    for u in inputs:
        for z0 in starts:
            for batch_stop in (False, True):
                torch.library.opcheck(torch.ops.pcdeq_C.forward_solve.default, (u, w, z0, 0, 1e-6, 100, batch_stop))
    v, w_adj, D = adjoint
    for batch_stop in (False, True):
        torch.library.opcheck(torch.ops.pcdeq_C.adjoint_solve.default, (v, w_adj, D, 1e-6, 100, batch_stop))


# --- activation accuracy: one step of a backend's solver -------------------------------------------


def activation_by_one_step(x, activation, device):
    """act(x) computed by the compiled backend on ``device``: one step from z0 = 0 with W = 0 gives
    act(0 + u), u = x. Rows of 131 run the CPU fused pass's full vectors and its masked last vector.
    Returned on the CPU."""
    d = 131
    n = x.numel()
    pad = (-n) % d
    u = torch.cat([x, x.new_zeros(pad)]).view(-1, d).to(device)
    w = x.new_zeros(d, d, device=device)
    z, *_ = torch.ops.pcdeq_C.forward_solve(u, w, None, get_activation(activation).kernel_id, 1e-4, 1, False)
    return z.flatten()[:n].cpu()


def ulps(got, exact, dtype):
    """|got - exact| in units of the spacing of the dtype at exact (exact given in float64)."""
    rounded = exact.to(dtype).abs()
    spacing = (torch.nextafter(rounded, torch.tensor(math.inf, dtype=dtype)) - rounded).double()
    return (got.double() - exact).abs() / spacing


def check_activation_accuracy(activation, dtype, device, max_ulps):
    """The backend's activation (activation_by_one_step on ``device``) in ``dtype`` is within
    ``max_ulps`` of the exact value (torch's float64) on a grid over [-30, 30], tiny magnitudes of both
    signs and a few special points; and maps inf, -inf and nan as torch does."""
    grid = torch.linspace(-30, 30, 20001, dtype=torch.float64)
    tiny = torch.logspace(-30, 0, 3001, dtype=torch.float64)
    x = torch.cat([grid, tiny, -tiny, torch.tensor([0.0, 0.625, -0.625, 6.0, 100.0, -100.0], dtype=torch.float64)])
    x = x.to(dtype)
    exact = get_activation(activation).fn(x.double())
    got = activation_by_one_step(x, activation, device)
    assert got.dtype == dtype
    assert ulps(got, exact, dtype).max().item() <= max_ulps
    special = torch.tensor([math.inf, -math.inf, math.nan], dtype=dtype)
    got = activation_by_one_step(special, activation, device)
    torch.testing.assert_close(got, get_activation(activation).fn(special), equal_nan=True)


# --- gradients through fixed_point ------------------------------------------------------------------


def gradcheck_fixed_point(u, w, activation, backend_name, stop="sample"):
    """torch.autograd.gradcheck (eps 1e-7, atol 1e-7, rtol 1e-6) of fixed_point(u, W) solved by
    ``backend_name`` to tol 1e-14 in float64, which must be the backend that ran. The caller keeps u
    away from 0 and W light, so that the -eps probes stay valid and relu6 stays off its kinks."""
    u, w = u.detach().requires_grad_(), w.detach().requires_grad_()

    def f(u, w):
        z, stats = pk.fixed_point(u, w, activation, tol=1e-14, max_iter=5000, stop=stop, backend=backend_name)
        assert stats.backend == backend_name
        return z

    assert torch.autograd.gradcheck(f, (u, w), eps=1e-7, atol=1e-7, rtol=1e-6)


def check_gradients_match_the_reference_backend(backend_name, u, w, activation, stop):
    """fixed_point with ``backend_name`` against backend="reference" on a float64 problem, both solved
    to tol 1e-13 (the remaining error is float64 rounding): z and the gradients of a random weighting
    of z with respect to u and W agree to 1e-10 relative; the backward solve ran, and the forward and
    backward iteration counts are within one of the reference's."""
    weights = torch.randn(u.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(u.device)
    results = {}
    for backend in (backend_name, "reference"):
        uu, ww = u.clone().requires_grad_(), w.clone().requires_grad_()
        z, stats = pk.fixed_point(uu, ww, activation, tol=1e-13, max_iter=5000, stop=stop, backend=backend)
        assert stats.backend == backend
        results[backend] = (z, *torch.autograd.grad((z * weights).sum(), (uu, ww)), stats)
    for got, want in zip(results[backend_name][:3], results["reference"][:3]):
        assert ((got - want).norm() / want.norm()).item() < 1e-10
    got_stats, want_stats = results[backend_name][3], results["reference"][3]
    assert (got_stats.backward_iterations > 0).all()
    assert (got_stats.forward_iterations - want_stats.forward_iterations).abs().max() <= 1
    assert (got_stats.backward_iterations - want_stats.backward_iterations).abs().max() <= 1


# --- rounded operands (tf32, float16, bfloat16) -----------------------------------------------------
# Where a solver rounds the matmul's or convolution's operands to a type of unit roundoff u (tf32 and
# fp16: 2^-11; bf16: 2^-8), accumulating in fp32, a relative perturbation of at most ~2u per product
# moves the fixed point by at most 2u / (1 - c), c the sample's contraction bound
# (reference.global_contraction_rate). Allowed, per sample (per batch, Frobenius, for stop="batch"):
# ||x - x*|| <= (4u + 2 tol) / (1 - c) ||x*||, the 2 tol for the two solves' stopping errors, plus
# 4 * 2^-24 sqrt(n) / (1 - c) for fp16's subnormal spacing (tiny entries have no relative precision).
# tests/test_backend_cuda.py and tests/test_backend_cuda_conv.py say more, per backend.
UNIT_ROUNDOFF = {"tf32": 2.0**-11, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
TINY = {"tf32": 0.0, torch.float16: 2.0**-24, torch.bfloat16: 0.0}  # fp16's subnormal spacing


def assert_within_rounding(x, x_star, c, kind, stop, tol=1e-4):
    """x is within the rounded-operand bound above of x_star (dense or conv; compared per sample,
    or per batch for stop="batch"); c: per-sample contraction bounds; kind: "tf32" or a half dtype."""
    x, x_star, c = x.double().flatten(1), x_star.double().flatten(1), c.double()
    unit, tiny = UNIT_ROUNDOFF[kind], TINY[kind]
    if stop == "batch":
        c_max = c.max()
        allowed = (4 * unit + 2 * tol) / (1 - c_max) * x_star.norm() + 4 * tiny * x.numel() ** 0.5 / (1 - c_max)
        assert (x - x_star).norm() <= allowed, ((x - x_star).norm().item(), allowed.item())
    else:
        allowed = (4 * unit + 2 * tol) / (1 - c) * x_star.norm(dim=1) + 4 * tiny * x.shape[1] ** 0.5 / (1 - c)
        excess = (x - x_star).norm(dim=1) / allowed
        assert (excess <= 1).all(), excess.max().item()


def not_slower(its, its_ref):
    """Whether a rounded solve took at most 25% + 2 more steps than the exact one (its_ref), per
    sample: the counts cannot match step for step (the rounded iteration becomes stationary, residual
    exactly 0, once the state stops changing at the operand's precision), but may not trail by more."""
    return (its <= its_ref + (0.25 * its_ref.float()).long() + 2).all()
