#!/usr/bin/env bash
# Build the wheels a cluster admin installs, then prove each one works in a fresh virtual environment.
#
#   scripts/build_wheels.sh [OUT_DIR]          (default: dist/)
#   scripts/build_wheels.sh --help             (this text)
#
#   cpu   pcdeq_kernels-<v>+cpu.torch<T>-...whl     against torch 2.13.0 (CPU build), portable AVX2 kernels
#   cuda  pcdeq_kernels-<v>+cu<C>.torch<T>-...whl   against torch 2.14.1 (CUDA 13.0 build) with this
#                                                   machine's nvcc, for TORCH_CUDA_ARCH_LIST
#                                                   (default "8.0;9.0+PTX")
#
# The local version (+cpu.torch2.13, +cu130.torch2.14) names what the wheel was compiled against: a
# wheel of the regular (not stable) libtorch ABI loads only with that torch minor version.
# Each wheel is installed into a new venv beside its torch; the check imports it, asserts the
# pcdeq_C ops have kernels for the expected dispatch keys (CPU; CPU and CUDA), runs the installation
# self-check (python -m pcdeq_kernels: each usable backend against the reference), and for the CUDA
# wheel lists the GPU architectures inside (cuobjdump from triton's wheel) and fails on register
# spills reported by ptxas.
#
# With WHEEL_TESTS="cuda" (the default; "cpu cuda" or "" to choose), the whole test suite then runs
# against the installed wheel in that venv (on CPU, without a GPU).
#
# Environment: WHEEL_KINDS="cpu cuda" (default both), CUDA_HOME (default /usr/local/cuda-13.0),
# TORCH_CPU_SPEC (torch==2.13.0), TORCH_CUDA_SPEC (torch==2.14.1), MAX_JOBS, KEEP_WORK=1 (keep the
# venvs and logs), BUILD_VENV_cpu / BUILD_VENV_cuda (build in an existing venv instead of a new one;
# the check venvs are always new).
#
# Disk: a CUDA torch install is about 5.5 GB. Each venv this script made is deleted as soon as it has
# served (the build venv once its wheel is built, the check venv once checked), so at most one of them
# exists at a time; two side by side ran a CI machine out of space.
set -euo pipefail
if [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then  # this header, without the comment marks
  sed -n '2,/^set -euo pipefail/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
  exit 0
fi
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=$(realpath -m "${1:-dist}")
WORK=$(mktemp -d /tmp/pcdeq-wheels.XXXXXX)
[ "${KEEP_WORK:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT  # the venvs hold two torch installs (GBs)
mkdir -p "$OUT"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda-13.0}
export MAX_JOBS=${MAX_JOBS:-2}
export PIP_NO_CACHE_DIR=1  # the torch wheels are GBs; nothing here is installed twice from a cache
log() {  # a step's banner, with the time so far and the free disk (the venvs hold GBs)
  printf '\n== %s (%d s in; %s free on %s)\n' "$*" "$SECONDS" "$(df -h --output=avail "$WORK" | tail -n 1 | tr -d ' ')" "$WORK"
}
done_with() {  # done_with VENV: delete a venv this script made, unless KEEP_WORK=1
  [ "${KEEP_WORK:-0}" = 1 ] || rm -rf "$1"
}

# Build from a clean copy of the source: an editable install's build/ folder and in-place _C*.so must
# not leak into a wheel built against another torch. WHEEL_SOURCE=head (default) takes the last
# commit; WHEEL_SOURCE=worktree the working tree's tracked and new (not ignored) files.
SRC="$WORK/src"
mkdir -p "$SRC"
if [ "${WHEEL_SOURCE:-head}" = worktree ]; then
  git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$SRC"
else
  git archive HEAD | tar -x -C "$SRC"
fi

new_venv() {  # new_venv DIR TORCH_SPEC: a fresh venv with torch and the build tools
  python3 -m venv "$1"
  "$1/bin/pip" install -q "$2" numpy "setuptools>=64" wheel ninja
}

torch_tag() {  # torch2.13 from the venv's torch
  "$1/bin/python" -c "import torch; print('torch' + '.'.join(torch.__version__.split('+')[0].split('.')[:2]))"
}

build() {  # build KIND VENV: one wheel into $OUT, echoes its path
  local kind=$1 venv=$2 local_version
  if [ "$kind" = cpu ]; then
    local_version="cpu.$(torch_tag "$venv")"
    # AVX2 runs on every x86-64 cluster node of the last decade; the build machine may have AVX-512
    PCDEQ_CPU_CAPABILITY=avx2 PCDEQ_LOCAL_VERSION=$local_version \
      "$venv/bin/pip" wheel -q --no-build-isolation --no-deps -w "$WORK/$kind" "$SRC" >&2
  else
    local cuda
    cuda=$("$venv/bin/python" -c "import torch; print('cu' + torch.version.cuda.replace('.', ''))")
    local_version="$cuda.$(torch_tag "$venv")"
    PCDEQ_CPU_CAPABILITY=avx2 PCDEQ_FORCE_CUDA=1 PCDEQ_PTXAS_VERBOSE=1 \
      TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX} PCDEQ_LOCAL_VERSION=$local_version \
      "$venv/bin/pip" wheel -v --no-build-isolation --no-deps -w "$WORK/$kind" "$SRC" >"$WORK/cuda-build.log" 2>&1 \
      || { tail -n 60 "$WORK/cuda-build.log" >&2; return 1; }
    # ptxas -v prints "N bytes spill stores, M bytes spill loads" per kernel
    if grep -E "[1-9][0-9]* bytes spill (stores|loads)" "$WORK/cuda-build.log" >&2; then
      echo "register spills in the CUDA kernels (above); see $WORK/cuda-build.log" >&2
      return 1
    fi
  fi
  local wheel
  wheel=$(ls "$WORK/$kind"/pcdeq_kernels-*.whl)
  cp "$wheel" "$OUT/"
  echo "$OUT/$(basename "$wheel")"
}

