"""Which transport a GPU link takes (KV transfer, per-layer attention link): CUDA IPC where the
two GPUs share memory, NCCL where they do not. A pure decision over plain strings and one
peer-access answer, so it is tested on CPU; the CUDA queries that feed it are
transport.cuda_ipc_transfer.peer_reachable's.

GPUs are named by UUID (a device index is local to a process). CUDA IPC needs the importing
process to see the exporter's GPU and, for two different GPUs, peer access between them; with
per-process CUDA_VISIBLE_DEVICES (as `adrenaline serve` launches its roles) a peer's GPU is not
even visible, and only NCCL (or gloo) can move the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LinkChoice:
    kind: str  # "cuda_ipc", "nccl", "shm", or the requested kind unchanged
    reason: str  # why, for the log line


def choose_link(requested: str, local_uuid: str, peer_uuid: str, peer_access: bool) -> LinkChoice:
    """requested: "auto" or a kind, kept as it is (an explicit cuda_ipc without peer access
    then fails with transport.cuda_ipc_transfer.PeerAccessError, saying so); local_uuid,
    peer_uuid: the two GPUs ("" on CPU, or when the peer did not say); peer_access: whether this
    process sees the peer's GPU and reaches it by peer access."""
    if requested != "auto":
        return LinkChoice(requested, f"{requested} requested")
    if not local_uuid:
        return LinkChoice("shm", "no GPU on this side")
    if not peer_uuid:
        return LinkChoice("cuda_ipc", "the peer did not name its GPU; assuming it can map ours")
    if peer_uuid == local_uuid:
        return LinkChoice("cuda_ipc", f"both sides on GPU {local_uuid}")
    if peer_access:
        return LinkChoice("cuda_ipc", f"GPU {local_uuid} has peer access to GPU {peer_uuid}")
    return LinkChoice("nccl", f"GPU {local_uuid} cannot map GPU {peer_uuid} (not visible to "
                      "this process, or no peer access)")  # fmt: skip
