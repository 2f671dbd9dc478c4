"""A simulated deployment: router, prefill workers with their executors, decode workers, the
heartbeats between them, and the benchmark client that drives it, all on one event loop.

`Simulation.run` plays one workload (what `adrenaline bench` sends) and returns each request's
record; runs may follow one another on the same deployment, as `bench --compare` sweeps rates
on one server.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from engine.config import BatchConfig
from scheduler.offload_policy import OffloadPolicy
from server.simulate.cpu import CpuPool
from server.simulate.events import EventLoop
from server.simulate.executor import Executor
from server.simulate.hardware import ModelShape
from server.simulate.router import SimRequest, SimRouter, SimWorkerState
from server.simulate.workers import DecodeWorker, PrefillWorker, SimProcess
from transport.heartbeat import HEARTBEAT_S


@dataclass(frozen=True)
class CpuCosts:
    """A deployment whose roles share this machine's cores (`serve` on a CPU): how many, the
    other jobs' load, and the router's and benchmark client's own work (seconds)."""

    cores: float = 2.0
    background: float = 0.0  # cores other jobs on the machine use meanwhile
    competitors: float = 0.0  # or: runnable processes they keep, sharing the cores fairly
    router_message_s: float = 50e-6  # a control message (decode, dispatch, books)
    router_token_s: float = 100e-6  # a token: metrics, queue, SSE frame, HTTP write
    router_request_s: float = 1e-3  # an HTTP request: parse, validate, admit
    client_token_s: float = 100e-6  # the benchmark client reading one streamed chunk
    client_request_s: float = 1e-3  # building and sending a request, before the router has it


@dataclass(frozen=True)
class SimConfig:
    """The deployment (`adrenaline serve`'s flags) and the simulator's own latencies."""

    batch: BatchConfig
    num_prefill: int = 1
    num_decode: int = 1
    block_size: int = 16
    prefill_blocks: int = 1024
    decode_blocks: int = 1024
    offload_blocks: int = 0  # each executor's share; 0: no executors
    max_pending: int = 512
    hop_s: float = 0.0002  # one control message between two processes
    http_s: float = 0.0005  # client to router, and the router's stream back to the client
    heartbeat_s: float = HEARTBEAT_S
    keep_itls: bool = False  # per-request inter-token gaps (for --save-result of small runs)
    cpu: CpuCosts | None = None  # None: one GPU per worker, nothing shared


@dataclass
class Workload:
    prompt_lens: list[int]
    output_lens: list[int]
    offsets: list[float]  # send times, seconds from the run's start
    max_concurrency: int | None = None


class Simulation:
    def __init__(
        self, config: SimConfig, cost, shape: ModelShape, policy: OffloadPolicy, meter=None
    ) -> None:
        from server.simulate.report import Meter, TokenGaps

        self.loop = EventLoop()
        self.config, self.cost, self.shape = config, cost, shape
        self.num_layers = cost.num_layers
        self.block_bytes = shape.kv_bytes_per_token * config.block_size
        self.token_gaps = TokenGaps()
        self.meter = meter or Meter()
        self.router = SimRouter(self, policy, config.max_pending)
        self.processes: dict[str, SimProcess] = {}
        self.executors: dict[str, Executor] = {}
        self.client: Client | None = None
        self.cpu = (
            CpuPool(self.loop, config.cpu.cores, config.cpu.background, config.cpu.competitors)
            if config.cpu
            else None
        )
        self._in_order_free: dict[object, float] = {}
        for i in range(config.num_prefill):
            prefill = PrefillWorker(self, f"prefill-{i}", config.prefill_blocks)
            self._add(prefill)
            if config.offload_blocks:
                executor = Executor(self, f"attention-{i}", prefill, config.offload_blocks)
                prefill.executor = executor
                self.executors[executor.instance] = executor
                self._add(executor, colocated_with=prefill.instance)
        for i in range(config.num_decode):
            self._add(DecodeWorker(self, f"decode-{i}", config.decode_blocks))
        self._runs = 0
        count = len(self.processes)
        for i, process in enumerate(self.processes.values()):
            self.loop.at(config.heartbeat_s * i / count, self._heartbeat, process)

    def _add(self, process: SimProcess, colocated_with: str = "") -> None:
        self.processes[process.instance] = process
        self.router.workers[process.instance] = SimWorkerState(
            process.instance, process.role, process.heartbeat(), colocated_with
        )

    def send(self, process: SimProcess, handler, *args) -> None:
        """A message to a worker: it arrives one hop later, then waits for its loop."""
        self.loop.at(self.loop.now + self.config.hop_s, process.deliver, handler, *args)

    def execute(self, owner, seconds: float, callback, *args) -> None:
        """`owner`'s step of `seconds` (alone on its device); on a shared CPU, longer."""
        if self.cpu is None:
            self.loop.at(self.loop.now + seconds, callback, *args)
        else:
            self.cpu.run(owner, seconds, callback, *args)

    def in_order(self, key, seconds: float, callback, *args) -> None:
        """Work on a thread of its own (a KV copy), after that thread's earlier work."""
        if self.cpu is not None:
            self.cpu.enqueue(key, seconds, callback, *args)
            return
        start = max(self.loop.now, self._in_order_free.get(key, 0.0))
        self._in_order_free[key] = start + seconds
        self.loop.at(start + seconds, callback, *args)

    def hold(self, owner) -> None:
        if self.cpu is not None:
            self.cpu.hold(owner)

    def drop(self, owner) -> None:
        if self.cpu is not None:
            self.cpu.drop(owner)

    def _heartbeat(self, process: SimProcess) -> None:
        stats = process.heartbeat()
        self.router.heartbeat(process.instance, stats)
        self.meter.heartbeat(self, process, stats)
        self.loop.at(self.loop.now + self.config.heartbeat_s, self._heartbeat, process)

    def run(self, workload: Workload) -> list[SimRequest]:
        self._runs += 1
        self.client = Client(self, workload, f"run{self._runs}")
        self.meter.begin(self)
        self.client.start()
        self.loop.run()
        self.meter.end(self)
        return self.client.requests


