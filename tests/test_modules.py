"""Drop-in modules, weight parametrizations and the paper's networks."""

import math

import pytest
import torch
import torch.nn.functional as F

import pcdeq_kernels as pk
from pcdeq_kernels.backends import resolve
from pcdeq_kernels.models import DATASETS, PAPER_WIDTHS, paper_model
from pcdeq_kernels.modules import default_injection, project_
from pcdeq_kernels.parametrizations import PARAMETRIZATIONS, make_parametrization
from pcdeq_kernels.problem import Problem

from problems import ALL_ACTIVATIONS, make_problem


@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
def test_linear_layer_is_the_fixed_point_of_its_injection(activation):
    layer = pk.PCDEQLinear(10, activation, tol=1e-10).double()
    x = torch.randn(2, 3, 10, dtype=torch.float64)  # leading dims are flattened and restored
    z = layer(x)
    inj = F.relu if activation == "sigmoid" else (lambda t: F.softplus(t, beta=5))
    z_ref, _ = pk.fixed_point(inj(x.reshape(6, 10)), layer.weight, activation, tol=1e-10)
    assert z.shape == x.shape
    torch.testing.assert_close(z.reshape(6, 10), z_ref)
    assert layer.stats.forward_iterations.shape == (6,) and layer.stats.converged.all()


def test_conv_layer_is_the_fixed_point_of_its_injection():
    layer = pk.PCDEQConv2d(4, "softsign", tol=1e-10).double()
    x = torch.randn(3, 4, 7, 5, dtype=torch.float64)
    z = layer(x)
    z_ref, _ = pk.fixed_point(F.softplus(x, beta=5), layer.weight, "softsign", tol=1e-10)
    torch.testing.assert_close(z, z_ref)
    assert layer.weight.shape == (4, 4, 3, 3)


def test_default_injection_is_the_papers_pairing():
    assert default_injection("sigmoid") == "relu"
    assert {default_injection(a) for a in ("tanh", "softsign", "relu6")} == {"softplus"}
    assert pk.PCDEQLinear(4, "sigmoid").injection == "relu"


@pytest.mark.parametrize("name", PARAMETRIZATIONS)
@pytest.mark.parametrize("shape", [(7, 7), (5, 5, 3, 3)])
def test_parametrizations_start_from_the_paper_init_and_stay_nonnegative(name, shape):
    param = make_parametrization(name, shape)
    w = param()
    bound = math.sqrt(1e-4) / math.sqrt(shape[0] + shape[1])
    assert w.shape == shape and (w >= 0).all() and w.max() <= bound * 1.0001
    with torch.no_grad():  # an optimizer step that pushes everything negative
        for p in param.parameters():
            p.sub_(1.0)
    param.project_()
    assert (param() >= 0).all() and torch.isfinite(param()).all()


def test_weight_norm_is_g_times_normalised_v():
    param = make_parametrization("weight_norm", (4, 6, 3, 3))
    with torch.no_grad():
        param.g.mul_(2.0)
    w = param()
    norms = w.flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, param.g.flatten())
    with torch.no_grad():  # a row of v clamped to zero gives a zero row of W, not NaN
        param.v[1].fill_(-1.0)
    param.project_()
    assert torch.isfinite(param()).all() and (param()[1] == 0).all()


def test_training_step_then_project_keeps_layer_valid():
    layer = pk.PCDEQLinear(6)
    opt = torch.optim.SGD(layer.parameters(), lr=100.0)
    loss = -layer(torch.randn(8, 6)).sum()
    loss.backward()
    opt.step()
    layer.project_()
    assert (layer.weight >= 0).all()
    layer(torch.randn(8, 6))  # would raise on negative weights


def test_backend_attribute_can_change_after_construction():
    layer = pk.PCDEQLinear(5)
    layer(torch.randn(2, 5))
    assert layer.stats.backend == resolve(pk.SolveSpec(), Problem("dense", "cpu", torch.float32, 1))
    layer.backend = "reference"
    layer(torch.randn(2, 5))
    assert layer.stats.backend == "reference"


@pytest.mark.parametrize("name", sorted(PAPER_WIDTHS))
def test_paper_models_forward_backward_on_every_dataset(name):
    for dataset in PAPER_WIDTHS[name]:
        in_ch, size = DATASETS[dataset]
        activation = "sigmoid" if dataset == "svhn" else "tanh"
        torch.manual_seed(0)
        model = paper_model(name, dataset, activation)
        x = torch.randn(2, in_ch, size, size)
        logits = model(x)
        assert logits.shape == (2, 10)
        logits.sum().backward()
        model.project_()
        layers = model.pcdeq_layers()
        assert len(layers) == (3 if name == "multi_conv" else 1)
        widths = PAPER_WIDTHS[name][dataset]
        widths = widths if isinstance(widths, tuple) else (widths,)
        assert [layer.weight.shape[0] for layer in layers] == list(widths)
        assert all(layer.stats.backward_iterations.min() > 0 for layer in layers)


def test_paper_heads_match_the_official_code():
    assert paper_model("single_conv", "mnist").classifier.in_features == 738
    assert paper_model("single_conv", "cifar10").classifier.in_features == 2000
    assert paper_model("multi_conv", "svhn").classifier.in_features == 80
    assert paper_model("linear", "mnist").classifier.in_features == 80
    with pytest.raises(ValueError, match="no linear network for 'svhn'"):
        paper_model("linear", "svhn")


def test_project_helper_reaches_nested_layers():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), pk.PCDEQLinear(4, parametrization="clamp"))
    with torch.no_grad():
        model[1].weight_param.weight.fill_(-1.0)
    project_(model)
    assert (model[1].weight == 0).all()


# --- autocast ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("conv_hw", [None, (5, 6)], ids=["dense", "conv"])
def test_autocast_does_not_recast_the_solves(backend, conv_hw):
    # the solvers' own matmuls/convolutions would otherwise run in bfloat16 inside the ops (autocast
    # stays on inside custom ops): the answer and the gradients must be those of the same float32 inputs
    if backend not in [name for name, ok in pk.available_backends().items() if ok]:
        pytest.skip(f"backend {backend!r} is not built here")
    u, w = make_problem(3, 6, "tanh", dtype=torch.float32, conv_hw=conv_hw, weight_scale=0.6)
    results = []
    for enabled in (False, True):
        uu, ww = u.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            z, stats = pk.fixed_point(uu, ww, "tanh", backend=backend)
            grads = torch.autograd.grad(z.square().sum(), (uu, ww))
        assert z.dtype == torch.float32 and stats.backend == backend
        results.append((z, *grads))
    for plain, autocast in zip(*results):
        torch.testing.assert_close(autocast, plain, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["linear", "single_conv"])
def test_paper_networks_train_under_autocast(name):
    # under autocast the pcDEQ layer's input is bfloat16 while W is a float32 parameter: the layer
    # runs with W in bfloat16 (as autocast runs nn.Linear/nn.Conv2d) and the solve in float32
    torch.manual_seed(0)
    model = paper_model(name, "mnist")
    x = torch.randn(4, 1, 28, 28)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16
    layer = model.pcdeq_layers()[0]
    assert layer.stats.converged.all() and (layer.stats.backward_iterations > 0).all()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters() if p.requires_grad)
