"""KV transfer between processes on one host's GPUs through CUDA IPC.

The decode worker exports its pool's allocation as an IPC handle; the endpoint carries the handle's
fields as hex strings (never pickle). A prefill worker opens it once and copies blocks on a side
stream, device to device. Completion is signalled on the control plane (KVSent -> mark_sent).

The GPU is named by its UUID: a device index is local to a process (with per-process
CUDA_VISIBLE_DEVICES both sides may call different GPUs "0"). A peer's GPU this process cannot
see, or cannot reach by peer access, fails with PeerAccessError: use nccl (or gloo) links there.
"""

from __future__ import annotations

import functools
import logging
import os
import threading

import torch

from transport.kv_transfer_base import (
    Endpoint,
    KVTransferError,
    MarkSentPoolHost,
    Transfers,
    block_index,
    check_block_ids,
    check_compatible,
    dtype_to_str,
    shape_to_str,
)
from transport.link_choice import LinkChoice, choose_link

logger = logging.getLogger(__name__)


class PeerAccessError(KVTransferError):
    """A peer's GPU buffer that this process cannot map (not visible here, or no peer access)."""


@functools.cache
def device_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


def local_device(uuid: str) -> int:
    """This process's index of the GPU with that UUID; PeerAccessError if it is not visible."""
    for index in range(torch.cuda.device_count()):
        if device_uuid(index) == uuid:
            return index
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "all")
    raise PeerAccessError(f"GPU {uuid} holding the peer's buffer is not visible to this process "
                          f"(CUDA_VISIBLE_DEVICES={visible}); make it visible to both sides, or "
                          "use nccl (or gloo) links")  # fmt: skip


def current_gpu_uuid() -> str:
    """The current CUDA device's UUID, "" where there is none (what Register.gpu_uuid says)."""
    if not torch.cuda.is_available():
        return ""
    return device_uuid(torch.cuda.current_device())


def peer_reachable(peer_uuid: str) -> bool:
    """Whether this process sees the GPU named peer_uuid and its current device maps that GPU's
    memory (the same GPU, or peer access): the answer transport.link_choice decides on."""
    try:
        index = local_device(peer_uuid)
    except PeerAccessError:
        return False
    current = torch.cuda.current_device()
    return index == current or torch.cuda.can_device_access_peer(current, index)


def gpu_link_kind(requested: str, device: torch.device, peer_uuids: list[str]) -> LinkChoice:
    """transport.link_choice's decision for this process's GPU against each named peer GPU:
    NCCL if any of them cannot map this GPU's memory."""
    index = torch.cuda.current_device() if device.index is None else device.index
    local = device_uuid(index)
    with torch.cuda.device(index):
        choices = [choose_link(requested, local, p, bool(p) and peer_reachable(p))
                   for p in peer_uuids or [""]]  # fmt: skip
    return next((c for c in choices if c.kind == "nccl"), choices[0])


def _hex(value: bytes | None) -> str:
    return "" if value is None else value.hex()


def _unhex(text: str | int) -> bytes | None:
    return bytes.fromhex(str(text)) if text else None


def export_pool(pool: torch.Tensor) -> Endpoint:
    """The fields of the storage's IPC handle, as msgpack-able strings and ints."""
    (
        device,
        handle,
        size_bytes,
        offset_bytes,
        ref_counter_handle,
        ref_counter_offset,
        event_handle,
        event_sync_required,
    ) = pool.untyped_storage()._share_cuda_()
    return {
        "device": int(device),
        "device_uuid": device_uuid(int(device)),
        "handle": _hex(handle),
        "storage_size_bytes": int(size_bytes),
        "storage_offset_bytes": int(offset_bytes),
        "ref_counter_handle": _hex(ref_counter_handle),
        "ref_counter_offset": int(ref_counter_offset),
        "event_handle": _hex(event_handle),
        "event_sync_required": int(bool(event_sync_required)),
        "tensor_offset": int(pool.storage_offset()),
    }


