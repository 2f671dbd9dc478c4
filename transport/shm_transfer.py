"""KV transfer between processes on one host through POSIX shared memory.

The decode worker's pool lives in a named segment; a prefill worker maps it once and writes the
reserved blocks directly, so a transfer is one gather-scatter copy. Completion is signalled on the
control plane (KVSent -> mark_sent), never by the data itself.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import secrets
import sys
import threading
from collections.abc import Callable
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory

import torch

from transport.heartbeat import process_exited
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

logger = logging.getLogger(__name__)

SEGMENT_PREFIX = "adrenaline-kv-"
SHM_DIR = "/dev/shm"


def remove_stale_segments(prefix: str = SEGMENT_PREFIX) -> list[str]:
    """Unlinks segments (KV pools, or with another prefix per-layer attention channels) left
    by processes that died without closing (e.g. SIGKILL).

    Segment names carry the creator's pid; a segment whose pid is gone is stale. (The
    multiprocessing resource tracker also unlinks a killed creator's segments; this covers the
    tracker itself being killed.) A reused pid keeps a stale segment until that process exits.
    """
    removed = _remove_segments((prefix,), process_exited)
    if removed:
        logger.warning(
            "removed %d stale shared-memory segments: %s", len(removed), ", ".join(removed)
        )
    return removed


def remove_segments_of(pids: set[int], prefixes: tuple[str, ...]) -> list[str]:
    """Unlinks the segments these processes, all stopped by now, left behind: exactly theirs,
    never another deployment's. A pid alive again belongs to another process and is skipped."""
    return _remove_segments(prefixes, lambda pid: pid in pids and process_exited(pid))


def _remove_segments(prefixes: tuple[str, ...], stale: Callable[[int], bool]) -> list[str]:
    removed: list[str] = []
    if not os.path.isdir(SHM_DIR):
        return removed
    for name in os.listdir(SHM_DIR):
        prefix = next((p for p in prefixes if name.startswith(p)), None)
        if prefix is None:
            continue
        pid_text = name[len(prefix) :].split("-", 1)[0]  # names are PREFIX{pid}-{random}
        if not pid_text.isdigit() or not stale(int(pid_text)):
            continue
        try:
            os.unlink(os.path.join(SHM_DIR, name))
            removed.append(name)
        except OSError:
            pass
    return removed


def _open_untracked(name: str) -> SharedMemory:
    """Opens a peer's segment without letting this process's resource tracker unlink it on exit."""
    if sys.version_info >= (3, 13):
        return SharedMemory(name=name, track=False)
    shm = SharedMemory(name=name)
    resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    return shm


def _view(shm: SharedMemory, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    numel = math.prod(shape)
    return torch.frombuffer(shm.buf, dtype=dtype, count=numel).view(shape)


class ShmPoolHost(MarkSentPoolHost):
    """Decode side: allocates the KV pool in a shared memory segment named in the endpoint."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, instance: str) -> None:
        remove_stale_segments()
        self.instance = instance
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        name = f"{SEGMENT_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        self._shm = SharedMemory(name=name, create=True, size=max(nbytes, 1))
        self.pool = _view(self._shm, tuple(shape), dtype)
        self.pool.zero_()
        self.endpoint: Endpoint = {
            "kind": "shm",
            "instance": instance,
            "name": name,
            "shape": shape_to_str(shape),
            "dtype": dtype_to_str(dtype),
            "nbytes": nbytes,
        }
        self._transfers = Transfers()
        self._closed = False
        self._close_lock = threading.Lock()
        atexit.register(self.close)
        logger.info("[decode %s] KV pool in shm segment %s (%d bytes)", instance, name, nbytes)

    @property
    def segment_name(self) -> str:
        return str(self.endpoint["name"])

    def close(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        atexit.unregister(self.close)
        self._transfers.fail_all(f"KV pool of {self.instance} closed")
        try:
            self._shm.unlink()
        except FileNotFoundError:
            pass
        # The mapping stays while tensors still view it (BufferError); it goes with the process.
        try:
            self._shm.close()
        except BufferError:
            pass


class ShmSender:
    """Prefill side: maps each peer's segment once and copies blocks straight into it."""

    def __init__(self, pool: torch.Tensor, instance: str) -> None:
        if pool.device.type != "cpu":
            raise KVTransferError(f"shm KV transfer needs a CPU pool, not {pool.device}")
        self.pool = pool
        self.instance = instance
        self._lock = threading.Lock()
        self._peers: dict[str, tuple[SharedMemory, torch.Tensor]] = {}

    def _peer_pool(self, endpoint: Endpoint) -> torch.Tensor:
        name = str(endpoint["name"])
        with self._lock:
            if os.path.isdir(SHM_DIR) and not os.path.exists(os.path.join(SHM_DIR, name)):
                # The host closed or died: writing into the orphaned mapping would look like success.
                self._drop(name)
                raise KVTransferError(f"KV segment {name} of {endpoint['instance']} is gone")
            peer = self._peers.get(name)
            if peer is None:
                shape = check_compatible(self.pool, endpoint)
                try:
                    shm = _open_untracked(name)
                except FileNotFoundError as e:
                    raise KVTransferError(
                        f"KV segment {name} of {endpoint['instance']} is gone"
                    ) from e
                peer = self._peers[name] = (shm, _view(shm, shape, self.pool.dtype))
            return peer[1]

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
        src = block_index(src_block_ids, self.pool.device)
        dst = block_index(dst_block_ids, self.pool.device)
        dst_pool.index_copy_(2, dst, self.pool.index_select(2, src))

    def _drop(self, name: str) -> None:
        peer = self._peers.pop(name, None)
        if peer is None:
            return
        shm = peer[0]
        del peer
        try:
            shm.close()
        except BufferError:
            pass

    def close(self) -> None:
        with self._lock:
            for name in list(self._peers):
                self._drop(name)
