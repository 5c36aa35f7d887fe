"""The solve specification: options validated once, at construction; the option list exists once;
every backend receives the spec and says, with a reason, what it cannot solve."""

import dataclasses
import inspect

import numpy as np
import pytest
import torch

import pcdeq_kernels as pk
from pcdeq_kernels import backends, ops
from pcdeq_kernels.problem import Problem
from pcdeq_kernels.spec import OPTION_NAMES, SolveSpec

from problems import make_problem


def test_defaults_and_resolution():
    spec = SolveSpec()
    assert (spec.activation, spec.tol, spec.max_iter, spec.stop, spec.backward) == ("tanh", 1e-4, 200, "sample", "implicit")
    assert (spec.solver, spec.on_nonconvergence, spec.backend) == ("picard", "warn", "auto")
    # the adjoint's stopping rule follows the forward's unless given
    assert (spec.backward_tol, spec.backward_max_iter) == (1e-4, 200)
    spec = SolveSpec(tol=1e-6, max_iter=50, backward_tol=1e-3)
    assert (spec.backward_tol, spec.backward_max_iter) == (1e-3, 50)


def test_frozen_hashable_and_equal_by_value():
    a, b = SolveSpec(tol=1e-5), SolveSpec(tol=1e-5)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.tol = 1.0


def test_numeric_types_become_python_numbers():
    spec = SolveSpec(tol=np.float32(1e-3), max_iter=np.int64(30))
    assert type(spec.tol) is float and type(spec.max_iter) is int and spec.max_iter == 30


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(tol=True), "tol must be a positive finite number, got True"),  # not 1.0
        (dict(tol="1e-3"), "tol must be a positive finite number"),
        (dict(tol=float("inf")), "tol must be a positive finite number"),
        (dict(max_iter=True), "max_iter must be an integer >= 1"),
        (dict(max_iter=2**63), r"max_iter must be an integer >= 1 \(and below 2\*\*63\), got 9223372036854775808"),
        (dict(backward_max_iter=0), "backward_max_iter must be an integer >= 1"),
        (dict(backward_tol=float("nan")), "backward_tol must be a positive finite number"),
        (dict(solver="anderson"), r"solver must be one of \('picard',\)"),
        (dict(activation="gelu"), "unknown activation 'gelu'"),
        (dict(backend="cudnn"), "unknown backend 'cudnn'"),
        (dict(stop=None), "stop must be one of"),
    ],
)
def test_bad_options_raise_at_construction(options, match):
    with pytest.raises(ValueError, match=match):
        SolveSpec(**options)
    # a layer builds its spec in its constructor: a bad option fails there, not at the first forward
    with pytest.raises(ValueError, match=match):
        pk.PCDEQLinear(4, **options)
    with pytest.raises(ValueError, match=match):
        pk.PCDEQConv2d(3, **options)


def test_unknown_option_names_the_caller_and_the_options():
    with pytest.raises(TypeError, match=r"PCDEQConv2d\(\) got an unexpected keyword argument 'tolerance'; the solve options"):
        pk.PCDEQConv2d(3, tolerance=1e-3)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'maxiter'"):
        SolveSpec().replace(maxiter=3)


def test_replace_validates():
    spec = SolveSpec(tol=1e-6)
    assert spec.replace(backend="reference").backend == "reference" and spec.replace(backend="reference").tol == 1e-6
    with pytest.raises(ValueError, match="tol must be a positive finite number"):
        spec.replace(tol=-1.0)


def test_key_round_trip_and_bad_keys():
    spec = SolveSpec(activation="relu6", tol=1.0 / 3.0, max_iter=7, stop="batch", backend="reference")
    assert SolveSpec.from_key(spec.key) == spec
    for bad in ("", "not a key", "(1, 2)", "{'tol': 1}", repr(("tanh",) * len(OPTION_NAMES))):
        with pytest.raises(ValueError):
            SolveSpec.from_key(bad)


def test_the_option_list_exists_once():
    """fixed_point's and both layers' signatures show exactly the spec's fields as keyword options."""
    for fn in (pk.fixed_point, pk.PCDEQLinear, pk.PCDEQConv2d):
        params = inspect.signature(fn).parameters
        options = [name for name in params if name in OPTION_NAMES]
        assert sorted(options) == sorted(OPTION_NAMES), fn
        defaults = {f.name: f.default for f in dataclasses.fields(SolveSpec)}
        assert all(params[name].default == defaults[name] for name in options if name != "activation")


def test_fixed_point_takes_a_spec_or_options_not_both():
    u, w = make_problem(3, 5, "sigmoid", dtype=torch.float32)
    spec = SolveSpec(activation="sigmoid", tol=1e-6, backend="reference")
    z_spec, stats = pk.fixed_point(u, w, spec=spec)
    z_kw, _ = pk.fixed_point(u, w, "sigmoid", tol=1e-6, backend="reference")
    assert torch.equal(z_spec, z_kw) and stats.backend == "reference"
    with pytest.raises(TypeError, match="either spec= or the solve options"):
        pk.fixed_point(u, w, spec=spec, tol=1e-3)
    with pytest.raises(TypeError, match="either spec= or the solve options"):
        pk.fixed_point(u, w, "tanh", spec=spec)
    with pytest.raises(TypeError, match="spec must be a pcdeq_kernels.SolveSpec"):
        pk.fixed_point(u, w, spec={"tol": 1e-3})


