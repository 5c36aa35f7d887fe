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
