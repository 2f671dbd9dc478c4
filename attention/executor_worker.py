"""The attention executor's process: registers with the router next to its prefill worker,
takes reservations and KV from the control plane, and serves decode workers' steps.

One thread. Router messages are handled between steps; a step runs all its layers back to
back, each waiting on the decode worker's per-layer signal, never on a socket. Both sockets
survive any input: what cannot be used is logged (rate-limited), dropped and counted in the
heartbeat's `dropped_messages`; who may attach and step a link is attention.executor_links'.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable

import msgspec
import torch
import zmq

from attention import colocation
from attention.backend import AttentionBackend
from attention.executor import AttentionExecutor, StepError
from attention.executor_links import ExecutorLinks, LinkRejected, LinkShape
from attention.executor_links import open_executor_link as open_executor_link
from attention.step_timer import SpanTimer
from engine.kv_cache import OutOfBlocksError
from transport import gpu_signal
from transport.attention_channel import ChannelTimeout
from transport.cuda_ipc_transfer import current_gpu_uuid
from transport.heartbeat import HeartbeatThread, SharedSocket, StepProgress, host_identity
from transport.kv_transfer import open_peer_pool
from transport.kv_transfer_base import dtype_to_str
from transport.messages import (
    Abort,
    AttachLink,
    AttachPool,
    AttentionStep,
    DecodeReserved,
    OffloadReleased,
    Register,
    ReleaseOffloaded,
    ReserveDecode,
    Shutdown,
    WorkerStats,
    decode,
    encode,
)
from transport.security import (
    ClusterKey,
    DroppedMessages,
    secure_client,
    secure_server,
    set_frame_limit,
    start_authenticator,
)

log = logging.getLogger(__name__)

STATS_REFRESH_S = 0.1
LAYER_TIMEOUT_S = 5.0
EMPTY_STATS = {"num_running": 0, "num_waiting": 0, "num_free_blocks": 0, "num_blocks": 0,
               "queued_tokens": 0, "num_preemptions": 0, "requests_total": 0}  # fmt: skip


class ExecutorWorker:
    def __init__(
        self,
        instance: str,
        colocated_with: str,
        make_executor: Callable[[torch.Tensor, int, int], AttentionExecutor],
        router_address: str,
        bind_host: str,
        model_name: str,
        max_model_len: int,
        device: torch.device | str = "cpu",
        cluster_key: ClusterKey | None = None,
    ) -> None:
        self.instance, self.colocated_with = instance, colocated_with
        # Built once the router sends the prefill worker's pool (AttachPool): the executor has
        # no pool of its own, it works in the tail of its prefill worker's.
        self.make_executor = make_executor
        self.executor: AttentionExecutor | None = None
        self.pool_endpoint: dict = {}
        self.model_name, self.max_model_len = model_name, max_model_len
        self.device = torch.device(device)
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.DEALER)
        self.router.setsockopt(zmq.IDENTITY, instance.encode())
        self.router.setsockopt(zmq.LINGER, 0)
        secure_client(self.router, cluster_key)
        set_frame_limit(self.router)
        self.router.connect(router_address)
        # Heartbeats go out from a thread of their own, so a long step never silences them.
        self.router_link = SharedSocket(self.router)
        self.progress = StepProgress()
        self.host = host_identity()
        self.gpu_uuid = current_gpu_uuid()  # "" on CPU; peers pick CUDA IPC or NCCL by it
        # With a cluster key only deployment members reach the step socket at all.
        self.auth = start_authenticator(self.ctx, cluster_key)
        self.steps = self.ctx.socket(zmq.ROUTER)
        self.steps.setsockopt(zmq.LINGER, 0)
        secure_server(self.steps, cluster_key, f"tcp://{bind_host}")
        set_frame_limit(self.steps)
        port = self.steps.bind_to_random_port(f"tcp://{bind_host}")
        self.address = f"tcp://{bind_host}:{port}"
        self.links = ExecutorLinks(cluster_key)
        self.dropped = DroppedMessages(log)
        self.attention_timer = SpanTimer(self.device)
        self.stopping = False
        self._stats = self._collect_stats()
        self._stats_at = 0.0
        self._heartbeats = HeartbeatThread(self._heartbeat)

    def run(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: setattr(self, "stopping", True))
        log.info("attention executor %s beside %s; steps on %s", self.instance,
                 self.colocated_with, self.address)  # fmt: skip
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.steps, zmq.POLLIN)
        self._heartbeats.start()
        try:
            while not self.stopping:
                self._refresh_stats()
                with self.router_link.lock:  # the heartbeat thread sends on this socket
                    events = dict(poller.poll(50))
                if self.router in events:
                    self._drain_router()
                if self.steps in events:
                    self._drain_steps()
        finally:
            self._heartbeats.stop()
            self.close()

    def close(self) -> None:
        self.links.close()
        self.router.close(0)
        self.steps.close(0)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()

    def _collect_stats(self) -> WorkerStats:
        # sm_share: the SM share in force (attention.colocation), for /stats and metrics.
        s = {**(self.executor.stats() if self.executor else EMPTY_STATS),
             "dropped_messages": self.dropped.total,
             "sm_share": colocation.applied_share()}  # fmt: skip
        return WorkerStats(**{k: s[k] for k in WorkerStats.__struct_fields__ if k in s})

    def _refresh_stats(self, now: bool = False) -> None:
        # The heartbeat thread sends the latest snapshot; the executor is only read here.
        t = time.monotonic()
        if now or t - self._stats_at >= STATS_REFRESH_S:
            self._stats, self._stats_at = self._collect_stats(), t

    def _heartbeat(self) -> None:
        self._send_router(
            Register(
                role="attention",
                instance=self.instance,
                pid=os.getpid(),
                model=self.model_name,
                max_model_len=self.max_model_len,
                kv_endpoint=self.pool_endpoint,
                stats=self._stats,
                colocated_with=self.colocated_with,
                attention_address=self.address,
                progress=self.progress.snapshot(),
                host=self.host,
                gpu_uuid=self.gpu_uuid,
            )
        )

    def _send_router(self, message) -> None:
        if not self.router_link.send(encode(message)):
            log.warning("router unreachable: dropped a %s", type(message).__name__)

    # Control plane --------------------------------------------------------------------------

    def _drain_router(self) -> None:
        while (frames := self.router_link.recv_nowait()) is not None:
            msg = self._decode(frames, 1, "router")
            try:
                self._on_router_message(msg)
            except Exception as exc:  # a bad endpoint or message must not end the executor
                self.dropped.drop(f"router message {type(msg).__name__} failed", repr(exc))

    def _decode(self, frames: list[bytes], expected: int, source: str):
        """The message in the last of exactly `expected` frames, or None (counted, logged)."""
        if len(frames) != expected:
            self.dropped.drop(f"{source}: wrong frame count", f"{len(frames)}, not {expected}")
            return None
        try:
            return decode(frames[-1])
        except msgspec.DecodeError as exc:
            self.dropped.drop(f"{source}: malformed message", f"{len(frames[-1])} bytes: {exc}")
            return None

    def _on_router_message(self, msg) -> None:
        if isinstance(msg, AttachPool):
            self._attach_pool(msg.kv_endpoint)
        elif isinstance(msg, ReserveDecode):
            self._on_adopt(msg)
        elif isinstance(msg, Abort):
            self._release(msg.request_id)
        elif isinstance(msg, Shutdown):
            self.stopping = True
        elif msg is not None:
            self.dropped.drop(f"router: unexpected {type(msg).__name__}")

    def _attach_pool(self, endpoint: dict) -> None:
        if self.executor is not None:
            return
        pool = open_peer_pool(endpoint, self.device)
        base, owned = int(endpoint["offload_base"]), int(endpoint["offload_blocks"])
        self.executor = self.make_executor(pool, base, owned)
        self.pool_endpoint = dict(endpoint)
        self._refresh_stats(now=True)
        self._heartbeat()  # report the pool at once: the router waits for it
        log.info("working in %s's KV pool: blocks [%d, %d) are ours", self.colocated_with,
                 base, base + owned)  # fmt: skip

    def _on_adopt(self, msg: ReserveDecode) -> None:
        try:
            if self.executor is None:
                raise StepError("no pool attached yet")
            # Prefill computed the KV of all but the newest output token.
            computed = len(msg.prompt_token_ids) + len(msg.output_token_ids) - 1
            self.executor.adopt(msg.request_id, msg.lent_blocks, computed)
        except (StepError, OutOfBlocksError) as exc:
            self._send_router(DecodeReserved(msg.request_id, [], error=str(exc)))
            return
        self._send_router(DecodeReserved(msg.request_id, msg.lent_blocks))

    def _release(self, request_id: str) -> None:
        """Done with a request (finished, dropped, aborted): its lent blocks go back to the
        prefill worker through the router, now that no step of ours can write them."""
        if self.executor is not None:
            self.executor.release(request_id)
        # Acknowledged even for a request never adopted here, so its blocks are never stranded.
        self._send_router(OffloadReleased(request_id))

    # Decode steps ---------------------------------------------------------------------------

    def _drain_steps(self) -> None:
        while True:
            # A busy decode worker always has its next step queued: keep serving the router
            # between steps, or this loop would starve it.
            self._refresh_stats()
            self._drain_router()
            try:
                frames = self.steps.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            # ROUTER: the peer's identity, then exactly one message frame.
            msg = self._decode(frames, 2, "step socket")
            try:
                self._on_step_message(frames[0], msg)
            except LinkRejected as exc:
                self.dropped.drop(f"step socket: refused {type(msg).__name__}", str(exc))
            except Exception as exc:  # a peer's content must not end the executor
                self.dropped.drop(f"step socket: {type(msg).__name__} failed", repr(exc))

    def _on_step_message(self, identity: bytes, msg) -> None:
        if isinstance(msg, AttachLink):
            self.links.attach(identity, msg, self._link_shape())
        elif isinstance(msg, AttentionStep):
            self._run_step(self.links.for_step(identity, msg), msg)
        elif isinstance(msg, ReleaseOffloaded):
            self.links.check_release(identity, msg)
            for request_id in msg.request_ids:
                self._release(request_id)
        elif msg is not None:
            self.dropped.drop(f"step socket: unexpected {type(msg).__name__}")

    def _link_shape(self) -> LinkShape | None:
        if self.executor is None:
            return None
        backend, pool = self.executor.backend, self.executor.pool
        return LinkShape(backend.num_heads, backend.num_kv_heads, backend.head_dim,
                         dtype_to_str(pool.dtype))  # fmt: skip

    def _run_step(self, link, msg: AttentionStep) -> None:
        if self.executor is None:
            raise LinkRejected(f"step from {msg.decode_instance} before a pool is attached")
        first_seq = msg.step_id * self.executor.num_layers + 1
        # The step's rows come from its plan: a GPU link's host cannot read them without a sync.
        link.begin_step(msg.step_id, len(msg.request_ids), first_seq)
        self.progress.begin()
        try:
            self._attend_step(link, msg, first_seq)
        finally:
            self.progress.end()

    def _attend_step(self, link, msg: AttentionStep, first_seq: int) -> None:
        layers = self.executor.num_layers
        try:
            step = self.executor.prepare(msg.request_ids, msg.positions)
        except (StepError, OutOfBlocksError) as exc:
            log.warning("refusing step %d of %s: %s", msg.step_id, msg.decode_instance, exc)
            link.refuse(msg.step_id, first_seq + layers - 1)
            return
        try:
            # Every layer is enqueued without a host wait (GPU links); a layer whose rows never
            # came is answered refused, and check() raises for the step at its end.
            for layer in range(layers):
                q, k, v = link.receive(first_seq + layer, LAYER_TIMEOUT_S)
                self.attention_timer.start()
                out = self.executor.attend(layer, step, q, k, v)
                self.attention_timer.stop()
                link.respond(first_seq + layer, out)
            link.check()
        except ChannelTimeout as exc:
            # The decode worker died, stalled or gave up on this step: its KV is incomplete.
            log.warning("step %d of %s not committed: %s", msg.step_id, msg.decode_instance, exc)
            self.attention_timer.discard()
            return
        self.executor.commit(msg.request_ids, msg.positions)
        for ms in self.attention_timer.spans_ms():  # GPU time, read after the step's sync
            self.executor.record_attention(ms / 1000)


def warm_up(
    backend: AttentionBackend,
    device: torch.device,
    dtype: torch.dtype,
    block_size: int,
    max_rows: int,
    max_model_len: int,
) -> None:
    """Compiles and runs the executor's kernels for this model's shapes, before it registers: a
    first Triton launch JIT-compiles for seconds, past the decode side's per-layer timeout, so
    the first offloaded requests would fail over to recompute. Triton compiles one variant per
    class of its integer arguments (1, a multiple of 16, other), which here follow the batch
    and the context length (block-table width, number of splits): the grid covers each class."""
    if device.type != "cuda":
        return  # nothing is compiled ahead on the CPU
    index = device.index if device.index is not None else torch.cuda.current_device()
    gpu_signal.warm_up(index)
    heads, kv_heads, head_dim = backend.num_heads, backend.num_kv_heads, backend.head_dim
    lengths = {1, block_size, 3 * block_size, 16 * block_size, 33 * block_size, max_model_len}
    batches = {1, 2, max(1, max_rows // 2), max_rows}
    # One block serves every row: the kernels read the same block over and over, in little memory.
    k_cache = torch.zeros(1, block_size, kv_heads, head_dim, dtype=dtype, device=device)
    v_cache = torch.zeros_like(k_cache)
    for batch in sorted(batches):
        q = torch.zeros(batch, heads, head_dim, dtype=dtype, device=device)
        kv = torch.zeros(batch, kv_heads, head_dim, dtype=dtype, device=device)
        backend.write_kv(kv, kv, k_cache, v_cache, torch.zeros(batch, dtype=torch.int64,
                                                                device=device))  # fmt: skip
        for length in sorted(n for n in lengths if n <= max_model_len):
            width = -(-length // block_size)
            tables = torch.zeros(batch, width, dtype=torch.int32, device=device)
            lens = torch.full((batch,), length, dtype=torch.int32, device=device)
            backend.decode(q, k_cache, v_cache, lens, tables, length)
    torch.cuda.synchronize(device)
    log.info("executor kernels warmed up for batches %s, contexts up to %d", sorted(batches),
             max_model_len)  # fmt: skip
