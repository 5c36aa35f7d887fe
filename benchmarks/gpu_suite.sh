#!/usr/bin/env bash
# One command on a GPU machine with no network (torch, triton, pytest, pytest-benchmark and ninja
# already installed): build the extension from source, run the tests on the GPU, run the benchmark
# reports (dense float32 and bfloat16, conv float32), and write everything under OUT. The steps can
# be run separately, e.g. in two calls of a machine with a 10-minute limit per command (the build
# stays in place between them):
#
#   benchmarks/gpu_suite.sh OUT_DIR                       # every step
#   benchmarks/gpu_suite.sh OUT_DIR build tests           # some: build tests bench-float32 bench-bfloat16 bench-conv bench-loops
#   benchmarks/gpu_suite.sh OUT_DIR sanitize-racecheck    # only when named: sanitize-racecheck, -synccheck, -memcheck
#
# Packages the GPU image lacks (torchdeq, a benchmark peer) travel as wheels: run
# benchmarks/fetch_gpu_wheels.sh here first (it downloads them into .whl/) and name .whl in the device
# call's carry; the suite installs them into /tmp/site. PYTHON (default python3) picks the interpreter.
set -uo pipefail
OUT=$(realpath -m "${1:?usage: benchmarks/gpu_suite.sh OUT_DIR [STEP...]}")
shift
WANTED=" ${*:-build tests bench-float32 bench-bfloat16 bench-conv bench-loops} "
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
unset TRITON_INTERPRET  # real kernels on the real GPU
status=0
step() {  # step NAME SECONDS CMD...: run with a time limit, log to OUT/NAME.log, remember failures
  local name=$1 limit=$2; shift 2
  [[ "$WANTED" == *" $name "* ]] || return 0
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 5 "$OUT/$name.log"
  [ $rc -eq 0 ] || { echo "!! $name failed (rc $rc), see $OUT/$name.log"; status=1; }
}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
} >"$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"
step build 300 env MAX_JOBS="${MAX_JOBS:-16}" "$PY" setup.py build_ext --inplace
# The tests run without autotuning (each launch compiles only the first config that suits it; a test
# forces every config in turn) and without the compile-only tests (every Triton config and every .cu
# file for sm_80/sm_90: CI runs them on CPU), which would take most of the 10 minutes here.
step tests 420 env PCDEQ_TRITON_AUTOTUNE=0 "$PY" -m pytest tests -q -rs --maxfail=30 --junitxml="$OUT/tests.xml" \
  -k "not compiles_for_sm80 and not sources_compile"
step bench-float32 150 "$PY" -m pcdeq_kernels.bench --device cuda --dtype float32 --min-seconds 0.2 --no-progress --out "$OUT"
step bench-bfloat16 120 "$PY" -m pcdeq_kernels.bench --device cuda --dtype bfloat16 --min-seconds 0.2 --no-progress --out "$OUT"
# The dispatchers' loop choice, measured: each GPU backend with its loop forced, where the choice is close.
step bench-loops 150 "$PY" -m pcdeq_kernels.bench --device cuda --dtype float32 --min-seconds 0.2 --no-progress --modes forward \
  --paths official,triton,triton-single,triton-stepwise,triton-split,cuda,cuda-single,cuda-stepwise \
  --shapes 256x1024,256x4096,1024x4096,8192x1024,8192x4096 --out "$OUT/loops"
step bench-conv 120 "$PY" -m pcdeq_kernels.bench --conv --device cuda --dtype float32 --min-seconds 0.2 --no-progress --out "$OUT"
# Not run by default: the kernels under compute-sanitizer (races, barrier use, memory errors).
for tool in racecheck synccheck memcheck; do
  step "sanitize-$tool" 300 compute-sanitizer --tool "$tool" --error-exitcode 1 "$PY" scripts/sanitize_kernels.py
done
echo "results in $OUT"
exit $status
