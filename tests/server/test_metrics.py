"""The router's `/metrics`: worker series from heartbeats, request latencies timed through the
router's own hooks, GPU series from a fake NVML (and none without one), and end to end over a
real deployment with an attention executor, parsed back with prometheus-client's parser."""

from __future__ import annotations

import asyncio
import sys
import time
import types
from collections.abc import Iterator
from types import SimpleNamespace

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from engine.sequence import InvalidRequestError
from server.router.core import Router, RouterRequest, WorkerInfo
from server.router.generation import Overloaded, Unavailable
from server.router.gpu_metrics import GPUCollector, load_nvml
from server.router.metrics import RouterMetrics, RouterStateCollector, WorkerCollector, error_reason
from tests.server.deployment import Deployment
from transport.messages import Register, SamplingSpec, TokenOutput, WorkerStats

SAMPLING = SamplingSpec(max_tokens=8, temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, seed=None,
                        stop=[], stop_token_ids=[], ignore_eos=True, logprobs=False)  # fmt: skip


def samples(text: str) -> list:
    return [s for f in text_string_to_metric_families(text) for s in f.samples]


def value(text: str, name: str, **labels: str) -> float | None:
    found = [s.value for s in samples(text) if s.name == name and s.labels == labels]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else None


def scrape(*collectors) -> str:
    registry = CollectorRegistry()
    for c in collectors:
        registry.register(c)
    return generate_latest(registry).decode()


def worker(role: str, instance: str, alive: bool = True, **stats) -> WorkerInfo:
    base = dict(num_running=0, num_waiting=0, num_free_blocks=100, num_blocks=100,
                queued_tokens=0, num_preemptions=0, requests_total=0)  # fmt: skip
    register = Register(role=role, instance=instance, pid=1, model="tiny", max_model_len=256,
                        kv_endpoint={}, stats=WorkerStats(**{**base, **stats}))  # fmt: skip
    return WorkerInfo(instance, role, instance.encode(), register, time.monotonic(), alive)


def test_worker_series_per_role_from_heartbeats():
    workers = [
        worker("prefill", "prefill-0", num_waiting=2, last_prefill_tokens=48, step_time_ms=12.0,
               prompt_tokens_total=300, generation_tokens_total=5),
        worker("decode", "decode-0", num_running=3, num_free_blocks=75, last_batch_size=3,
               step_time_ms=4.0, offload_roundtrip_ms=0.5, num_preemptions=2,
               generation_tokens_total=40),
        worker("attention", "attention-0", num_free_blocks=90, attention_time_ms=0.25,
               last_batch_size=2),
        worker("decode", "decode-1", alive=False, num_free_blocks=0),
    ]  # fmt: skip
    workers[1].stuck = True  # decode-0: alive, but one step ran past --stuck-timeout
    text = scrape(WorkerCollector(lambda: workers))
    assert value(text, "adrenaline:worker_stuck", role="decode", instance="decode-0") == 1.0
    p, d, a = (dict(role=r, instance=f"{r}-0") for r in ("prefill", "decode", "attention"))
    dead = dict(role="decode", instance="decode-1")

    assert value(text, "adrenaline:worker_up", **p) == 1.0
    assert value(text, "adrenaline:worker_up", **dead) == 0.0
    assert value(text, "adrenaline:worker_stuck", **p) == 0.0
    assert value(text, "adrenaline:worker_draining", **d) == 0.0
    # A dead worker's last heartbeat is stale: nothing but worker_up.
    assert [s.name for s in samples(text) if s.labels == dead] == ["adrenaline:worker_up"]
    assert value(text, "adrenaline:num_requests_running", **d) == 3
    assert value(text, "adrenaline:num_requests_waiting", **p) == 2
    assert value(text, "adrenaline:kv_cache_usage_perc", **d) == pytest.approx(0.25)
    assert value(text, "adrenaline:kv_cache_usage_perc", **a) == pytest.approx(0.10)
    assert value(text, "adrenaline:kv_blocks_free", **a) == 90
    assert value(text, "adrenaline:executor_sm_share", **a) == 1.0
    assert value(text, "adrenaline:executor_sm_share", **d) is None  # executors only
    assert value(text, "adrenaline:decode_batch_size", **d) == 3
    assert value(text, "adrenaline:decode_batch_size", **a) == 2
    assert value(text, "adrenaline:decode_batch_size", **p) is None
    assert value(text, "adrenaline:prefill_tokens_per_step", **p) == 48
    assert value(text, "adrenaline:prefill_tokens_per_step", **d) is None
    assert value(text, "adrenaline:step_time_seconds", **p) == pytest.approx(0.012)
    assert value(text, "adrenaline:executor_attention_time_seconds", **a) == pytest.approx(25e-5)
    assert value(text, "adrenaline:executor_attention_time_seconds", **d) is None
    assert value(text, "adrenaline:offload_roundtrip_seconds", **d) == pytest.approx(5e-4)
    assert value(text, "adrenaline:num_preemptions_total", **d) == 2
    assert value(text, "adrenaline:prompt_tokens_total", **p) == 300
    assert value(text, "adrenaline:generation_tokens_total", **d) == 40
    types_ = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert types_["adrenaline:generation_tokens"] == "counter"
    assert types_["adrenaline:step_time_seconds"] == "gauge"


