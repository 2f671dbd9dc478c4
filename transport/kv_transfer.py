"""The KV data plane: copies a request's KV blocks from a prefill worker's pool into blocks a decode
worker reserved, across processes. The decode side hosts its pool (`KVPoolHost`) and publishes an
endpoint; the prefill side (`KVSender`) reaches it through that endpoint. Control messages
(ReserveDecode, SendKV, KVSent) travel separately, see transport.messages.

A pool is one tensor [num_layers, 2 (k, v), num_blocks, block_size, num_kv_heads, head_dim];
a block id indexes dim 2. An endpoint is a flat dict[str, str | int] so it fits the msgpack
control messages as is: shapes, dtypes and handles travel as strings.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

import torch

from transport.kv_transfer_base import (
    BlockSender,
    Endpoint,
    KVPoolHost,
    KVTransferError,
    dtype_from_str,
    shape_from_str,
)

if TYPE_CHECKING:
    from transport.security import ClusterKey

logger = logging.getLogger(__name__)

KINDS = ("shm", "cuda_ipc", "gloo", "nccl", "auto")


def create_pool_host(
    kind: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    instance: str,
    host: str = "127.0.0.1",
    cluster_key: ClusterKey | None = None,
    peer_gpu_uuids: list[str] | None = None,
) -> KVPoolHost:
    """Allocates a decode worker's KV pool where the chosen transport can reach it; with a
    cluster key, gloo/nccl peers must prove it (shm and CUDA IPC never leave the host). On a
    GPU, auto is CUDA IPC unless one of peer_gpu_uuids (its prefill workers' GPUs, where
    known) cannot map this GPU's memory: then NCCL (transport.link_choice)."""
    device = torch.device(device)
    if kind == "auto" and device.type == "cuda":
        from transport.cuda_ipc_transfer import gpu_link_kind

        choice = gpu_link_kind(kind, device, list(peer_gpu_uuids or []))
        logger.info("[decode %s] %s KV transfer: %s", instance, choice.kind, choice.reason)
        kind = choice.kind
    elif kind == "auto":
        kind = "shm"
    if kind in ("shm", "gloo") and device.type != "cpu":
        raise KVTransferError(f"KV transport {kind!r} needs a CPU pool, not {device}")
    if kind in ("cuda_ipc", "nccl") and device.type != "cuda":
        raise KVTransferError(f"KV transport {kind!r} needs a CUDA pool, not {device}")
    if kind == "shm":
        from transport.shm_transfer import ShmPoolHost

        return ShmPoolHost(shape, dtype, instance)
    if kind in ("gloo", "nccl"):
        from transport.gloo_transfer import P2PPoolHost

        return P2PPoolHost(kind, shape, dtype, device, instance, host, cluster_key=cluster_key)
    if kind == "cuda_ipc":
        from transport.cuda_ipc_transfer import CudaIpcPoolHost

        return CudaIpcPoolHost(shape, dtype, device, instance)
    raise KVTransferError(f"unknown KV transport {kind!r}; choose one of {', '.join(KINDS)}")


def _make_sender(
    kind: str, pool: torch.Tensor, instance: str, cluster_key: ClusterKey | None
) -> BlockSender:
    if kind == "shm":
        from transport.shm_transfer import ShmSender

        return ShmSender(pool, instance)
    if kind in ("gloo", "nccl"):
        from transport.gloo_transfer import P2PSender

        return P2PSender(pool, instance, cluster_key)
    if kind == "cuda_ipc":
        from transport.cuda_ipc_transfer import CudaIpcSender

        return CudaIpcSender(pool, instance)
    raise KVTransferError(f"unknown KV endpoint kind {kind!r}")


class KVSender:
    """Prefill side: copies blocks of its pool into peers' pools, keeping one link per peer."""

    def __init__(
        self, pool: torch.Tensor, instance: str, cluster_key: ClusterKey | None = None
    ) -> None:
        self.pool = pool
        self.instance = instance
        self.cluster_key = cluster_key
        self._lock = threading.Lock()
        self._by_kind: dict[str, BlockSender] = {}

    def _sender(self, kind: str) -> BlockSender:
        with self._lock:
            sender = self._by_kind.get(kind)
            if sender is None:
                sender = _make_sender(kind, self.pool, self.instance, self.cluster_key)
                self._by_kind[kind] = sender
            return sender

    def send(
        self,
        transfer_id: int,
        endpoint: Endpoint,
        src_block_ids: list[int],
        dst_block_ids: list[int],
        timeout_s: float = 10.0,
    ) -> None:
        """Blocks until the listed blocks (all layers, k and v) are in the peer's pool."""
        sender = self._sender(str(endpoint.get("kind")))
        sender.send(transfer_id, endpoint, list(src_block_ids), list(dst_block_ids), timeout_s)

    def close(self) -> None:
        with self._lock:
            senders, self._by_kind = list(self._by_kind.values()), {}
        for sender in senders:
            sender.close()


_MAPPED_SEGMENTS: list = []  # peers' pools mapped for the life of this process


def open_peer_pool(endpoint: Endpoint, device: torch.device | str = "cpu") -> torch.Tensor:
    """Maps another process's whole KV pool (shm or CUDA IPC) into this one, for an attention
    executor working directly on its prefill worker's pool."""
    shape = shape_from_str(str(endpoint["shape"]))
    dtype = dtype_from_str(str(endpoint["dtype"]))
    kind = endpoint.get("kind")
    if kind == "shm":
        from transport.shm_transfer import _open_untracked, _view

        segment = _open_untracked(str(endpoint["name"]))
        # The tensor views the mapping: the segment object must outlive it, or it unmaps.
        _MAPPED_SEGMENTS.append(segment)
        return _view(segment, shape, dtype)
    if kind == "cuda_ipc":
        from transport.cuda_ipc_transfer import import_pool

        with torch.cuda.device(torch.device(device)):
            return import_pool(endpoint, shape, dtype)
    raise KVTransferError(f"a pool of kind {kind!r} cannot be mapped from another process")
