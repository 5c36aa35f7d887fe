"""Official checkpoints and optimizer states in the library's networks (pcdeq_kernels.migration)."""

import io

import pytest
import torch
import torch.nn.functional as F

import pcdeq_kernels as pk
from pcdeq_kernels.migration import official_names
from pcdeq_kernels.models import load_official_state_dict, official_optimizer_state, paper_model

from official_networks import NETWORKS

# float64 and a tolerance far below the differences between the two algorithms (the official one
# returns one more map application and measures its adjoint residual on another vector): both sit on
# the same fixed points to about 1e-12, so training runs agree to rounding.
TOL = 1e-12


def _saved_and_loaded(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer)


def _train_step(model, optimizer, x, y):
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    model.clamp()  # the official loop's projection: an alias of project_() on the library's networks
    return loss.item()


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_official_checkpoint_and_optimizer_state_continue_training_identically(name):
    torch.manual_seed(0)
    official = NETWORKS[name]("tanh", TOL, 2000).double()
    opt = torch.optim.AdamW(official.parameters(), lr=1e-2, weight_decay=1e-2)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.rand(6, 1, 28, 28, generator=g, dtype=torch.float64), torch.randint(0, 10, (6,), generator=g))
               for _ in range(5)]
    for x, y in batches[:2]:
        _train_step(official, opt, x, y)
    state, opt_state = _saved_and_loaded(official.state_dict()), _saved_and_loaded(opt.state_dict())

    ours = paper_model(name, "mnist", "tanh", tol=TOL, max_iter=2000, stop="batch", backend="cpu").double()
    load_official_state_dict(ours, state)
    ours_opt = torch.optim.AdamW(ours.parameters(), lr=1e-2, weight_decay=1e-2)
    ours_opt.load_state_dict(official_optimizer_state(ours, opt_state))
    for x, y in batches[2:]:
        assert _train_step(ours, ours_opt, x, y) == pytest.approx(_train_step(official, opt, x, y), rel=1e-9)
    # (AdamW divides by the root of the second moment, which turns the solves' 1e-12 differences in a
    # gradient component near 0 into parameter differences up to about 1e-9 after three steps; a state
    # paired with the wrong parameter moves them by the learning rate, 1e-2)
    official_state = official.state_dict()
    for key, official_key in official_names(ours).items():
        torch.testing.assert_close(ours.state_dict()[key], official_state[official_key], rtol=1e-6, atol=1e-8)


def test_official_optimizer_state_loaded_as_it_is_would_be_wrong():
    """Why official_optimizer_state exists: the parameter orders differ (g/v, and the conv nets'
    module order), so the raw state pairs moments with the wrong parameters."""
    official = NETWORKS["single_conv"]("tanh", 1e-4, 50)
    opt = torch.optim.AdamW(official.parameters(), lr=1e-3)
    x, y = torch.rand(2, 1, 28, 28), torch.tensor([1, 2])
    _train_step(official, opt, x, y)
    ours = paper_model("single_conv", "mnist", "tanh")
    load_official_state_dict(ours, official.state_dict())
    raw = opt.state_dict()
    shapes = [p.shape for p in ours.parameters()]
    raw_shapes = [raw["state"][i]["exp_avg"].shape for i in raw["param_groups"][0]["params"]]
    assert raw_shapes != shapes
    mapped = official_optimizer_state(ours, raw)
    assert [mapped["state"][i]["exp_avg"].shape for i in range(len(shapes))] == shapes