def test_router_state_offload_ratio_and_in_flight():
    def request(phase: str, executor: str | None) -> RouterRequest:
        r = RouterRequest("r", [1], SAMPLING, asyncio.Queue(), "prefill-0", phase=phase)
        r.executor = executor
        return r

    reqs = [request("decoding", "attention-0"), request("decoding", None),
            request("decoding", None), request("decoding", "attention-0"),
            request("transferring", "attention-0"), request("prefill", None)]  # fmt: skip
    router = SimpleNamespace(
        requests=dict(enumerate(reqs)), counters={"offloaded": 7, "migrated": 2}, dropped_messages=5
    )
    text = scrape(RouterStateCollector(router))
    assert value(text, "adrenaline:num_requests_in_flight") == 6
    assert value(text, "adrenaline:num_offloaded_requests") == 2
    assert value(text, "adrenaline:offload_ratio") == pytest.approx(0.5)
    assert value(text, "adrenaline:offloaded_requests_total") == 7
    assert value(text, "adrenaline:requests_migrated_total") == 2
    assert value(text, "adrenaline:control_messages_dropped_total") == 5

    idle = scrape(
        RouterStateCollector(
            SimpleNamespace(
                requests={}, counters={"offloaded": 0, "migrated": 0}, dropped_messages=0
            )
        )
    )
    assert value(idle, "adrenaline:offload_ratio") == 0.0


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def router(monkeypatch) -> Iterator[Router]:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # no GPU series, whatever the host
    r = Router("tiny", None, "tcp://127.0.0.1:1", max_pending=4)  # never bound
    r.metrics.clock = Clock()
    yield r
    r.sock.close(0)
    r.ctx.term()


def test_latencies_through_the_router_hooks(router: Router):
    clock = router.metrics.clock
    req = RouterRequest("a", [1, 2, 3], SAMPLING, asyncio.Queue(), "prefill-0")
    router.requests["a"] = req
    router.metrics.request_arrived("a")

    def tokens(n: int, after: float, finish_reason: str | None = None) -> None:
        clock.now += after
        out = TokenOutput("a", [7] * n, "x" * n, finished=finish_reason is not None,
                          finish_reason=finish_reason)  # fmt: skip
        router._on_tokens(req, out)

    tokens(1, after=0.5)  # TTFT 0.5
    tokens(1, after=0.1)
    tokens(2, after=0.2)  # two tokens in one delta: 0.1 each
    tokens(1, after=0.1, finish_reason="length")
    text = router.metrics.exposition().decode()

    assert value(text, "adrenaline:time_to_first_token_seconds_count") == 1
    assert value(text, "adrenaline:time_to_first_token_seconds_sum") == pytest.approx(0.5)
    assert value(text, "adrenaline:inter_token_latency_seconds_count") == 4
    assert value(text, "adrenaline:inter_token_latency_seconds_sum") == pytest.approx(0.4)
    assert value(text, "adrenaline:time_per_output_token_seconds_sum") == pytest.approx(0.1)
    assert value(text, "adrenaline:e2e_request_latency_seconds_sum") == pytest.approx(0.9)
    assert value(text, "adrenaline:request_success_total", finished_reason="length") == 1
    assert "adrenaline:gpu_" not in text
    assert router.metrics.timings == {}
    stats = router.stats()
    assert stats["latency"]["time_to_first_token"] == {"count": 1, "mean_s": 0.5}
    assert stats["requests"]["success_by_reason"] == {"length": 1}


