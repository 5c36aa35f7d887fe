"""Which precision torch's own float32 matmuls (cuBLAS) use: ``"ieee"`` (exact fp32) or ``"tf32"``.

torch has two ways to set it: the legacy ``torch.set_float32_matmul_precision("highest" | "high" |
"medium")`` and, since 2.9, ``torch.backends.cuda.matmul.fp32_precision = "ieee" | "tf32"`` (or the
global ``torch.backends.fp32_precision``). Once a program uses the newer API, the legacy getters
raise, so a user who set TF32 the recommended way would get an error from us for no fault of theirs.
The newer attribute resolves both: the legacy setter writes it, and it falls back to the global
setting when unset ("none", which means exact fp32).
"""

import torch

__all__ = ["torch_matmul_precision"]


def torch_matmul_precision() -> str:
    """``"tf32"`` when torch's float32 matmuls may use TF32 tensor cores, else ``"ieee"``."""
    matmul = torch.backends.cuda.matmul
    try:
        setting = matmul.fp32_precision
    except AttributeError:  # torch before 2.9: only the legacy API exists
        return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return "tf32" if setting == "tf32" else "ieee"
