"""A prefill or decode worker: one engine, one DEALER socket to the router, one data plane.

A single thread owns the engine. It drains control messages, runs an engine step whenever there
is work, and reports tokens; KV copies run on a side thread and report back through a queue, so
a slow transfer never stalls the batch.
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

from engine.engine import Handoff, LLMEngine, RequestOutput
from engine.sequence import InvalidRequestError, sampling_params
from server.offload_client import OffloadClient
from transport.kv_transfer import KVPoolHost, KVSender
from transport.messages import (
    Abort,
    DecodeReserved,
    KVSent,
    Prefill,
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

log = logging.getLogger(__name__)

HEARTBEAT_S = 0.5


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
    ) -> None:
        assert role in ("prefill", "decode")
        self.role, self.instance, self.engine = role, instance, engine
        self.model_name = model_name
        self.kv_host, self.kv_sender = kv_host, kv_sender
        self.offload = offload
        if offload is not None:
            offload.on_idle = self._heartbeat
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, instance.encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(router_address)
        self.stopping = False
        self._last_heartbeat = 0.0
        # Prefill side: KV copies in flight, completed on the side thread.
        self._copier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-send")
        self._copies_done: queue.Queue[tuple[str, str | None]] = queue.Queue()
        # Decode side: request id -> (transfer id, data future, StartDecode seen).
        self._incoming: dict[str, list] = {}

    # Loop ---------------------------------------------------------------------------------

    def run(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.stop())
        log.info("%s %s serving; router at %s", self.role, self.instance, self.sock.LAST_ENDPOINT)
        try:
            while not self.stopping:
                self._heartbeat()
                busy = self.engine.has_unfinished() or self._incoming
                if self.sock.poll(0 if busy else 50):
                    self._drain_socket()
                self._finish_copies()
                self._start_arrived()
                if self.engine.has_unfinished():
                    for out in self.engine.step():
                        self._send_output(out)
        finally:
            self.close()

    def stop(self) -> None:
        self.stopping = True

    def close(self) -> None:
        self._copier.shutdown(wait=False, cancel_futures=True)
        for closable in (self.kv_host, self.kv_sender, self.offload):
            if closable is not None:
                closable.close()
        self.sock.close(0)
        self.ctx.term()

    def _send(self, message) -> None:
        self.sock.send(encode(message))

    def _heartbeat(self) -> None:
        now = time.monotonic()
        if now - self._last_heartbeat < HEARTBEAT_S:
            return
        self._last_heartbeat = now
        s = self.engine.stats()
        if self.offload is not None:
            s["offload_roundtrip_ms"] = round(self.offload.roundtrip_ms, 4)
        self._send(
            Register(
                role=self.role,
                instance=self.instance,
                pid=os.getpid(),
                model=self.model_name,
                max_model_len=self.engine.max_model_len,
                kv_endpoint=self.kv_host.endpoint if self.kv_host else {},
                stats=WorkerStats(**{k: s[k] for k in WorkerStats.__struct_fields__ if k in s}),
            )
        )

    def _drain_socket(self) -> None:
        while True:
            try:
                raw = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self._handle(decode(raw))
            except msgspec.DecodeError:
                log.error("dropping a malformed control message (%d bytes)", len(raw))

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
        else:
            log.warning("unexpected %s on a %s worker", type(msg).__name__, self.role)

    # Prefill side ---------------------------------------------------------------------------

    def _on_prefill(self, msg: Prefill) -> None:
        try:
            params = sampling_params(msg.sampling)
            self.engine.add_request(msg.request_id, msg.prompt_token_ids, params, handoff=True)
        except InvalidRequestError as exc:
            self._send(RequestError(msg.request_id, str(exc), status=400))

    def _on_send_kv(self, msg: SendKV) -> None:
        try:
            src = self.engine.held_block_table(msg.request_id)
        except KeyError as exc:
            self._send(KVSent(msg.request_id, error=str(exc)))
            return
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
            block_ids = self.engine.reserve_prefilled(msg.request_id, handoff_of(msg))
        except Exception as exc:  # out of blocks or a bad request: the router decides
            self._send(DecodeReserved(msg.request_id, [], error=str(exc)))
            return
        arrival = self.kv_host.expect(msg.transfer_id, msg.prefill_instance, block_ids)
        self._incoming[msg.request_id] = [msg.transfer_id, arrival, False]
        self._send(DecodeReserved(msg.request_id, block_ids))

    def _on_offloaded(self, msg: ReserveDecode) -> None:
        """The KV is already in the executor's pool: start decoding at once."""
        assert self.offload is not None, "this decode worker takes no offloaded requests"
        try:
            self.offload.connect(msg.executor, msg.executor_address)
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
                handoff=out.handoff,
                block_table=self.engine.held_block_table(out.request_id) if out.handoff else None,
                # A handed-off request has sent exactly one output: this one.
                text_sent=len(out.new_text) if out.handoff else 0,
                generator_state=out.generator_state,
            )
        )


def handoff_of(msg: ReserveDecode) -> Handoff:
    return Handoff(
        prompt_token_ids=msg.prompt_token_ids,
        first_token=msg.first_token,
        first_logprob=msg.first_logprob,
        params=sampling_params(msg.sampling),
        generator_state=msg.generator_state,
        text_sent=msg.text_sent,
    )


def _error_text(future: Future) -> str | None:
    if future.cancelled():
        return "cancelled"
    exc = future.exception()
    return None if exc is None else f"{type(exc).__name__}: {exc}"
