"""The router of a simulated deployment: admission, placement and the hand-off walk of
server/router/core.py (prefill -> reserving -> transferring -> decoding -> done), deciding with the
same scheduler.routing functions over the same books, kept here one request at a time.

Messages take `hop_s` each way; the router itself handles each at once (one asyncio loop, fast
next to the workers). Heartbeats replace each worker's stats every HEARTBEAT_S.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from scheduler.offload_policy import OffloadPolicy
from scheduler.placement import pick_prefill
from scheduler.routing import Books, place_decode, tally, worker_loads
from transport.messages import WorkerStats

if TYPE_CHECKING:
    from server.simulate.cluster import Simulation

RETRY_S = 0.05  # no decode worker has room: retry after this (server/router/core.py)
HOUSEKEEPING_S = 0.02  # the router's housekeeping tick, which does the retries


@dataclass(eq=False)
class SimRequest:
    """A request in flight, with what scheduler.routing reads (RequestState) and what the
    benchmark client measures."""

    index: int
    wire_id: str
    prompt_tokens: int
    max_tokens: int
    sent_at: float  # by the client
    phase: str = "prefill"
    prefill: str = ""
    decode: str | None = None
    executor: str | None = None
    reserve_blocks: int = 0
    retry_at: float = 0.0
    first_token_at: float = 0.0  # when the prefill worker's step produced it
    ttft: float = 0.0
    e2el: float = 0.0
    output_tokens: int = 0
    error: str = ""
    itl: list[float] | None = None
    block_table: list[int] | None = None  # the prefill worker's, lent when offloaded


@dataclass
class SimWorkerState:
    """The router's record of a worker (scheduler.routing.WorkerState)."""

    instance: str
    role: str
    stats: WorkerStats
    colocated_with: str = ""
    heartbeat_at: float = 0.0
    alive: bool = True
    stuck: bool = False
    available: bool = True


@dataclass
class RouterCounters:
    finished: int = 0
    offloaded: int = 0
    rejected: int = 0
    retries: int = 0
    placements: list = field(default_factory=list)  # (wire id, prefill, decode, executor)


