#!/usr/bin/env bash
# Create .venv, install torch and pcdeq_kernels (editable) with its test, demo and triton extras.
#   TORCH_SPEC  which torch to install (default: torch==2.13.0, the CPU build; on a CUDA machine use
#               e.g. TORCH_SPEC="torch==2.14.1" or keep the torch you have with TORCH_SPEC=skip)
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
if [ "${TORCH_SPEC:-torch==2.13.0}" != skip ]; then
  pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
pip install -q "setuptools>=64" wheel
pip install -q --no-build-isolation -e ".[test,demo,triton,bench]"
python -c "import pcdeq_kernels as pk, torch; print('pcdeq_kernels', pk.__version__, 'torch', torch.__version__, 'backends', pk.available_backends())"
