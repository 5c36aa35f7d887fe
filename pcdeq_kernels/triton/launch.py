"""What the dense (``dense.py``) and convolutional (``conv.py``) launchers share: the iteration a solve
runs (read from the ``SolveSpec``, its map id checked against the map table), the checks of what the
kernels take, the autotuning helpers, the launch context, the stepwise loop's buffers and host loop,
and the options (path, precision, how often the host checks).

The kernels' device code is in ``epilogue.py`` (the shared @triton.jit helpers) and in the two kernel
modules; what the kernels can take, without importing Triton, in ``limits.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import threading
from typing import Callable, Optional

import torch
import triton
from torch import Tensor
from triton.runtime import driver

from ..activations import ADJOINT_ID, check_map_id, get_activation
from ..spec import SolveSpec
from . import limits


def _interpreting() -> bool:
    """Whether Triton's CPU interpreter is on (read the way Triton reads ``TRITON_INTERPRET``)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# Decided once, when the kernels are defined (they import this module first): @triton.jit builds
# interpreter objects or compiled kernels at decoration time, so switching TRITON_INTERPRET later has
# no effect on them.
INTERPRETED = _interpreting()

SOLVE_PATHS = ("auto", "single", "stepwise", "split")
PRECISIONS = ("ieee", "tf32")
DEFAULT_CHECK_EVERY = 8

# The stepwise loop's per-sample statuses (``epilogue.RUNNING``, ``MET``, ``FAILED``), for the host.
RUNNING, MET, FAILED = 1, 0, 2


# ------------------------------------------------------------------------------------- the iteration


@dataclasses.dataclass(frozen=True)
class Iteration:
    """What one solve launch iterates and when it stops: the map's epilogue id (an activation's
    ``kernel_id``, or ``ADJOINT_ID``), and the stopping rule. Built by ``iteration`` from a spec;
    constructing one checks the id against the map table and the count against the kernels' 32-bit
    step counter, so nothing is compiled or launched for an id the kernels do not know."""

    map_id: int
    tol: float
    max_iter: int
    stop: str

    def __post_init__(self):
        check_map_id(self.map_id)
        if self.max_iter > limits.MAX_ITER:
            raise ValueError(
                f"the Triton kernels count steps in 32 bits (a 32-bit step counter): max_iter <= 2**30, got "
                f"{self.max_iter}; use another backend"
            )

    @property
    def adjoint(self) -> bool:
        return self.map_id == ADJOINT_ID

    @property
    def batch_stop(self) -> bool:
        return self.stop == "batch"


def map_id(activation: Optional[str]) -> int:
    """The epilogue id of a map: ``activation``'s ``kernel_id`` for the forward map, ``ADJOINT_ID`` for
    None (the adjoint), checked against the map table (``activations.check_map_id``)."""
    return check_map_id(ADJOINT_ID if activation is None else get_activation(activation).kernel_id)


def iteration(spec: SolveSpec, adjoint: bool) -> Iteration:
    """The forward solve's iteration of ``spec`` (its activation, ``tol``, ``max_iter``), or the
    adjoint's (``backward_tol``, ``backward_max_iter``); both stop by ``spec.stop``. The spec has
    validated its options already; this checks only what the kernels add (the id, the 32-bit count)."""
    if not isinstance(spec, SolveSpec):
        raise TypeError(f"the Triton launchers take a pcdeq_kernels.SolveSpec, got {type(spec).__name__}")
    if adjoint:
        return Iteration(map_id(None), spec.backward_tol, spec.backward_max_iter, spec.stop)
    return Iteration(map_id(spec.activation), spec.tol, spec.max_iter, spec.stop)


# ------------------------------------------------------------------------------------------ inputs


def check_inputs(x: Tensor, weight: Tensor, others: dict, *, x_dims: int, taps: tuple, needs: str) -> None:
    """What the kernels assume and cannot check themselves (tl.device_assert is not enforced everywhere):
    operands of a kernel dtype (``limits.KERNEL_DTYPES``) on one device the kernels run on, ``x`` with
    ``x_dims`` dimensions and at least one element, ``weight`` of shape ``(n, n, *taps)`` for
    ``n = x.shape[1]`` (``needs`` says so when it is not), ``others`` (z0, D, ...; None allowed)
    shaped like ``x``. The 32-bit limits on shapes are each kernel family's own."""
    for name, t in {"input": x, "weight": weight, **others}.items():
        if t is None:
            continue
        if t.dtype == torch.float64:
            raise TypeError(
                f"the Triton backend computes in float32 and does not take float64 ({name}); "
                "use backend='reference' (or 'cpu') for float64, or cast to float32"
            )
        if t.dtype not in limits.KERNEL_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; the Triton kernels take float16, bfloat16 or float32")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but the input is on {x.device}")
    if x.dim() != x_dims or tuple(weight.shape) != (x.shape[1], x.shape[1], *taps):
        raise ValueError(f"{needs}; got {tuple(x.shape)}, {tuple(weight.shape)}")
    for name, t in others.items():
        if t is not None and t.shape != x.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(
            f"the Triton launchers solve nonempty problems, got shape {tuple(x.shape)}: an empty batch is "
            "answered by the op layer (pcdeq_kernels.fixed_point), without a backend"
        )
    if x.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "Triton kernels run on CUDA tensors; CPU tensors need the interpreter, i.e. TRITON_INTERPRET=1 "
            "set before pcdeq_kernels.triton is first imported"
        )
    if x.device.type not in ("cpu", "cuda"):
        raise ValueError(
            f"the Triton backend runs on cuda tensors (or cpu under TRITON_INTERPRET=1), not {x.device.type}"
        )