class Client:
    """`adrenaline bench`'s sender: request i at its offset, at most `max_concurrency` at once."""

    def __init__(self, sim: Simulation, workload: Workload, tag: str) -> None:
        self.sim, self.loop = sim, sim.loop
        self.start_at = self.loop.now
        keep = sim.config.keep_itls
        self.requests = [
            SimRequest(i, f"{tag}-{i}", p, o, sent_at=0.0, itl=[] if keep else None)
            for i, (p, o) in enumerate(zip(workload.prompt_lens, workload.output_lens))
        ]
        self.offsets = workload.offsets
        self.limit = workload.max_concurrency or len(self.requests)
        self.in_flight = 0
        self.gated: deque[SimRequest] = deque()
        self.remaining = len(self.requests)
        self._next = 0  # the next request to arrive
        self.finished_at = self.start_at

    def start(self) -> None:
        self._schedule_next()

    def _schedule_next(self) -> None:
        """One arrival in the queue at a time (offsets are in order): the event heap stays the
        size of the deployment, not of the workload."""
        if self._next < len(self.requests):
            self.loop.at(self.start_at + self.offsets[self._next], self._arrival)

    def _arrival(self) -> None:
        req = self.requests[self._next]
        self._next += 1
        self._schedule_next()  # first: requests due at one instant arrive in order
        self._due(req)

    def _due(self, req: SimRequest) -> None:
        if self.in_flight >= self.limit:
            self.gated.append(req)
            return
        self._send(req)

    def _send(self, req: SimRequest) -> None:
        self.in_flight += 1
        req.sent_at = self.loop.now  # bench's clock starts before it builds the request
        costs = self.sim.config.cpu
        if costs is None:
            self._post(req)
            return
        # Its CPU per request goes to building and sending it (the prompt's token ids as
        # JSON, headers, the stream opened): the router sees the request after that. A raw
        # HTTP client gets the first token 3-6 ms sooner than bench's here (benchmarks/README).
        self.sim.cpu.enqueue(self, costs.client_request_s, self._post, req)

    def _post(self, req: SimRequest) -> None:
        router, config = self.sim.router, self.sim.config
        work = config.cpu.router_request_s if config.cpu else None
        self.loop.at(self.loop.now + config.http_s, router._arrive, router.on_arrival, (req,), work)

    def receive(self, count: int, firsts: list[SimRequest], finished: list[SimRequest]) -> None:
        """A step's `count` tokens streamed back: first tokens and ends time TTFT and E2EL."""
        costs = self.sim.config.cpu
        if costs is None:
            self._received(firsts, finished)
            return
        self.sim.cpu.enqueue(self, count * costs.client_token_s, self._received, firsts, finished)

    def _received(self, firsts: list[SimRequest], finished: list[SimRequest]) -> None:
        at = self.loop.now + self.sim.config.http_s
        for req in firsts:
            req.ttft = at - req.sent_at
        for req in finished:
            req.e2el = at - req.sent_at
            self.done(req)

    def done(self, req: SimRequest) -> None:
        self.in_flight -= 1
        self.remaining -= 1
        self.finished_at = self.loop.now + self.sim.config.http_s
        if self.gated:
            self._send(self.gated.popleft())
        if self.remaining == 0:
            self.loop.stop()

    @property
    def duration(self) -> float:
        return self.finished_at - self.start_at
