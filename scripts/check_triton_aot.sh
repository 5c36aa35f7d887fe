#!/usr/bin/env bash
# Compile every Triton kernel configuration for sm_80 and sm_90 with another Triton release and check
# it for register spills and shared memory (the AOT tests of tests/test_backend_triton.py and
# tests/test_triton_conv.py), and that the epilogue compiles for every map id of the table and refuses
# any other (its tl.static_assert; test_every_map_id_compiles_for_sm80_...). The project's venv carries the newest Triton (3.9); the GPU machines
# carry the one their torch pins (torch 2.11: triton 3.6.0; torch 2.14.1 pins 3.8.0), and ptxas's
# register allocation differs between versions, so the configurations must be spill-free under each
# that users run. CI checks 3.6.0 and 3.8.0.
#   usage: scripts/check_triton_aot.sh [VERSION]     (default 3.6.0; run scripts/setup.sh first)
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:-3.6.0}"
target=".venv/triton-$version"
if [ ! -d "$target/triton" ]; then
  .venv/bin/pip install -q --no-deps --target "$target" "triton==$version"
fi
# PYTHONPATH puts this Triton ahead of the venv's, in pytest and in the compile workers it starts.
PYTHONPATH="$PWD/$target" .venv/bin/python - <<PY
import triton
import os
assert triton.__version__ == "$version", f"imported triton {triton.__version__} from {triton.__file__}"
# the tests skip without Triton's NVIDIA tools: here that would be a silent pass
assert os.path.exists(triton.knobs.nvidia.cuobjdump.path), "this Triton has no ptxas/cuobjdump"
PY
PYTHONPATH="$PWD/$target" .venv/bin/python -m pytest -q -p no:cacheprovider -k compiles_for_sm80 \
  tests/test_backend_triton.py tests/test_triton_conv.py
