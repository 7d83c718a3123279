#!/usr/bin/env bash
# One command for a lent H100/H200 (jax 0.11.x with the CUDA plugin, Python 3.12):
#   bash scripts/device_check.sh            # from the repo root; results in $OUT (or ./device_results)
# 1. the decode kernels compiled by Triton on the GPU against the XLA oracle (tests/test_kernels.py),
# 2. python -m kvjax.bench.attention at 4K-128K (Pallas vs XLA, every dtype, GB/s vs a device copy).
# Fits the device budget: each step has its own timeout (about 8 minutes together).
set -uo pipefail
OUT=${OUT:-device_results}
mkdir -p "$OUT"
R="$OUT/device_check.txt"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset JAX_PLATFORMS
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
} 2>&1 | tee "$R"
missing=$(python - <<'PY'
import importlib.util
print(" ".join(m for m in ("flax", "pytest", "numpy") if importlib.util.find_spec(m) is None))
PY
)
[ -n "$missing" ] && echo "missing packages: $missing (install or carry wheels; see the device README)" | tee -a "$R"

echo "## kernels compiled on the GPU vs the XLA oracle" | tee -a "$R"
timeout 240 python -m pytest -q -p no:cacheprovider tests/test_kernels.py \
  -k "triton_kernel_matches_xla_on_gpu or one_split" 2>&1 | tail -25 | tee -a "$R"

echo "## python -m kvjax.bench.attention" | tee -a "$R"
timeout 300 python -m kvjax.bench.attention --contexts 4096,32768,131072 --batches 1,8 \
  --iters 10 2>&1 | grep -v "^WARNING" | tee -a "$R"
echo "done $(date -u)" | tee -a "$R"
