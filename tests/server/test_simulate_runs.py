"""Decode runs (server/simulate/decode_run.py): steps that cannot change a decision, run as one
event, simulate exactly what stepping one at a time does: the same step times, the same
requests' timestamps and gaps, the same heartbeats, the same KV pools."""

from __future__ import annotations

import random

import pytest

from engine.config import BatchConfig
from scheduler.cost_model import CostModel
from scheduler.policies import parse_policy
from server.simulate.cluster import SimConfig, Simulation, Workload
from server.simulate.engine import SimEngine
from server.simulate.hardware import ModelShape, gpu, model_config
from server.simulate.roofline import load_fit
from server.simulate.router import SimRouter
from server.simulate.step_cost import GpuStepCost, ProfileStepCost, StepWork
from server.simulate.workers import DecodeWorker

POLICY_MODEL = CostModel(num_layers=32, decode=(12.0, 0.05, 0.0004), attention=(0.02, 3e-6, 0.0),
                         prefill=(10.0, 0.08))  # fmt: skip


def gpu_cost() -> GpuStepCost:
    device = gpu("a100-80g")
    return GpuStepCost(ModelShape.of(model_config("llama-2-7b"), 2), device, load_fit(device.fit))


@pytest.mark.parametrize("kind", ["gpu", "profile"])
def test_a_runs_step_times_are_each_steps_own(kind):
    cost = gpu_cost()
    if kind == "profile":
        cost = ProfileStepCost(POLICY_MODEL, cost.shape)
    rng = random.Random(5)
    for _ in range(20):
        rows = rng.randint(1, 64)
        work = StepWork(tokens=rows, sampled=rows, local_rows=rows,
                        local_kv=rows * rng.randint(2, 3000))  # fmt: skip
        steps = rng.randint(1, 50)
        ms = cost.decode_steps(work, steps)
        times = [cost.step(StepWork(tokens=rows, sampled=rows, local_rows=rows,
                                    local_kv=work.local_kv + i * rows))
                 for i in range(steps)]  # fmt: skip
        assert ms == [t.ms for t in times]  # bit for bit
        start = rng.randint(0, steps - 1)
        flops, nbytes = cost.decode_totals(work, start, steps)
        assert flops == pytest.approx(sum(t.flops for t in times[start:]), rel=1e-12)
        assert nbytes == pytest.approx(sum(t.bytes for t in times[start:]), rel=1e-12)


def simulate(policy: str) -> tuple[Simulation, list, list]:
    config = SimConfig(batch=BatchConfig(max_num_seqs=24, max_num_batched_tokens=1024,
                                         max_model_len=2048),
                       num_prefill=1, num_decode=2, prefill_blocks=400, decode_blocks=70,
                       offload_blocks=120, keep_itls=True)  # fmt: skip
    cost = gpu_cost()
    sim = Simulation(config, cost, cost.shape, parse_policy(policy, POLICY_MODEL))
    sim.router.check_books = True
    beats = []
    record = sim.meter.heartbeat
    sim.meter.heartbeat = lambda s, p, stats: (beats.append((s.loop.now, p.instance, stats)),
                                               record(s, p, stats))  # fmt: skip
    rng = random.Random(11)
    n = 90
    offsets = sorted(rng.uniform(0, 6.0) for _ in range(n))
    done = sim.run(Workload([rng.randint(16, 500) for _ in range(n)],
                            [rng.randint(2, 400) for _ in range(n)], offsets))  # fmt: skip
    sim.loop.run(until=sim.loop.now + 1.0)  # releases and heartbeats settle
    return sim, done, beats


@pytest.mark.parametrize("policy", ["none", "ratio:0.4"])
def test_runs_simulate_what_stepping_one_at_a_time_does(policy, monkeypatch):
    runs = {"begun": 0, "read": 0, "shortened": 0}
    begin, read = DecodeWorker._begin_run, DecodeWorker._read_between

    def counted_begin(self, *args):
        runs["begun"] += 1
        begin(self, *args)

    def counted_read(self, run, step):
        planned, messages = run.planned, len(self.inbox) if step < run.last else 0
        read(self, run, step)
        runs["read"] += messages > 0
        runs["shortened"] += run.planned < planned

    monkeypatch.setattr(DecodeWorker, "_begin_run", counted_begin)
    monkeypatch.setattr(DecodeWorker, "_read_between", counted_read)
    sim, done, beats = simulate(policy)
    with monkeypatch.context() as m:
        m.setattr(SimEngine, "decision_free_steps", lambda self, cap, after=None: 0)
        ref, ref_done, ref_beats = simulate(policy)
    # Runs, which read reservations between their steps and went on, some cut short by them.
    assert runs["begun"] > 20 and runs["read"] > 20 and runs["shortened"] > 0
    assert sim.loop.events < ref.loop.events

    def requests(reqs):
        return [(r.ttft, r.e2el, r.output_tokens, r.itl, r.error) for r in reqs]

    assert requests(done) == requests(ref_done)
    assert all(r.output_tokens for r in done)
    assert sim.token_gaps.as_dict() == ref.token_gaps.as_dict()
    assert beats == ref_beats  # every heartbeat of every worker, mid-run ones too
    for name, process in sim.processes.items():
        other = ref.processes[name]
        assert (process.busy_s, getattr(process, "steps", 0)) == (
            other.busy_s, getattr(other, "steps", 0),
        ), name  # fmt: skip
        blocks = process.engine.blocks if hasattr(process, "engine") else process.blocks
        assert blocks.num_free_blocks == blocks.num_blocks, name
    decode = [p for p in sim.processes.values() if p.role == "decode"]
    assert sum(p.engine.batcher.num_preemptions for p in decode) == sum(
        p.engine.batcher.num_preemptions for p in ref.processes.values() if p.role == "decode"
    )
    assert sim.router.counters.retries == ref.router.counters.retries
    for key in ("decode_flops", "decode_bytes", "decode_busy_s", "decode_row_seconds"):
        assert getattr(sim.meter, key) == pytest.approx(getattr(ref.meter, key), rel=1e-12)
    assert sim.meter.decode_steps == ref.meter.decode_steps
    if policy != "none":
        assert sim.router.counters.offloaded > 0


@pytest.mark.parametrize("policy", ["none", "load-aware"])
def test_heartbeats_applied_at_decisions_decide_as_heartbeat_events_do(policy, monkeypatch):
    """The router applies a heartbeat when a decision reads the workers, not as an event of
    its own: every placement, every request's times and every worker's stats as seen at the
    end equal those of a run whose heartbeats arrive as events."""

    def seen(sim, done):
        sim.router.apply_heartbeats()
        return (
            [(r.wire_id, r.prefill, r.decode, r.executor, r.ttft, r.e2el, r.itl) for r in done],
            {n: (w.stats, w.heartbeat_at) for n, w in sim.router.workers.items()},
        )

    sim, done, _ = simulate(policy)
    lazy = seen(sim, done)
    with monkeypatch.context() as m:
        m.setattr(SimRouter, "heartbeat",
                  lambda self, instance, stats: self.send(self.on_heartbeat, instance, stats))  # fmt: skip
        ref, done, _ = simulate(policy)
    assert not ref.router._heartbeats
    assert lazy == seen(ref, done)
    assert sim.loop.events < ref.loop.events
