#!/usr/bin/env bash
# One OpenAI endpoint over several hosts: every host runs this script with the same arguments;
# process 0 (HOST_ID=0) binds the HTTP port and schedules, every other process runs the same
# jitted step on its shards with the inputs process 0 sends each step (kvjax.engine follow mode).
# The environment variables are scripts/multihost.sh's:
#
#   host 0:  COORDINATOR=10.0.0.1:8476 NUM_HOSTS=2 HOST_ID=0 scripts/serve_multihost.sh \
#              --config llama70b_turbo --weights /ckpt/llama70b-orbax \
#              --tensor-parallel 8 --data-parallel 2 --host 0.0.0.0 --port 8000
#   host 1:  COORDINATOR=10.0.0.1:8476 NUM_HOSTS=2 HOST_ID=1 scripts/serve_multihost.sh <same args>
#
# Clients talk to host 0 only (http://host0:8000/v1). /health answers 503 until every process
# has loaded and compiled; stopping process 0 releases the others.
#
# On one machine with fake CPU devices:
#   python -m kvjax.launch --num-processes 2 --cpu-devices-per-process 4 --module kvjax.serve \
#     -- --config tiny_llama --random-weights --tensor-parallel 4 --data-parallel 2 --port 8000
set -euo pipefail

: "${COORDINATOR:?set COORDINATOR=host0-address:port}"
: "${NUM_HOSTS:?set NUM_HOSTS to the number of hosts}"
: "${HOST_ID:?set HOST_ID (0 on the coordinator host)}"
PYTHON="${PYTHON:-python}"

cd "$(dirname "$0")/.."
export KVJAX_COORDINATOR_ADDRESS="$COORDINATOR"
export KVJAX_NUM_PROCESSES="$NUM_HOSTS"
export KVJAX_PROCESS_ID="$HOST_ID"
exec "$PYTHON" -m kvjax.serve "$@"
