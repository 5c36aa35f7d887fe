"""The reference solver against the mathematics of DESIGN.md section 1 and the official algorithm."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pcdeq_kernels import reference
from pcdeq_kernels.activations import get_activation
from pcdeq_kernels.official import official_fixed_point
from pcdeq_kernels.reference import adjoint_map, linear_map

from problems import ALL_ACTIVATIONS, make_problem

TIGHT = dict(tol=1e-13, max_iter=5000)
# iterate until the float64 iterate stops changing: the relative rule's +1e-5 guard would stop
# samples with a tiny norm early, and the property tests need z* to full precision
EXACT = dict(tol=1e-300, max_iter=20000)


def weighted_sup_error(z, z_star):
    """max_i |z_i - z*_i| / z*_i per sample: the norm in which the iteration contracts by the bound."""
    return ((z - z_star).abs() / z_star).flatten(1).amax(1)


@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
@pytest.mark.parametrize("conv_hw", [None, (5, 7)])
def test_solution_is_a_fixed_point(activation, conv_hw):
    u, w = make_problem(6, 9, activation, conv_hw=conv_hw)
    z, its, res, conv = reference.forward_solve(u, w, activation, **TIGHT)
    act = get_activation(activation).fn
    torch.testing.assert_close(act(linear_map(z, w) + u), z, rtol=0, atol=1e-12)
    assert conv.all() and (res < 1e-13).all() and (its > 1).all()
    assert (z >= get_activation(activation).fn(u) - 1e-15).all()  # z* >= T(0) = act(u)


@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
def test_sample_stopping_equals_solving_each_sample_alone(activation):
    u, w = make_problem(7, 11, activation, seed=3, weight_scale=0.9)
    u = u * torch.logspace(-2, 1, 7, dtype=u.dtype)[:, None]  # samples of very different difficulty
    z, its, res, conv = reference.forward_solve(u, w, activation, tol=1e-6, max_iter=200)
    assert len(set(its.tolist())) > 1, "the test needs samples that converge at different steps"
    for b in range(u.shape[0]):
        zb, itb, rb, cb = reference.forward_solve(u[b : b + 1], w, activation, tol=1e-6, max_iter=200)
        assert its[b] == itb[0]
        # a batch of 1 may take another BLAS path: equal up to float64 rounding
        torch.testing.assert_close(z[b], zb[0], rtol=0, atol=1e-14)
        torch.testing.assert_close(res[b], rb[0], rtol=1e-9, atol=0)


def test_max_iter_reports_nonconvergence():
    u, w = make_problem(4, 8, "tanh", weight_scale=0.9)
    z, its, res, conv = reference.forward_solve(u, w, "tanh", tol=1e-12, max_iter=3)
    assert (its == 3).all() and not conv.any() and (res >= 1e-12).all()


@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_stop_reproduces_the_official_algorithm(activation, dtype):
    u, w = make_problem(16, 20, activation, dtype=dtype, weight_scale=0.8, seed=5)
    z, its, res, conv = reference.forward_solve(u, w, activation, tol=1e-4, max_iter=200, stop="batch")
    z_official, stats = official_fixed_point(u, w, activation, tol=1e-4, max_iter=200)
    assert (its == stats.forward_iterations).all() and conv.all()
    torch.testing.assert_close(z, stats.pre_output, rtol=0, atol=0)  # same iterate, same arithmetic
    # the official output is one more application of the map: within the stopping tolerance
    assert ((z_official - z).norm() / z_official.norm()).item() < 1e-4


def test_batch_stop_runs_all_samples_the_same_number_of_steps():
    u, w = make_problem(8, 10, "tanh", seed=2, u_scale=2.0)
    _, its_sample, _, _ = reference.forward_solve(u, w, "tanh", tol=1e-6, stop="sample")
    _, its_batch, _, _ = reference.forward_solve(u, w, "tanh", tol=1e-6, stop="batch")
    assert len(set(its_batch.tolist())) == 1
    assert its_batch[0] >= its_sample.min()


@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
def test_fixed_point_does_not_depend_on_z0(activation):
    u, w = make_problem(5, 12, activation, weight_scale=0.9)
    z_a, *_ = reference.forward_solve(u, w, activation, **TIGHT)
    for z0 in (torch.rand_like(u) * 10, torch.full_like(u, 1e3), torch.zeros_like(u)):
        z_b, *_ = reference.forward_solve(u, w, activation, z0=z0, **TIGHT)
        torch.testing.assert_close(z_b, z_a, rtol=0, atol=1e-11)


def _problem_strategy():
    return st.tuples(
        st.sampled_from(ALL_ACTIVATIONS),
        st.integers(1, 4),  # batch
        st.integers(1, 12),  # dim
        st.floats(-3, 3),  # log10 of the weight scale: from 1e-3 to 1e3 (very large entries)
        st.floats(0.1, 3.0),  # injection scale
        st.floats(0.0, 2.0),  # injection offset: away from 0 the bound is far below 1 and the test bites
        st.integers(0, 2**31 - 1),
    )


@settings(max_examples=40, deadline=None)
@given(_problem_strategy())
def test_forward_converges_geometrically_within_the_bound(params):
    """From z_0 = 0 the iterates increase monotonically to z*, and by concavity
    max_i (z*_i - z_k,i) / z*_i <= c^k with c the global contraction rate."""
    activation, batch, dim, log_scale, u_scale, u_offset, seed = params
    u, w = make_problem(batch, dim, activation, weight_scale=10**log_scale, seed=seed, u_scale=u_scale, u_offset=u_offset)
    z_star, *_ = reference.forward_solve(u, w, activation, **EXACT)
    c = reference.global_contraction_rate(z_star, u, activation)
    assert (c <= 1).all()
    act = get_activation(activation).fn
    z = torch.zeros_like(u)
    for k in range(1, 40):
        z_next = act(linear_map(z, w) + u)
        assert (z_next >= z - 1e-12).all(), "iterates from 0 must be nondecreasing"
        z = z_next
        assert (weighted_sup_error(z, z_star) <= c**k + 1e-9).all()


@settings(max_examples=40, deadline=None)
@given(_problem_strategy())
def test_adjoint_converges_within_the_bound(params):
    """g_k = J^T g_{k-1} + v contracts by c in the norm sum_i z*_i |x_i| (J z* <= c z*):
    ||g_k - g*|| <= c^k ||g_0 - g*||, where g_{k+1} = h_k @ W + v recovers g from the reference's h."""
    activation, batch, dim, log_scale, u_scale, u_offset, seed = params
    u, w = make_problem(batch, dim, activation, weight_scale=10**log_scale, seed=seed, u_scale=u_scale, u_offset=u_offset)
    z_star, *_ = reference.forward_solve(u, w, activation, **EXACT)
    c = reference.global_contraction_rate(z_star, u, activation)
    D = reference.activation_derivative_at(z_star, u, w, activation)
    v = torch.randn_like(u)
    h_star, _, _, conv = reference.adjoint_solve(v, w, D, **EXACT)

    def weighted_l1(g):
        return (z_star * (g - (adjoint_map(h_star, w) + v)).abs()).flatten(1).sum(1)

    e0 = weighted_l1(v)
    for k in range(0, 30):
        h_k, *_ = reference.adjoint_solve(v, w, D, tol=1e-300, max_iter=k + 1) if k else (D * v,)
        g_next = adjoint_map(h_k, w) + v  # g_{k+1}
        assert (weighted_l1(g_next) <= c ** (k + 1) * e0 * (1 + 1e-9) + 1e-12).all()


