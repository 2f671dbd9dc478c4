"""Where a request goes next, decided from the router's books: each worker's load for placement
(`WorkerLoad`), the load-aware policy's `ClusterView`, and the hand-off after the first token
(which decode worker, offloaded to which executor, or wait for room).

Pure functions over plain records. The router passes its own request and worker objects (see
server/router/core.py); the simulator passes its own (server/simulate/), so both decide with this
code. A `Books` is the one pass over the requests in flight that every decision reads.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from scheduler.offload_policy import (
    ClusterView,
    DecodeLoad,
    ExecutorLoad,
    OffloadCandidate,
    OffloadPolicy,
)
from scheduler.placement import WorkerLoad, pick_decode

IN_FLIGHT = ("reserving", "transferring")  # placed on a decode worker, not yet decoding there


class RequestState(Protocol):
    """What the books read of a request in flight."""

    index: int  # arrival order
    phase: str  # prefill -> reserving -> transferring -> decoding -> done
    prefill: str
    decode: str | None
    executor: str | None  # set when offloaded
    prompt_tokens: int
    reserve_blocks: int  # KV blocks its decode worker (or executor) must hold for it


class StatsState(Protocol):
    """The fields of a worker's last heartbeat (transport.messages.WorkerStats) decisions read."""

    num_running: int
    num_free_blocks: int
    num_blocks: int
    queued_tokens: int
    num_offloaded: int
    context_tokens: int
    last_batch_size: int
    step_time_ms: float
    attention_time_ms: float
    offload_roundtrip_ms: float


class WorkerState(Protocol):
    instance: str
    role: str  # prefill | decode | attention
    alive: bool
    stuck: bool
    available: bool  # alive, not stuck, not draining: new work may go there
    heartbeat_at: float  # when `stats` arrived
    colocated_with: str  # an executor's prefill worker
    stats: StatsState


@dataclass
class Books:
    """Per instance, what the router has placed since (or beyond) the workers' heartbeats."""

    queued_tokens: dict[str, int] = field(default_factory=dict)  # prefill: prompts not yet run
    running: dict[str, int] = field(default_factory=dict)  # decode: requests placed there
    pending_blocks: dict[str, int] = field(default_factory=dict)  # decode: reserving, local
    in_flight_blocks: dict[str, int] = field(default_factory=dict)  # decode: local, in IN_FLIGHT
    in_flight_tokens: dict[str, int] = field(default_factory=dict)
    offloaded: dict[str, int] = field(default_factory=dict)  # executor: requests offloaded there
    offload_in_flight_blocks: dict[str, int] = field(default_factory=dict)
    offload_in_flight_tokens: dict[str, int] = field(default_factory=dict)

    def add(self, r: RequestState, sign: int = 1) -> None:
        """Counts `r` in (sign 1) or out (sign -1): the simulator keeps its books this way,
        one request at a time, instead of a pass over all of them per decision."""
        if r.phase == "prefill":
            _bump(self.queued_tokens, r.prefill, sign * r.prompt_tokens)
        in_flight = r.phase in IN_FLIGHT
        if r.decode is not None:
            _bump(self.running, r.decode, sign)
            if r.phase == "reserving" and r.executor is None:
                _bump(self.pending_blocks, r.decode, sign * r.reserve_blocks)
            if in_flight and r.executor is None:
                _bump(self.in_flight_blocks, r.decode, sign * r.reserve_blocks)
                _bump(self.in_flight_tokens, r.decode, sign * r.prompt_tokens)
        if r.executor is not None:
            _bump(self.offloaded, r.executor, sign)
            if in_flight:
                _bump(self.offload_in_flight_blocks, r.executor, sign * r.reserve_blocks)
                _bump(self.offload_in_flight_tokens, r.executor, sign * r.prompt_tokens)


def _bump(counts: dict[str, int], key: str, delta: int) -> None:
    value = counts.get(key, 0) + delta
    if value:
        counts[key] = value
    else:
        counts.pop(key, None)  # books built incrementally compare equal to a fresh tally


def tally(requests: Iterable[RequestState]) -> Books:
    books = Books()
    for r in requests:
        books.add(r)
    return books


def worker_loads(
    role: str,
    workers: Iterable[WorkerState],
    books: Books,
    assigned: Mapping[str, int],
    draining_too: bool = False,
) -> list[WorkerLoad]:
    """Placement's view of the workers of `role`; with `draining_too`, draining ones count as
    live (the whole deployment may be draining: what is in flight still finishes)."""
    # Once per placement over every worker (64 in the simulator's largest runs): lookups bound.
    queued, running, pending = books.queued_tokens.get, books.running.get, books.pending_blocks.get
    sent = assigned.get
    new = tuple.__new__  # half the time of WorkerLoad(...), whose __new__ is Python code
    return [
        new(WorkerLoad, (
            w.instance,
            w.available or (draining_too and w.alive and not w.stuck),
            queued(w.instance, 0),
            running(w.instance, 0),
            w.stats.num_free_blocks,
            pending(w.instance, 0),
            sent(w.instance, 0),
        ))
        for w in workers
        if w.role == role
    ]  # fmt: skip


