#!/usr/bin/env bash
# One command on a GPU machine with no network (torch, triton, pytest, pytest-benchmark and ninja
# already installed): build the extension from source, run the tests on the GPU, run the benchmark
# reports (dense float32 and bfloat16, conv float32, the loops forced), and write everything under OUT.
# The steps can be run separately, e.g. one group per call of a machine with a 10-minute limit per
# command (each group starts with build: a machine that has gone idle between calls starts bare, and
# a build that is already there costs seconds):
#
#   benchmarks/gpu_suite.sh OUT_DIR                                   # every step but the sanitizers
#   benchmarks/gpu_suite.sh OUT_DIR build tests-cuda                  # some, in this order:
#       build selfcheck tests-cuda tests-triton tests-rest bench-float32 bench-bfloat16 bench-loops bench-loops-cuda bench-conv
#   benchmarks/gpu_suite.sh OUT_DIR build sanitize-racecheck          # only when named: sanitize-racecheck, -synccheck, -memcheck
#
# PACK=1 packs everything the steps wrote into OUT_DIR/suite-<steps>.tgz (one file: the device tool
# brings back at most 8). Packages the GPU image lacks (torchdeq, a benchmark peer) travel as wheels:
# run benchmarks/fetch_gpu_wheels.sh here first (it downloads them into .whl/) and name .whl in the
# device call's carry; the suite installs them into /tmp/site. PYTHON (default python3) picks the
# interpreter; the build targets the GPU present (TORCH_CUDA_ARCH_LIST overrides).
set -uo pipefail
OUT=$(realpath -m "${1:?usage: benchmarks/gpu_suite.sh OUT_DIR [STEP...]}")
shift
WANTED=" ${*:-build selfcheck tests-cuda tests-triton tests-rest bench-float32 bench-bfloat16 bench-loops bench-loops-cuda bench-conv} "
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
if [ "${PACK:-0}" = 1 ]; then  # write into a folder of its own, packed at exit
  FINAL_OUT=$OUT
  OUT=$(mktemp -d)
  trap 'tar czf "$FINAL_OUT/suite-$(echo $WANTED | tr " " "_").tgz" -C "$OUT" . && rm -rf "$OUT"' EXIT
fi
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
ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)
step build 300 env MAX_JOBS="${MAX_JOBS:-16}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-${ARCH:-9.0}}" \
  "$PY" setup.py build_ext --inplace
# The installation self-check (python -m pcdeq_kernels): every usable backend against the float64
# reference on a dense and a conv problem, on the GPU; a minute at most, and the first answer to
# "do the kernels work on this GPU at all".
step selfcheck 120 "$PY" -m pcdeq_kernels
# The tests run without autotuning (each launch compiles only the first config that suits it; a test
# forces every config in turn) and without the compile-only tests (every Triton config and every .cu
# file for sm_80/sm_90: CI runs them on CPU), in three groups that each fit a call beside the build.
# Each test's name is logged as it runs and a hung test fails after 120 s (pytest-timeout, when
# installed), so that a step stopped at its limit still says where it was.
PYTEST=(env PCDEQ_TRITON_AUTOTUNE=0 "$PY" -m pytest -vv -rfEs --tb=short --maxfail=30
        -k "not compiles_for_sm80 and not sources_compile")
"$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST+=(--timeout=120)
REST_TESTS=$(ls tests/test_*.py | grep -v -e test_backend_cuda -e test_backend_triton -e test_triton_conv)
step tests-cuda 420 "${PYTEST[@]}" --junitxml="$OUT/tests-cuda.xml" tests/test_backend_cuda.py tests/test_backend_cuda_conv.py
step tests-triton 420 "${PYTEST[@]}" --junitxml="$OUT/tests-triton.xml" tests/test_backend_triton.py tests/test_triton_conv.py
step tests-rest 300 "${PYTEST[@]}" --junitxml="$OUT/tests-rest.xml" $REST_TESTS
step bench-float32 240 "$PY" -m pcdeq_kernels.bench --device cuda --dtype float32 --min-seconds 0.2 --no-progress --out "$OUT"
step bench-bfloat16 240 "$PY" -m pcdeq_kernels.bench --device cuda --dtype bfloat16 --min-seconds 0.2 --no-progress --out "$OUT"
# The dispatchers' loop choice, measured: each GPU backend with its loop forced, where the choice is
# close. The CUDA single launch holds a 16-row block's state in shared memory (up to d of about 1700
# in float32), so its forced loop is timed at d = 1024, where "auto" takes the stepwise loop.
step bench-loops 240 "$PY" -m pcdeq_kernels.bench --device cuda --dtype float32 --min-seconds 0.2 --no-progress --modes forward \
  --paths official,triton,triton-single,triton-stepwise,triton-split \
  --shapes 256x1024,256x4096,1024x4096,8192x1024,8192x4096 --out "$OUT/loops"
step bench-loops-cuda 180 "$PY" -m pcdeq_kernels.bench --device cuda --dtype float32 --min-seconds 0.2 --no-progress --modes forward \
  --paths official,cuda,cuda-single,cuda-stepwise --shapes 256x1024,1024x1024,8192x1024 --out "$OUT/loops-cuda"
step bench-conv 180 "$PY" -m pcdeq_kernels.bench --conv --device cuda --dtype float32 --min-seconds 0.2 --no-progress --out "$OUT"
# Not run by default: the kernels under compute-sanitizer (races, barrier use, memory errors), without
# autotuning (which would time every config under the sanitizer).
for tool in racecheck synccheck memcheck; do
  step "sanitize-$tool" 400 env PCDEQ_TRITON_AUTOTUNE=0 compute-sanitizer --tool "$tool" --error-exitcode 1 \
    "$PY" scripts/sanitize_kernels.py
done
echo "results in ${FINAL_OUT:-$OUT}${FINAL_OUT:+ (packed at exit)}"
exit $status
