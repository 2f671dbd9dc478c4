"""The processes a deployment runs: per-role entry points, the prefill/decode worker loop and its offload client."""