def test_rejections_failures_and_aborts_are_counted(router: Router):
    async def first(request_id: str, prompt: list[int]) -> None:
        await anext(router.generate(request_id, prompt, SAMPLING))

    with pytest.raises(InvalidRequestError):
        asyncio.run(first("empty", []))
    with pytest.raises(Unavailable):
        asyncio.run(first("nowhere", [1, 2]))  # no prefill worker registered
    router.workers["prefill-0"] = worker("prefill", "prefill-0")
    router.max_pending = 0
    with pytest.raises(Overloaded):
        asyncio.run(first("busy", [1, 2]))

    async def fail_one_abandon_one() -> None:  # sends to the worker need a running loop
        failed = RouterRequest("f", [1], SAMPLING, asyncio.Queue(), "prefill-0")
        router.metrics.request_arrived("f")
        router._finish(failed, Unavailable("decode worker decode-0 died"))
        router.max_pending = 4
        stream = router.generate("gone", [1, 2], SAMPLING)
        reading = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0)
        router._on_tokens(router.requests["gone"], TokenOutput("gone", [5], "x", finished=False))
        await reading
        await stream.aclose()  # the client went away

    asyncio.run(fail_one_abandon_one())
    text = router.metrics.exposition().decode()
    for reason in ("invalid", "no_worker", "overloaded", "worker_died"):
        assert value(text, "adrenaline:request_errors_total", reason=reason) == 1, reason
    assert value(text, "adrenaline:request_aborts_total") == 1
    assert value(text, "adrenaline:time_to_first_token_seconds_count") == 1
    assert router.metrics.timings == {}
    assert router.stats()["requests"]["errors_by_reason"]["worker_died"] == 1


def test_error_reasons_follow_the_routers_messages():
    assert error_reason(Unavailable("attention worker attention-0 died")) == "worker_died"
    assert error_reason(Unavailable("KV transfer failed: peer gone")) == "kv_transfer"
    assert error_reason(Unavailable("no decode worker had room in time")) == "no_kv_room"
    assert error_reason(Unavailable("no live decode worker")) == "no_worker"
    assert error_reason(Unavailable("CUDA out of memory")) == "worker_error"


def test_each_router_has_its_own_registry(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    one, two = RouterMetrics(SimpleNamespace()), RouterMetrics(SimpleNamespace())
    one.request_rejected(Overloaded("full"))
    assert one.registry is not two.registry
    assert two.outcome_summary()["errors_by_reason"] == {}


# GPU ----------------------------------------------------------------------------------------


class FakeNVMLError(Exception):
    pass


def fake_nvml(init_fails: bool = False, broken: tuple[int, ...] = ()) -> types.ModuleType:
    nvml = types.ModuleType("pynvml")
    nvml.NVMLError = FakeNVMLError

    def init() -> None:
        if init_fails:
            raise FakeNVMLError("Driver Not Loaded")

    def handle(i: int) -> int:
        if i in broken:
            raise FakeNVMLError("GPU is lost")
        return i

    nvml.nvmlInit = init
    nvml.nvmlDeviceGetCount = lambda: 2
    nvml.nvmlDeviceGetHandleByIndex = handle
    nvml.nvmlDeviceGetUtilizationRates = lambda h: SimpleNamespace(gpu=80 + h, memory=40 + h)
    nvml.nvmlDeviceGetMemoryInfo = lambda h: SimpleNamespace(used=(h + 1) * 2**30)
    return nvml


def test_gpu_series_from_nvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml())
    text = scrape(GPUCollector())
    assert value(text, "adrenaline:gpu_utilization_perc", gpu="0") == pytest.approx(0.80)
    assert value(text, "adrenaline:gpu_utilization_perc", gpu="1") == pytest.approx(0.81)
    assert value(text, "adrenaline:gpu_memory_used_bytes", gpu="1") == 2 * 2**30
    assert value(text, "adrenaline:gpu_memory_bandwidth_utilization_perc", gpu="0") == 0.40


