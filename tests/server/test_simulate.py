"""`adrenaline simulate`: the event loop, the cost models, the engine bookkeeping against the real
LLMEngine (same batches), a simulated deployment that drains back to full pools, and the
command's output in bench's format."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace

import pytest

from engine.config import BatchConfig, CacheConfig, EngineConfig
from engine.engine import LLMEngine
from engine.sequence import SamplingParams
from scheduler.cost_model import CostModel
from scheduler.policies import parse_policy
from server.cli import build_parser, main
from server.simulate.calibration import DEFAULT_DIR, predict_table, read_operators
from server.simulate.cluster import SimConfig, Simulation, Workload
from server.simulate.engine import SimEngine
from server.simulate.events import EventLoop
from server.simulate.hardware import ModelShape, gpu, model_config
from server.simulate.report import TokenGaps, weighted_summary
from server.simulate.roofline import load_fit
from server.simulate.step_cost import GpuStepCost, ProfileStepCost, StepWork

# Event loop -------------------------------------------------------------------------------------


def test_events_run_in_time_order_then_in_scheduling_order():
    loop, seen = EventLoop(), []
    loop.at(2.0, seen.append, "late")
    loop.at(1.0, seen.append, "first")
    loop.at(1.0, seen.append, "second")
    loop.at(1.0, lambda: loop.after(0.0, seen.append, "scheduled at 1.0 by a callback"))
    loop.run()
    assert seen == ["first", "second", "scheduled at 1.0 by a callback", "late"]
    assert loop.now == 2.0


def test_stop_keeps_the_rest_for_a_later_run_and_the_past_is_refused():
    loop, seen = EventLoop(), []
    loop.at(1.0, lambda: (seen.append(1), loop.stop()))
    loop.at(3.0, seen.append, 3)
    loop.run()
    assert seen == [1] and loop.now == 1.0
    loop.run(until=2.0)
    assert seen == [1] and loop.now == 2.0
    loop.run()
    assert seen == [1, 3]
    with pytest.raises(ValueError):
        loop.at(0.5, seen.append, 0)


def test_a_heartbeat_is_read_by_decisions_from_when_its_event_would_have_run():
    """The router applies heartbeats when a decision reads the workers: one sent at 1.0
    arrives one hop later, after what was due then and scheduled before it was sent, before
    what was scheduled after (as its own event would), and stays applied."""
    from types import SimpleNamespace

    from server.simulate.router import SimRouter, SimWorkerState
    from transport.messages import WorkerStats

    loop, hop = EventLoop(), 0.25
    sim = SimpleNamespace(loop=loop, config=SimpleNamespace(hop_s=hop), cpu=None)
    router = SimRouter(sim, parse_policy("none"), max_pending=8)

    def stats(free: int) -> WorkerStats:
        return WorkerStats(num_running=0, num_waiting=0, num_free_blocks=free, num_blocks=9,
                           queued_tokens=0, num_preemptions=0, requests_total=0)  # fmt: skip

    state = router.workers["decode-0"] = SimWorkerState("decode-0", "decode", stats(9))
    seen = []

    def look(label: str) -> None:
        router.apply_heartbeats()
        seen.append((label, state.stats.num_free_blocks, state.heartbeat_at))

    def send() -> None:
        router.heartbeat("decode-0", stats(1))
        loop.at(1.0 + hop, look, "due on arrival, scheduled after the send")

    loop.at(1.0 + hop, look, "due on arrival, scheduled before the send")
    loop.at(1.0, send)
    loop.at(1.0 + hop / 2, look, "on its way")
    loop.at(2.0, look, "later")
    loop.run()
    assert seen == [
        ("on its way", 9, 0.0),
        ("due on arrival, scheduled before the send", 9, 0.0),
        ("due on arrival, scheduled after the send", 1, 1.0 + hop),
        ("later", 1, 1.0 + hop),
    ]


def test_weighted_percentiles_equal_numpy_over_the_expanded_list():
    import numpy as np

    from server.bench.metrics import summarize

    rng = random.Random(1)
    gaps = TokenGaps()
    expanded = []
    for _ in range(50):
        value, count = rng.random(), rng.randint(1, 9)
        if count > 4:  # both ways in: in bulk, as a run's steps, and one token at a time
            gaps.add_each([value], count)
        else:
            for _ in range(count):
                gaps.add(value)
        expanded += [value] * count
    gaps.add_each(expanded[:7], 2)  # repeats of gaps already counted, merged
    expanded += expanded[:7] * 2
    assert gaps.summary() == pytest.approx(summarize(expanded))
    assert sum(gaps.as_dict().values()) == len(expanded)
    assert np.isclose(weighted_summary(np.array([0.5]), np.array([3.0]))["p99"], 500.0)
    assert TokenGaps().summary()["p99"] == 0.0


def test_cores_are_shared_by_whoever_is_runnable():
    from server.simulate.cpu import CpuPool

    loop, done = EventLoop(), {}
    cpu = CpuPool(loop, cores=1.0)
    cpu.run("decode", 1.0, lambda: done.setdefault("decode", loop.now))
    cpu.run("prefill", 0.5, lambda: done.setdefault("prefill", loop.now))
    loop.run()
    # Half a core each until prefill's 0.5 s are done at 1.0 s; then decode alone.
    assert done == pytest.approx({"prefill": 1.0, "decode": 1.5})
    cpu.background = 0.5  # other jobs take half the core
    cpu.hold("executor")  # spinning: runnable, no work of its own
    start = loop.now  # (superseded completion events may have moved the clock past 1.5 s)
    for i in range(2):
        cpu.enqueue("router", 0.1, lambda i=i: done.setdefault(f"router{i}", loop.now - start))
    loop.run()
    # The router's two messages in turn, at a quarter of a core: 0.4 s each.
    assert done["router0"] == pytest.approx(0.4) and done["router1"] == pytest.approx(0.8)
    cpu.drop("executor")
    cpu.background, cpu.competitors = 0.0, 3.0  # three runnable processes of other jobs
    start = loop.now
    cpu.run("decode", 0.25, lambda: done.setdefault("decode2", loop.now - start))
    loop.run()
    # Alone among ours, it still shares the core fairly with the three: a quarter of it.
    assert done["decode2"] == pytest.approx(1.0)


def test_a_prefill_step_takes_the_core_a_spinner_yields():
    from server.simulate.cpu import CpuPool
    from server.simulate.workers import PrefillWorker

    loop, done = EventLoop(), {}
    cpu = CpuPool(loop, cores=1.0)
    prefill = PrefillWorker.__new__(PrefillWorker)  # only its role matters here
    cpu.hold("executor")  # spinning between layers
    cpu.run(prefill, 0.5, lambda: done.setdefault("prefill", loop.now))
    loop.run()
    assert done["prefill"] == pytest.approx(0.5)  # the spinner took none of its core
    start = loop.now
    cpu.run("decode", 0.5, lambda: done.setdefault("decode", loop.now - start))
    loop.run()
    assert done["decode"] == pytest.approx(1.0)  # anyone else shares with it
    cpu.drop("executor")


# Cost models ------------------------------------------------------------------------------------


def a100_7b() -> GpuStepCost:
    return GpuStepCost(ModelShape.of(model_config("llama-2-7b"), 2), gpu("a100-80g"),
                       load_fit("a100"))  # fmt: skip


def test_decode_is_memory_bound_and_prefill_compute_bound_on_a100():
    cost = a100_7b()
    shape, device = cost.shape, cost.device
    one = cost.step(StepWork(tokens=1, sampled=1, local_rows=1, local_kv=500)).ms
    floor = shape.weight_bytes / device.hbm_bandwidth * 1e3
    assert floor < one < 2.5 * floor  # reading the weights once dominates a single decode
    prefill = cost.step(StepWork(tokens=2048, sampled=1, prefill=[(2048, 0)]))
    flops = 2 * 2048 * shape.weight_bytes / 2
    assert flops / device.peak_flops * 1e3 < prefill.ms < 2.5 * flops / device.peak_flops * 1e3
    times = [cost.step(StepWork(tokens=b, sampled=b, local_rows=b, local_kv=b * 500)).ms
             for b in (1, 8, 64, 256)]  # fmt: skip
    assert times == sorted(times)


def test_offloaded_rows_cost_only_what_the_local_attention_does_not_hide():
    cost = a100_7b()
    local = StepWork(tokens=64, sampled=64, local_rows=64, local_kv=64 * 800)
    split = StepWork(tokens=64, sampled=64, local_rows=32, local_kv=32 * 800,
                     remote={"attention-0": [32, 32 * 800, 800]})  # fmt: skip
    t_local, t_split = cost.step(local), cost.step(split)
    assert t_split.executor_ms["attention-0"] > 0
    # The executor reaches 0.6 of HBM bandwidth against the full kernel's ~0.78: its half
    # takes longer than the local half, and the step waits for the difference.
    assert t_split.layer_wait_ms > 0
    assert t_split.ms < t_local.ms + cost.num_layers * t_split.layer_wait_ms


def test_profile_cost_adds_the_executor_wait_per_layer():
    model = CostModel(num_layers=4, decode=(1.0, 0.1, 0.001), attention=(0.2, 0.0001, 0.0),
                      prefill=(2.0, 0.01))  # fmt: skip
    cost = ProfileStepCost(model, ModelShape.of(model_config("tiny"), 4), sync_ms=0.1)
    local = cost.step(StepWork(tokens=10, sampled=10, local_rows=10, local_kv=4000)).ms
    assert local == pytest.approx(1.0 + 0.1 * 10 + 0.001 * 4000)
    split = cost.step(StepWork(tokens=10, sampled=10, local_rows=5, local_kv=400,
                               remote={"attention-0": [5, 3600, 900]}))  # fmt: skip
    wait = (0.2 + 0.0001 * 3600 + 0.1) - 0.001 * 400 / 4
    assert split.ms == pytest.approx(1.0 + 0.1 * 10 + 0.001 * 400 + 4 * wait)


def test_profile_cost_of_offloading_the_decode_worker_itself_pays():
    """With the profile's offloading measured: a step with local rows pays the exchange per
    layer and executor beside the decode step; one without local rows is the offloaded step's
    line (no local attention), plus the exchange of any executor past the first."""
    model = CostModel(num_layers=4, decode=(1.0, 0.1, 0.001), attention=(0.2, 0.0001, 0.0),
                      prefill=(2.0, 0.01), offloaded=(0.6, 0.05), exchange=(0.03, 0.002))  # fmt: skip
    cost = ProfileStepCost(model, ModelShape.of(model_config("tiny"), 4), sync_ms=0.1)
    wait = 0.2 + 0.0001 * 3600 + 0.1  # no local attention to hide behind
    split = cost.step(StepWork(tokens=10, sampled=10, local_rows=5, local_kv=400,
                               remote={"attention-0": [5, 3600, 900]}))  # fmt: skip
    local_wait = wait - 0.001 * 400 / 4
    exchange = 0.03 + 0.002 * 5
    assert split.ms == pytest.approx(1.0 + 0.1 * 10 + 0.001 * 400 + 4 * (local_wait + exchange))
    alone = cost.step(StepWork(tokens=5, sampled=5, remote={"attention-0": [5, 3600, 900]}))
    assert alone.ms == pytest.approx(0.6 + 0.05 * 5 + 4 * wait)
    two = cost.step(StepWork(tokens=8, sampled=8, remote={"attention-0": [5, 3600, 900],
                                                           "attention-1": [3, 300, 100]}))  # fmt: skip
    assert two.ms == pytest.approx(0.6 + 0.05 * 8 + 4 * (wait + 0.03 + 0.002 * 3))
    # A profile without these measurements costs such a step as a decode step, as before.
    old = ProfileStepCost(replace(model, offloaded=(0.0, 0.0), exchange=(0.0, 0.0)),
                          ModelShape.of(model_config("tiny"), 4), sync_ms=0.1)  # fmt: skip
    no_local = StepWork(tokens=5, sampled=5, remote={"attention-0": [5, 3600, 900]})
    assert old.step(no_local).ms == pytest.approx(1.0 + 0.1 * 5 + 4 * wait)


def test_a_steps_work_counts_each_rows_kv_and_the_longest():
    from engine.batcher import ScheduledBatch
    from server.simulate.workers import EngineWorker

    def row(prompt: int, generated: int, executor: str = ""):
        seq = SimEngine(BatchConfig(), 64, 16).new_sequence(f"r{prompt}", prompt, 8, None)
        seq.token_ids += [0] * generated
        seq.num_computed_tokens, seq.executor = len(seq.token_ids) - 1, executor
        return seq

    prompt, a, b = row(50, 0), row(110, 10), row(299, 1)
    prompt.num_computed_tokens = 0
    c, d = row(80, 10, "attention-0"), row(390, 10, "attention-0")
    batch = ScheduledBatch(entries=[(prompt, 50), (a, 1), (b, 1), (c, 1), (d, 1)])
    work, offloaded = EngineWorker.step_work(None, batch)
    assert work.prefill == [(50, 0)] and (work.tokens, work.sampled) == (54, 5)
    assert (work.local_rows, work.local_kv, work.local_longest) == (2, 420, 300)
    assert work.remote == {"attention-0": [2, 490, 400]} and offloaded["attention-0"] == [c, d]


def test_a_cpu_profile_costs_attention_padded_to_the_longest_row():
    """The torch backend reads every row's keys padded to the longest row's: on a CPU profile,
    rows of 100 and 700 KV tokens cost as two of 700, here and on an executor."""
    model = CostModel(num_layers=4, decode=(1.0, 0.1, 0.001), attention=(0.2, 0.0001, 0.0),
                      prefill=(2.0, 0.01))  # fmt: skip
    shape = ModelShape.of(model_config("tiny"), 4)
    padded = ProfileStepCost(model, shape, sync_ms=0.1, padded_attention=True)
    exact = ProfileStepCost(model, shape, sync_ms=0.1)
    mixed = StepWork(tokens=2, sampled=2, local_rows=2, local_kv=800, local_longest=700)
    assert padded.step(mixed).ms == pytest.approx(1.0 + 0.1 * 2 + 0.001 * 1400)
    assert exact.step(mixed).ms == pytest.approx(1.0 + 0.1 * 2 + 0.001 * 800)
    remote = StepWork(tokens=2, sampled=2, remote={"attention-0": [2, 800, 700]})
    assert padded.step(remote).executor_ms["attention-0"] == pytest.approx(0.2 + 0.0001 * 1400)
    assert exact.step(remote).executor_ms["attention-0"] == pytest.approx(0.2 + 0.0001 * 800)


@pytest.mark.skipif(not DEFAULT_DIR.is_dir(), reason="Vidur's calibration data is not here")
@pytest.mark.parametrize("folder", ["a100", "h100"])
def test_shipped_fits_predict_the_measured_operators(folder):
    import numpy as np

    fit = load_fit(folder)
    for path in sorted((DEFAULT_DIR / folder).glob("*.mlp.csv")):
        table = read_operators(path)
        table = table.where(table.tp == 1)
        predicted = predict_table(fit, {"a100": "a100-80g", "h100": "h100"}[folder], table)
        layer_pred = sum(predicted.values())
        layer_meas = sum(table.times.values())
        assert np.median(np.abs(layer_pred - layer_meas) / layer_meas) < 0.1, path.name


# The engine's bookkeeping: the same batches as the real engine ------------------------------


def _trace(seed: int, n: int = 14) -> list[tuple[int, int, int]]:
    """(arrival step, prompt tokens, output tokens)."""
    rng = random.Random(seed)
    return sorted((rng.randint(0, 30), rng.randint(5, 120), rng.randint(3, 40)) for _ in range(n))


@pytest.mark.parametrize("handoff", [False, True])
def test_sim_engine_schedules_the_batches_llm_engine_schedules(handoff):
    batch = BatchConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=256)
    real = LLMEngine(
        EngineConfig(
            model="tiny", batch=batch, cache=CacheConfig(num_blocks=24, enable_prefix_caching=False)
        )
    )
    sim = SimEngine(batch, num_blocks=24, block_size=16)  # fmt: skip
    real_batches, sim_batches = [], []
    schedule = real.batcher.schedule

    def recording():
        b = schedule()
        real_batches.append([(s.request_id, n) for s, n in b.entries])
        return b

    real.batcher.schedule = recording
    trace = _trace(0 if not handoff else 1)
    held: list[tuple[int, str]] = []  # (step to release at, request id)
    step = 0
    while step < 400 and (trace or real.has_unfinished() or held or sim.has_unfinished()):
        for i, (at, prompt, out) in enumerate(trace):
            if at == step:
                ids = [random.Random(i).randint(10, 300) for _ in range(prompt)]
                params = SamplingParams(max_tokens=out, temperature=0.0, ignore_eos=True)
                real.add_request(f"r{i}-{at}", ids, params, handoff=handoff)
                sim.add_request(sim.new_sequence(f"r{i}-{at}", prompt, out, None), handoff)
        trace = [t for t in trace if t[0] != step]
        for _, rid in [h for h in held if h[0] == step]:
            real.release(rid)
            sim.release(rid)
        held = [h for h in held if h[0] != step]
        outputs = real.step()
        b = sim.schedule()
        sim_batches.append([(s.request_id, n) for s, n in b.entries])
        if b:
            result = sim.finish_step(b, 0.001, step + 1.0, TokenGaps())
            held += [(step + 3, s.request_id) for s in result.held]
        assert [o.handoff for o in outputs].count(True) == len(result.held if b else [])
        counts = ("last_batch_size", "last_prefill_tokens", "prompt_tokens_total",
                  "generation_tokens_total")  # fmt: skip
        assert [getattr(sim.timing, k) for k in counts] == [getattr(real.timing, k) for k in counts]
        step += 1
    assert real_batches == sim_batches
    assert real.batcher.num_preemptions == sim.batcher.num_preemptions
    assert any(len(b) > 1 for b in sim_batches)
    if not handoff:
        assert sim.batcher.num_preemptions > 0  # the KV is small enough to preempt


# A whole simulated deployment -------------------------------------------------------------------


def _deployment(policy: str) -> Simulation:
    model = CostModel(num_layers=4, decode=(0.5, 0.02, 0.001), attention=(0.03, 0.0001, 0.0),
                      prefill=(0.5, 0.1))  # fmt: skip
    shape = ModelShape.of(model_config("tiny"), 4)
    config = SimConfig(batch=BatchConfig(max_num_seqs=32, max_num_batched_tokens=512),
                       num_prefill=2, num_decode=2, prefill_blocks=96, decode_blocks=48,
                       offload_blocks=256)  # fmt: skip
    sim = Simulation(config, ProfileStepCost(model, shape), shape, parse_policy(policy, model))
    sim.router.check_books = True
    return sim


def _workload(n: int = 120, rate: float = 200.0) -> Workload:
    rng = random.Random(3)
    gaps = [rng.expovariate(rate) for _ in range(n)]
    offsets = [sum(gaps[:i]) for i in range(n)]
    return Workload([rng.randint(8, 300) for _ in range(n)], [rng.randint(1, 60) for _ in range(n)],
                    offsets)  # fmt: skip


@pytest.mark.parametrize("policy", ["none", "ratio:0.5", "load-aware"])
def test_deployment_finishes_every_request_and_drains_to_full_pools(policy):
    sim = _deployment(policy)
    work = _workload()
    done = sim.run(work)
    assert [r.output_tokens for r in done] == work.output_lens
    assert all(r.ttft > 0 and r.e2el >= r.ttft for r in done)
    sim.loop.run(until=sim.loop.now + 1.0)  # releases and heartbeats settle
    for process in sim.processes.values():
        blocks = process.engine.blocks if hasattr(process, "engine") else process.blocks
        assert blocks.num_free_blocks == blocks.num_blocks, process.instance
    assert (
        not sim.router.requests
        and not sim.router.lent
        and sim.router.books == type(sim.router.books)()
    )
    if policy != "none":
        assert sim.router.counters.offloaded > 0
    again = _deployment(policy).run(work)
    assert [(r.ttft, r.e2el) for r in again] == [(r.ttft, r.e2el) for r in done]


# The command ------------------------------------------------------------------------------------


def test_simulate_prints_and_saves_what_bench_saves(tmp_path, capsys):
    path = tmp_path / "sim.json"
    argv = ["simulate", "--num-prompts", "30", "--request-rate", "inf", "--max-output-len", "16",
            "--serve-args", "--model tiny --num-kv-blocks 128 --offload-policy always",
            "--save-result", str(path)]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Serving Benchmark Result" in out and "offload ratio" in out
    saved = json.loads(path.read_text())
    assert saved["completed"] == 30 and len(saved["itls"]) == 30
    assert all(len(itl) == n - 1 for itl, n in zip(saved["itls"], saved["output_lens"]))
    assert saved["simulated"]["offload_ratio"] == 1.0
    for key in ("request_throughput", "median_ttft_ms", "p99_itl_ms", "ttfts", "e2els", "args"):
        assert key in saved


def test_simulate_compare_writes_per_policy_rows(tmp_path, capsys):
    path = tmp_path / "cmp.json"
    argv = ["simulate", "--compare", "none,always", "--request-rates", "50,inf",
            "--num-prompts", "30", "--max-output-len", "16", "--serve-args",
            "--model tiny --num-kv-blocks 128", "--save-result", str(path)]  # fmt: skip
    assert main(argv) == 0
    assert "always / none output throughput" in capsys.readouterr().out
    saved = json.loads(path.read_text())
    assert [r["request_rate"] for r in saved["always"]] == [50.0, "inf"]
    assert saved["none"][0]["offload_ratio"] == 0.0 and saved["always"][0]["offload_ratio"] == 1.0


def test_bad_hardware_is_a_flag_error(capsys):
    args = ["simulate", "--serve-args", "--model llama-2-7b", "--num-prompts", "2"]
    assert main(args) == 2  # the built-in profile is tiny's
    assert "--gpu" in capsys.readouterr().err
    assert build_parser().parse_args(["simulate", "--gpu", "h200"]).gpu == "h200"
    assert math.isinf(build_parser().parse_args(["simulate"]).request_rate)
