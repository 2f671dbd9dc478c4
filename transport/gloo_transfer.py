"""KV transfer across hosts with torch.distributed point-to-point: gloo for CPU pools, NCCL for GPU.

There is no global process group: each (prefill, decode) pair builds its own 2-rank group on the
decode worker's TCPStore, so a worker can talk to any number of peers. A transfer is announced in
the store ("{transfer_id},{num_blocks}") before its data is sent, so the decode side only posts a
recv when data is on its way: a gloo wait that times out poisons the whole group, so it must
never idle inside one. Either side drops a failed group; the sender rebuilds it under a new
generation number, which the decode side follows. With a cluster key every message in the log
carries an HMAC (over its sender, receiver, sequence number and text) and the pair group forms
only with a peer that proves the key (transport.p2p_group); other messages are refused.

On a GPU, both sides copy on a stream of their own: the model's stream never waits for a
transfer, and a transfer's sync waits only for the transfer.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from datetime import timedelta

import torch
import torch.distributed as dist

from transport.kv_transfer_base import (
    Endpoint,
    KVTransferError,
    Transfers,
    block_index,
    check_block_ids,
    check_compatible,
    dtype_to_str,
    shape_to_str,
)
from transport.p2p_group import PairAuthError, join_pair
from transport.security import ClusterKey

logger = logging.getLogger(__name__)

SENDER_RANK, HOST_RANK = 0, 1
IDLE_WAIT = timedelta(hours=1)


def _tag(transfer_id: int) -> int:
    return transfer_id % 2**31


def _copy_stream(device: torch.device) -> torch.cuda.Stream | None:
    return torch.cuda.Stream(device=device) if device.type == "cuda" else None


def _on(stream: torch.cuda.Stream | None):
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def _pair_prefix(src: str, dst: str, generation: int) -> str:
    return f"{src}->{dst}/{generation}"


def _message_key(src: str, seq: int) -> str:
    return f"{src}/msg/{seq}"


def _post(store: dist.Store, src: str, dst: str, key: ClusterKey | None, *fields: object) -> None:
    """Appends to src's message log: "join,gen,timeout_s" | "send,gen,transfer_id,n" | "close",
    then ";HMAC" with a cluster key."""
    seq = int(store.add(f"{src}/seq", 1)) - 1
    text = ",".join(str(f) for f in fields)
    if key is not None:
        text += ";" + key.mac("kv-message", src, dst, seq, text)
    store.set(_message_key(src, seq), text)


class P2PPoolHost:
    """Decode side: a TCPStore for rendezvous plus one receiving thread per prefill peer."""

    def __init__(
        self,
        backend: str,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
        instance: str,
        host: str = "127.0.0.1",
        connect_timeout_s: float = 30.0,
        data_timeout_s: float = 60.0,
        cluster_key: ClusterKey | None = None,
    ) -> None:
        self.backend = backend
        self.instance = instance
        self.cluster_key = cluster_key
        self.pool = torch.zeros(shape, dtype=dtype, device=device)
        self._stream = _copy_stream(self.pool.device)
        self.connect_timeout_s = connect_timeout_s
        self.data_timeout_s = data_timeout_s
        self._store = dist.TCPStore(
            host, 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30)
        )
        self.endpoint: Endpoint = {
            "kind": backend,
            "instance": instance,
            "host": host,
            "port": int(self._store.port),
            "shape": shape_to_str(shape),
            "dtype": dtype_to_str(dtype),
        }
        self._transfers = Transfers()
        # Held while blocks are written, so cancel() never returns with a copy still landing.
        self._scatter_lock = threading.Lock()
        self._links: dict[str, threading.Thread] = {}
        self._links_lock = threading.Lock()
        self._closed = threading.Event()
        logger.info("[decode %s] %s KV endpoint %s:%d", instance, backend, host, self._store.port)

    def expect(self, transfer_id: int, src_instance: str, block_ids: list[int]) -> Future[None]:
        if self._closed.is_set():
            raise KVTransferError(f"KV pool of {self.instance} is closed")
        future = self._transfers.add(transfer_id, src_instance, block_ids)
        if not block_ids:  # nothing will be sent
            self._transfers.complete(transfer_id)
            return future
        with self._links_lock:
            if src_instance not in self._links:
                thread = threading.Thread(
                    target=self._serve_peer,
                    args=(src_instance,),
                    name=f"kv-recv-{src_instance}",
                    daemon=True,
                )
                self._links[src_instance] = thread
                thread.start()
        return future

    def mark_sent(self, transfer_id: int) -> None:
        # The data itself signals completion here; KVSent arrives after the recv finished.
        pass

    def cancel(self, transfer_id: int) -> None:
        with self._scatter_lock:
            self._transfers.fail(transfer_id, f"transfer {transfer_id} cancelled")

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._transfers.fail_all(f"KV pool of {self.instance} closed")
        with self._links_lock:
            links = dict(self._links)
        for src in links:
            _post(self._store, src, self.instance, self.cluster_key, "close")
        for thread in links.values():
            thread.join(timeout=1.0)

    # -- the receiving side of one peer ----------------------------------------------------

    def _serve_peer(self, src: str) -> None:
        # Its own client: a client blocked in wait() holds its socket, and this one waits for hours.
        store = dist.TCPStore(
            str(self.endpoint["host"]), self._store.port, is_master=False, wait_for_workers=False
        )
        group: dist.ProcessGroup | None = None
        generation = 0
        for fields in self._messages(store, src):
            if fields[0] == "close":
                return
            try:
                if fields[0] == "join":
                    generation = int(fields[1])
                    group = self._join(store, src, generation, float(fields[2]))
                elif fields[0] == "send":
                    link_generation, transfer_id, num_blocks = (int(x) for x in fields[1:])
                    if group is None or link_generation != generation:
                        self._transfers.fail(transfer_id, f"transfer {transfer_id}: link is down")
                    elif not self._receive_one(src, group, transfer_id, num_blocks):
                        group = None  # a failed wait poisons the group; the sender rebuilds it
            except (ValueError, IndexError):
                logger.warning("[decode %s] malformed KV message from %s: %s", self.instance,
                               src, fields)  # fmt: skip

    def _join(
        self, store: dist.Store, src: str, generation: int, timeout_s: float
    ) -> dist.ProcessGroup | None:
        label = _pair_prefix(src, self.instance, generation)
        try:
            group = join_pair(self.backend, store, HOST_RANK, timeout_s, label,
                              self.cluster_key, self.pool.device)  # fmt: skip
        except PairAuthError as e:
            logger.error("[decode %s] refused KV link %s: %s", self.instance, label, e)
            return None
        except Exception as e:  # a sender that gave up: it posts a new join
            logger.warning("[decode %s] joining %s failed: %s", self.instance, label, e)
            return None
        logger.info("[decode %s] KV link %s up", self.instance, label)
        return group

    def _messages(self, store: dist.TCPStore, src: str) -> Iterator[list[str]]:
        """The peer's message log in the store, in order; waits never time out while idle."""
        seq = 0
        while not self._closed.is_set():
            key = _message_key(src, seq)
            try:
                store.wait([key], IDLE_WAIT)
            except Exception:
                continue  # idle for IDLE_WAIT: keep waiting
            text = store.get(key).decode(errors="replace")
            store.delete_key(key)
            seq += 1
            body, _, mac = text.partition(";")
            if self.cluster_key is None and mac:
                logger.error("[decode %s] %s signs its KV messages but this worker has no "
                             "--cluster-key; refused", self.instance, src)  # fmt: skip
            elif self.cluster_key is not None and not self.cluster_key.verify(
                mac, "kv-message", src, self.instance, seq - 1, body
            ):
                logger.error("[decode %s] refused a KV message for %s without a valid proof of "
                             "the cluster key (is --cluster-key the same on both?)", self.instance,
                             src)  # fmt: skip
            else:
                yield body.split(",")

    def _receive_one(
        self, src: str, group: dist.ProcessGroup, transfer_id: int, num_blocks: int
    ) -> bool:
        shape = list(self.pool.shape)
        shape[2] = num_blocks
        try:
            with _on(self._stream):  # the receive, then the scatter, ordered on our stream
                buf = torch.empty(shape, dtype=self.pool.dtype, device=self.pool.device)
                group.recv([buf], SENDER_RANK, _tag(transfer_id)).wait(
                    timedelta(seconds=self.data_timeout_s)
                )
        except Exception as e:
            logger.warning(
                "[decode %s] recv of transfer %d failed: %s", self.instance, transfer_id, e
            )
            self._transfers.fail(transfer_id, f"receiving transfer {transfer_id} failed: {e}")
            return False
        with self._scatter_lock:
            entry = self._transfers.get(transfer_id)
            if entry is None or entry[0] != src or len(entry[1]) != num_blocks:
                logger.warning(
                    "[decode %s] dropped unexpected transfer %d from %s",
                    self.instance,
                    transfer_id,
                    src,
                )
                return True
            with _on(self._stream):
                self.pool.index_copy_(2, block_index(entry[1], self.pool.device), buf)
            if self._stream is not None:
                self._stream.synchronize()  # the blocks are in the pool; model work is not waited
            self._transfers.complete(transfer_id)
        return True