def test_bare_layer_takes_an_official_block_state_and_errors_name_the_keys():
    block = NETWORKS["linear"]("tanh", 1e-4, 50).block
    layer = pk.PCDEQLinear(80)
    load_official_state_dict(layer, block.state_dict())
    torch.testing.assert_close(layer.weight, block.deq.f.W.weight())
    conv_layer = pk.PCDEQConv2d(82)
    load_official_state_dict(conv_layer, NETWORKS["single_conv"]("tanh", 1e-4, 50).block.state_dict())
    with pytest.raises(KeyError, match=r"missing official keys \['bn2.bias'"):
        state = NETWORKS["linear"]("tanh", 1e-4, 50).state_dict()
        del state["bn2.bias"]
        load_official_state_dict(paper_model("linear", "mnist", "tanh"), state)
    with pytest.raises(KeyError, match=r"unexpected keys \['extra'\]"):
        load_official_state_dict(layer, {**block.state_dict(), "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="parametrization='weight_norm'"):
        load_official_state_dict(pk.PCDEQLinear(80, parametrization="softplus"), block.state_dict())
    with pytest.raises(TypeError, match="no official counterpart for Sequential"):
        load_official_state_dict(torch.nn.Sequential(), {})


def test_networks_offer_the_official_loops_calls():
    """model.clamp() and model.blocks, as the official training loop uses them; blocks are found afresh,
    so a swapped-in layer is the one projected."""
    model = paper_model("linear", "mnist", "tanh")
    new_layer = pk.PCDEQLinear(80)
    model.body[3] = new_layer
    assert model.blocks == [new_layer]
    with torch.no_grad():
        new_layer.weight_param.v.fill_(-1.0)
    model.clamp()
    assert (new_layer.weight_param.v == 0).all()


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_stop_official_matches_the_official_algorithm_step_for_step(name):
    """stop="official": on the paper's networks, in float32 at the official tol, the forward and backward
    iteration counts of every block, the losses and the parameters follow the official algorithm's,
    batch for batch, over training steps."""
    torch.manual_seed(0)
    official = NETWORKS[name]("tanh", 1e-4, 200)
    ours = paper_model(name, "mnist", "tanh", stop="official")
    load_official_state_dict(ours, official.state_dict())
    # (plain SGD: Adam would scale the rounding noise of gradients near 0, the pre-norm biases' above
    # all, up to steps of size lr; the checkpoint test above covers AdamW's state)
    opt = torch.optim.SGD(official.parameters(), lr=0.05)
    ours_opt = torch.optim.SGD(ours.parameters(), lr=0.05)
    outputs = {id(official): [], id(ours): []}
    for net in (official, ours):
        for block in net.blocks:
            block.register_forward_hook(lambda module, args, out, net=net: outputs[id(net)].append(out.detach()))
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        x, y = torch.rand(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)
        assert _train_step(ours, ours_opt, x, y) == pytest.approx(_train_step(official, opt, x, y), rel=1e-6)
        # the blocks' outputs: the official T(z_K) to rounding (z_K itself, stop="batch"'s output, is
        # about tol away)
        for theirs, mine in zip(outputs[id(official)], outputs[id(ours)]):
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
        outputs[id(official)].clear()
        outputs[id(ours)].clear()
        for theirs, mine in zip(official.blocks, ours.blocks):
            assert mine.stats.backend == "reference"
            assert (mine.stats.forward_iterations == theirs.stats.forward_iterations).all()
            assert (mine.stats.backward_iterations == theirs.stats.backward_iterations).all()
    names, official_params = official_names(ours), dict(official.named_parameters())
    for key, param in ours.named_parameters():
        torch.testing.assert_close(param, official_params[names[key]], rtol=1e-4, atol=1e-6, msg=lambda m: f"{key}: {m}")


def test_stop_official_runs_on_the_reference_backend_only():
    u, w = torch.rand(3, 5), torch.rand(5, 5) * 0.1
    z, stats = pk.fixed_point(u, w, stop="official")
    assert stats.backend == "reference"
    with pytest.raises(ValueError, match=r"stop='official' is implemented by the reference backend\(s\) only"):
        pk.fixed_point(u, w, stop="official", backend="cpu")


@pytest.mark.parametrize("conv_hw", [None, (5, 6)], ids=["dense", "conv"])
def test_stop_official_is_the_official_algorithm(conv_hw):
    """One solve and its gradient against pcdeq_kernels.official (the official algorithm restated): the
    same output, counts and gradients, where stop="batch" returns the last iterate instead."""
    from pcdeq_kernels.official import official_fixed_point
    from problems import make_problem

    u, w = make_problem(6, 5, "tanh", weight_scale=0.9, conv_hw=conv_hw)
    v = torch.randn(u.shape, generator=torch.Generator().manual_seed(3), dtype=u.dtype)
    runs = {}
    for stop in ("official", "batch", None):
        u_, w_ = u.clone().requires_grad_(), w.clone().requires_grad_()
        z, stats = pk.fixed_point(u_, w_, stop=stop) if stop else official_fixed_point(u_, w_, "tanh", 1e-4, 200)
        runs[stop] = (z.detach(), torch.autograd.grad(z, (u_, w_), v), stats)
    z, grads, stats = runs["official"]
    z_o, grads_o, stats_o = runs[None]
    torch.testing.assert_close(z, z_o, rtol=1e-14, atol=0)
    for got, want in zip(grads, grads_o):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert (stats.forward_iterations == stats_o.forward_iterations).all()
    assert (stats.backward_iterations == stats_o.backward_iterations).all()
    assert (runs["batch"][0] - z_o).abs().max() > 1e-7  # stop="batch" returns z_K, not T(z_K)


def test_stop_official_under_torch_compile_matches_eager():
    layer = pk.PCDEQLinear(6, stop="official")
    x = torch.rand(4, 6)
    x_eager, x_compiled = x.clone().requires_grad_(), x.clone().requires_grad_()
    eager = layer(x_eager)
    compiled = torch.compile(layer, fullgraph=True)(x_compiled)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-7)  # (inductor fuses T(z_K): an ulp)
    eager.sum().backward()
    compiled.sum().backward()
    torch.testing.assert_close(x_compiled.grad, x_eager.grad, rtol=1e-6, atol=1e-7)
