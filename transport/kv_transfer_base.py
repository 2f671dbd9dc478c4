"""What every KV transport shares: the endpoint a decode worker publishes, the pool-host and
sender interfaces, the bookkeeping of transfers in flight, and the checks and dtype/shape codecs
both sides run. The implementations (shm, gloo/nccl, CUDA IPC) import this module; the factory
(transport/kv_transfer.py) imports them lazily, and they never import the factory.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from typing import Protocol

import torch

logger = logging.getLogger(__name__)

Endpoint = dict[str, str | int]


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
