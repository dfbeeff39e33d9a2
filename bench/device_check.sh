#!/usr/bin/env bash
# One-call GPU verification of sqz_kernels: build, CUDA tests, CUDA benchmarks, compact table last.
#
#   bash bench/device_check.sh          # results in $OUT if set, else bench/results/
#
# Needs: a CUDA GPU, torch with CUDA, nvcc, ninja, pytest (no internet, nothing is installed from
# a registry). Sized to finish in < 8 minutes: every step has a timeout, the benchmarks a budget.
# A test failure does not stop the benchmarks; it is recorded and reflected in the exit status.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
RES="${OUT:-bench/results}"
mkdir -p "$RES"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-16}"
export PYTHONUNBUFFERED=1
export SQZ_CUDA="${SQZ_CUDA:-1}"   # fail the build loudly if CUDA cannot be built
PY="${PYTHON:-python3}"
T0=$(date +%s)
TOTAL_S="${DEVICE_CHECK_SECONDS:-450}"   # the whole script, leaving margin under 8 minutes
elapsed() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( TOTAL_S - $(elapsed) )); }

echo "== device_check: $(date -u +%FT%TZ) results -> $RES"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
  "$PY" -c "import torch,sys;print('python',sys.version.split()[0],'torch',torch.__version__,'cuda',torch.version.cuda,'cudnn',torch.backends.cudnn.version(),'gpu',torch.cuda.is_available() and torch.cuda.get_device_name())"
  command -v nvcc >/dev/null && nvcc --version | tail -2 || echo "nvcc: not on PATH"
} 2>&1 | tee "$RES/env.txt"

# ---- 1. build ------------------------------------------------------------------------------
echo "== build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS)"
build_ok=0
if timeout 330 "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e . >"$RES/build.log" 2>&1; then
  build_ok=1
else
  echo "pip install -e . failed (see build.log); trying setup.py build_ext --inplace"
  if timeout 300 "$PY" setup.py build_ext --inplace >>"$RES/build.log" 2>&1; then build_ok=1; fi
fi
grep -E "ptxas info|ptxas warning|spill|Used [0-9]+ registers|error" "$RES/build.log" >"$RES/ptxas.txt" 2>/dev/null || true
if [ "$build_ok" != 1 ]; then
  echo "BUILD FAILED after $(elapsed) s; last lines of $RES/build.log:"
  tail -40 "$RES/build.log"
  exit 1
fi
echo "build ok ($(elapsed) s)"
"$PY" - <<'EOF' 2>&1 | tee -a "$RES/env.txt"
import torch, sqz_kernels
ok = torch._C._dispatch_has_kernel_for_dispatch_key("sqz_kernels::fused_fire", "CUDA")
print("sqz_kernels from", sqz_kernels.__file__, "| CUDA kernel registered:", ok)
raise SystemExit(0 if ok else 3)
EOF

# ---- 2. CUDA tests ---------------------------------------------------------------------------
echo "== CUDA tests"
set +e
timeout 170 "$PY" -m pytest -m cuda tests/ -q -p no:cacheprovider \
  --junitxml="$RES/tests_cuda.xml" >"$RES/tests_cuda.log" 2>&1
test_rc=$?
set -e
tail -25 "$RES/tests_cuda.log"
echo "tests exit status: $test_rc ($(elapsed) s)"

# ---- 3. CUDA benchmarks -------------------------------------------------------------------
budget=$(( $(left) - 40 ))
if [ "$budget" -lt 30 ]; then budget=30; fi
echo "== CUDA benchmarks (budget ${budget} s)"
set +e
timeout $(( budget + 60 )) "$PY" bench/bench_fire_cuda.py --out "$RES" --budget "$budget" \
  >"$RES/bench_cuda.log" 2>&1
bench_rc=$?
set -e

# ---- 4. summary: the compact table last -------------------------------------------------------
echo "== summary ($(elapsed) s): build ok, tests rc=$test_rc, bench rc=$bench_rc"
grep -E "passed|failed|error" "$RES/tests_cuda.log" | tail -3 || true
grep -E "Used [0-9]+ registers|spill" "$RES/ptxas.txt" | sort | uniq -c | head -8 || true
# the benchmark prints its table last: show it from the 'wrote' line on
sed -n '/^wrote /,$p' "$RES/bench_cuda.log" || true
if [ "$bench_rc" != 0 ]; then tail -20 "$RES/bench_cuda.log"; fi
[ "$test_rc" = 0 ] && [ "$bench_rc" = 0 ]