def test_layer_attributes_are_validated_after_construction():
    layer = pk.PCDEQLinear(6, "sigmoid", injection="relu", tol=1e-6)
    with pytest.raises(ValueError, match=r"activation 'tanh' has tanh\(0\) = 0"):
        layer.activation = "tanh"  # with relu's u = 0 the map could fix z = 0
    with pytest.raises(ValueError, match="unknown injection"):
        layer.injection = "exp"
    layer = pk.PCDEQLinear(6, "tanh")
    with pytest.raises(ValueError, match=r"activation 'tanh' has tanh\(0\) = 0"):
        layer.injection = "relu"
    assert layer.injection == "softplus" and layer.activation == "tanh"
    layer.backend = "reference"
    layer.spec = layer.spec.replace(tol=1e-7)
    layer(torch.randn(2, 6))
    assert layer.stats.backend == "reference" and layer.spec.tol == 1e-7 and layer.spec.backend == "reference"


def test_a_backend_that_cannot_solve_a_spec_says_why_and_auto_skips_it(monkeypatch):
    """The dispatcher asks each backend's unsupported_reason(spec, problem): an explicit request raises
    that reason, "auto" passes on to the next backend."""
    u, w = make_problem(3, 5, "tanh", dtype=torch.float32)
    cpu = backends.get("cpu")
    if not cpu.is_available():
        pytest.skip("needs the compiled cpu backend")
    seen = []

    def refuse_long_solves(spec, problem):
        seen.append((spec, problem))
        return "max_iter above 100 is not for this backend" if spec.max_iter > 100 else ""

    monkeypatch.setattr(cpu, "unsupported_reason", refuse_long_solves)
    assert pk.fixed_point(u, w, max_iter=100)[1].backend == "cpu"
    assert pk.fixed_point(u, w, max_iter=101)[1].backend == "reference"
    with pytest.raises(ValueError, match=r"backend 'cpu' cannot solve this problem \(dense, torch.float32 on cpu\): "
                                         r"max_iter above 100 is not for this backend; use backend='auto' or one of"):
        pk.fixed_point(u, w, max_iter=101, backend="cpu")
    spec, problem = seen[0]
    assert isinstance(spec, SolveSpec) and problem == Problem("dense", "cpu", torch.float32, 3)


def test_triton_refuses_what_its_kernels_cannot_do():
    triton = backends.get("triton")
    device_type = "cpu" if triton._interpreting() else "cuda"  # where Triton kernels run here
    problem = Problem("dense", device_type, torch.float32, 8)
    assert triton.unsupported_reason(SolveSpec(max_iter=2**30), problem) == ""
    assert "32 bits" in triton.unsupported_reason(SolveSpec(backward_max_iter=2**30 + 1), problem)
    assert "float64" in triton.unsupported_reason(SolveSpec(), problem._replace(dtype=torch.float64))
    assert triton.unsupported_reason(SolveSpec(), problem._replace(device_type="meta"))


def test_every_backend_receives_the_spec(monkeypatch):
    """The ops hand the backend the SolveSpec itself (both solves), with the concrete backend name."""
    u, w = make_problem(3, 5, "softsign", dtype=torch.float64)
    u.requires_grad_()
    reference_backend = backends.get("reference")
    received = []
    for name in ("forward_solve", "adjoint_solve"):
        real = getattr(reference_backend, name)

        def spy(*args, _real=real):
            received.append(args[-1])
            return _real(*args)

        monkeypatch.setattr(reference_backend, name, spy)
    z, _ = pk.fixed_point(u, w, "softsign", tol=1e-7, backward_tol=1e-8, backend="reference")
    z.sum().backward()
    want = SolveSpec(activation="softsign", tol=1e-7, backward_tol=1e-8, backend="reference")
    assert received == [want, want]


def test_ops_validate_their_spec_and_backend():
    """The custom ops decode and check their spec string and resolve its backend again: a direct call
    cannot pass an unknown rule or a backend that cannot solve the tensors."""
    u, w = make_problem(3, 5, "tanh", dtype=torch.float32)
    with pytest.raises(ValueError, match="not a solve spec key"):
        ops.forward_solve(u, w, None, "tanh")
    bogus = repr(tuple("bogus" if name == "stop" else getattr(SolveSpec(), name) for name in OPTION_NAMES))
    with pytest.raises(ValueError, match="stop must be one of"):
        ops.forward_solve(u, w, None, bogus)
    if not pk.available_backends()["cuda"]:
        with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
            ops.forward_solve(u, w, None, SolveSpec(backend="cuda").key)
    z, *_ = ops.forward_solve(u, w, None, SolveSpec().key)  # "auto" is resolved in the op too
    torch.testing.assert_close(z, pk.fixed_point(u, w)[0])
    with pytest.raises(ValueError, match="z0 must be a tensor shaped like u"):
        ops.forward_solve(u, w, u[:1], SolveSpec().key)
    with pytest.raises(ValueError, match="D must be a tensor shaped like v"):
        ops.adjoint_solve(u, w, u[:, :2], SolveSpec().key)
