#!/usr/bin/env bash
# The attention executor beside a prefill worker: same node, same GPU ($GPU). It holds offloaded
# requests' KV in its own pool and runs their decode attention with a limited SM share.
#   ROUTER=tcp://10.0.0.1:5557 GPU=0 COLOCATED_WITH=prefill-nodeB-0 SM_SHARE=0.2 scripts/launch_attention.sh
# CLUSTER_KEY=FILE (from `adrenaline keygen`, the same on every node) authenticates the roles.
set -euo pipefail
DEVICE="${DEVICE:-cuda}"
if [[ "$DEVICE" == cuda ]]; then export CUDA_VISIBLE_DEVICES="${GPU:-0}"; fi
exec "${ADRENALINE:-adrenaline}" attention \
  --model "${MODEL:-smollm2}" --device "$DEVICE" \
  --router "${ROUTER:-tcp://127.0.0.1:5557}" \
  --instance "${INSTANCE:-attention-$(hostname)-${GPU:-cpu}}" \
  --colocated-with "${COLOCATED_WITH:?name the prefill worker this executor sits beside}" \
  --bind-host "${BIND_HOST:-127.0.0.1}" --sm-share "${SM_SHARE:-1.0}" \
  ${CLUSTER_KEY:+--cluster-key "$CLUSTER_KEY"} \
  "$@"
