"""Checkpoints of the official pcDEQ code (the authors' ``networks.py``) in this library's networks.

    model = paper_model("single_conv", "mnist", "tanh")
    load_official_state_dict(model, torch.load("mnist_single_conv_pcdeq_1_tanh.pth"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=7e-4, weight_decay=1e-2)
    optimizer.load_state_dict(official_optimizer_state(model, official_optimizer.state_dict()))

The official networks name their modules ``linear1``, ``conv1``, ``bn1`` ... ``bn6``, ``block`` /
``block1`` ... ``block3``, ``downsample1`` / ``downsample2`` and ``classifier``, and keep each pcDEQ
weight as ``torch.nn.utils.weight_norm``'s pair ``<block>.deq.f.W.weight_g`` / ``weight_v``. The
library's ``paper_model`` networks have the same layers in ``body`` (a ``Sequential``) and the same
``W = g * v / ||v||`` parametrization (``weight_param.g`` / ``.v``). ``official_names(model)`` gives
the correspondence; loading is strict both ways. A bare ``PCDEQLinear`` / ``PCDEQConv2d`` takes an
official block's own state dict (``deq.f.W.weight_g``, ``deq.f.W.weight_v``).

Optimizer states are lists in parameter order, and the official order differs (its modules are
registered in another order, and ``weight_norm`` registers ``g`` before ``v``): a state loaded as it
is would be matched to the wrong parameters, which ``load_state_dict`` does not notice.
``official_optimizer_state`` reorders it by name.
"""

from __future__ import annotations

import copy

from torch import nn

from .modules import PCDEQConv2d, PCDEQLinear

_BLOCK = ("deq.f.W.weight_g", "deq.f.W.weight_v")

# Per network (by class name: models.py re-exports this module's functions, so it cannot be imported
# here): (body index -> official module name) for every module with state, and the official modules
# in their registration order (the official parameter order).
_LAYOUTS = {
    "LinearPCDEQNet": ({1: "linear1", 2: "bn1", 3: "block", 4: "bn2"}, ["linear1", "bn1", "block", "bn2", "classifier"]),
    "SingleConvPCDEQNet": ({0: "conv1", 1: "bn1", 2: "block", 4: "bn2"}, ["conv1", "block", "bn1", "bn2", "classifier"]),
    "MultiConvPCDEQNet": (
        {0: "conv1", 1: "bn1", 2: "block1", 4: "bn2", 5: "downsample1", 6: "bn3", 7: "block2", 9: "bn4",
         10: "downsample2", 11: "bn5", 12: "block3", 14: "bn6"},
        ["conv1", "block1", "downsample1", "block2", "downsample2", "block3", "classifier",
         "bn1", "bn2", "bn3", "bn4", "bn5", "bn6"],
    ),
}


def _layout(model: nn.Module):
    from . import models  # (here, not at the top: models imports this module)

    name = type(model).__name__
    return _LAYOUTS[name] if name in _LAYOUTS and type(model) is getattr(models, name) else None


def _layer_names(prefix: str, layer: nn.Module) -> dict[str, str]:
    if getattr(layer, "parametrization", None) != "weight_norm":
        raise ValueError(
            f"the official pcDEQ blocks use weight norm; this layer ({type(layer).__name__}) has "
            f"parametrization={getattr(layer, 'parametrization', None)!r}: build it with parametrization='weight_norm'"
        )
    return {"weight_param.g": prefix + _BLOCK[0], "weight_param.v": prefix + _BLOCK[1]}


def official_names(model: nn.Module) -> dict[str, str]:
    """``{library state-dict key: official key}`` for every parameter and buffer of ``model``: a
    ``paper_model`` network or a bare pcDEQ layer (whose keys are an official block's own)."""
    if isinstance(model, (PCDEQLinear, PCDEQConv2d)):
        return _layer_names("", model)
    layout = _layout(model)
    if layout is None:
        raise TypeError(
            f"no official counterpart for {type(model).__name__}: official checkpoints load into the networks of "
            "pcdeq_kernels.models.paper_model (LinearPCDEQNet, SingleConvPCDEQNet, MultiConvPCDEQNet) or a bare "
            "PCDEQLinear / PCDEQConv2d"
        )
    body_names, _ = layout
    names = {}
    for key in model.state_dict():
        module, _, rest = key.partition(".")
        if module == "classifier":
            names[key] = key
            continue
        index, _, leaf = rest.partition(".")
        official = body_names.get(int(index)) if module == "body" and index.isdigit() else None
        if official is None:
            raise TypeError(f"{type(model).__name__} has a state entry {key!r} with no official counterpart")
        layer = model.body[int(index)]
        names[key] = _layer_names(official + ".", layer)[leaf] if isinstance(layer, (PCDEQLinear, PCDEQConv2d)) else f"{official}.{leaf}"
    return names


def load_official_state_dict(model: nn.Module, state_dict: dict) -> None:
    """Load a state dict saved by the official code (``model.state_dict()`` of its network, or of one
    of its blocks for a bare layer) into ``model``, strictly: every key of both must be accounted for,
    and an error names those that are not."""
    names = official_names(model)
    missing = sorted(official for official in names.values() if official not in state_dict)
    unexpected = sorted(set(state_dict) - set(names.values()))
    if missing or unexpected:
        raise KeyError(
            f"this is not an official checkpoint of a {type(model).__name__} of this size: missing official keys "
            f"{missing}, unexpected keys {unexpected} (expected: {sorted(names.values())})"
        )
    model.load_state_dict({ours: state_dict[official] for ours, official in names.items()}, strict=True)


def _official_parameter_order(model: nn.Module) -> list[str]:
    names = official_names(model)
    params = [key for key, _ in model.named_parameters()]
    if isinstance(model, (PCDEQLinear, PCDEQConv2d)):
        return [names[key] for key in ("weight_param.g", "weight_param.v")]
    by_module: dict[str, list[str]] = {}
    for key in params:
        official = names[key]
        by_module.setdefault(official.split(".")[0], []).append(official)
    order = []
    for module in _layout(model)[1]:
        entries = by_module.get(module, [])
        order += sorted(entries, key=lambda name: name.endswith("weight_v"))  # (g before v, weight before bias)
    return order


def official_optimizer_state(model: nn.Module, state: dict) -> dict:
    """An optimizer's ``state_dict()`` saved by the official code (one parameter group over
    ``model.parameters()``, the official training scripts' AdamW), reordered for ``model``'s
    parameters: pass the result to ``optimizer.load_state_dict`` of an optimizer built the same way
    on ``model.parameters()``."""
    official_order = _official_parameter_order(model)
    ours = [key for key, _ in model.named_parameters()]
    groups = state["param_groups"]
    if len(groups) != 1 or len(groups[0]["params"]) != len(ours):
        raise ValueError(
            f"expected the state of an optimizer with one parameter group over the official network's {len(ours)} "
            f"parameters; got {len(groups)} group(s) with {[len(g['params']) for g in groups]} parameters"
        )
    names = official_names(model)
    saved_ids = groups[0]["params"]
    position = {official: i for i, official in enumerate(official_order)}
    group = copy.deepcopy({k: v for k, v in groups[0].items() if k != "params"})
    group["params"] = list(range(len(ours)))
    reordered = {}
    for j, key in enumerate(ours):
        saved = saved_ids[position[names[key]]]
        if saved in state["state"]:
            reordered[j] = copy.deepcopy(state["state"][saved])
    return {"state": reordered, "param_groups": [group]}
