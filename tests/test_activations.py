import pytest
import torch

from pcdeq_kernels.activations import ACTIVATIONS, get_activation

from problems import ALL_ACTIVATIONS


@pytest.mark.parametrize("name", ALL_ACTIVATIONS)
def test_derivative_matches_autograd(name):
    act = get_activation(name)
    # avoid relu6's kinks at exactly 0 and 6, where autograd and the table both say 0 but a finite
    # difference would not
    x = torch.linspace(-10, 10, 2001, dtype=torch.float64)
    x = x[(x - 0).abs().gt(1e-9) & (x - 6).abs().gt(1e-9)].requires_grad_()
    (grad,) = torch.autograd.grad(act.fn(x).sum(), x)
    torch.testing.assert_close(act.derivative(x.detach()), grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ALL_ACTIVATIONS)
def test_pcdeq_properties_on_nonnegatives(name):
    """Nondecreasing, concave, nonnegative and bounded on [0, inf), with the tabulated act(0)."""
    act = get_activation(name)
    x = torch.linspace(0, 50, 50001, dtype=torch.float64)
    y = act.fn(x)
    assert act.fn(torch.zeros(1, dtype=torch.float64)).item() == act.value_at_zero
    assert (y >= 0).all() and (y <= act.supremum).all() and act.bounded
    assert (y.diff() >= -1e-15).all(), "not nondecreasing"
    assert (y.diff().diff() <= 1e-12).all(), "not concave"
    d = act.derivative(x[1:])  # on (0, inf): relu6' jumps at its kink x = 0 by convention
    assert (d.diff() <= 1e-15).all(), "derivative of a concave function must be nonincreasing"


def test_unknown_activation_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown activation 'relu'.*sigmoid.*tanh"):
        get_activation("relu")


def test_kernel_ids_are_unique_and_dense():
    # kernels take the id as a compile-time constant; ids index lookup tables in the compiled code
    assert sorted(a.kernel_id for a in ACTIVATIONS.values()) == list(range(len(ACTIVATIONS)))
