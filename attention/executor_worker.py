"""The attention executor's process: registers with the router next to its prefill worker,
takes reservations and KV from the control plane, and serves decode workers' steps.

One thread. Router messages are handled between steps; a step runs all its layers back to
back, each waiting on the decode worker's per-layer signal, never on a socket.
"""

from __future__ import annotations

import logging
import os
import signal
import time

import msgspec
import zmq

from attention.executor import AttentionExecutor, StepError
from engine.kv_cache import OutOfBlocksError
from transport.attention_channel import ChannelTimeout, ExecutorSideLink
from transport.kv_transfer import KVPoolHost
from transport.messages import (
    Abort,
    AttachLink,
    AttentionStep,
    DecodeReserved,
    Register,
    ReleaseOffloaded,
    ReserveDecode,
    Shutdown,
    StartDecode,
    WorkerStats,
    decode,
    encode,
)

log = logging.getLogger(__name__)

HEARTBEAT_S = 0.5
LAYER_TIMEOUT_S = 5.0
READY_WAIT_S = 5.0


class ExecutorWorker:
    def __init__(
        self,
        instance: str,
        colocated_with: str,
        executor: AttentionExecutor,
        pool_host: KVPoolHost,
        router_address: str,
        bind_host: str,
        model_name: str,
        max_model_len: int,
    ) -> None:
        self.instance, self.colocated_with = instance, colocated_with
        self.executor, self.pool_host = executor, pool_host
        self.model_name, self.max_model_len = model_name, max_model_len
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.DEALER)
        self.router.setsockopt(zmq.IDENTITY, instance.encode())
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.connect(router_address)
        self.steps = self.ctx.socket(zmq.ROUTER)
        self.steps.setsockopt(zmq.LINGER, 0)
        port = self.steps.bind_to_random_port(f"tcp://{bind_host}")
        self.address = f"tcp://{bind_host}:{port}"
        self.links: dict[str, ExecutorSideLink] = {}
        self.transfers: dict[str, int] = {}
        self.stopping = False
        self._last_heartbeat = 0.0

    def run(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: setattr(self, "stopping", True))
        log.info("attention executor %s beside %s; steps on %s", self.instance,
                 self.colocated_with, self.address)  # fmt: skip
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.steps, zmq.POLLIN)
        try:
            while not self.stopping:
                self._heartbeat()
                events = dict(poller.poll(50))
                if self.router in events:
                    self._drain_router()
                if self.steps in events:
                    self._drain_steps()
        finally:
            self.close()

    def close(self) -> None:
        for link in self.links.values():
            link.close()
        self.pool_host.close()
        self.router.close(0)
        self.steps.close(0)
        self.ctx.term()

    def _heartbeat(self) -> None:
        now = time.monotonic()
        if now - self._last_heartbeat < HEARTBEAT_S:
            return
        self._last_heartbeat = now
        s = self.executor.stats()
        self.router.send(
            encode(
                Register(
                    role="attention",
                    instance=self.instance,
                    pid=os.getpid(),
                    model=self.model_name,
                    max_model_len=self.max_model_len,
                    kv_endpoint=self.pool_host.endpoint,
                    stats=WorkerStats(**{k: s[k] for k in WorkerStats.__struct_fields__ if k in s}),
                    colocated_with=self.colocated_with,
                    attention_address=self.address,
                )
            )
        )

    # Control plane --------------------------------------------------------------------------

    def _drain_router(self) -> None:
        while True:
            try:
                raw = self.router.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            msg = decode(raw)
            if isinstance(msg, ReserveDecode):
                self._on_reserve(msg)
            elif isinstance(msg, StartDecode):
                transfer_id = self.transfers.pop(msg.request_id, None)
                if transfer_id is not None:
                    self.pool_host.mark_sent(transfer_id)
                self.executor.mark_ready(msg.request_id)
            elif isinstance(msg, Abort):
                self._release(msg.request_id)
            elif isinstance(msg, Shutdown):
                self.stopping = True

    def _on_reserve(self, msg: ReserveDecode) -> None:
        try:
            block_ids = self.executor.reserve(msg.request_id, len(msg.prompt_token_ids))
        except (StepError, OutOfBlocksError) as exc:
            self.router.send(encode(DecodeReserved(msg.request_id, [], error=str(exc))))
            return
        self.pool_host.expect(msg.transfer_id, msg.prefill_instance, block_ids)
        self.transfers[msg.request_id] = msg.transfer_id
        self.router.send(encode(DecodeReserved(msg.request_id, block_ids)))

    def _release(self, request_id: str) -> None:
        transfer_id = self.transfers.pop(request_id, None)
        if transfer_id is not None:
            self.pool_host.cancel(transfer_id)
        self.executor.release(request_id)

    # Decode steps ---------------------------------------------------------------------------

    def _drain_steps(self) -> None:
        while True:
            # A busy decode worker always has its next step queued: keep heartbeating and
            # serving the router between steps, or this loop would starve both.
            self._heartbeat()
            self._drain_router()
            try:
                _, raw = self.steps.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = decode(raw)
            except msgspec.DecodeError:
                log.error("dropping a malformed step message")
                continue
            if isinstance(msg, AttachLink):
                old = self.links.pop(msg.decode_instance, None)
                if old is not None:
                    old.close()
                self.links[msg.decode_instance] = open_executor_link(msg.link)
            elif isinstance(msg, AttentionStep):
                self._run_step(msg)
            elif isinstance(msg, ReleaseOffloaded):
                for request_id in msg.request_ids:
                    self._release(request_id)

    def _run_step(self, msg: AttentionStep) -> None:
        link = self.links.get(msg.decode_instance)
        if link is None:
            log.error("step from %s, which attached no link", msg.decode_instance)
            return
        layers = self.executor.num_layers
        first_seq = msg.step_id * layers + 1
        self._await_ready(msg.request_ids)
        # GPU and P2P links take the step's rows ahead; a GPU link enqueues every layer without
        # a host wait and syncs once, in check(), at the step's end.
        begin_step = getattr(link, "begin_step", None)
        if begin_step is not None:
            begin_step(msg.step_id, len(msg.request_ids), first_seq)
        try:
            step = self.executor.prepare(msg.request_ids, msg.positions)
        except (StepError, OutOfBlocksError) as exc:
            log.warning("refusing step %d of %s: %s", msg.step_id, msg.decode_instance, exc)
            link.refuse(msg.step_id, first_seq + layers - 1)
            return
        try:
            for layer in range(layers):
                q, k, v = link.receive(first_seq + layer, LAYER_TIMEOUT_S)
                started = time.perf_counter()
                out = self.executor.attend(layer, step, q, k, v)
                self.executor.record_attention(time.perf_counter() - started)
                link.respond(first_seq + layer, out)
            if begin_step is not None:
                link.check()
        except ChannelTimeout:
            # The decode worker died or gave up on this step: its KV for it is incomplete.
            log.warning("decode worker %s stopped mid-step %d", msg.decode_instance, msg.step_id)
            return
        self.executor.commit(msg.request_ids)

    def _await_ready(self, request_ids: list[str]) -> None:
        """A request's StartDecode (router) may trail the decode worker's first step."""
        deadline = time.monotonic() + READY_WAIT_S
        while any(r not in self.executor.ready for r in request_ids):
            if time.monotonic() > deadline:
                return  # prepare() refuses the step
            if self.router.poll(10):
                self._drain_router()


def open_executor_link(endpoint: dict):
    """The executor's end of a decode worker's link, by the endpoint's kind."""
    kind = str(endpoint.get("kind", "shm"))
    if kind == "cuda_ipc":
        from transport.cuda_attention_channel import CudaExecutorSideLink

        return CudaExecutorSideLink(endpoint)
    if kind in ("gloo", "nccl"):
        from transport.nccl_attention_channel import P2PExecutorSideLink

        return P2PExecutorSideLink(endpoint)
    return ExecutorSideLink(endpoint)
