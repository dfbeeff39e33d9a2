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
  "$PY" -c "import torch,sys;print('python',sys.version.split()[0],'torch',torch.__version__,'cuda',torch.version.cuda,'cudnn',torch.backends.cudnn.version(),'gpu',torch.cuda.is_available() and torch.cuda.get_device_name())" || true
  command -v nvcc >/dev/null && nvcc --version | tail -2 || echo "nvcc: not on PATH"
} 2>&1 | tee "$RES/env.txt"

# ---- 1. build ------------------------------------------------------------------------------
# pip -e builds the extension in place (sqz_kernels/_C*.so) before it installs anything, so even
# where the interpreter's site-packages is read-only the in-place .so is usable via PYTHONPATH.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
importable() {
  "$PY" - <<'EOF' 2>&1 | tee -a "$RES/env.txt"
import torch, sqz_kernels
ok = torch._C._dispatch_has_kernel_for_dispatch_key("sqz_kernels::fused_fire", "CUDA")
print("sqz_kernels from", sqz_kernels.__file__, "| CUDA kernel registered:", ok)
raise SystemExit(0 if ok else 3)
EOF
}
# cap MAX RESERVE: a timeout of at most MAX s that leaves RESERVE s of the total (>= 30 s)
cap() { local t=$(( $(left) - $2 )); [ "$t" -gt "$1" ] && t=$1; [ "$t" -lt 30 ] && t=30; echo "$t"; }
echo "== build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS)"
build_ok=0
build_how="pip -e"
if ! timeout -k 10 "$(cap 300 150)" "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e . \
    >"$RES/build.log" 2>&1; then
  echo "pip install -e . failed (see build.log)"
  build_how="in-place .so (pip -e failed)"
fi
if importable; then
  build_ok=1
else
  echo "not importable after pip; trying setup.py build_ext --inplace"
  build_how="build_ext --inplace"
  if timeout -k 10 "$(cap 300 120)" "$PY" setup.py build_ext --inplace >>"$RES/build.log" 2>&1 && importable; then
    build_ok=1
  fi
fi
grep -E "ptxas info|ptxas warning|spill|Used [0-9]+ registers|error" "$RES/build.log" >"$RES/ptxas.txt" 2>/dev/null || true
if [ "$build_ok" != 1 ]; then
  echo "BUILD FAILED after $(elapsed) s; last lines of $RES/build.log:"
  tail -40 "$RES/build.log"
  exit 1
fi
echo "build ok via $build_how ($(elapsed) s)"

# ---- 2. CUDA tests ---------------------------------------------------------------------------
# Only the CUDA test module (collecting every module would import optional dependencies).
echo "== CUDA tests"
set +e
timeout -k 10 "$(cap 240 90)" "$PY" -m pytest tests/test_fire_cuda.py -m cuda -q -p no:cacheprovider \
  -rfE --durations=8 --junitxml="$RES/tests_cuda.xml" >"$RES/tests_cuda.log" 2>&1
test_rc=$?
set -e
if [ "$test_rc" = 124 ] || [ "$test_rc" = 137 ]; then echo "tests TIMED OUT (rc=$test_rc)"; fi
tail -25 "$RES/tests_cuda.log"
echo "tests exit status: $test_rc ($(elapsed) s)"

# ---- 2b. optional: compute-sanitizer on small calls of each dtype (DEVICE_CHECK_SANITIZE=1) ----
san_rc=-
if [ "${DEVICE_CHECK_SANITIZE:-0}" = 1 ] && command -v compute-sanitizer >/dev/null; then
  san_rc=0
  for tool in memcheck racecheck synccheck; do
    set +e
    timeout -k 10 "$(cap 60 60)" compute-sanitizer --tool "$tool" --error-exitcode 9 "$PY" -c "
import torch, sqz_kernels as sk
for dt in (torch.float32, torch.float16, torch.bfloat16):
    for (n, c, h, w, s, e1, e3) in ((1, 17, 9, 19, 16, 33, 31), (1, 7, 5, 3, 70, 9, 40)):
        p = [torch.randn(*sh, device='cuda', dtype=dt) for sh in ((s, c, 1, 1), (s,), (e1, s, 1, 1), (e1,), (e3, s, 3, 3), (e3,))]
        sk.ops.fused_fire(torch.randn(n, c, h, w, device='cuda', dtype=dt), *p)
torch.cuda.synchronize()
" >"$RES/sanitize_$tool.log" 2>&1
    rc=$?
    set -e
    [ "$rc" != 0 ] && san_rc=$rc
    echo "compute-sanitizer $tool: rc=$rc $(tail -1 "$RES/sanitize_$tool.log")"
  done
fi

# ---- 3. CUDA benchmarks -------------------------------------------------------------------
budget=$(( $(left) - 45 ))
if [ "$budget" -lt 30 ]; then budget=30; fi
echo "== CUDA benchmarks (budget ${budget} s)"
set +e
timeout -k 10 $(( budget + 30 )) "$PY" bench/bench_fire_cuda.py --out "$RES" --budget "$budget" \
  >"$RES/bench_cuda.log" 2>&1
bench_rc=$?
set -e

# ---- 4. summary: the compact table last -------------------------------------------------------
echo "== summary ($(elapsed) s): build ok via $build_how, tests rc=$test_rc, sanitizer rc=$san_rc, bench rc=$bench_rc"
grep -E "Used [0-9]+ registers|spill" "$RES/ptxas.txt" | sort | uniq -c | head -8 || true
grep -E "^(FAILED|ERROR) " "$RES/tests_cuda.log" | cut -c1-220 | head -15 || true
grep -E "[0-9]+ (passed|failed|skipped|error)" "$RES/tests_cuda.log" | tail -1 || true
if [ "$bench_rc" != 0 ]; then tail -20 "$RES/bench_cuda.log" || true; fi
# the benchmark prints its table last: show it from the 'wrote' line on
sed -n '/^wrote /,$p' "$RES/bench_cuda.log" || true
[ "$test_rc" = 0 ] && [ "$bench_rc" = 0 ] && { [ "$san_rc" = 0 ] || [ "$san_rc" = - ]; }