check() {  # check KIND WHEEL: install into a fresh venv with its torch, import, inspect registrations
  local kind=$1 wheel=$2 spec=$3 venv="$WORK/check-$1"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "$spec" numpy
  "$venv/bin/pip" install -q --no-deps "$wheel"
  (cd "$WORK" && "$venv/bin/python" - "$kind" <<'EOF'
import sys
import torch
import pcdeq_kernels as pk
from pcdeq_kernels import _C

kind = sys.argv[1]
keys = ["CPU"] + (["CUDA"] if kind == "cuda" else [])
for op in ("pcdeq_C::forward_solve", "pcdeq_C::adjoint_solve"):
    for key in keys:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, key), f"{op} has no {key} kernel"
assert pk.available_backends()["cpu"], pk.backend_status()["cpu"].reason
# the metadata pins the torch minor version the wheel was compiled against (setup.py requirements)
import importlib.metadata
minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
assert f"torch=={minor}.*" in importlib.metadata.requires("pcdeq_kernels"), importlib.metadata.requires("pcdeq_kernels")
print(f"{kind} wheel: {_C.__file__}; torch {torch.__version__}; kernels for {keys}")
EOF
  )
  # the self-check a cluster admin runs on a node (python -m pcdeq_kernels): every usable backend
  # against the float64 reference, dense and conv (on CPU here; on a GPU node the GPU backends too)
  (cd "$WORK" && "$venv/bin/python" -m pcdeq_kernels)
  if [ "$kind" = cuda ]; then
    local so cuobjdump
    so=$(cd "$WORK" && "$venv/bin/python" -c "from pcdeq_kernels import _C; print(_C.__file__)")
    cuobjdump=$(ls "$ROOT"/.venv/lib/python3*/site-packages/triton/backends/nvidia/bin/cuobjdump 2>/dev/null | head -n 1)
    cuobjdump=${cuobjdump:-$CUDA_HOME/bin/cuobjdump}
    echo "GPU code in $(basename "$so"):"
    "$cuobjdump" --list-elf "$so" | sed -E 's/.*\.(sm_[0-9a-z]+)\..*/  cubin \1/' | sort -u
    "$cuobjdump" --list-ptx "$so" | sed -E 's/.*\.(sm_[0-9a-z]+)\..*/  ptx   \1/' | sort -u
  fi
  if [[ " ${WHEEL_TESTS-cuda} " == *" $kind "* ]]; then
    # The whole test suite against the installed wheel, with its torch and the Triton that torch pins
    # (torch 2.14.1: Triton 3.8, whose interpreter runs the Triton tests): the stack a cluster user of
    # the CUDA wheel has, which the main suite (torch 2.13, Triton 3.9) does not cover. The console
    # script, unlike `python -m pytest`, does not put the source tree on sys.path, so `import
    # pcdeq_kernels` finds the wheel; the tests still read csrc/ and examples/ from the source copy.
    log "$kind: the test suite against the installed wheel"
    "$venv/bin/pip" install -q "$spec" "pytest>=7" "pytest-benchmark>=4" "hypothesis>=6" scikit-learn tqdm matplotlib torchdeq
    # (what pytest puts on sys.path: the tests' folders; there the package resolves to the wheel)
    (cd "$SRC/tests" && "$venv/bin/python" -c "import pcdeq_kernels as p; assert p.__file__.startswith('$venv'), p.__file__")
    if (cd "$SRC" && "$venv/bin/pytest" -p no:cacheprovider -o addopts="--benchmark-disable") >"$WORK/tests-$kind.log" 2>&1; then
      tail -n 1 "$WORK/tests-$kind.log"
    else
      tail -n 80 "$WORK/tests-$kind.log" >&2
      return 1
    fi
  fi
}

for kind in ${WHEEL_KINDS:-cpu cuda}; do
  if [ "$kind" = cpu ]; then spec=${TORCH_CPU_SPEC:-torch==2.13.0}; else spec=${TORCH_CUDA_SPEC:-torch==2.14.1}; fi
  build_venv_var="BUILD_VENV_$kind"
  build_venv=${!build_venv_var:-}
  if [ -z "$build_venv" ]; then
    log "$kind: build venv with $spec"
    build_venv="$WORK/build-$kind"
    new_venv "$build_venv" "$spec"
  fi
  log "$kind: build the wheel in $build_venv"
  wheel=$(build "$kind" "$build_venv")
  echo "$wheel"
  [ "$build_venv" != "$WORK/build-$kind" ] || done_with "$build_venv"
  log "$kind: install into a fresh venv and check"
  check "$kind" "$wheel" "$spec"
  done_with "$WORK/check-$kind"
done
log "wheels in $OUT"
ls -l "$OUT"
