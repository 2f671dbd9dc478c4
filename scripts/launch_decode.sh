#!/usr/bin/env bash
# One decode worker on this node. KV_TRANSFER picks the data plane prefill workers copy KV over:
# cuda_ipc (same host, GPU), nccl (across hosts, GPU), shm (same host, CPU), gloo (across, CPU).
# KV_HOST is the address prefill workers reach this node at (for gloo/nccl).
#   ROUTER=tcp://10.0.0.1:5557 GPU=1 KV_TRANSFER=nccl KV_HOST=10.0.0.2 scripts/launch_decode.sh
# CLUSTER_KEY=FILE (from `adrenaline keygen`, the same on every node) authenticates the roles.
set -euo pipefail
DEVICE="${DEVICE:-cuda}"
if [[ "$DEVICE" == cuda ]]; then export CUDA_VISIBLE_DEVICES="${GPU:-0}"; fi
exec "${ADRENALINE:-adrenaline}" decode \
  --model "${MODEL:-smollm2}" --device "$DEVICE" \
  --router "${ROUTER:-tcp://127.0.0.1:5557}" \
  --instance "${INSTANCE:-decode-$(hostname)-${GPU:-cpu}}" \
  --kv-transfer "${KV_TRANSFER:-auto}" --kv-host "${KV_HOST:-127.0.0.1}" \
  ${CLUSTER_KEY:+--cluster-key "$CLUSTER_KEY"} \
  "$@"