def test_an_unreadable_gpu_is_skipped(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(broken=(0,)))
    text = scrape(GPUCollector())
    assert {s.labels["gpu"] for s in samples(text)} == {"1"}


@pytest.mark.parametrize("nvml", [None, fake_nvml(init_fails=True)], ids=["missing", "no-driver"])
def test_no_gpu_series_without_nvml(monkeypatch, nvml):
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert load_nvml() is None
    assert samples(scrape(GPUCollector())) == []


# End to end ---------------------------------------------------------------------------------


def test_metrics_end_to_end_with_an_executor():
    requests, max_tokens = 4, 6
    d = Deployment("--offload-policy", "ratio:0.5", "--num-kv-blocks", "256",
                   "--offload-blocks", "256")  # fmt: skip
    try:

        async def send() -> None:
            async with httpx.AsyncClient(timeout=60) as client:
                bodies = [{"prompt": f"metrics {i} " * (i + 1), "max_tokens": max_tokens,
                           "ignore_eos": True} for i in range(requests)]  # fmt: skip
                for resp in await asyncio.gather(
                    *(client.post(f"{d.url}/generate", json=b) for b in bodies)
                ):
                    assert resp.status_code == 200, resp.text

        asyncio.run(send())
        d.wait_idle()
        generated = requests * max_tokens
        deadline = time.monotonic() + 5
        while True:  # heartbeats carry the workers' totals every 0.5 s
            resp = httpx.get(f"{d.url}/metrics", timeout=5)
            text = resp.text
            tokens = sum(s.value for s in samples(text)
                         if s.name == "adrenaline:generation_tokens_total")  # fmt: skip
            if tokens >= generated or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        stats = d.stats()
    finally:
        d.stop()

    assert resp.headers["content-type"].startswith("text/plain")
    assert tokens >= generated
    up = {(s.labels["role"], s.labels["instance"]): s.value for s in samples(text)
          if s.name == "adrenaline:worker_up"}  # fmt: skip
    assert {role for role, _ in up} == {"prefill", "decode", "attention"}
    assert all(instance and v == 1.0 for (_, instance), v in up.items())
    kv = {s.labels["role"]: s.value for s in samples(text)
          if s.name == "adrenaline:kv_cache_usage_perc"}  # fmt: skip
    assert {"decode", "attention"} <= kv.keys() and set(kv.values()) == {0.0}
    assert value(text, "adrenaline:time_to_first_token_seconds_count") == requests
    assert value(text, "adrenaline:e2e_request_latency_seconds_count") == requests
    assert value(text, "adrenaline:inter_token_latency_seconds_count") == requests * (
        max_tokens - 1
    )
    assert value(text, "adrenaline:request_success_total", finished_reason="length") == requests
    assert value(text, "adrenaline:offloaded_requests_total") == requests // 2
    assert value(text, "adrenaline:num_requests_in_flight") == 0
    assert value(text, "adrenaline:offload_ratio") == 0.0
    assert stats["latency"]["time_to_first_token"]["count"] == requests
    assert stats["requests"]["offloaded"] == requests // 2
