"""The router's core: admission, and each request's walk from a prefill worker through the KV
hand-off to a decode worker (see transport/messages.py), with the workers' liveness kept by
`server.router.worker_registry`. A request whose worker dies, gets stuck or fails its hand-off is
migrated: a prefill worker recomputes its prompt and the tokens generated so far and decoding
goes on elsewhere, the client's stream unbroken.

Everything runs on the asyncio loop of the HTTP server: one ROUTER socket, one receive task,
one housekeeping task. Callers see a request as an async iterator of `TokenOutput`. Messages
about a request are believed only from the workers it was placed on.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import msgspec
import zmq
import zmq.asyncio

from engine.sequence import InvalidRequestError, sampling_params
from engine.tokenizer import Tokenizer
from scheduler.offload_policy import NeverOffload, OffloadPolicy
from scheduler.placement import WorkerLoad, pick_prefill
from scheduler.routing import place_decode, tally, worker_loads
from server.router.generation import Overloaded, Unavailable
from server.router.metrics import RouterMetrics, offload_now
from server.router.worker_registry import RegistrationRefused, WorkerInfo, WorkerRegistry
from transport.messages import (
    Abort,
    AttachPool,
    DecodeReserved,
    Drain,
    KVSent,
    OffloadReleased,
    Prefill,
    Register,
    RequestError,
    ReserveDecode,
    SamplingSpec,
    SendKV,
    Shutdown,
    StartDecode,
    TokenOutput,
    decode,
    encode,
)
from transport.security import ClusterKey, secure_server, set_frame_limit, start_authenticator

log = logging.getLogger(__name__)

HANDOFF_TIMEOUT_S = 60.0  # first token to decoding: reservations, KV copy
MAX_MIGRATIONS = 3
STUCK_TIMEOUT_S = 120.0
HOUSEKEEPING_S = 0.02
# Housekeeping this late means the router itself did not run (a paused VM, a starved process).
ROUTER_STALL_S = 0.5


@dataclass
class RouterRequest:
    request_id: str  # on the wire: the client's id, with a suffix once migrated
    prompt_token_ids: list[int]
    sampling: SamplingSpec
    outputs: asyncio.Queue
    prefill: str
    client_id: str = ""  # the id the caller knows, for metrics and logs
    phase: str = "prefill"  # prefill -> reserving -> transferring -> decoding -> done
    decode: str | None = None
    executor: str | None = None  # set when offloaded: it holds the KV, the decode worker none
    index: int = 0  # arrival order, for the offload policy
    first: TokenOutput | None = None
    transfer_id: int = 0
    reserve_blocks: int = 0
    retry_at: float = 0.0
    deadline: float = field(default_factory=lambda: time.monotonic() + 60.0)
    # What the client has been sent: enough to continue the request on other workers.
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    text_sent: int = 0
    migrations: int = 0

    def __post_init__(self) -> None:
        self.client_id = self.client_id or self.request_id

    @property
    def prompt_tokens(self) -> int:  # what scheduler.routing's books count
        return len(self.prompt_token_ids)


class Router:
    def __init__(
        self,
        model_name: str,
        tokenizer: Tokenizer,
        control_address: str,
        expect_prefill: int = 1,
        expect_decode: int = 1,
        max_pending: int = 512,
        heartbeat_timeout_s: float = 3.0,
        block_size: int = 16,
        offload_policy: OffloadPolicy | None = None,
        expect_attention: int = 0,
        max_migrations: int = MAX_MIGRATIONS,
        stuck_timeout_s: float = STUCK_TIMEOUT_S,
        cluster_key: ClusterKey | None = None,
    ) -> None:
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.control_address = control_address
        self.expect = {
            "prefill": expect_prefill, "decode": expect_decode, "attention": expect_attention
        }  # fmt: skip
        self.offload_policy = offload_policy or NeverOffload()
        self._arrivals = itertools.count()
        self.max_pending = max_pending
        self.block_size = block_size
        self.max_migrations = max_migrations
        self.registry = WorkerRegistry(heartbeat_timeout_s, stuck_timeout_s)
        self.workers = self.registry.workers
        self.requests: dict[str, RouterRequest] = {}
        self.admitting = True  # False once the whole deployment drains
        self.dropped_messages = 0
        # Ended requests whose KV copy may still be writing into a decode worker's blocks: that
        # worker must not free them until the prefill worker reports KVSent. Request id ->
        # (prefill worker, decode worker): the request itself may have moved on since.
        self.copies_in_flight: dict[str, tuple[str, str]] = {}
        # Offloaded requests whose prompt blocks their prefill worker lent to its executor:
        # request id -> (prefill worker, executor). The blocks go back once the executor says
        # it is done with them (OffloadReleased), or dies.
        self.lent: dict[str, tuple[str, str]] = {}
        self.counters = {
            "finished": 0, "aborted": 0, "failed": 0, "offloaded": 0, "migrated": 0
        }  # fmt: skip
        self.assigned: dict[str, int] = {}
        self._transfer_ids = itertools.count(1)
        self._tasks: list[asyncio.Task] = []
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.SNDHWM, 0)  # a burst of prefills queues; it is never refused
        # Without a key this refuses a control address beyond loopback (InsecureBindError).
        secure_server(self.sock, cluster_key, control_address)
        set_frame_limit(self.sock)
        self.cluster_key = cluster_key
        self._auth = None  # the ZAP handler; it needs the event loop, so it starts in start()
        self.metrics = RouterMetrics(self)

    # Lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        self._auth = start_authenticator(self.ctx, self.cluster_key)
        self.sock.bind(self.control_address)
        self._tasks = [
            asyncio.create_task(self._receive_loop(), name="router-receive"),
            asyncio.create_task(self._housekeeping_loop(), name="router-housekeeping"),
        ]
        log.info("router control plane on %s", self.control_address)

    async def stop(self, shutdown_workers: bool = False) -> None:
        if shutdown_workers:
            for w in self.workers.values():
                self._send(w.instance, Shutdown())
        for task in self._tasks:
            task.cancel()
        self.sock.close(0)
        if self._auth is not None:
            self._auth.stop()
        self.ctx.term()

    @property
    def max_model_len(self) -> int:
        lens = [w.registration.max_model_len for w in self.workers.values() if w.alive]
        return min(lens) if lens else 0

    def health(self) -> tuple[bool, str]:
        missing = [] if self.admitting else ["draining"]
        for role, wanted in self.expect.items():
            # An executor is ready once it works in its prefill worker's pool.
            ready = sum(
                1 for w in self.registry.of_role(role)
                if w.alive and (role != "attention" or bool(w.registration.kv_endpoint))
            )  # fmt: skip
            if ready < wanted:
                missing.append(f"{role}: {ready} of {wanted} alive")
        stuck = [w.instance for w in self.workers.values() if w.alive and w.stuck]
        if stuck:
            missing.append(f"stuck: {', '.join(sorted(stuck))}")
        return (not missing, "; ".join(missing) or "ok")

    # Draining ------------------------------------------------------------------------------

    def drain(self, instance: str | None = None) -> None:
        """Drains one worker (it finishes its requests, takes nothing new, exits), or with no
        instance the whole deployment: new requests get 503, those in flight finish."""
        if instance is None:
            self.admitting = False
            log.info("draining: new requests are refused, %d in flight finish",
                     len(self.requests))  # fmt: skip
            return
        worker = self.workers.get(instance)
        if worker is None:
            raise KeyError(instance)
        worker.draining = True
        self._send(instance, Drain())

    def stats(self) -> dict:
        now = time.monotonic()
        offloaded_now, decoding = offload_now(self.requests.values())
        return {
            "model": self.model_name,
            "workers": {i: w.as_json(now) for i, w in sorted(self.workers.items())},
            "offload_policy": self.offload_policy.name,
            "draining": not self.admitting,
            "dropped_messages": self.dropped_messages,
            "requests": {
                "active": len(self.requests),
                "by_phase": _count_phases(self.requests.values()),
                **self.counters,
                "decoding": decoding,
                "offloaded_now": offloaded_now,
                "offload_ratio": round(offloaded_now / decoding, 4) if decoding else 0.0,
                **self.metrics.outcome_summary(),
            },
            "latency": self.metrics.latency_summary(),
        }

    # Requests -------------------------------------------------------------------------------

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingSpec,
        near: str | None = None,
    ) -> AsyncIterator[TokenOutput]:
        """`near`: a request with the same prompt (an earlier choice of an n > 1 request); its
        prefill worker, while alive, has the prompt's full blocks in its prefix cache."""
        try:
            self._admit(request_id, prompt_token_ids, sampling)
            sibling = self.requests.get(near) if near is not None else None
            prefer = sibling.prefill if sibling is not None else None
            prefill = pick_prefill(self._loads("prefill"), prefer=prefer)
            if prefill is None:
                raise Unavailable("no live prefill worker")
            if sampling.temperature > 0 and sampling.seed is None:
                # Fixed here, so that every worker the request visits draws the same stream.
                sampling = msgspec.structs.replace(sampling, seed=random.getrandbits(63))
            first_message = encode(Prefill(request_id, prompt_token_ids, sampling))
        except Exception as exc:
            self.metrics.request_rejected(exc)
            if isinstance(exc, (OverflowError, TypeError, ValueError)) and not isinstance(
                exc, InvalidRequestError
            ):
                raise InvalidRequestError(f"the request cannot be encoded: {exc}") from exc
            raise
        if not self._send_raw(prefill, first_message):
            self.metrics.request_rejected(Unavailable(prefill))
            raise Unavailable(f"prefill worker {prefill} cannot be reached; retry shortly")
        # Registered only once sent: no failure before this line leaves it behind, and no
        # reply can come in before it (the receive task runs only when this one awaits).
        self.assigned[prefill] = self.assigned.get(prefill, 0) + 1
        req = RouterRequest(
            request_id, prompt_token_ids, sampling, asyncio.Queue(), prefill,
            index=next(self._arrivals),
        )  # fmt: skip
        self.requests[request_id] = req
        self.metrics.request_arrived(request_id)
        try:
            while True:
                item = await req.outputs.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            if req.phase != "done":
                self.counters["aborted"] += 1
                self.metrics.request_aborted(req.client_id)
                self._abort_everywhere(req)
            self.requests.pop(req.request_id, None)

    def _admit(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingSpec) -> None:
        sampling_params(sampling)  # raises InvalidRequestError before any worker sees it
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        if not prompt_token_ids:
            raise InvalidRequestError("the prompt is empty")
        limit = self.max_model_len
        if limit and len(prompt_token_ids) >= limit:
            raise InvalidRequestError(
                f"the prompt has {len(prompt_token_ids)} tokens; this model's context length is "
                f"{limit} tokens, leaving no room to generate"
            )
        if not self.admitting:
            raise Unavailable("the server is draining; it takes no new requests")
        if len(self.requests) >= self.max_pending:
            raise Overloaded(f"{len(self.requests)} requests in flight; retry shortly")

    def _abort_everywhere(self, req: RouterRequest) -> None:
        if req.request_id in self.lent:
            # The executor may be mid-step on the lent blocks: it frees them, then tells us.
            # While decoding, the decode worker's release reaches it behind that worker's own
            # queued steps (which still name the request); otherwise we tell it directly.
            decode = self.workers.get(req.decode) if req.decode else None
            if req.phase == "decoding" and decode is not None and decode.alive:
                self._send(req.decode, Abort(req.request_id))
            else:
                self._send(req.executor, Abort(req.request_id))
            req.phase = "done"
            return
        self._send(req.prefill, Abort(req.request_id))
        if req.phase == "transferring":
            # The KV copy may still be writing into the target's blocks: free them after it.
            self.copies_in_flight[req.request_id] = (req.prefill, req.decode)
        elif req.decode is not None:
            self._send(req.decode, Abort(req.request_id))
        req.phase = "done"

    def _finish(self, req: RouterRequest, error: BaseException | None = None) -> None:
        if error is not None:
            self.counters["failed"] += 1
            self.metrics.request_failed(req.client_id, error)
            self._abort_everywhere(req)
            req.outputs.put_nowait(error)
        else:
            self.counters["finished"] += 1
            self.metrics.request_finished(req.client_id)
            req.phase = "done"

    def _migrate(self, req: RouterRequest, reason: str) -> None:
        """Continues a request whose worker was lost (`reason`) on live ones: a prefill worker
        recomputes the KV of its prompt and of the tokens it generated, then hands it off as
        usual. The client's stream goes on where it was; greedy output is unchanged."""
        if req.migrations >= self.max_migrations:
            self._finish(req, Unavailable(f"{reason}; gave up after {req.migrations} migrations"))
            return
        prefill = pick_prefill(self._loads("prefill"))
        if prefill is None:
            self._finish(req, Unavailable(f"{reason}; no live prefill worker to continue on"))
            return
        self._abort_everywhere(req)  # the old attempt, on whichever of its workers still live
        log.info("migrating %s to %s after %d tokens: %s", req.client_id, prefill,
                 len(req.output_token_ids), reason)  # fmt: skip
        self.requests.pop(req.request_id, None)
        req.migrations += 1
        self.counters["migrated"] += 1
        # A fresh wire id: late news from the old attempt can never be taken for the new one.
        req.request_id = f"{req.client_id}~m{req.migrations}"
        self.requests[req.request_id] = req
        req.phase, req.prefill, req.decode, req.executor = "prefill", prefill, None, None
        req.first, req.retry_at = None, 0.0
        self.assigned[prefill] = self.assigned.get(prefill, 0) + 1
        sent = self._send(
            prefill,
            Prefill(
                req.request_id, req.prompt_token_ids, req.sampling,
                output_token_ids=list(req.output_token_ids),
                output_logprobs=list(req.output_logprobs) if req.sampling.logprobs else None,
                text_sent=req.text_sent,
            ),
        )  # fmt: skip
        if not sent:
            self._finish(req, Unavailable(f"{reason}; {prefill} cannot be reached either"))

    # Control plane --------------------------------------------------------------------------

    def _send(self, instance: str, message) -> bool:
        return self._send_raw(instance, encode(message))

    def _send_raw(self, instance: str, data: bytes) -> bool:
        """Whether the message left; a peer that is gone surfaces here (ROUTER_MANDATORY)."""
        worker = self.workers.get(instance)
        if worker is None:
            return False
        try:
            sent = self.sock.send_multipart([worker.identity, data], flags=zmq.NOBLOCK)
        except (zmq.Again, zmq.ZMQError) as exc:
            log.warning("cannot reach %s (%s); it will be marked dead", instance, exc)
            return False
        sent.add_done_callback(lambda f, who=instance: _log_send_failure(f, who))
        return True

    async def _receive_loop(self) -> None:
        while True:
            try:
                frames = await self.sock.recv_multipart()
            except asyncio.CancelledError:
                raise
            except zmq.ZMQError as exc:
                if self.sock.closed:
                    return
                log.error("control socket receive failed: %s", exc)
                await asyncio.sleep(0.01)
                continue
            try:
                self._on_frames(frames)
            except Exception:  # never let one message end the loop
                self.dropped_messages += 1
                log.exception("router failed handling a control message")

    def _on_frames(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            self._drop(f"message of {len(frames)} frames")
            return
        identity, raw = frames
        try:
            msg = decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self._drop(f"malformed message from {identity[:64]!r}: {exc}")
            return
        self._dispatch(identity, msg)

    def _drop(self, why: str) -> None:
        self.dropped_messages += 1
        if self.dropped_messages <= 20 or self.dropped_messages % 1000 == 0:
            log.warning("dropped a control message (%d so far): %s", self.dropped_messages, why)

    def _dispatch(self, identity: bytes, msg) -> None:
        if isinstance(msg, Register):
            self._on_register(identity, msg)
            return
        sender = self.registry.sender(identity)
        if sender is None or not sender.alive:
            self._drop(f"{type(msg).__name__} from unregistered {identity[:64]!r}")
            return
        request_id = getattr(msg, "request_id", None)
        if not isinstance(request_id, str):
            self._drop(f"{type(msg).__name__} from {sender.instance}, unexpected at the router")
            return
        if isinstance(msg, OffloadReleased):
            lent = self.lent.get(request_id)
            if lent is not None and lent[1] == sender.instance:
                self._return_lent(request_id)
            return
        copy = self.copies_in_flight.get(request_id)
        if isinstance(msg, KVSent) and copy is not None:
            if copy[0] == sender.instance:
                self._send(self.copies_in_flight.pop(request_id)[1], Abort(request_id))
            return
        req = self.requests.get(request_id)
        if req is None or req.phase == "done":
            return  # late news about a request that already ended
        if not self._speaks_for(req, sender.instance, msg):
            self._drop(f"{type(msg).__name__} about {request_id} from {sender.instance}, "
                       "which does not hold it")  # fmt: skip
            return
        if isinstance(msg, TokenOutput):
            self._on_tokens(req, msg)
        elif isinstance(msg, DecodeReserved):
            self._on_reserved(req, msg)
        elif isinstance(msg, KVSent):
            self._on_kv_sent(req, msg)
        elif isinstance(msg, RequestError):
            if msg.status == 400:
                self._finish(req, InvalidRequestError(msg.message))
            else:
                self._migrate(req, f"{sender.instance}: {msg.message}")

    @staticmethod
    def _speaks_for(req: RouterRequest, instance: str, msg) -> bool:
        """Whether `instance` is the worker this message about `req` may come from now."""
        if isinstance(msg, TokenOutput):
            return instance == (req.prefill if req.phase == "prefill" else req.decode) and (
                req.phase in ("prefill", "decoding")
            )
        if isinstance(msg, DecodeReserved):
            return req.phase == "reserving" and instance == (req.executor or req.decode)
        if isinstance(msg, KVSent):
            return req.phase == "transferring" and instance == req.prefill
        return instance in (req.prefill, req.decode, req.executor)

    def _on_register(self, identity: bytes, msg: Register) -> None:
        try:
            worker, replaced = self.registry.register(identity, msg)
        except RegistrationRefused as exc:
            self._drop(f"registration refused: {exc}")
            return
        if replaced is not None:
            self._worker_lost(replaced)
        if msg.role == "attention" and not msg.kv_endpoint:
            prefill = self.workers.get(msg.colocated_with)
            if prefill is not None and prefill.registration.kv_endpoint.get("offload_blocks"):
                self._send(msg.instance, AttachPool(prefill.registration.kv_endpoint))

    def _on_tokens(self, req: RouterRequest, msg: TokenOutput) -> None:
        self.metrics.tokens_arrived(req.client_id, len(msg.token_ids), msg.finish_reason)
        req.output_token_ids += msg.token_ids
        if req.sampling.logprobs:
            req.output_logprobs += msg.logprobs or []
        req.text_sent += len(msg.text)
        if req.request_id != req.client_id:  # the caller knows its request by its own id
            msg = msgspec.structs.replace(msg, request_id=req.client_id)
        req.outputs.put_nowait(msg)
        if msg.finished:
            self._finish(req)
        elif msg.handoff:
            req.first = msg
            req.phase = "reserving"
            # From here the request waits on workers' replies, not on a queue: bound it.
            req.deadline = time.monotonic() + HANDOFF_TIMEOUT_S
            num_tokens = len(req.prompt_token_ids) + len(req.output_token_ids)
            req.reserve_blocks = -(-num_tokens // self.block_size)
            self._try_reserve(req)

    def _try_reserve(self, req: RouterRequest) -> None:
        placement = place_decode(
            self.offload_policy, req, self.workers, tally(self.requests.values()), self.assigned
        )
        if placement.decode is None:
            if not placement.decode_alive:
                self._finish(req, Unavailable("no live decode worker"))
            else:
                req.retry_at = time.monotonic() + 0.05  # wait for KV blocks to free up
            return
        decode_worker, executor = placement.decode, placement.executor
        req.decode, req.executor = decode_worker, executor
        self.assigned[decode_worker] = self.assigned.get(decode_worker, 0) + 1
        req.retry_at = 0.0
        req.transfer_id = next(self._transfer_ids)
        if executor is not None:
            # The prompt's KV stays in the prefill worker's pool, which the executor shares.
            self.lent[req.request_id] = (req.prefill, executor)
            message = self._continue_message(req)
            lent_blocks = req.first.block_table if req.first else None
            self._send(executor, msgspec.structs.replace(message, lent_blocks=lent_blocks or []))
            return
        self._send(req.decode, self._continue_message(req))

    def _continue_message(self, req: RouterRequest, for_decode_of_offloaded: bool = False):
        executor = self.workers[req.executor] if for_decode_of_offloaded else None
        return ReserveDecode(
            request_id=req.request_id,
            prompt_token_ids=req.prompt_token_ids,
            output_token_ids=list(req.output_token_ids),
            output_logprobs=list(req.output_logprobs) if req.sampling.logprobs else None,
            text_sent=req.text_sent,
            sampling=req.sampling,
            prefill_instance=req.prefill,
            transfer_id=req.transfer_id,
            executor=executor.instance if executor else "",
            executor_address=executor.registration.attention_address if executor else "",
            executor_gpu_uuid=executor.registration.gpu_uuid if executor else "",
        )

    def _on_reserved(self, req: RouterRequest, msg: DecodeReserved) -> None:
        if msg.error is not None:
            log.info("reservation for %s refused: %s; retrying", req.request_id, msg.error)
            self.lent.pop(req.request_id, None)  # nothing was adopted: the prefill worker holds on
            req.decode = req.executor = None
            req.retry_at = time.monotonic() + 0.05
            return
        if req.executor is not None:
            # The executor has adopted the KV in place: decoding starts at once, nothing moves.
            req.phase = "decoding"
            self.counters["offloaded"] += 1
            self._send(req.decode, self._continue_message(req, for_decode_of_offloaded=True))
            return
        req.phase = "transferring"
        worker = self.workers[req.decode]
        self._send(
            req.prefill,
            SendKV(
                request_id=req.request_id,
                decode_instance=req.decode,
                kv_endpoint=worker.registration.kv_endpoint,
                dst_block_ids=msg.block_ids,
                transfer_id=req.transfer_id,
                first_block=msg.first_block,
            ),
        )

    def _on_kv_sent(self, req: RouterRequest, msg: KVSent) -> None:
        if msg.error is not None:
            req.phase = "decoding"  # the copy is over: the decode worker may free its blocks
            self._migrate(req, f"KV transfer failed: {msg.error}")
            return
        req.phase = "decoding"
        self._send(req.decode, StartDecode(req.request_id))

    # Housekeeping ---------------------------------------------------------------------------

    async def _housekeeping_loop(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(HOUSEKEEPING_S)
            now = time.monotonic()
            try:
                if now - last > ROUTER_STALL_S:
                    self._forgive_stall(now - last, now)
                self._housekeeping(now)
            except Exception:  # a bug here must not stop liveness checks for good
                log.exception("router housekeeping failed")
            last = now

    def _forgive_stall(self, stall_s: float, now: float) -> None:
        """Time the router did not run is nobody's delay: the heartbeats and hand-off replies
        sent meanwhile wait unread in its socket, behind this check."""
        log.warning("the router did not run for %.1f s; deadlines move on by as much", stall_s)
        self.registry.forgive(stall_s, now)
        for req in self.requests.values():
            req.deadline += stall_s

    def _housekeeping(self, now: float) -> None:
        for worker in self.registry.check(now):
            self._worker_lost(worker)
        for req in list(self.requests.values()):
            self._check_request(req, now)
        for request_id, (prefill, target) in list(self.copies_in_flight.items()):
            if not self.workers[prefill].alive:
                self._send(target, Abort(request_id))
                del self.copies_in_flight[request_id]
        for request_id, (_, executor) in list(self.lent.items()):
            if not self.workers[executor].alive:
                # Should it be only slow, not dead, the abort makes it drop the request
                # (its decode worker then recomputes it) before its next step.
                self._send(executor, Abort(request_id))
                self._return_lent(request_id)

    def _worker_lost(self, worker: WorkerInfo) -> None:
        """Moves every request that needed `worker` (now dead) elsewhere at once."""
        for req in list(self.requests.values()):
            if req.phase != "done" and self._needs(req, worker.instance):
                self._migrate(req, f"{worker.role} worker {worker.instance} died ({worker.death})")

    @staticmethod
    def _needs(req: RouterRequest, instance: str) -> bool:
        # Once its KV has moved, a request no longer needs its prefill worker; and a decoding
        # request outlives its executor (the decode worker recomputes it locally).
        if req.phase == "decoding":
            return req.decode == instance
        return instance in (req.prefill, req.decode, req.executor)

    def _return_lent(self, request_id: str) -> None:
        entry = self.lent.pop(request_id, None)
        if entry is not None:
            self._send(entry[0], Abort(request_id))

    def _check_request(self, req: RouterRequest, now: float) -> None:
        if req.phase == "done":
            return
        for instance in (req.prefill, req.decode, req.executor):
            w = self.registry.get(instance)
            if w is not None and self._needs(req, instance) and (not w.alive or w.stuck):
                state = "is stuck" if w.alive else f"died ({w.death})"
                self._migrate(req, f"{w.role} worker {w.instance} {state}")
                return
        if req.phase in ("reserving", "transferring") and now > req.deadline:
            self._migrate(req, f"hand-off to decode did not complete ({req.phase})")
        elif req.phase == "reserving" and req.decode is None and now >= req.retry_at:
            self._try_reserve(req)

    def _loads(self, role: str, draining_too: bool = False) -> list[WorkerLoad]:
        books = tally(self.requests.values())
        return worker_loads(role, self.workers.values(), books, self.assigned, draining_too)


def _count_phases(requests) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in requests:
        counts[r.phase] = counts.get(r.phase, 0) + 1
    return counts


def _log_send_failure(future: asyncio.Future, instance: str) -> None:
    # A gone peer (ROUTER_MANDATORY: host unreachable) surfaces here; heartbeats mark it dead.
    if not future.cancelled() and future.exception() is not None:
        log.debug("send to %s failed: %s", instance, future.exception())
