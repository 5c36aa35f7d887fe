"""Ahead-of-time compilation of the Triton kernels for a GPU architecture, on a machine without a GPU:
what the tests use to check that every kernel configuration compiles for sm_80 and sm_90 without
register spills and within shared memory (dense.aot_compile, conv.aot_compile)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton

from ..activations import ADJOINT_ID

# Triton's names of the operand dtypes the kernels take.
TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# The GPU architectures the kernels are compiled for, and the most shared memory one block may opt in
# to on each (A100: 163 KB, H100: 227 KB).
CAPABILITIES = (80, 90)
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}

# The arguments both kernel families (dense.py, conv.py) name alike, by role, for compiling without a
# GPU: "T" is the operands' dtype; "W1" marks a weight stride, the one that is 1 in a launch specialised
# to the constant 1 (Triton does so with an int argument equal to 1, so a real launch compiles exactly
# that): stride_wk for the forward map (W.T, or each tap's W.T), stride_wn for the adjoint's.
ARG_TYPES = {
    "x0_ptr": "*T", "bias_ptr": "*T", "scale_ptr": "*T", "w_ptr": "*T", "out_ptr": "*T",
    "its_ptr": "*i32", "res_ptr": "*fp32", "conv_ptr": "*u1", "buf_ptr": "*fp32",
    "x_in_ptr": "*fp32", "x_out_ptr": "*fp32", "sums_ptr": "*fp64", "tot_ptr": "*fp64", "active_ptr": "*i32",
    "B": "i32", "stride_wk": "W1", "stride_wn": "W1", "tol": "fp32", "max_iter": "i32", "t": "i32",
}

# A launch compiles a variant of the single-launch kernels with and without z0 (x0: given, or the
# map's default start), and of the step kernel per stop rule and for the bookkeeping-only launch.
SOLVE_VARIANTS = (dict(has_x0=False), dict(has_x0=True))
STEP_VARIANTS = tuple(dict(stop_batch=b, compute=c) for b, c in ((True, True), (False, True), (False, False)))


def compile_for_gpu(fn, arg_types: dict, constexprs: dict, dtype: torch.dtype, config, capability: int,
                    divisible=()) -> dict:
    """``triton.compile`` a @triton.jit function for ``sm_<capability>`` (no GPU needed) and read its
    registers and local memory from the cubin (``cuobjdump --dump-resource-usage``: ``n_regs`` and
    ``n_spills`` need a driver). Generic over kernels: ``arg_types`` maps argument names to roles
    (``"*T"``: a pointer to the operands' dtype, ``"W1"``: a weight stride, specialised to 1 as a real
    launch does for the map ``constexprs["ACT"]``: see ``ARG_TYPES``); other arguments are
    ``constexprs``; the integer arguments named in ``divisible`` are compiled as multiples of 16."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    unit_stride = "stride_wn" if constexprs["ACT"] == ADJOINT_ID else "stride_wk"
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
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    if config.maxnreg is not None:  # a register cap the config sets, as a launch passes it
        options["maxnreg"] = config.maxnreg
    compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    local = int(re.search(r"LOCAL:(\d+)", usage).group(1)) + int(re.search(r"STACK:(\d+)", usage).group(1))
    return {"registers": regs, "spill_bytes": local, "shared": compiled.metadata.shared,
            "num_warps": config.num_warps, "num_stages": config.num_stages}


# ptxas sometimes stops a kernel at an occupancy step (64 to 128 registers) and moves up to three 64-bit
# values to local memory to get there; allowed the whole register file (maxnreg=255, or 128 for a
# 16-warp block: all it can have) the same kernels spill nothing. Checked for every case seen: the
# default plans and the whole products under Triton 3.6, 3.8 and 3.9 (2026-11-23), where 31 of 17100
# dense compiles keep 24 bytes at 80, 96 or 128 registers (need 94 to 186 without),
# except Triton 3.8's on-chip 16 x 128 ieee tile over 16 warps, which keeps 8 or 16 bytes at 128
# registers (dense.py: no cleaner tile compiles there under 3.8). Capping registers by hand does not
# help: maxnreg=128 on those configs spills up to 368 bytes in their other variants. Those few bytes
# per thread sit in L1 and cost a handful of instructions per tile; a config that spills more is too
# big for the register file and is a defect.
OCCUPANCY_SPILL_BYTES = 24


def spills_accepted(report: dict) -> bool:
    """Whether a compile's spills (``compile_for_gpu``'s report) are none, or ptxas's occupancy trade:
    at most ``OCCUPANCY_SPILL_BYTES`` per thread at 128 registers or fewer."""
    return report["spill_bytes"] == 0 or (report["spill_bytes"] <= OCCUPANCY_SPILL_BYTES
                                          and report["registers"] <= 128)


# One worker process per shard compiles its share of ``<module>.aot_plan()`` and prints one JSON line
# per compile (after a first line with the plan's length).
_WORKER = """
import importlib, json, sys
module = importlib.import_module("pcdeq_kernels.triton." + sys.argv[1])
shard, shards, full = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
plan = module.aot_plan(full=full)
print(json.dumps({"planned": len(plan)}), flush=True)
for job in plan[shard::shards]:
    label = dict(job, config=str(job["config"]), dtype=str(job["dtype"]))
    print(json.dumps(dict(label, **module.aot_compile(**job))), flush=True)
"""


def cuobjdump_available() -> bool:
    """Whether this Triton carries its NVIDIA tools (ptxas, cuobjdump), which ``compile_for_gpu`` needs."""
    try:
        return os.path.exists(triton.knobs.nvidia.cuobjdump.path)
    except Exception:  # older Triton without knobs, or no NVIDIA backend
        return False


def compile_plan_in_workers(module: str, full: bool = False, shards: int = 2, timeout: float = 1800) -> list[dict]:
    """Every compile of ``pcdeq_kernels.triton.<module>.aot_plan(full)``, split over ``shards``
    processes (the compiles are CPU-bound) that run without ``TRITON_INTERPRET``, so that they compile
    for real even when the caller runs the interpreter. Returns one dict per compile: the job's
    keywords (config and dtype as strings) and ``aot_compile``'s report."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default today; silences Triton 3.9's notice
    workers = [subprocess.Popen([sys.executable, "-c", _WORKER, module, str(i), str(shards), str(int(full))],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(shards)]
    results, planned = [], set()
    for p in workers:
        out, err = p.communicate(timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"an AOT compile worker for {module} failed:\n{err[-4000:]}")
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        planned.add(lines[0]["planned"])
        results += lines[1:]
    if len(planned) != 1 or len(results) != planned.pop():
        raise RuntimeError(f"the AOT compile workers for {module} did not cover the plan")
    return results
