"""The router's Prometheus metrics, named like vLLM's (`adrenaline:` prefix, `_seconds`, `_total`).

Worker series are read from each worker's latest heartbeat at scrape time; request latencies are
measured here, by the router, through the hooks it calls as a request arrives, streams tokens
and ends. Each router owns its registry, so several routers can share one process.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engine.sequence import InvalidRequestError
from server.router.generation import Overloaded
from server.router.gpu_metrics import GPUCollector
from server.router.worker_registry import WorkerInfo
from transport.messages import WorkerStats


# What the metrics read of the router, declared here so that the router imports its metrics and
# never the reverse (server/router/core.py's Router and RouterRequest fit these shapes).
class RequestPhase(Protocol):
    @property
    def phase(self) -> str: ...

    @property
    def executor(self) -> str | None: ...


class RouterState(Protocol):
    @property
    def requests(self) -> Mapping[object, RequestPhase]: ...

    @property
    def workers(self) -> Mapping[str, WorkerInfo]: ...

    @property
    def counters(self) -> Mapping[str, int]: ...

    @property
    def dropped_messages(self) -> int: ...


# vLLM's buckets.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip

# The router's own failure messages (server/router/core.py) name their cause; errors typed by cause
# at the raise sites would make this table unnecessary.
_ERROR_CAUSES = (
    ("died", "worker_died"),
    ("KV transfer failed", "kv_transfer"),
    ("had room in time", "no_kv_room"),
    ("no live", "no_worker"),
)


def error_reason(exc: BaseException) -> str:
    """The `reason` label of `adrenaline:request_errors_total` for a request ended by `exc`."""
    if isinstance(exc, InvalidRequestError):
        return "invalid"
    if isinstance(exc, Overloaded):
        return "overloaded"
    text = str(exc)
    return next((reason for cue, reason in _ERROR_CAUSES if cue in text), "worker_error")


def offload_now(requests: Iterable[RequestPhase]) -> tuple[int, int]:
    """(offloaded, all) among the requests decoding now."""
    decoding = [r for r in requests if r.phase == "decoding"]
    return sum(1 for r in decoding if r.executor is not None), len(decoding)


@dataclass(frozen=True)
class WorkerSeries:
    name: str
    kind: str  # "gauge" | "counter"
    documentation: str
    value: Callable[[WorkerStats], float | None]  # None: no sample for this worker
    roles: tuple[str, ...] = ()  # the roles it applies to; empty: all


def _kv_usage(s: WorkerStats) -> float | None:
    return 1.0 - s.num_free_blocks / s.num_blocks if s.num_blocks else None


WORKER_SERIES = (
    WorkerSeries("adrenaline:num_requests_running", "gauge", "Requests running on the worker.",
                 lambda s: s.num_running),
    WorkerSeries("adrenaline:num_requests_waiting", "gauge", "Requests waiting on the worker.",
                 lambda s: s.num_waiting),
    WorkerSeries("adrenaline:kv_cache_usage_perc", "gauge",
                 "Fraction of the worker's KV blocks in use (an executor: its offload pool).",
                 _kv_usage),
    WorkerSeries("adrenaline:kv_blocks_free", "gauge", "Free KV blocks on the worker.",
                 lambda s: s.num_free_blocks),
    WorkerSeries("adrenaline:decode_batch_size", "gauge", "Sequences in the worker's last step.",
                 lambda s: s.last_batch_size, ("decode", "attention")),
    WorkerSeries("adrenaline:prefill_tokens_per_step", "gauge",
                 "Prompt tokens computed in the worker's last step.",
                 lambda s: s.last_prefill_tokens, ("prefill",)),
    WorkerSeries("adrenaline:step_time_seconds", "gauge",
                 "Moving average of the worker's step time (decode: a pure decode step).",
                 lambda s: s.step_time_ms / 1000),
    WorkerSeries("adrenaline:executor_attention_time_seconds", "gauge",
                 "Moving average of one layer's attention on the executor.",
                 lambda s: s.attention_time_ms / 1000, ("attention",)),
    WorkerSeries("adrenaline:offload_roundtrip_seconds", "gauge",
                 "Moving average of the decode worker's per-layer wait for executor attention.",
                 lambda s: s.offload_roundtrip_ms / 1000, ("decode",)),
    WorkerSeries("adrenaline:num_preemptions_total", "counter", "Preemptions on the worker.",
                 lambda s: s.num_preemptions),
    WorkerSeries("adrenaline:prompt_tokens_total", "counter", "Prompt tokens the worker computed.",
                 lambda s: s.prompt_tokens_total),
    WorkerSeries("adrenaline:generation_tokens_total", "counter",
                 "Tokens the worker generated.", lambda s: s.generation_tokens_total),
    WorkerSeries("adrenaline:executor_sm_share", "gauge",
                 "Share of the GPU's SMs the executor may use (1: no limit applied).",
                 lambda s: s.sm_share, ("attention",)),
    WorkerSeries("adrenaline:worker_control_messages_dropped_total", "counter",
                 "Malformed or unexpected control messages the worker dropped.",
                 lambda s: s.dropped_messages),
)  # fmt: skip


class WorkerCollector(Collector):
    """Per-worker series (labels `role`, `instance`) from the router's latest heartbeats. A dead
    worker reports only `worker_up 0`: its last heartbeat is stale."""

    def __init__(self, workers: Callable[[], Iterable[WorkerInfo]]) -> None:
        self.workers = workers

    def collect(self) -> Iterator[Metric]:
        labels = ["role", "instance"]
        up = GaugeMetricFamily(
            "adrenaline:worker_up", "1 while the worker heartbeats, 0 once missed.", labels=labels
        )
        # Liveness apart from progress: alive but stuck in one step, or finishing to exit.
        stuck = GaugeMetricFamily(
            "adrenaline:worker_stuck", "1 while one step has run past --stuck-timeout.",
            labels=labels,
        )  # fmt: skip
        draining = GaugeMetricFamily(
            "adrenaline:worker_draining", "1 while the worker drains before it exits.",
            labels=labels,
        )  # fmt: skip
        steps = CounterMetricFamily(
            "adrenaline:worker_steps_total", "Engine steps the worker completed.", labels=labels
        )
        families = {
            s.name: (CounterMetricFamily if s.kind == "counter" else GaugeMetricFamily)(
                s.name, s.documentation, labels=labels
            )
            for s in WORKER_SERIES
        }
        for w in sorted(self.workers(), key=lambda w: w.instance):
            up.add_metric([w.role, w.instance], 1.0 if w.alive else 0.0)
            if not w.alive:
                continue
            stuck.add_metric([w.role, w.instance], float(w.stuck))
            draining.add_metric([w.role, w.instance], float(w.draining))
            steps.add_metric([w.role, w.instance], w.registration.progress.steps_total)
            for series in WORKER_SERIES:
                if series.roles and w.role not in series.roles:
                    continue
                value = series.value(w.registration.stats)
                if value is not None:
                    families[series.name].add_metric([w.role, w.instance], float(value))
        yield from (up, stuck, draining, steps)
        yield from families.values()


class RouterStateCollector(Collector):
    """What the router holds now: requests in flight, offloaded ones, and the offloaded total."""

    def __init__(self, router: RouterState) -> None:
        self.router = router

    def collect(self) -> Iterator[Metric]:
        offloaded, decoding = offload_now(self.router.requests.values())
        yield GaugeMetricFamily(
            "adrenaline:num_requests_in_flight", "Requests the router holds, in any phase.",
            value=len(self.router.requests),
        )  # fmt: skip
        yield GaugeMetricFamily(
            "adrenaline:num_offloaded_requests",
            "Requests decoding now with their attention on an executor.", value=offloaded,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "adrenaline:offload_ratio", "Offloaded share of the requests decoding now.",
            value=offloaded / decoding if decoding else 0.0,
        )  # fmt: skip
        yield CounterMetricFamily(
            "adrenaline:offloaded_requests_total", "Requests the offload policy offloaded.",
            value=self.router.counters["offloaded"],
        )  # fmt: skip
        yield CounterMetricFamily(
            "adrenaline:requests_migrated_total",
            "Times a request moved to other workers after its worker died or got stuck.",
            value=self.router.counters["migrated"],
        )  # fmt: skip
        yield CounterMetricFamily(
            "adrenaline:control_messages_dropped_total",
            "Malformed, unexpected or unauthorised control messages the router dropped.",
            value=self.router.dropped_messages,
        )  # fmt: skip


@dataclass
class RequestTiming:
    arrival: float
    first_token: float = 0.0
    last_token: float = 0.0
    num_tokens: int = 0
    finish_reason: str | None = None


class RouterMetrics:
    """The router's registry, and the hooks through which it times its requests."""

    def __init__(self, router: RouterState, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(
            "adrenaline:time_to_first_token_seconds", "Time from arrival to the first token.",
            buckets=TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.tpot = Histogram(
            "adrenaline:time_per_output_token_seconds",
            "Mean time per token after the first, per finished request.",
            buckets=TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
        self.itl = Histogram(
            "adrenaline:inter_token_latency_seconds", "Time between consecutive tokens.",
            buckets=TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            "adrenaline:e2e_request_latency_seconds", "Time from arrival to the last token.",
            buckets=E2E_BUCKETS, registry=r,
        )  # fmt: skip
        self.success = Counter(
            "adrenaline:request_success_total", "Requests finished, by finish reason.",
            ["finished_reason"], registry=r,
        )  # fmt: skip
        self.aborts = Counter(
            "adrenaline:request_aborts_total", "Requests their client abandoned.", registry=r
        )
        self.errors = Counter(
            "adrenaline:request_errors_total", "Requests refused or failed, by reason.",
            ["reason"], registry=r,
        )  # fmt: skip
        r.register(WorkerCollector(lambda: list(router.workers.values())))
        r.register(RouterStateCollector(router))
        r.register(GPUCollector())
        self.timings: dict[str, RequestTiming] = {}

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    # Hooks ----------------------------------------------------------------------------------

    def request_arrived(self, request_id: str) -> None:
        self.timings[request_id] = RequestTiming(arrival=self.clock())

    def request_rejected(self, exc: BaseException) -> None:
        """Refused at admission, before it had an id of its own here."""
        self.errors.labels(error_reason(exc)).inc()

    def tokens_arrived(self, request_id: str, num_tokens: int, finish_reason: str | None) -> None:
        t = self.timings.get(request_id)
        if t is None or num_tokens == 0:
            return
        now = self.clock()
        if t.num_tokens == 0:
            t.first_token = now
            self.ttft.observe(now - t.arrival)
        else:
            gap = (now - t.last_token) / num_tokens  # the tokens of one delta share its gap
            for _ in range(num_tokens):
                self.itl.observe(gap)
        t.last_token = now
        t.num_tokens += num_tokens
        t.finish_reason = finish_reason or t.finish_reason

    def request_finished(self, request_id: str) -> None:
        t = self.timings.pop(request_id, None)
        if t is None:
            return
        self.success.labels(t.finish_reason or "unknown").inc()
        self.e2e.observe(t.last_token - t.arrival)
        if t.num_tokens > 1:
            self.tpot.observe((t.last_token - t.first_token) / (t.num_tokens - 1))

    def request_failed(self, request_id: str, exc: BaseException) -> None:
        self.timings.pop(request_id, None)
        self.errors.labels(error_reason(exc)).inc()

    def request_aborted(self, request_id: str) -> None:
        self.timings.pop(request_id, None)
        self.aborts.inc()

    # For /stats -----------------------------------------------------------------------------

    def latency_summary(self) -> dict[str, dict[str, float | int | None]]:
        summary = {}
        histograms = {"time_to_first_token": self.ttft, "time_per_output_token": self.tpot,
                      "inter_token_latency": self.itl, "e2e_request_latency": self.e2e}  # fmt: skip
        for key, hist in histograms.items():
            values = {s.name.rsplit("_", 1)[1]: s.value for s in _samples(hist)}
            count = int(values.get("count", 0))
            mean = values.get("sum", 0.0) / count if count else None
            summary[key] = {"count": count, "mean_s": None if mean is None else round(mean, 6)}
        return summary

    def outcome_summary(self) -> dict[str, dict[str, int]]:
        def by_label(metric: Counter, label: str) -> dict[str, int]:
            return {s.labels[label]: int(s.value) for s in _samples(metric)
                    if s.name.endswith("_total")}  # fmt: skip

        return {
            "success_by_reason": by_label(self.success, "finished_reason"),
            "errors_by_reason": by_label(self.errors, "reason"),
        }


def _samples(metric: Counter | Histogram):
    return [s for family in metric.collect() for s in family.samples]