def _jacobians(z, u, w, activation):
    """The dense Jacobians J_b = d T(z)_b / d z_b at z (float64, one (n, n) matrix per sample, n the
    entries of a sample), by autograd: diag(D) W for dense problems, diag(D) conv3x3 for conv ones."""
    act = get_activation(activation).fn
    out = []
    for b in range(z.shape[0]):
        f = lambda x: act(linear_map(x[None], w) + u[b : b + 1])[0].flatten()  # noqa: E731
        out.append(torch.autograd.functional.jacobian(f, z[b]).reshape(z[b].numel(), z[b].numel()))
    return out


@settings(max_examples=60, deadline=None)
@given(_problem_strategy(), st.booleans())
def test_contraction_bound_is_an_upper_bound_on_the_spectral_radius(params, conv):
    """For J >= 0 and x > 0, rho(J) <= max_i (J x)_i / x_i (Collatz-Wielandt): the bound, from z* and
    two power steps, is never below the spectral radius of the dense Jacobian at z* (float64
    eigenvalues), and never above the global contraction rate it starts from."""
    activation, batch, dim, log_scale, u_scale, u_offset, seed = params
    dim, conv_hw = (min(dim, 3), (3, 4)) if conv else (dim, None)
    u, w = make_problem(batch, dim, activation, weight_scale=10**log_scale, seed=seed, u_scale=u_scale,
                        u_offset=u_offset, conv_hw=conv_hw)
    z, *_ = reference.forward_solve(u, w, activation, **TIGHT)
    c = reference.contraction_bound(z, u, w, activation)
    # (the global rate at the computed z*, whose error is about tol: a tolerance of 1e-9)
    assert (c <= reference.global_contraction_rate(z, u, activation) * (1 + 1e-9)).all() and (c <= 1).all()
    for b, J in enumerate(_jacobians(z, u, w, activation)):
        assert (J >= 0).all()
        rho = torch.linalg.eigvals(J).abs().max()
        assert rho <= c[b], (rho.item(), c[b].item())


