"""The paths a benchmark compares, each solving the same map on the same data.

    official            the authors' algorithm (pcdeq_kernels.official): batch-global stop with two host
                        reads per iteration; backward by one autograd VJP per iteration
    torchdeq-fpi        torchdeq's get_deq with fixed_point_iter forward and IFT backward (relative stop)
    torchdeq-anderson   the same with Anderson acceleration in the forward
    <backend>           pcdeq_kernels.fixed_point with that backend (reference, cpu, cuda, triton)
    <gpu backend>-single, <gpu backend>-stepwise, triton-split
                        the cuda or triton backend with its solve loop forced (PCDEQ_CUDA_PATH /
                        PCDEQ_TRITON_PATH), to measure the dispatcher's choice; only when asked for by name

Every path takes ``(u, weight, activation, tol, max_iter)`` and returns a runner: ``forward()`` solves
without autograd and returns ``z*``; ``train_step()`` solves with gradients, backpropagates
``sum(z*^2)`` and returns ``(dL/du, dL/dW)``. Both stop at relative residual ``tol`` (torchdeq by its
per-sample maximum, the project by each sample, official by the whole batch), so answers agree to
about ``tol`` and are checked before timing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import os
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backends
from ..activations import get_activation
from ..functional import fixed_point
from ..official import official_fixed_point
from ..problem import Problem
from ..reference import linear_map
from ..spec import SolveSpec

PEERS = ("official", "torchdeq-fpi", "torchdeq-anderson")
# name -> (backend, the environment variable that forces its solve loop, the loop)
FORCED_LOOPS = {
    f"{backend}-{loop}": (backend, f"PCDEQ_{backend.upper()}_PATH", loop)
    for backend, loops in (("cuda", ("single", "stepwise")), ("triton", ("single", "stepwise", "split")))
    for loop in loops
}


@dataclasses.dataclass
class Runner:
    forward: Callable[[], Tensor]
    train_step: Callable[[], tuple[Tensor, Tensor]]
    iterations: Callable[[], tuple[float, float]]  # mean forward, backward iterations of the last calls


def make_problem(batch: int, dim: int, *, device="cpu", dtype=torch.float32, activation="tanh", seed=0,
                 image: tuple[int, int] | None = None):
    """A problem in the regime of trained pcDEQ layers: W >= 0 with row sums about 0.9 and
    u = softplus(beta=5) of N(0.5, 1) (relu for pcDEQ-2): tens of iterations at tol 1e-4.
    ``image=(H, W)`` gives a convolutional problem with ``dim`` channels (kernel (dim, dim, 3, 3))."""
    g = torch.Generator().manual_seed(seed)
    if image is None:
        weight = torch.rand(dim, dim, generator=g) * (1.8 / dim)
        x = torch.randn(batch, dim, generator=g) + 0.5
    else:
        weight = torch.rand(dim, dim, 3, 3, generator=g) * (1.8 / (9 * dim))
        x = torch.randn(batch, dim, *image, generator=g) + 0.5
    u = F.relu(x) if get_activation(activation).family == "pcDEQ-2" else F.softplus(x, beta=5)
    return u.to(device=device, dtype=dtype), weight.to(device=device, dtype=dtype)


def problem_for_shape(shape: tuple[int, ...], **kw):
    """``(B, d)``: dense; ``(B, C, H, W)``: convolutional. Keywords as make_problem."""
    if len(shape) == 2:
        return make_problem(*shape, **kw)
    if len(shape) == 4:
        return make_problem(shape[0], shape[1], image=tuple(shape[2:]), **kw)
    raise ValueError(f"a benchmark shape is (B, d) or (B, C, H, W), got {shape}")


def torchdeq_missing_reason() -> str:
    if importlib.util.find_spec("torchdeq") is None:
        return "torchdeq is not installed (pip install torchdeq) - skipped"
    return ""


def available_paths(device_type: str, kind: str = "dense", dtype: torch.dtype = torch.float32) -> dict[str, str]:
    """Every path name -> '' if it runs here for ``kind`` ("dense" or "conv") problems in ``dtype``, else
    the reason it does not."""
    out = {"official": ""}
    reason = torchdeq_missing_reason()
    out["torchdeq-fpi"] = out["torchdeq-anderson"] = reason
    if not reason and dtype in (torch.float16, torch.bfloat16):
        out["torchdeq-anderson"] = ("torchdeq's Anderson solver calls torch.linalg.solve, which has no "
                                    f"{str(dtype).replace('torch.', '')} kernels")
    problem = Problem(kind, device_type, dtype, 1)
    for name, ok in backends.available_backends().items():
        backend = backends.get(name)
        unsupported = backend.unsupported_reason(SolveSpec(), problem) if ok else ""
        if not ok:
            out[name] = backend.unavailable_reason()
        elif unsupported:
            out[name] = unsupported
        elif name == "triton" and device_type == "cpu":
            out[name] = "the Triton interpreter is never timed"
        else:
            out[name] = ""
    for name, (backend, _, loop) in FORCED_LOOPS.items():
        out[name] = out[backend] or ("dense problems only" if loop == "split" and kind == "conv" else "")
    return out


@contextlib.contextmanager
def _environment(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def _grad_of(solve: Callable[[Tensor, Tensor], Tensor], u: Tensor, weight: Tensor):
    def train_step():
        uu = u.detach().requires_grad_()
        ww = weight.detach().requires_grad_()
        z = solve(uu, ww)
        return torch.autograd.grad(z.square().sum(), (uu, ww))

    return train_step


def runner(path: str, u: Tensor, weight: Tensor, activation: str = "tanh", tol: float = 1e-4, max_iter: int = 200) -> Runner:
    last: dict[str, float] = {"fwd": math.nan, "bwd": math.nan}
    if path == "official":

        def solve(uu, ww):
            z, stats = official_fixed_point(uu, ww, activation, tol, max_iter)
            last["fwd"] = stats.forward_iterations
            last["stats"] = stats
            return z

        def forward():
            with torch.no_grad():
                return solve(u, weight)

        def train_step():
            grads = _grad_of(solve, u, weight)()
            last["bwd"] = last["stats"].backward_iterations
            return grads

        return Runner(forward, train_step, lambda: (last["fwd"], last["bwd"]))

    if path.startswith("torchdeq-"):
        from torchdeq import get_deq

        solver = "fixed_point_iter" if path == "torchdeq-fpi" else "anderson"
        deq = get_deq(
            f_solver=solver, f_max_iter=max_iter, f_tol=tol, f_stop_mode="rel",
            b_solver="fixed_point_iter", b_max_iter=max_iter, b_tol=tol, b_stop_mode="rel", ift=True,
        )
        act = get_activation(activation).fn

        def solve(uu, ww):
            z_list, info = deq(lambda z: act(linear_map(z, ww) + uu), torch.zeros_like(uu))
            last["fwd"] = float(info["nstep"].float().mean()) if "nstep" in info else math.nan
            return z_list[-1]

        def forward():
            with torch.no_grad():
                return solve(u, weight)

        return Runner(forward, _grad_of(solve, u, weight), lambda: (last["fwd"], last["bwd"]))

    holder = {}
    backend, variable, loop = FORCED_LOOPS.get(path, (path, None, None))

    def solve(uu, ww):
        z, holder["stats"] = fixed_point(uu, ww, activation, tol=tol, max_iter=max_iter, backend=backend)
        return z

    def forced(fn):  # the whole call, backward solve included, under the forced loop
        def call():
            with _environment(variable, loop) if variable else contextlib.nullcontext():
                return fn()
        return call

    @forced
    def forward():
        with torch.no_grad():
            return solve(u, weight)

    def iterations():
        s = holder["stats"]
        return s.forward_iterations.float().mean().item(), s.backward_iterations.float().mean().item()

    return Runner(forward, forced(_grad_of(solve, u, weight)), iterations)
