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
from concurrent.futures import Future
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from transport.security import ClusterKey

logger = logging.getLogger(__name__)

Endpoint = dict[str, str | int]

KINDS = ("shm", "cuda_ipc", "gloo", "nccl", "auto")


class KVTransferError(RuntimeError):
    """A KV transfer failed, timed out or was cancelled; the blocks it targeted hold no valid KV."""


class KVPoolHost(Protocol):
    """Decode side: owns the pool that receives."""

    pool: torch.Tensor  # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
    endpoint: Endpoint

    def expect(self, transfer_id: int, src_instance: str, block_ids: list[int]) -> Future[None]:
        """Called once block_ids are reserved; the future completes when the KV is in them."""
        ...

    def mark_sent(self, transfer_id: int) -> None:
        """The sender reported KVSent on the control plane."""
        ...

    def cancel(self, transfer_id: int) -> None:
        """The reservation was dropped: stop waiting and fail the future."""
        ...

    def close(self) -> None: ...


class BlockSender(Protocol):
    """One transport's sending side; KVSender picks it by the endpoint's kind."""

    def send(
        self,
        transfer_id: int,
        endpoint: Endpoint,
        src_block_ids: list[int],
        dst_block_ids: list[int],
        timeout_s: float,
    ) -> None: ...

    def close(self) -> None: ...


class Transfers:
    """The transfers a host expects, by id: each a target block list and the future to complete."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[int, tuple[str, list[int], Future[None]]] = {}

    def add(self, transfer_id: int, src_instance: str, block_ids: list[int]) -> Future[None]:
        future: Future[None] = Future()
        with self._lock:
            if transfer_id in self._pending:
                raise KVTransferError(f"transfer {transfer_id} is already expected")
            self._pending[transfer_id] = (src_instance, list(block_ids), future)
        return future

    def get(self, transfer_id: int) -> tuple[str, list[int], Future[None]] | None:
        with self._lock:
            return self._pending.get(transfer_id)

    def pop(self, transfer_id: int) -> Future[None] | None:
        with self._lock:
            entry = self._pending.pop(transfer_id, None)
        return None if entry is None else entry[2]

    def complete(self, transfer_id: int) -> bool:
        future = self.pop(transfer_id)
        if future is None:
            return False
        future.set_result(None)
        return True

    def fail(self, transfer_id: int, message: str) -> bool:
        future = self.pop(transfer_id)
        if future is None:
            return False
        future.set_exception(KVTransferError(message))
        return True

    def fail_all(self, message: str) -> None:
        with self._lock:
            ids = list(self._pending)
        for transfer_id in ids:
            self.fail(transfer_id, message)


class MarkSentPoolHost:
    """Shared by the pool hosts whose peers write straight into the pool (shm, CUDA IPC): a
    transfer completes when the sender reports KVSent on the control plane (`mark_sent`)."""

    instance: str
    _transfers: Transfers
    _closed: bool

    def expect(self, transfer_id: int, src_instance: str, block_ids: list[int]) -> Future[None]:
        if self._closed:
            raise KVTransferError(f"KV pool of {self.instance} is closed")
        return self._transfers.add(transfer_id, src_instance, block_ids)

    def mark_sent(self, transfer_id: int) -> None:
        if not self._transfers.complete(transfer_id):
            logger.warning("[%s] KVSent for unknown transfer %d", self.instance, transfer_id)

    def cancel(self, transfer_id: int) -> None:
        self._transfers.fail(transfer_id, f"transfer {transfer_id} cancelled")


def shape_to_str(shape: tuple[int, ...] | torch.Size) -> str:
    return ",".join(str(int(d)) for d in shape)


def shape_from_str(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in str(text).split(","))


def dtype_to_str(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_str(text: str) -> torch.dtype:
    dtype = getattr(torch, str(text), None)
    if not isinstance(dtype, torch.dtype):
        raise KVTransferError(f"unknown dtype {text!r} in KV endpoint")
    return dtype


def check_compatible(pool: torch.Tensor, endpoint: Endpoint) -> tuple[int, ...]:
    """Both pools must agree on everything but the number of blocks; returns the peer's shape."""
    shape = shape_from_str(str(endpoint["shape"]))
    dtype = dtype_from_str(str(endpoint["dtype"]))
    mine = tuple(pool.shape)
    if len(shape) != 6 or shape[:2] != mine[:2] or shape[3:] != mine[3:] or dtype != pool.dtype:
        raise KVTransferError(
            f"KV pool mismatch: local {mine} {pool.dtype}, peer {endpoint['instance']} {shape} {dtype}"
        )
    return shape


def check_block_ids(src: list[int], dst: list[int], src_blocks: int, dst_blocks: int) -> None:
    if len(src) != len(dst):
        raise KVTransferError(f"{len(src)} source blocks but {len(dst)} destination blocks")
    if src and not (0 <= min(src) and max(src) < src_blocks):
        raise KVTransferError(f"source block id out of range [0, {src_blocks})")
    if dst and not (0 <= min(dst) and max(dst) < dst_blocks):
        raise KVTransferError(f"destination block id out of range [0, {dst_blocks})")


def block_index(block_ids: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(block_ids, dtype=torch.long, device=device)


def create_pool_host(
    kind: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    instance: str,
    host: str = "127.0.0.1",
    cluster_key: ClusterKey | None = None,
) -> KVPoolHost:
    """Allocates a decode worker's KV pool where the chosen transport can reach it; with a
    cluster key, gloo/nccl peers must prove it (shm and CUDA IPC never leave the host)."""
    device = torch.device(device)
    if kind == "auto":
        kind = "cuda_ipc" if device.type == "cuda" else "shm"
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
