#!/usr/bin/env bash
# One command for a lent H100/H200 (the device image: Python 3.12 as python3, jax 0.11.2 with the
# CUDA 13 plugin, flax, pytest; no network, so nothing is installed):
#   bash scripts/device_check.sh        # from the repo root; results in $OUT/device_check.txt
#                                       # ($OUT unset: ./device_results)
# 1. the decode kernels compiled by Triton on the GPU against the XLA oracle (tests/test_kernels.py),
# 2. the ragged prefill+decode kernel against the XLA oracle (tests/test_ragged.py, when present),
# 3. python -m kvjax.bench.attention at 4K, 32K and 128K (Pallas vs XLA, every dtype, GB/s vs a
#    device copy).
# Each step has its own timeout and they sum to 540 s, inside one 10-minute device command; a step
# that times out leaves what it printed in the results file. Dry run on a CPU: DEVICE_CHECK_DRY=1
# (tiny bench, JAX on the CPU; the GPU-only tests skip).
set -uo pipefail
OUT=${OUT:-device_results}
mkdir -p "$OUT"
R="$OUT/device_check.txt"
: > "$R"
PY=${PYTHON:-python3}  # the image has no `python`
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "${DEVICE_CHECK_DRY:-0}" = 1 ]; then
  export JAX_PLATFORMS=cpu
  BENCH=(--small --dtypes bf16,int8,turbo3.5)
else
  # tests/conftest.py defaults JAX_PLATFORMS to cpu: name the GPU, or every GPU test skips.
  export JAX_PLATFORMS=cuda,cpu
  BENCH=(--contexts 4096,32768,131072 --batches 1,8 --iters 10
         --dtypes bf16,fp8,int8,int4,kivi4,kivi2,turbo4,turbo3.5,turbo2.5)
fi
log() { echo "$*" | tee -a "$R"; }
step() {  # step SECONDS TITLE CMD...: run with a timeout, output into the results file
  local secs=$1 title=$2; shift 2
  log "## $title ($(date -u +%T), timeout ${secs}s)"
  timeout "$secs" "$@" 2>&1 | grep -v -e "^WARNING" -e "^I0000" | tee -a "$R"
  local rc=${PIPESTATUS[0]}
  log "rc=$rc$([ "$rc" = 124 ] && echo ' (timed out)')"
}

step 30 "machine" bash -c "date -u; nvidia-smi --query-gpu=name,memory.total,driver_version \
--format=csv,noheader 2>/dev/null || echo 'no nvidia-smi'; $PY -c \"import sys, jax, jaxlib, flax; \
print('python', sys.version.split()[0], 'jax', jax.__version__, 'jaxlib', jaxlib.__version__, \
'flax', flax.__version__, 'backend', jax.default_backend(), jax.devices())\""

step 120 "decode kernels compiled on the GPU vs the XLA oracle (tests/test_kernels.py)" \
  "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py \
  -k "triton_kernel_matches_xla_on_gpu or one_split" -rs

if [ -f tests/test_ragged.py ]; then
  # its GPU-compiled tests when it has some (names with gpu/triton), else the whole file
  sel=(-k "gpu or triton")
  "$PY" -m pytest -q -p no:cacheprovider --collect-only tests/test_ragged.py "${sel[@]}" \
    > /dev/null 2>&1 || sel=()
  step 120 "ragged prefill+decode kernel vs the XLA oracle (tests/test_ragged.py ${sel[*]})" \
    "$PY" -m pytest -q -p no:cacheprovider tests/test_ragged.py "${sel[@]}" -rs
else
  log "## tests/test_ragged.py: absent, skipped"
fi

step 210 "python -m kvjax.bench.attention ${BENCH[*]}" \
  "$PY" -m kvjax.bench.attention "${BENCH[@]}"
if [ "${DEVICE_CHECK_DRY:-0}" != 1 ]; then
  step 60 "bench.attention, the old split count (k_splits 8) beside the auto default above" \
    "$PY" -m kvjax.bench.attention --contexts 32768,131072 --batches 1 --iters 10 \
    --dtypes bf16,turbo3.5 --k-splits 8
fi
log "done $(date -u +%T)"
