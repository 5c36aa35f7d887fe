#!/usr/bin/env bash
# Download the wheels benchmarks/gpu_suite.sh installs on a GPU machine that cannot reach PyPI: the
# packages its image lacks (torchdeq, a benchmark peer; pure Python, so any platform), into .whl/
# (ignored by git: name it in the device call's carry).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl "torchdeq==0.1.0"
ls .whl
