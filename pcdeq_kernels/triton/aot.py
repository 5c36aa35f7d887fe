"""Ahead-of-time compilation of the Triton kernels for a GPU architecture, on a machine without a GPU:
what the tests use to check that every kernel configuration compiles for sm_80 and sm_90 without
register spills and within shared memory (dense.aot_compile, conv.aot_compile)."""

from __future__ import annotations

import re
import subprocess
import tempfile

import torch
import triton

# Triton's names of the operand dtypes the kernels take.
TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def compile_for_gpu(fn, arg_types: dict, constexprs: dict, unit_stride: str, dtype: torch.dtype, config,
                    capability: int, divisible=()) -> dict:
    """``triton.compile`` a @triton.jit function for ``sm_<capability>`` (no GPU needed) and read its
    registers and local memory from the cubin (``cuobjdump --dump-resource-usage``: ``n_regs`` and
    ``n_spills`` need a driver). Generic over kernels: ``arg_types`` maps argument names to roles
    (``"*T"``: a pointer to the operands' dtype, ``"W1"``: a weight stride, the one named
    ``unit_stride`` specialised to 1 as a real launch does); other arguments are ``constexprs``; the
    integer arguments named in ``divisible`` are compiled as multiples of 16."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = {}, dict(constexprs), {}
    for i, name in enumerate(fn.arg_names):
        role = arg_types.get(name, "constexpr")
        if role == "W1":
            role = "constexpr" if name == unit_stride else "i32"
            if name == unit_stride:
                constexprs[name] = 1
        signature[name] = role.replace("T", TRITON_DTYPES[dtype])
        # torch allocations are 16-byte aligned
        if role.startswith("*") or (name in divisible and role == "i32"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    local = int(re.search(r"LOCAL:(\d+)", usage).group(1)) + int(re.search(r"STACK:(\d+)", usage).group(1))
    return {"registers": regs, "spill_bytes": local, "shared": compiled.metadata.shared,
            "num_warps": config.num_warps, "num_stages": config.num_stages}