# ----------------------------------------------------------------------------------------- options


def resolve_precision(precision: Optional[str], torch_setting: Callable[[], str]) -> str:
    """The ``tl.dot`` input precision for float32 operands: ``"ieee"`` (exact fp32) or ``"tf32"``.

    ``precision`` overrides; else the environment variable ``PCDEQ_TRITON_PRECISION``; else
    ``torch_setting()``, torch's own setting for the op the kernels replace (``dense.resolve_precision``:
    float32 matmuls; ``conv.resolve_precision``: float32 convolutions). Half-precision operands are
    converted to float32 in registers and go through the same dot (fp16 and bf16 values are exact in
    tf32, so only the float32 state is rounded under ``"tf32"``).
    """
    if precision is None:
        precision = os.environ.get("PCDEQ_TRITON_PRECISION") or None
    if precision is None:
        return torch_setting()
    if precision not in PRECISIONS:
        raise ValueError(f"input precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def requested_path(path: Optional[str], stop: str, split: bool) -> str:
    """The solve path asked for: ``path``, else ``PCDEQ_TRITON_PATH``, else ``"auto"``; validated.
    ``stop="batch"`` is always stepwise (or split): its stopping rule is a reduction over every row
    block or image, which one launch cannot make without a grid-wide barrier. ``split``: whether this
    kernel family has the split path (dense only)."""
    if path is None:
        path = os.environ.get("PCDEQ_TRITON_PATH") or "auto"
    if path not in SOLVE_PATHS:
        raise ValueError(f"Triton solve path must be one of {SOLVE_PATHS}, got {path!r}")
    if path == "split" and not split:
        raise ValueError("the Triton 'split' path (cuBLAS matmul + fused epilogue) is for dense problems; "
                         "convolutional ones take 'single', 'stepwise' or 'auto'")
    if stop == "batch":
        if path == "single":
            raise ValueError("stop='batch' needs the stepwise path (a whole-batch reduction per iteration)")
        return "split" if path == "split" else "stepwise"
    return path


def num_sms(device: torch.device) -> int:
    """How many SMs the launches' GPU has (1 off a GPU): what "auto" paths fill."""
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def check_every(value: Optional[int]) -> int:
    """How many steps the stepwise loop runs between host reads of the convergence flags: ``value``,
    else ``PCDEQ_TRITON_CHECK_EVERY``, else ``DEFAULT_CHECK_EVERY``."""
    if value is None:
        value = int(os.environ.get("PCDEQ_TRITON_CHECK_EVERY") or DEFAULT_CHECK_EVERY)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"check_every must be an integer >= 1, got {value!r}")
    return value


# ----------------------------------------------------------------------------------------- configs


def make_configs(entries, names) -> list:
    """triton.Config list from tuples ``(*block sizes, num_warps, num_stages[, maxnreg])``."""
    out = []
    for e in entries:
        num_warps, num_stages, *maxnreg = e[len(names):]
        out.append(triton.Config(dict(zip(names, e[:len(names)])), num_warps=num_warps, num_stages=num_stages,
                                 maxnreg=maxnreg[0] if maxnreg else None))
    return out


def tuned(configs):
    """The configs a kernel's autotuner gets. The interpreter runs only the first config anyway; giving
    it only that one also skips the autotuner's benchmarking (and makes the tiles it tests the ones
    listed first: small, so that small test problems still span several tiles). Tests of the other
    configs force them one at a time (an autotuner with one config launches it as it is)."""
    return configs[:1] if INTERPRETED else configs


def arg(named_args: dict, kwargs: dict, name: str):
    """A launch argument, as an ``early_config_prune`` receives it (positional or keyword)."""
    return named_args[name] if name in named_args else kwargs[name]


def autotuning() -> bool:
    """Whether launches autotune (``PCDEQ_TRITON_AUTOTUNE``: ``1``, the default, or ``0``). With ``0`` each
    launch takes the first config that suits it, without compiling and timing the others: for test runs
    on a GPU, where every variant's configs would cost minutes of compiling."""
    value = os.environ.get("PCDEQ_TRITON_AUTOTUNE") or "1"
    if value not in ("0", "1"):
        raise ValueError(f"PCDEQ_TRITON_AUTOTUNE must be 0 or 1, got {value!r}")
    return value == "1"