@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
def test_contraction_bound_is_close_to_the_spectral_radius(activation):
    """Where the global rate says little (some u_i near 0: here rows of W summing to 0.9, d = 64), two
    power steps bring the bound to within a few percent of rho(J) in 1 - rho, the quantity that sets
    the iteration count."""
    u, w = make_problem(4, 64, activation, weight_scale=0.9, seed=1)
    z, *_ = reference.forward_solve(u, w, activation, **TIGHT)
    c = reference.contraction_bound(z, u, w, activation)
    c0 = reference.contraction_bound(z, u, w, activation, power_steps=0)  # x = z* alone
    rate = reference.global_contraction_rate(z, u, activation)
    for b, J in enumerate(_jacobians(z, u, w, activation)):
        rho = torch.linalg.eigvals(J).abs().max().item()
        assert rho <= c[b] <= c0[b] <= rate[b] * (1 + 1e-9)
        assert (1 - c[b]) >= 0.95 * (1 - rho), (activation, b, c[b].item(), rho)


def test_half_precision_is_solved_in_float32():
    u, w = make_problem(4, 16, "sigmoid", dtype=torch.float32)
    z32, its32, res32, _ = reference.forward_solve(u, w, "sigmoid", tol=1e-6)
    for dtype in (torch.float16, torch.bfloat16):
        z, its, res, _ = reference.forward_solve(u.to(dtype), w.to(dtype), "sigmoid", tol=1e-6)
        assert z.dtype == dtype and res.dtype == torch.float32
        # the only differences are the inputs' rounding (relative error <= eps * (1 + ||J||)) and
        # the output's rounding (eps/2): a few eps of the half dtype
        torch.testing.assert_close(z.float(), z32, rtol=4 * torch.finfo(dtype).eps, atol=0)


def test_residual_cannot_overflow_or_be_a_spurious_zero():
    """Squares of 1e20 overflow float32; the residual is computed from float64 sums, so it is the true
    ratio, and where even those are not finite it is NaN, never 0 or inf/inf."""
    x = torch.full((2, 10), 1e20)
    x_next = x * (1 + 1e-3)
    r = reference.relative_residual(x_next, x)
    # (1 + 1e-3) is rounded to float32: the difference it makes is exact to 6e-5 relative
    torch.testing.assert_close(r, torch.full((2,), 1e-3 / (1 + 1e-3)), rtol=1e-4, atol=0)
    huge = torch.full((1, 4), 1e200, dtype=torch.float64)
    assert reference.relative_residual(huge * 2, huge).isnan().all()
    inf = torch.tensor([[float("inf"), 1.0]])
    assert reference.relative_residual(inf, torch.ones(1, 2)).isnan().all()


@pytest.mark.parametrize("stop", ["sample", "batch"])
def test_a_non_finite_sample_stops_at_once(stop):
    """A sample whose step goes non-finite stops at that step, unconverged (with "batch", the whole
    batch does); it is never iterated on up to max_iter."""
    u, w = make_problem(3, 5, "tanh")
    u[1, 2] = float("nan")
    z, its, res, conv = reference.forward_solve(u, w, "tanh", tol=1e-9, max_iter=1000, stop=stop)
    assert its[1] == 1 and res[1].isnan() and not conv[1]
    if stop == "batch":
        assert (its == 1).all() and not conv.any()
    else:
        assert conv[[0, 2]].all() and (its[[0, 2]] > 5).all()
