import pytest
import torch

from pathlib import Path

from pcdeq_kernels.activations import ACTIVATIONS, ADJOINT_ID, c_header, check_map_id, get_activation, map_ids

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


def test_adjoint_id_cannot_collide_with_an_activation_id():
    assert ADJOINT_ID < 0 <= min(a.kernel_id for a in ACTIVATIONS.values())
    assert len(set(map_ids().values())) == len(map_ids()) == len(ACTIVATIONS) + 1


def test_unknown_map_id_is_an_error():
    assert check_map_id(ADJOINT_ID) == ADJOINT_ID
    for bad in (len(ACTIVATIONS), -2, 2**32, True, 0.0 + 0.5):
        with pytest.raises(ValueError, match="unknown map id"):
            check_map_id(bad)


def test_generated_header_is_the_table():
    """csrc/include/pcdeq/map_ids.h is what the table generates: after adding an activation, run
    scripts/generate_map_ids.py."""
    header = Path(__file__).parents[1] / "csrc" / "include" / "pcdeq" / "map_ids.h"
    assert header.read_text() == c_header(), "csrc/include/pcdeq/map_ids.h is stale: run scripts/generate_map_ids.py"