class _SendLink:
    def __init__(
        self, store: dist.TCPStore, group: dist.ProcessGroup, generation: int, dst: str
    ) -> None:
        self.store = store
        self.group = group
        self.generation = generation
        self.dst = dst


class P2PSender:
    """Prefill side: one 2-rank group per decode endpoint, built on first send."""

    def __init__(
        self, pool: torch.Tensor, instance: str, cluster_key: ClusterKey | None = None
    ) -> None:
        self.pool = pool
        self.instance = instance
        self.cluster_key = cluster_key
        self._lock = threading.Lock()
        self._links: dict[tuple[str, int], _SendLink] = {}
        self._peer_locks: dict[tuple[str, int], threading.Lock] = {}
        self._stream = _copy_stream(pool.device)

    def _connect(self, endpoint: Endpoint, timeout_s: float) -> _SendLink:
        backend = str(endpoint["kind"])
        store = dist.TCPStore(
            str(endpoint["host"]),
            int(endpoint["port"]),
            is_master=False,
            wait_for_workers=False,
            timeout=timedelta(seconds=timeout_s),
        )
        generation = int(store.add(f"{self.instance}/gen", 1))
        dst, key = str(endpoint["instance"]), self.cluster_key
        _post(store, self.instance, dst, key, "join", generation, timeout_s)
        label = _pair_prefix(self.instance, dst, generation)
        group = join_pair(backend, store, SENDER_RANK, timeout_s, label, key, self.pool.device)
        logger.info("[prefill %s] KV link %s up", self.instance, label)
        return _SendLink(store, group, generation, dst)

    def send(
        self,
        transfer_id: int,
        endpoint: Endpoint,
        src_block_ids: list[int],
        dst_block_ids: list[int],
        timeout_s: float = 10.0,
    ) -> None:
        shape = check_compatible(self.pool, endpoint)
        check_block_ids(src_block_ids, dst_block_ids, self.pool.shape[2], shape[2])
        if not src_block_ids:
            return
        peer = (str(endpoint["host"]), int(endpoint["port"]))
        with self._lock:
            peer_lock = self._peer_locks.setdefault(peer, threading.Lock())
        deadline = time.monotonic() + timeout_s
        if not peer_lock.acquire(timeout=timeout_s):
            raise KVTransferError(f"transfer {transfer_id}: link to {peer} busy for {timeout_s}s")
        try:
            link = self._links.get(peer)
            try:
                if link is None:
                    link = self._links[peer] = self._connect(endpoint, timeout_s)
                self._send_blocks(link, transfer_id, src_block_ids, deadline)
            except Exception as e:
                self._links.pop(peer, None)
                raise KVTransferError(
                    f"sending transfer {transfer_id} to {endpoint['instance']} at {peer} failed: {e}"
                ) from e
        finally:
            peer_lock.release()

    def _send_blocks(
        self, link: _SendLink, transfer_id: int, src_block_ids: list[int], deadline: float
    ) -> None:
        with _on(self._stream):
            if self._stream is not None:
                # After the prefill that wrote the blocks, enqueued before this call on the
                # device's default stream (this thread's current one), and nothing after it.
                self._stream.wait_stream(torch.cuda.default_stream(self.pool.device))
            # [num_layers, 2, n, block_size, num_kv_heads, head_dim], contiguous
            blocks = self.pool.index_select(2, block_index(src_block_ids, self.pool.device))
            _post(link.store, self.instance, link.dst, self.cluster_key, "send", link.generation,
                  transfer_id, len(src_block_ids))  # fmt: skip
            remaining = max(deadline - time.monotonic(), 0.001)
            # A timeout here blocks this (copier) thread only; with NCCL it aborts the group,
            # which this process survives (transport.p2p_group), and the next send rebuilds it.
            link.group.send([blocks], HOST_RANK, _tag(transfer_id)).wait(
                timedelta(seconds=remaining)
            )

    def close(self) -> None:
        with self._lock:
            self._links.clear()