def executor_beside(prefill: str, workers: Iterable[WorkerState]) -> WorkerState | None:
    return next((w for w in workers if w.role == "attention" and w.colocated_with == prefill), None)


def cluster_view(
    executor: WorkerState,
    workers: Mapping[str, WorkerState],
    books: Books,
    assigned: Mapping[str, int],
) -> ClusterView:
    """The load-aware policy's input: the latest heartbeats, plus what the router has placed
    since (requests still reserving or transferring count in full, conservatively)."""
    decode_instance = pick_decode(worker_loads("decode", workers.values(), books, assigned), 0)
    decode = None
    if decode_instance is not None:
        worker = workers[decode_instance]
        d = worker.stats
        measured = d.num_running > 0  # idle, its last step no longer describes its load
        decode = DecodeLoad(
            instance=decode_instance,
            batch=max(books.running.get(decode_instance, 0), d.num_running),
            context_tokens=d.context_tokens + books.in_flight_tokens.get(decode_instance, 0),
            free_blocks=d.num_free_blocks - books.in_flight_blocks.get(decode_instance, 0),
            last_batch_size=d.last_batch_size if measured else 0,
            last_context_tokens=d.context_tokens if measured else 0,
            step_time_ms=d.step_time_ms,
            offload_wait_ms=d.offload_roundtrip_ms if d.num_offloaded else 0.0,
            heartbeat_at=worker.heartbeat_at,
        )
    e = executor.stats
    name = executor.instance
    prefill = workers.get(executor.colocated_with)
    return ClusterView(
        decode=decode,
        executor=ExecutorLoad(
            instance=name,
            alive=executor.alive,
            num_blocks=e.num_blocks,
            free_blocks=e.num_free_blocks - books.offload_in_flight_blocks.get(name, 0),
            offloaded=max(books.offloaded.get(name, 0), e.num_offloaded),
            offloaded_tokens=e.context_tokens + books.offload_in_flight_tokens.get(name, 0),
            last_offloaded=e.num_offloaded,
            last_offloaded_tokens=e.context_tokens if e.num_offloaded else 0,
            attention_time_ms=e.attention_time_ms,
            heartbeat_at=executor.heartbeat_at,
            prefill_queued_tokens=prefill.stats.queued_tokens if prefill else 0,
        ),
    )


def offload_target(
    policy: OffloadPolicy,
    req: RequestState,
    workers: Mapping[str, WorkerState],
    books: Books,
    assigned: Mapping[str, int],
) -> str | None:
    """The executor beside the request's prefill worker, if the policy offloads it."""
    executor = executor_beside(req.prefill, workers.values())
    candidate = OffloadCandidate(
        request_index=req.index,
        prompt_tokens=req.prompt_tokens,
        executor_alive=executor is not None and executor.available,
        executor_free_blocks=executor.stats.num_free_blocks if executor else 0,
        blocks_needed=req.reserve_blocks,
        view=cluster_view(executor, workers, books, assigned)
        if executor is not None and policy.needs_view
        else None,
    )
    if executor is None or not policy.decide(candidate):
        return None
    return executor.instance


@dataclass(frozen=True)
class Placement:
    """Where a prefilled request decodes. No `decode`: none has room now (retry shortly), or,
    without `decode_alive`, none is alive at all (the request fails)."""

    decode: str | None
    executor: str | None = None
    decode_alive: bool = True


def place_decode(
    policy: OffloadPolicy,
    req: RequestState,
    workers: Mapping[str, WorkerState],
    books: Books,
    assigned: Mapping[str, int],
) -> Placement:
    """The hand-off decision after the first token: offload or not, then the decode worker
    (an offloaded request needs no KV room there)."""
    executor = offload_target(policy, req, workers, books, assigned)
    blocks = 0 if executor else req.reserve_blocks
    decode = pick_decode(worker_loads("decode", workers.values(), books, assigned), blocks)
    if decode is None:
        # The whole deployment may be draining: what is in flight still finishes.
        loads = worker_loads("decode", workers.values(), books, assigned, draining_too=True)
        decode = pick_decode(loads, blocks)
    if decode is None:
        alive = any(w.alive and not w.stuck for w in workers.values() if w.role == "decode")
        return Placement(None, None, decode_alive=alive)
    return Placement(decode, executor)
