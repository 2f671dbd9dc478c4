#!/usr/bin/env bash
# One prefill worker on this node, on GPU $GPU (or the CPU with DEVICE=cpu), joining the router.
#   ROUTER=tcp://10.0.0.1:5557 GPU=0 MODEL=/models/llama-3-8b scripts/launch_prefill.sh
# Its pool also holds its attention executor's share (--offload-blocks, or a memory fraction).
# CLUSTER_KEY=FILE (from `adrenaline keygen`, the same on every node) authenticates the roles.
set -euo pipefail
DEVICE="${DEVICE:-cuda}"
if [[ "$DEVICE" == cuda ]]; then export CUDA_VISIBLE_DEVICES="${GPU:-0}"; fi
exec "${ADRENALINE:-adrenaline}" prefill \
  --model "${MODEL:-smollm2}" --device "$DEVICE" \
  --router "${ROUTER:-tcp://127.0.0.1:5557}" \
  --instance "${INSTANCE:-prefill-$(hostname)-${GPU:-cpu}}" \
  ${CLUSTER_KEY:+--cluster-key "$CLUSTER_KEY"} \
  "$@"