class SimRouter:
    def __init__(self, sim: Simulation, policy: OffloadPolicy, max_pending: int) -> None:
        self.sim, self.loop = sim, sim.loop
        self.policy = policy
        self.max_pending = max_pending
        self.workers: dict[str, SimWorkerState] = {}
        self.requests: dict[str, SimRequest] = {}
        self.books = Books()
        self.assigned: dict[str, int] = {}
        self.waiting: dict[str, SimRequest] = {}  # reserving, no decode worker had room
        self.lent: dict[str, str] = {}  # offloaded request -> the prefill worker lending its KV
        self.counters = RouterCounters()
        self.record_placements = False
        self._tick_pending = False
        self.check_books = False  # tests: compare the books with a fresh tally at each decision
        self._prefills: list[SimWorkerState] | None = None
        # Heartbeats on their way, applied when a decision reads them (`_decide`) instead of
        # as events of their own: two in five events of a large run were their arrivals.
        self._heartbeats: deque[tuple[float, int, SimWorkerState, WorkerStats]] = deque()

    def send(self, handler, *args, work_s: float | None = None) -> None:
        """A message to the router, from a worker: it arrives one hop later; on a shared CPU
        the router's one thread then takes `work_s` to handle it, in arrival order."""
        self.loop.at(self.loop.now + self.sim.config.hop_s, self._arrive, handler, args, work_s)

    def _arrive(self, handler, args, work_s: float | None) -> None:
        cpu = self.sim.cpu
        if cpu is None:
            handler(*args)
            return
        costs = self.sim.config.cpu
        cpu.enqueue(self, costs.router_message_s if work_s is None else work_s, handler, *args)

    def tokens(self, count: int, firsts: list, finished: list, at: float) -> None:
        """One worker step's tokens: `firsts` (request, prefill block table or None when it
        ended there), `finished` (request, output tokens)."""
        costs = self.sim.config.cpu
        work = costs.router_message_s + count * costs.router_token_s if costs else None
        self.send(self._on_tokens, count, firsts, finished, at, work_s=work)

    def _on_tokens(self, count: int, firsts: list, finished: list, at: float) -> None:
        for req, block_table in firsts:
            self.on_first_token(req, block_table, at)
        for req, output_tokens in finished:
            self.on_finished(req, output_tokens)
        self.sim.client.receive(count, [r for r, _ in firsts], [r for r, _ in finished])

    def _change(self, req: SimRequest, **fields) -> None:
        self.books.add(req, -1)
        for name, value in fields.items():
            setattr(req, name, value)
        self.books.add(req, 1)

    def _decide(self):
        self.apply_heartbeats()
        if self.check_books:
            assert self.books == tally(self.requests.values()), "the router's books drifted"
        return self.books

    # Requests -------------------------------------------------------------------------------

    def on_arrival(self, req: SimRequest) -> None:
        if len(self.requests) >= self.max_pending:
            self.counters.rejected += 1
            req.error = f"HTTP 429: {len(self.requests)} requests in flight; retry shortly"
            self.sim.client.done(req)
            return
        books = self._decide()
        if self._prefills is None:  # the deployment's workers are fixed once it runs
            self._prefills = [w for w in self.workers.values() if w.role == "prefill"]
        prefill = pick_prefill(worker_loads("prefill", self._prefills, books, self.assigned))
        self.assigned[prefill] = self.assigned.get(prefill, 0) + 1
        req.prefill = prefill
        self.requests[req.wire_id] = req
        self.books.add(req)
        worker = self.sim.processes[prefill]
        self.sim.send(worker, worker.on_prefill, req)

    def on_first_token(self, req: SimRequest, block_table: list[int] | None, at: float) -> None:
        req.first_token_at = at  # the prefill step's end: the first decode gap starts there
        if block_table is None:
            return  # finished at its first token
        blocks = -(-(req.prompt_tokens + 1) // self.sim.config.block_size)
        self._change(req, phase="reserving", reserve_blocks=blocks)
        req.block_table = block_table
        self._try_reserve(req)

    def _try_reserve(self, req: SimRequest) -> None:
        placement = place_decode(self.policy, req, self.workers, self._decide(), self.assigned)
        if placement.decode is None:
            req.retry_at = self.loop.now + RETRY_S
            self.waiting[req.wire_id] = req
            self.counters.retries += 1
            self._tick()
            return
        self.waiting.pop(req.wire_id, None)
        self._change(req, decode=placement.decode, executor=placement.executor)
        self.assigned[req.decode] = self.assigned.get(req.decode, 0) + 1
        req.retry_at = 0.0
        if self.record_placements:
            self.counters.placements.append((req.wire_id, req.prefill, req.decode, req.executor))
        if req.executor is not None:
            self.lent[req.wire_id] = req.prefill  # its prompt's KV stays where prefill wrote it
            executor = self.sim.processes[req.executor]
            self.sim.send(executor, executor.on_adopt, req, req.block_table)
            return
        decode = self.sim.processes[req.decode]
        self.sim.send(decode, decode.on_reserve, req)

    def on_reserved(self, req: SimRequest, ok: bool) -> None:
        if not ok:
            self.lent.pop(req.wire_id, None)  # nothing was adopted: the prefill worker holds on
            self._change(req, decode=None, executor=None)
            req.retry_at = self.loop.now + RETRY_S
            self.waiting[req.wire_id] = req
            self._tick()
            return
        decode = self.sim.processes[req.decode]
        if req.executor is not None:
            self._change(req, phase="decoding")
            self.counters.offloaded += 1
            self.sim.send(decode, decode.on_offloaded, req, req.executor)
            return
        self._change(req, phase="transferring")
        prefill = self.sim.processes[req.prefill]
        self.sim.send(prefill, prefill.on_send_kv, req, decode)

    def on_kv_sent(self, req: SimRequest) -> None:
        self._change(req, phase="decoding")
        decode = self.sim.processes[req.decode]
        self.sim.send(decode, decode.on_start, req.wire_id)

    def on_finished(self, req: SimRequest, output_tokens: int) -> None:
        req.output_tokens = output_tokens
        self.counters.finished += 1
        self.books.add(req, -1)
        req.phase = "done"
        del self.requests[req.wire_id]

    def on_offload_released(self, request_id: str) -> None:
        prefill = self.lent.pop(request_id, None)
        if prefill is not None:
            worker = self.sim.processes[prefill]
            self.sim.send(worker, worker.on_abort, request_id)

    def on_heartbeat(self, instance: str, stats: WorkerStats) -> None:
        state = self.workers[instance]
        state.stats, state.heartbeat_at = stats, self.loop.now

    def heartbeat(self, instance: str, stats: WorkerStats) -> None:
        """A worker's heartbeat, sent now: it arrives one hop later. Handling one takes the
        router's CPU on a shared CPU (an event then); otherwise it only replaces the worker's
        stats, which only decisions read, so it waits for the next (`apply_heartbeats`)."""
        if self.sim.cpu is not None:
            self.send(self.on_heartbeat, instance, stats)
            return
        at = self.loop.now + self.sim.config.hop_s
        self._heartbeats.append((at, self.loop.reserve_order(), self.workers[instance], stats))

    def apply_heartbeats(self) -> None:
        """Those that would have arrived before the running event, as their events would have:
        sent in time order one hop before arriving, they arrive in the order sent."""
        due, runs_before = self._heartbeats, self.loop.runs_before
        while due and runs_before(due[0][0], due[0][1]):
            at, _, state, stats = due.popleft()
            state.stats, state.heartbeat_at = stats, at

    # Housekeeping ---------------------------------------------------------------------------

    def _tick(self) -> None:
        if not self._tick_pending:
            self._tick_pending = True
            at = (int(self.loop.now / HOUSEKEEPING_S) + 1) * HOUSEKEEPING_S
            if at <= self.loop.now:  # rounding: the next tick is always later
                at += HOUSEKEEPING_S
            self.loop.at(at, self._housekeeping)

    def _housekeeping(self) -> None:
        self._tick_pending = False
        now = self.loop.now
        for req in sorted(self.waiting.values(), key=lambda r: r.index):
            if req.decode is None and now >= req.retry_at:
                self._try_reserve(req)
        if self.waiting:
            self._tick()
