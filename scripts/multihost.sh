#!/usr/bin/env bash
# Multi-host kvjax: one process per host, all joined by JAX's multi-controller runtime
# (jax.distributed) into one global device mesh. Run this same script on every host:
#
#   host 0:  COORDINATOR=10.0.0.1:8476 NUM_HOSTS=2 HOST_ID=0 scripts/multihost.sh \
#              --config llama70b_turbo --weights /ckpt/llama70b-orbax --prompt "Hello" \
#              --tensor-parallel 8 --data-parallel 2
#   host 1:  COORDINATOR=10.0.0.1:8476 NUM_HOSTS=2 HOST_ID=1 scripts/multihost.sh <same args>
#
# COORDINATOR is host 0's address and a free port, reachable from every host. Every host passes
# the same arguments: all processes feed identical inputs, and only process 0 prints. The mesh
# is (data, tensor) with tensor the minor axis, so keep --tensor-parallel <= GPUs per host (the
# heads' all-reduces then stay on NVLink) and put --data-parallel across hosts; data x tensor
# must equal the total device count (a 1 x 1 config mesh spreads tensor over every device).
# A kvjax orbax checkpoint (python -m kvjax.convert) is restored straight into its shardings,
# each host reading only its own shards; GGUF and HF weights are read whole on every host.
#
# On SLURM / Open MPI / TPU pods, KVJAX_DISTRIBUTED=auto lets jax find the cluster instead:
#   srun --ntasks-per-node=1 env KVJAX_DISTRIBUTED=auto python -m kvjax.generate <args>
#
# To try the same on one machine with fake CPU devices:
#   python -m kvjax.launch --num-processes 2 --cpu-devices-per-process 4 -- <args>
set -euo pipefail

: "${COORDINATOR:?set COORDINATOR=host0-address:port}"
: "${NUM_HOSTS:?set NUM_HOSTS to the number of hosts}"
: "${HOST_ID:?set HOST_ID (0 on the coordinator host)}"
MODULE="${MODULE:-kvjax.generate}"  # or another kvjax program that calls kvjax.launch.initialize
PYTHON="${PYTHON:-python}"

cd "$(dirname "$0")/.."
export KVJAX_COORDINATOR_ADDRESS="$COORDINATOR"
export KVJAX_NUM_PROCESSES="$NUM_HOSTS"
export KVJAX_PROCESS_ID="$HOST_ID"
exec "$PYTHON" -m "$MODULE" "$@"
