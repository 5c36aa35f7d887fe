"""Which precision torch's own float32 matmuls (cuBLAS) and convolutions (cuDNN) use: ``"ieee"``
(exact fp32) or ``"tf32"``. The two have separate switches and defaults: matmuls are exact unless
asked, convolutions use TF32 unless asked not to.

torch has two ways to set it: the legacy ``torch.set_float32_matmul_precision("highest" | "high" |
"medium")`` and, since 2.9, ``torch.backends.cuda.matmul.fp32_precision = "ieee" | "tf32"`` (or the
global ``torch.backends.fp32_precision``). Once a program uses the newer API, the legacy getters
raise, so a user who set TF32 the recommended way would get an error from us for no fault of theirs.
The newer attribute resolves both: the legacy setter writes it, and it falls back to the global
setting when unset ("none", which means exact fp32). Convolutions likewise: the legacy
``torch.backends.cudnn.allow_tf32`` (default True) and, since 2.9, ``torch.backends.cudnn.conv.fp32_precision``.
"""

import torch

__all__ = ["torch_conv_precision", "torch_matmul_precision"]


def torch_matmul_precision() -> str:
    """``"tf32"`` when torch's float32 matmuls may use TF32 tensor cores, else ``"ieee"``."""
    matmul = torch.backends.cuda.matmul
    try:
        setting = matmul.fp32_precision
    except AttributeError:  # torch before 2.9: only the legacy API exists
        return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return "tf32" if setting == "tf32" else "ieee"


def torch_conv_precision() -> str:
    """``"tf32"`` when torch's float32 convolutions may use TF32 tensor cores (torch's default), else ``"ieee"``."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    setting = getattr(conv, "fp32_precision", None)
    if setting is None:  # torch before 2.9: only the legacy switch exists
        return "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"
    return "tf32" if setting == "tf32" else "ieee"
