"""A prefill or decode worker: one engine, one DEALER socket to the router, one data plane.

A single thread owns the engine. It drains control messages, runs an engine step whenever there
is work, and reports tokens; KV copies run on a side thread and report back through a queue, so
a slow transfer never stalls the batch. Heartbeats go out from a thread of their own, so a long
step never makes a live worker look dead. SIGTERM (or a Drain message) drains: the worker takes
nothing new, finishes what it has, then exits.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor

import msgspec
import zmq

from engine.engine import Handoff, LLMEngine, RequestOutput, Resume
from engine.sequence import InvalidRequestError, sampling_params
from server.roles.offload_client import OffloadClient
from transport.cuda_ipc_transfer import current_gpu_uuid
from transport.heartbeat import HeartbeatThread, SharedSocket, StepProgress, host_identity
from transport.kv_transfer import KVSender
from transport.kv_transfer_base import KVPoolHost
from transport.messages import (
    Abort,
    DecodeReserved,
    Drain,
    KVSent,
    Prefill,
    PromptLogprobs,
    Register,
    RequestError,
    ReserveDecode,
    SendKV,
    Shutdown,
    StartDecode,
    TokenOutput,
    WorkerStats,
    decode,
    encode,
)
from transport.security import (
    ClusterKey,
    report_handshake_failures,
    secure_client,
    set_frame_limit,
)

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 30.0
STATS_REFRESH_S = 0.1
# Test hook: "INSTANCE:N:S" makes that worker's N-th engine step (from 1) sleep S seconds
# first, to prove a worker stalled inside a step is not declared dead.
STALL_ENV = "ADRENALINE_TEST_STALL_STEP"


class Worker:
    def __init__(
        self,
        role: str,
        instance: str,
        engine: LLMEngine,
        router_address: str,
        model_name: str,
        kv_host: KVPoolHost | None = None,
        kv_sender: KVSender | None = None,
        offload: OffloadClient | None = None,
        drain_timeout_s: float = DRAIN_TIMEOUT_S,
        cluster_key: ClusterKey | None = None,
    ) -> None:
        assert role in ("prefill", "decode")
        self.role, self.instance, self.engine = role, instance, engine
        self.model_name = model_name
        self.kv_host, self.kv_sender = kv_host, kv_sender
        self.offload = offload
        self.ctx = zmq.Context()
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, instance.encode())
        sock.setsockopt(zmq.LINGER, 0)
        # Sends never block (see SharedSocket): with no high-water mark, a busy router delays
        # token outputs but never makes this worker drop one.
        sock.setsockopt(zmq.SNDHWM, 0)
        secure_client(sock, cluster_key)
        set_frame_limit(sock)
        sock.connect(router_address)
        if cluster_key is not None:
            report_handshake_failures(sock, f"the router at {router_address}")
        self.sock = SharedSocket(sock)
        self.stopping = False
        self.drain_timeout_s = drain_timeout_s
        self.drain_deadline: float | None = None  # set once draining
        self.dropped_messages = 0
        self.progress = StepProgress()
        self.host = host_identity()
        self.gpu_uuid = current_gpu_uuid()  # "" on CPU; peers pick CUDA IPC or NCCL by it
        self._stats = self._collect_stats()
        self._stats_at = 0.0
        self._heartbeats = HeartbeatThread(self._heartbeat)
        self._stall = _parse_stall(os.environ.get(STALL_ENV, ""), instance)
        # Prefill side: KV copies in flight, completed on the side thread.
        self._copier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-send")
        self._copies_done: queue.Queue[tuple[str, str | None]] = queue.Queue()
        # Decode side: request id -> (transfer id, data future, StartDecode seen).
        self._incoming: dict[str, list] = {}

    # Loop ---------------------------------------------------------------------------------

    def run(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.drain())
        log.info("%s %s serving", self.role, self.instance)
        self._heartbeats.start()
        try:
            while not self.stopping:
                self._refresh_stats()
                busy = self.engine.has_unfinished() or self._incoming
                if self.sock.poll(0 if busy else 50):
                    self._drain_socket()
                self._finish_copies()
                self._start_arrived()
                if self.engine.has_unfinished():
                    for out in self._step():
                        self._send_output(out)
                if self.drain_deadline is not None and self._drained():
                    self.stopping = True
        finally:
            self._heartbeats.stop()
            self.close()

    def _step(self) -> list[RequestOutput]:
        self.progress.begin()
        try:
            if self._stall and self.progress.steps_total + 1 == self._stall[0]:
                time.sleep(self._stall[1])
            return self.engine.step()
        finally:
            self.progress.end()

    def stop(self) -> None:
        self.stopping = True

    def drain(self) -> None:
        """Takes nothing new and exits once idle (or at the drain deadline, leaving what is
        left to the router, which migrates it); a second call stops at once."""
        if self.drain_deadline is not None:
            self.stop()
            return
        log.info("%s %s draining (at most %.0f s)", self.role, self.instance,
                 self.drain_timeout_s)  # fmt: skip
        self.drain_deadline = time.monotonic() + self.drain_timeout_s
        self._stats_at = 0.0

    def _drained(self) -> bool:
        # Held KV counts: a prefill worker's blocks may be lent to its executor, or mid-copy.
        idle = not self.engine.requests and not self._incoming and self._copies_done.empty()
        if idle:
            log.info("%s %s drained: exiting", self.role, self.instance)
        elif time.monotonic() > self.drain_deadline:
            log.warning("%s %s: drain timed out with %d requests; the router moves them",
                        self.role, self.instance, len(self.engine.requests))  # fmt: skip
            return True
        return idle

    def close(self) -> None:
        self._copier.shutdown(wait=False, cancel_futures=True)
        for closable in (self.kv_host, self.kv_sender, self.offload):
            if closable is not None:
                closable.close()
        self.sock.close()
        self.ctx.term()

    def _send(self, message) -> None:
        if not self.sock.send(encode(message)):
            log.warning("router unreachable: dropped a %s", type(message).__name__)

    def _collect_stats(self) -> WorkerStats:
        s = self.engine.stats()
        if self.offload is not None:
            s["offload_roundtrip_ms"] = round(self.offload.roundtrip_ms, 4)
        s["dropped_messages"] = self.dropped_messages
        return WorkerStats(**{k: s[k] for k in WorkerStats.__struct_fields__ if k in s})

    def _refresh_stats(self) -> None:
        # The heartbeat thread sends the latest snapshot; the engine is only read here.
        now = time.monotonic()
        if now - self._stats_at >= STATS_REFRESH_S:
            self._stats, self._stats_at = self._collect_stats(), now

    def _heartbeat(self) -> None:
        self._send(
            Register(
                role=self.role,
                instance=self.instance,
                pid=os.getpid(),
                model=self.model_name,
                max_model_len=self.engine.max_model_len,
                kv_endpoint=self.kv_host.endpoint if self.kv_host else {},
                stats=self._stats,
                progress=self.progress.snapshot(),
                draining=self.drain_deadline is not None,
                host=self.host,
                gpu_uuid=self.gpu_uuid,
            )
        )

    def _drain_socket(self) -> None:
        while (frames := self.sock.recv_nowait()) is not None:
            try:
                if len(frames) != 1:
                    raise ValueError(f"{len(frames)} frames")
                self._handle(decode(frames[0]))
            except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
                self._drop(f"malformed control message ({exc})")
            except Exception:
                self.dropped_messages += 1
                log.exception("%s %s failed handling a control message", self.role,
                              self.instance)  # fmt: skip

    def _drop(self, why: str) -> None:
        self.dropped_messages += 1
        if self.dropped_messages <= 10 or self.dropped_messages % 1000 == 0:
            log.error("%s %s dropped a %s (%d so far)", self.role, self.instance, why,
                      self.dropped_messages)  # fmt: skip

    def _handle(self, msg) -> None:
        if isinstance(msg, Prefill):
            self._on_prefill(msg)
        elif isinstance(msg, SendKV):
            self._on_send_kv(msg)
        elif isinstance(msg, ReserveDecode):
            self._on_reserve(msg)
        elif isinstance(msg, StartDecode):
            self._on_start(msg)
        elif isinstance(msg, Abort):
            self._on_abort(msg.request_id)
        elif isinstance(msg, Shutdown):
            self.stop()
        elif isinstance(msg, Drain):
            self.drain()
        else:
            self._drop(f"{type(msg).__name__}, unexpected on a {self.role} worker")

    # Prefill side ---------------------------------------------------------------------------

    def _on_prefill(self, msg: Prefill) -> None:
        resume = None
        if msg.output_token_ids:
            resume = Resume(msg.output_token_ids, msg.output_logprobs, msg.text_sent)
        try:
            params = sampling_params(msg.sampling)
            self.engine.add_request(
                msg.request_id, msg.prompt_token_ids, params, handoff=True, resume=resume
            )
        except InvalidRequestError as exc:
            self._send(RequestError(msg.request_id, str(exc), status=400))

    def _on_send_kv(self, msg: SendKV) -> None:
        try:
            src = self.engine.held_block_table(msg.request_id)
            if not 0 <= msg.first_block <= len(src):
                raise KeyError(f"first_block {msg.first_block} outside its {len(src)} blocks")
        except KeyError as exc:
            self._send(KVSent(msg.request_id, error=str(exc)))
            return
        src = src[msg.first_block :]  # the decode worker holds the blocks before it already
        assert self.kv_sender is not None, "a prefill worker has a KV sender"
        # The decode side also reserved room for the first token, which may need one more
        # block than the prompt's KV fills; only the prompt's blocks are copied.
        dst = msg.dst_block_ids[: len(src)]
        future = self._copier.submit(
            self.kv_sender.send, msg.transfer_id, msg.kv_endpoint, src, dst
        )
        future.add_done_callback(
            lambda f, rid=msg.request_id: self._copies_done.put((rid, _error_text(f)))
        )

    def _finish_copies(self) -> None:
        while True:
            try:
                request_id, error = self._copies_done.get_nowait()
            except queue.Empty:
                return
            # The copy is complete (or failed): either way the prefill KV is no longer needed.
            self.engine.release(request_id)
            self._send(KVSent(request_id, error=error))

    # Decode side ----------------------------------------------------------------------------

    def _on_reserve(self, msg: ReserveDecode) -> None:
        if msg.executor:
            self._on_offloaded(msg)
            return
        assert self.kv_host is not None, "a decode worker hosts a KV pool"
        try:
            table, shared = self.engine.reserve_prefilled_sharing(msg.request_id, handoff_of(msg))
        except Exception as exc:  # out of blocks or a bad request: the router decides
            self._send(DecodeReserved(msg.request_id, [], error=str(exc)))
            return
        block_ids = table[shared:]  # the leading `shared` blocks hold this prompt's KV already
        arrival = self.kv_host.expect(msg.transfer_id, msg.prefill_instance, block_ids)
        self._incoming[msg.request_id] = [msg.transfer_id, arrival, False]
        self._send(DecodeReserved(msg.request_id, block_ids, first_block=shared))

    def _on_offloaded(self, msg: ReserveDecode) -> None:
        """The KV is already in the executor's pool: start decoding at once."""
        assert self.offload is not None, "this decode worker takes no offloaded requests"
        try:
            self.offload.connect(msg.executor, msg.executor_address, msg.executor_gpu_uuid)
            self.engine.start_offloaded(msg.request_id, handoff_of(msg), msg.executor)
        except Exception as exc:
            self._send(RequestError(msg.request_id, f"cannot decode offloaded: {exc}", 503))

    def _on_start(self, msg: StartDecode) -> None:
        entry = self._incoming.get(msg.request_id)
        if entry is None:
            return
        entry[2] = True
        self.kv_host.mark_sent(entry[0])

    def _start_arrived(self) -> None:
        for request_id, (_, arrival, started) in list(self._incoming.items()):
            if not (started and arrival.done()):
                continue
            del self._incoming[request_id]
            error = _error_text(arrival)
            if error is None:
                self.engine.start_prefilled(request_id)
            else:
                self.engine.abort(request_id)
                self._send(RequestError(request_id, f"KV transfer failed: {error}", status=503))

    def _on_abort(self, request_id: str) -> None:
        entry = self._incoming.pop(request_id, None)
        if entry is not None:
            self.kv_host.cancel(entry[0])
        self.engine.abort(request_id)

    # Outputs --------------------------------------------------------------------------------

    def _send_output(self, out: RequestOutput) -> None:
        new = len(out.new_token_ids)
        self._send(
            TokenOutput(
                request_id=out.request_id,
                token_ids=out.new_token_ids,
                text=out.new_text,
                finished=out.finished,
                finish_reason=out.finish_reason,
                logprobs=out.logprobs[-new:] if out.logprobs and new else None,
                prompt_tokens=len(out.prompt_token_ids),
                top_logprobs=out.top_logprobs[-new:] if out.top_logprobs and new else None,
                prompt_logprobs=wire_prompt_logprobs(out),
                handoff=out.handoff,
                block_table=self.engine.held_block_table(out.request_id) if out.handoff else None,
            )
        )


def wire_prompt_logprobs(out: RequestOutput) -> PromptLogprobs | None:
    """The prompt's logprobs, on the output that carries the request's first token."""
    if out.prompt_logprobs is None or len(out.new_token_ids) != len(out.token_ids):
        return None
    logprobs, ranks, top = zip(*out.prompt_logprobs) if out.prompt_logprobs else ((), (), ())
    return PromptLogprobs(list(logprobs), list(ranks), list(top))


def handoff_of(msg: ReserveDecode) -> Handoff:
    return Handoff(
        prompt_token_ids=msg.prompt_token_ids,
        output_token_ids=msg.output_token_ids,
        output_logprobs=msg.output_logprobs,
        params=sampling_params(msg.sampling),
        text_sent=msg.text_sent,
    )


def _parse_stall(spec: str, instance: str) -> tuple[int, float] | None:
    if not spec:
        return None
    name, step, seconds = spec.rsplit(":", 2)
    return (int(step), float(seconds)) if name == instance else None


def _error_text(future: Future) -> str | None:
    if future.cancelled():
        return "cancelled"
    exc = future.exception()
    return None if exc is None else f"{type(exc).__name__}: {exc}"
