#!/usr/bin/env bash
# One node's router: the HTTP API, admission and placement. Workers on any host join it.
#   HOST=0.0.0.0 PORT=8000 CONTROL=tcp://0.0.0.0:5557 NUM_PREFILL=2 NUM_DECODE=2 \
#     scripts/launch_router.sh --api-key secret
# CLUSTER_KEY=FILE (from `adrenaline keygen`, the same on every node) authenticates the roles.
set -euo pipefail
exec "${ADRENALINE:-adrenaline}" router \
  --model "${MODEL:-smollm2}" \
  --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}" \
  --control "${CONTROL:-tcp://127.0.0.1:5557}" \
  --num-prefill "${NUM_PREFILL:-1}" --num-decode "${NUM_DECODE:-1}" \
  ${CLUSTER_KEY:+--cluster-key "$CLUSTER_KEY"} \
  "$@"
