"""The solve specification: every option of a solve, validated once, in one frozen object.

    spec = SolveSpec(activation="tanh", tol=1e-5)     # any bad option raises here, naming the fix
    spec.replace(backend="cpu")                        # a validated copy
    z, stats = pk.fixed_point(u, W, spec=spec)         # or pk.fixed_point(u, W, "tanh", tol=1e-5)

``fixed_point`` builds one per call from its keywords, a layer builds its own at construction (so a bad
option fails there), and every backend receives the spec, never loose keywords; the custom ops carry it
as ``spec.key``, a string. The fields of ``SolveSpec`` are the option list: it exists here only, and
the signatures of ``fixed_point`` and the layers are generated from it (``with_solve_options``).

What a backend can do depends on the spec and on the problem (``problem.Problem``: kind, device,
dtype); ``backends.resolve(spec, problem)`` asks each backend's ``unsupported_reason(spec, problem)``.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import numbers
from typing import Optional

from .activations import get_activation

STOP_RULES = ("sample", "batch", "official")
BACKWARD_MODES = ("implicit", "jfb")
SOLVERS = ("picard",)  # plain iteration x <- T(x); the solver of every backend
NONCONVERGENCE_POLICIES = ("warn", "raise", "ignore")
BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")
MAX_ITER_LIMIT = 2**63 - 1  # the compiled ops take a 64-bit count; backends may state a lower limit


def _positive_finite(name: str, value) -> float:
    # bool is an int to Python: tol=True would silently mean 1.0
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < float(value) < math.inf:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _iteration_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= MAX_ITER_LIMIT:
        raise ValueError(f"{name} must be an integer >= 1 (and below 2**63), got {value!r}")
    return int(value)


def _one_of(name: str, value, choices: tuple) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class SolveSpec:
    """What to solve and how: the map, the stopping rules, the gradient, the solver, the backend.

    Args:
        activation: the forward map's activation, a name in the map table (``activations.ACTIVATIONS``).
        tol, max_iter: forward stopping rule ``||x_{k+1} - x_k|| / (||x_{k+1}|| + 1e-5) < tol``.
        stop: "sample" (each sample stops on its own), "batch" (whole-batch norms, the official code's
            rule) or "official" (the official algorithm step for step: the "batch" rule, the output
            ``T(z_K)``, one more map application, and the adjoint residual measured on ``g``, where
            ``h = D * g``; for parity with the official code, on the reference backend).
        backward: "implicit" (exact gradient via the adjoint fixed point) or "jfb" (Jacobian-free).
        backward_tol, backward_max_iter: the adjoint's stopping rule; None: the forward's values.
        solver: "picard" (plain iteration).
        on_nonconvergence: "warn", "raise" (``NonConvergenceError``) or "ignore"; the per-sample
            ``converged`` flags are in the stats either way.
        backend: "auto" (the fastest available backend that can solve the problem), "reference",
            "cpu", "cuda" or "triton".

    Frozen and hashable; ``replace(**changes)`` gives a validated copy. ``backward_tol`` and
    ``backward_max_iter`` are resolved at construction (None becomes the forward value).
    """

    activation: str = "tanh"
    tol: float = 1e-4
    max_iter: int = 200
    stop: str = "sample"
    backward: str = "implicit"
    backward_tol: Optional[float] = None
    backward_max_iter: Optional[int] = None
    solver: str = "picard"
    on_nonconvergence: str = "warn"
    backend: str = "auto"

    def __post_init__(self):
        get_activation(self.activation)  # a ValueError that lists the table's names
        tol = _positive_finite("tol", self.tol)
        max_iter = _iteration_count("max_iter", self.max_iter)
        resolved = dict(
            tol=tol,
            max_iter=max_iter,
            stop=_one_of("stop", self.stop, STOP_RULES),
            backward=_one_of("backward", self.backward, BACKWARD_MODES),
            backward_tol=tol if self.backward_tol is None else _positive_finite("backward_tol", self.backward_tol),
            backward_max_iter=(max_iter if self.backward_max_iter is None
                               else _iteration_count("backward_max_iter", self.backward_max_iter)),
            solver=_one_of("solver", self.solver, SOLVERS),
            on_nonconvergence=_one_of("on_nonconvergence", self.on_nonconvergence, NONCONVERGENCE_POLICIES),
        )
        if not isinstance(self.backend, str) or self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}: choose one of {BACKENDS}")
        for name, value in resolved.items():  # plain Python numbers, whatever numeric type came in
            object.__setattr__(self, name, value)
        # The key is built here, once, never under torch.compile: a float that Dynamo has seen take two
        # values (two layers with different tols) becomes symbolic, and a symbolic float has no repr.
        object.__setattr__(self, "_key", repr(tuple(getattr(self, name) for name in OPTION_NAMES)))

    @classmethod
    def from_options(cls, caller: str, **options) -> "SolveSpec":
        """The spec of ``options``; a keyword that is not an option is a TypeError naming ``caller``."""
        unknown = sorted(set(options) - set(OPTION_NAMES))
        if unknown:
            raise TypeError(
                f"{caller}() got an unexpected keyword argument {unknown[0]!r}; the solve options are {OPTION_NAMES}"
            )
        return cls(**options)

    @property
    def key(self) -> str:
        """The spec as a string, the ``repr`` of its field values in field order (exact for floats):
        how the custom ops carry it. Built at construction (``__post_init__``)."""
        return self._key

    @staticmethod
    @functools.lru_cache(maxsize=256)
    def from_key(key: str) -> "SolveSpec":
        """The spec a ``key`` encodes, validated again (a custom op may be called directly)."""
        if not isinstance(key, str):
            raise TypeError(f"a solve spec key is a string (SolveSpec.key), got {type(key).__name__}")
        try:
            values = ast.literal_eval(key)
        except (ValueError, SyntaxError):
            values = None
        if not isinstance(values, tuple) or len(values) != len(OPTION_NAMES):
            raise ValueError(f"not a solve spec key (SolveSpec.key, a tuple of {OPTION_NAMES}): {key!r}")
        return SolveSpec(*values)

    def replace(self, **changes) -> "SolveSpec":
        """A validated copy with ``changes``; the adjoint's tol/max_iter keep their resolved values
        unless given."""
        unknown = sorted(set(changes) - set(OPTION_NAMES))
        if unknown:
            raise TypeError(f"SolveSpec.replace() got an unexpected keyword argument {unknown[0]!r}")
        return dataclasses.replace(self, **changes)

    @property
    def batch_stop(self) -> bool:
        return self.stop in ("batch", "official")


OPTION_NAMES = tuple(f.name for f in dataclasses.fields(SolveSpec))


def with_solve_options(fn):
    """Give ``fn(..., **options)`` the signature it really has: its ``**options`` replaced by the solve
    options as keyword-only parameters with their defaults (what ``help()``, IDEs and ``inspect`` show).
    Parameters of ``fn`` that are options themselves (``activation``, ``backend``) keep their place."""
    signature = inspect.signature(fn)
    params = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    taken = {p.name for p in params}
    params += [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
        for f in dataclasses.fields(SolveSpec) if f.name not in taken
    ]
    fn.__signature__ = signature.replace(parameters=params)
    return fn
