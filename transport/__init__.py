"""How bytes and messages move between processes: control plane and KV data plane."""
