"""pcdeq_kernels: fast positive concave deep equilibrium (pcDEQ) layers for PyTorch.

    import pcdeq_kernels as pk
    z, stats = pk.fixed_point(u, weight, "tanh")        # z = tanh(z @ W.T + u), W >= 0, u >= 0
    layer = pk.PCDEQLinear(80, activation="tanh")       # softplus(beta=5) injection, then the solve
"""

from .activations import ACTIVATIONS, Activation, get_activation
from .backends import BackendStatus, available_backends, backend_status
from .functional import SolverStats, fixed_point
from .modules import PCDEQConv2d, PCDEQLinear
from .ops import NonConvergenceError
from .spec import SolveSpec

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "BackendStatus",
    "NonConvergenceError",
    "PCDEQConv2d",
    "PCDEQLinear",
    "SolveSpec",
    "SolverStats",
    "available_backends",
    "backend_status",
    "fixed_point",
    "get_activation",
]