def import_pool(endpoint: Endpoint, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Opens a peer's exported pool (see export_pool) as a tensor on the GPU holding it, which
    must be this process's current device or one it reaches by peer access."""
    torch.cuda._lazy_init()
    index = local_device(str(endpoint.get("device_uuid", "")))
    current = torch.cuda.current_device()
    if index != current and not torch.cuda.can_device_access_peer(current, index):
        raise PeerAccessError(f"cuda:{current} has no peer access to cuda:{index} "
                              f"({device_uuid(index)}), which holds the peer's buffer; use nccl "
                              "(or gloo) links")  # fmt: skip
    storage = torch.UntypedStorage._new_shared_cuda(
        index,
        _unhex(endpoint["handle"]),
        int(endpoint["storage_size_bytes"]),
        int(endpoint["storage_offset_bytes"]),
        _unhex(endpoint["ref_counter_handle"]),
        int(endpoint["ref_counter_offset"]),
        _unhex(endpoint["event_handle"]),
        bool(endpoint["event_sync_required"]),
    )
    pool = torch.empty(0, dtype=dtype, device=torch.device("cuda", index))
    return pool.set_(storage, int(endpoint["tensor_offset"]), shape)


class CudaIpcPoolHost(MarkSentPoolHost):
    """Decode side: allocates the KV pool on its GPU and exports it."""

    def __init__(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, instance: str
    ) -> None:
        self.instance = instance
        self.pool = torch.zeros(shape, dtype=dtype, device=device)
        torch.cuda.synchronize(self.pool.device)  # the zeros land before a peer may write
        self.endpoint: Endpoint = {
            "kind": "cuda_ipc",
            "instance": instance,
            "shape": shape_to_str(shape),
            "dtype": dtype_to_str(dtype),
            **export_pool(self.pool),
        }
        self._transfers = Transfers()
        self._closed = False
        logger.info("[decode %s] KV pool exported over CUDA IPC on %s", instance, device)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._transfers.fail_all(f"KV pool of {self.instance} closed")


class CudaIpcSender:
    """Prefill side: opens each peer's pool once; copies on a side stream."""

    def __init__(self, pool: torch.Tensor, instance: str) -> None:
        if not pool.is_cuda:
            raise KVTransferError(f"cuda_ipc KV transfer needs a CUDA pool, not {pool.device}")
        self.pool = pool
        self.instance = instance
        self._lock = threading.Lock()
        self._peers: dict[str, torch.Tensor] = {}
        self._stream = torch.cuda.Stream(device=pool.device)

    def _peer_pool(self, endpoint: Endpoint) -> torch.Tensor:
        key = str(endpoint["handle"])
        with self._lock:
            peer = self._peers.get(key)
            if peer is None:
                shape = check_compatible(self.pool, endpoint)
                try:
                    with torch.cuda.device(self.pool.device):
                        peer = import_pool(endpoint, shape, self.pool.dtype)
                except RuntimeError as e:
                    raise KVTransferError(
                        f"cannot open the KV pool of {endpoint['instance']} over CUDA IPC: {e}"
                    ) from e
                self._peers[key] = peer
            return peer

    def send(
        self,
        transfer_id: int,
        endpoint: Endpoint,
        src_block_ids: list[int],
        dst_block_ids: list[int],
        timeout_s: float = 10.0,
    ) -> None:
        dst_pool = self._peer_pool(endpoint)
        check_block_ids(src_block_ids, dst_block_ids, self.pool.shape[2], dst_pool.shape[2])
        if not src_block_ids:
            return
        # The prefill that wrote these blocks ran on the current stream.
        self._stream.wait_stream(torch.cuda.current_stream(self.pool.device))
        with torch.cuda.stream(self._stream):
            src = block_index(src_block_ids, self.pool.device)
            dst = block_index(dst_block_ids, dst_pool.device)
            blocks = self.pool.index_select(2, src)
            if dst_pool.device != self.pool.device:
                blocks = blocks.to(dst_pool.device, non_blocking=True)
            dst_pool.index_copy_(2, dst, blocks)
        # The decode side reads the blocks after KVSent; they must be in memory by then.
        self._stream.synchronize()
        if dst_pool.device != self.pool.device:
            torch.cuda.synchronize(dst_pool.device)

    def close(self) -> None:
        with self._lock:
            self._peers.clear()
