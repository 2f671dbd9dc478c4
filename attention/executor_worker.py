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
from collections.abc import Callable

import msgspec
import torch
import zmq

from attention.executor import AttentionExecutor, StepError
from engine.kv_cache import OutOfBlocksError
from transport.attention_channel import ChannelTimeout, ExecutorSideLink
from transport.kv_transfer import open_peer_pool
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

log = logging.getLogger(__name__)

HEARTBEAT_S = 0.5
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
        self.router.connect(router_address)
        self.steps = self.ctx.socket(zmq.ROUTER)
        self.steps.setsockopt(zmq.LINGER, 0)
        port = self.steps.bind_to_random_port(f"tcp://{bind_host}")
        self.address = f"tcp://{bind_host}:{port}"
        self.links: dict[str, ExecutorSideLink] = {}
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
        self.router.close(0)
        self.steps.close(0)
        self.ctx.term()

    def _heartbeat(self) -> None:
        now = time.monotonic()
        if now - self._last_heartbeat < HEARTBEAT_S:
            return
        self._last_heartbeat = now
        s = self.executor.stats() if self.executor else EMPTY_STATS
        self.router.send(
            encode(
                Register(
                    role="attention",
                    instance=self.instance,
                    pid=os.getpid(),
                    model=self.model_name,
                    max_model_len=self.max_model_len,
                    kv_endpoint=self.pool_endpoint,
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
            try:
                msg = decode(raw)
            except msgspec.DecodeError:
                log.error("dropping a malformed control message (%d bytes)", len(raw))
                continue
            if isinstance(msg, AttachPool):
                self._attach_pool(msg.kv_endpoint)
            elif isinstance(msg, ReserveDecode):
                self._on_adopt(msg)
            elif isinstance(msg, Abort):
                self._release(msg.request_id)
            elif isinstance(msg, Shutdown):
                self.stopping = True

    def _attach_pool(self, endpoint: dict) -> None:
        if self.executor is not None:
            return
        pool = open_peer_pool(endpoint, self.device)
        base, owned = int(endpoint["offload_base"]), int(endpoint["offload_blocks"])
        self.executor = self.make_executor(pool, base, owned)
        self.pool_endpoint = dict(endpoint)
        self._last_heartbeat = 0.0  # report the pool at once: the router waits for it
        log.info("working in %s's KV pool: blocks [%d, %d) are ours", self.colocated_with,
                 base, base + owned)  # fmt: skip

    def _on_adopt(self, msg: ReserveDecode) -> None:
        try:
            if self.executor is None:
                raise StepError("no pool attached yet")
            self.executor.adopt(msg.request_id, msg.lent_blocks, len(msg.prompt_token_ids))
        except (StepError, OutOfBlocksError) as exc:
            self.router.send(encode(DecodeReserved(msg.request_id, [], error=str(exc))))
            return
        self.router.send(encode(DecodeReserved(msg.request_id, msg.lent_blocks)))

    def _release(self, request_id: str) -> None:
        """Done with a request (finished, dropped, aborted): its lent blocks go back to the
        prefill worker through the router, now that no step of ours can write them."""
        if self.executor is not None:
            self.executor.release(request_id)
        # Acknowledged even for a request never adopted here, so its blocks are never stranded.
        self.router.send(encode(OffloadReleased(request_id)))

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
                link = open_executor_link(msg.link)
                # Keep heartbeating while a step waits on the decode worker.
                link.on_idle = self._heartbeat
                self.links[msg.decode_instance] = link
            elif isinstance(msg, AttentionStep):
                self._run_step(msg)
            elif isinstance(msg, ReleaseOffloaded):
                for request_id in msg.request_ids:
                    self._release(request_id)

    def _run_step(self, msg: AttentionStep) -> None:
        link = self.links.get(msg.decode_instance)
        if link is None or self.executor is None:
            log.error("step from %s, which attached no link", msg.decode_instance)
            return
        layers = self.executor.num_layers
        first_seq = msg.step_id * layers + 1
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
        self.executor.commit(msg.request_ids, msg.positions)


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