def autotuned(candidates):
    """An ``early_config_prune`` from a filter of the configs that suit a launch: all of them, for the
    autotuner to time, or only the first when ``autotuning()`` is off."""
    def prune(configs, named_args, **kwargs):
        kept = candidates(configs, named_args, **kwargs)
        return kept if autotuning() else kept[:1]

    return prune


def benchmark(kernel_call, quantiles):
    """The autotuners' timer (their ``do_bench``). With autotuning off the prune leaves one config, which
    Triton 3.8+ launches untimed; Triton 3.6 times even a lone config (warm-up, repetitions, an L2 flush
    per run: 0.1 to 0.3 s per shape, many times that under compute-sanitizer), so here it is not run."""
    if not autotuning():
        return [0.0] * len(quantiles)
    return driver.active.get_benchmarker()(kernel_call, quantiles=quantiles)


# ---------------------------------------------------------------------------------------- launching

# Triton's autotuner keeps a launch's arguments, and while it benchmarks the saved copies of the buffers
# it restores, on the kernel object that every caller shares: launches from several host threads at
# once (DataParallel replicas, serving threads) could mix them up, so they take turns. And a launch
# runs on the current CUDA device and its current stream, whatever device its tensors are on.
LAUNCH_LOCK = threading.Lock()


@contextlib.contextmanager
def launching(device: torch.device):
    """The context of every kernel launch: one launch at a time, on ``device`` (the tensors' GPU)."""
    with LAUNCH_LOCK, torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        yield


# ------------------------------------------------------------------------------------------ buffers


def stats(batch: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """The per-sample outputs a single-launch kernel writes: iterations, residual, converged."""
    return (
        torch.empty(batch, dtype=torch.int32, device=device),
        torch.empty(batch, dtype=torch.float32, device=device),
        torch.empty(batch, dtype=torch.bool, device=device),
    )


def step_buffers(batch: int, device) -> tuple[Tensor, ...]:
    """The stepwise loop's ``(sums, tot, active, its, res)`` (``epilogue.close_previous_step``): float64
    squared norms, every sample's status RUNNING in both slots."""
    sums = torch.zeros((3, 2, batch), dtype=torch.float64, device=device)
    tot = torch.zeros((3, 2), dtype=torch.float64, device=device)
    active = torch.full((2, batch), RUNNING, dtype=torch.int32, device=device)
    its = torch.zeros(batch, dtype=torch.int32, device=device)
    res = torch.full((batch,), math.inf, dtype=torch.float32, device=device)
    return sums, tot, active, its, res


def state_planes(shape, device) -> Tensor:
    """Two float32 state planes ``(2, *shape)`` for the stepwise loop, each starting on a 128-byte
    boundary. A launch specialises its pointers on 16-byte alignment: with ``shape`` of a size not
    divisible by 4, back-to-back planes would compile every step kernel twice and run the odd steps
    without vectorised loads."""
    size = math.prod(shape)
    padded = -(-size // 32) * 32
    return torch.empty((2, padded), dtype=torch.float32, device=device)[:, :size].view(2, *shape)


def start_state(plane: Tensor, x0: Optional[Tensor], bias: Tensor, scale: Tensor, map_id: int) -> None:
    """The stepwise loop's ``x_0`` into ``plane`` (float32): x0 if given, else ``h_0 = D * v`` for the
    adjoint and ``z_0 = 0`` for the forward map (the reference's defaults; ``epilogue.initial_state``
    for the single-launch kernels)."""
    if x0 is not None:
        plane.copy_(x0)
    elif map_id == ADJOINT_ID:
        torch.mul(scale.float(), bias.float(), out=plane)
    else:
        plane.zero_()


def run_steps(launch_step: Callable[[int, bool], None], max_iter: int, every: int, active: Tensor) -> int:
    """The stepwise solves' host loop: ``launch_step(t, True)`` for steps t = 0, 1, ... (step t also
    closes step t-1), until ``max_iter`` steps or until the host, reading ``active`` every ``every``
    steps, sees that no sample iterated; then ``launch_step(steps, False)``, the bookkeeping of the
    last step (its residuals, counts and stops) without a matmul. Returns the number of steps; the
    samples that met the rule are ``converged(active, steps)``."""
    steps = 0
    for t in range(max_iter):
        launch_step(t, True)
        steps = t + 1
        # active[t % 2] = each sample's status at the start of step t: when none is RUNNING, the steps
        # since changed nothing and we are done. Reading it is the only host synchronisation.
        if steps % every == 0 and steps < max_iter and not bool((active[t % 2] == RUNNING).any()):
            break
    launch_step(steps, False)
    return steps


def converged(active: Tensor, steps: int) -> Tensor:
    """Which samples met the stopping rule in a stepwise solve of ``steps`` steps: status MET after the
    last step's bookkeeping (not merely stopped: a non-finite residual stops a sample FAILED, and one
    still RUNNING ran out of steps)."""
    return active[steps % 2] == MET
