#!/usr/bin/env bash
# Create .venv and install torch and pcdeq_kernels (editable, built from this checkout) into it,
# saying what each step does and how long it took.
#
#   TORCH_SPEC  the torch to install, as pip arguments (default: torch==2.13.0 from your pip index;
#               on PyPI that is the CUDA build for Linux, about 5 GB: for the CPU-only build use
#               TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu").
#               skip: keep the torch already in .venv.
#   EXTRAS      the package's extras (default: test,demo,triton,bench, what the tests need: the
#               Triton tests run its interpreter on CPU, the benchmark tests draw plots and time
#               torchdeq). EXTRAS=demo for the demo alone (no Triton, about 1 GB less).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-test,demo,triton,bench}
STEP_START=$SECONDS
step() { printf '\n[setup] %s\n' "$*"; STEP_START=$SECONDS; }
took() { printf '[setup]   done in %d s\n' "$((SECONDS - STEP_START))"; }

step "1/4 .venv: a virtual environment with $(python3 --version)"
python3 -m venv .venv
. .venv/bin/activate
pip install -q "setuptools>=64" wheel ninja
took

if [ "$TORCH_SPEC" = skip ]; then
  step "2/4 torch: keeping $(python -c 'import torch; print(torch.__version__)')"
else
  step "2/4 torch: pip install $TORCH_SPEC (1-3 min; a CUDA build is about 5 GB)"
  # (word splitting on purpose: TORCH_SPEC may carry pip options such as --index-url)
  # shellcheck disable=SC2086
  pip install -q $TORCH_SPEC
fi
python -c "import torch; print('[setup]   torch', torch.__version__, '(CUDA ' + torch.version.cuda + ' build)' if torch.version.cuda else '(CPU-only build)')"
took

step "3/4 pcdeq_kernels: build the C++ kernels and install with extras [$EXTRAS] (1-2 min on 2 cores)"
# pip -v shows the build's own messages; only those (what is built, for which SIMD level and GPU
# architectures, and why something is skipped) and the compiler's progress are printed. The whole
# log is kept for when the build fails.
LOG=.venv/setup-build.log
if ! pip install -v --no-build-isolation -e ".[$EXTRAS]" >"$LOG" 2>&1; then
  tail -n 40 "$LOG"
  echo "[setup] the build failed; the whole log is $LOG" >&2
  exit 1
fi
grep -E '^\s*(pcdeq_kernels:|\[[0-9]+/[0-9]+\] )' "$LOG" \
  | sed -E 's#^\s*##; s#^(\[[0-9]+/[0-9]+\]) .* -c \S*/(csrc/\S+) .*#\1 compiled \2#; s#^(\[[0-9]+/[0-9]+\]) [^ ]* .* -o \S*/(\S+\.so)$#\1 linked \2#' \
  | awk '!seen[$0]++' | sed 's/^/[setup]   /' || true  # (setup.py runs twice under pip: metadata, then build)
took

step "4/4 check: which backends run here (python -m pcdeq_kernels checks each against the reference)"
python -c "
import pcdeq_kernels as pk
for name, status in pk.backend_status().items():
    print('[setup]  ', name, status)
"
took
