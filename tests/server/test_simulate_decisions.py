"""The simulated router decides as the real one: at every placement of a small simulated run,
the real `server.router.core.Router`, given the same requests in flight, the same heartbeats and the
same policy state, picks the same prefill worker, the same decode worker and the same
executor (or waits too)."""

from __future__ import annotations

import copy
import random

import pytest

from engine.config import BatchConfig
from scheduler.cost_model import CostModel
from scheduler.policies import parse_policy
from server.router.core import Router, RouterRequest
from server.router.worker_registry import WorkerInfo
from server.simulate.cluster import SimConfig, Simulation, Workload
from server.simulate.hardware import ModelShape, model_config
from server.simulate.router import SimRouter
from server.simulate.step_cost import ProfileStepCost
from transport.messages import Register, SamplingSpec

GREEDY = SamplingSpec(max_tokens=8, temperature=0.0, top_p=1.0, top_k=-1, min_p=0.0, seed=None,
                      stop=[], stop_token_ids=[], ignore_eos=True, logprobs=False)  # fmt: skip
MODEL = CostModel(num_layers=4, decode=(0.5, 0.02, 0.001), attention=(0.03, 0.0004, 0.01),
                  prefill=(0.5, 0.1))  # fmt: skip


def snapshot(sim_router: SimRouter, target=None) -> dict:
    sim_router.apply_heartbeats()  # those arrived by now, as the decision will see them
    return {
        "requests": [
            (r.wire_id, r.index, r.phase, r.prefill, r.decode, r.executor, r.prompt_tokens,
             r.reserve_blocks)
            for r in sim_router.requests.values() if r is not target
        ],
        "workers": {n: (w.role, w.stats, w.colocated_with, w.heartbeat_at)
                    for n, w in sim_router.workers.items()},
        "assigned": dict(sim_router.assigned),
        "policy": copy.deepcopy(sim_router.policy),
    }  # fmt: skip


def real_router(state: dict, tmp_path) -> Router:
    router = Router("tiny", tokenizer=None, control_address=f"ipc://{tmp_path}/control",
                    offload_policy=state["policy"])  # fmt: skip
    for name, (role, stats, colocated, seen) in state["workers"].items():
        reg = Register(role=role, instance=name, pid=1, model="tiny", max_model_len=2048,
                       kv_endpoint={}, stats=stats, colocated_with=colocated)  # fmt: skip
        router.registry.workers[name] = WorkerInfo(name, role, name.encode(), reg, seen)
    for rid, index, phase, prefill, decode, executor, prompt, blocks in state["requests"]:
        router.requests[rid] = RouterRequest(
            rid, [0] * prompt, GREEDY, None, prefill, phase=phase, decode=decode,
            executor=executor, index=index, reserve_blocks=blocks,
        )  # fmt: skip
    router.assigned = dict(state["assigned"])
    router._send = lambda instance, message: True
    return router


@pytest.mark.parametrize("policy", ["load-aware", "ratio:0.6", "none"])
def test_every_simulated_placement_is_the_real_routers(policy, tmp_path, monkeypatch):
    shape = ModelShape.of(model_config("tiny"), 4)
    config = SimConfig(batch=BatchConfig(max_num_seqs=16, max_num_batched_tokens=512),
                       num_prefill=2, num_decode=2, prefill_blocks=160, decode_blocks=40,
                       offload_blocks=200)  # fmt: skip
    sim = Simulation(config, ProfileStepCost(MODEL, shape), shape, parse_policy(policy, MODEL))
    decisions = []
    arrival, reserve = SimRouter.on_arrival, SimRouter._try_reserve

    def on_arrival(self, req):
        state = snapshot(self)
        reserve_count = len(self.requests)
        arrival(self, req)
        if len(self.requests) > reserve_count:
            decisions.append(("prefill", state, req, req.prefill))

    def try_reserve(self, req):
        state = snapshot(self, target=req)
        fields = (req.wire_id, req.index, req.prompt_tokens, req.reserve_blocks, req.prefill)
        reserve(self, req)
        decisions.append(("decode", state, fields, (req.decode, req.executor)))

    monkeypatch.setattr(SimRouter, "on_arrival", on_arrival)
    monkeypatch.setattr(SimRouter, "_try_reserve", try_reserve)
    rng = random.Random(7)
    n = 60
    offsets = sorted(rng.uniform(0, 0.3) for _ in range(n))
    sim.run(Workload([rng.randint(8, 300) for _ in range(n)],
                     [rng.randint(2, 40) for _ in range(n)], offsets))  # fmt: skip
    placed = set()
    for kind, state, req, chosen in decisions:
        router = real_router(state, tmp_path)
        try:
            if kind == "prefill":
                from scheduler.placement import pick_prefill

                assert pick_prefill(router._loads("prefill")) == chosen
                continue
            rid, index, prompt, blocks, prefill = req
            rr = RouterRequest(rid, [0] * prompt, GREEDY, None, prefill, phase="reserving",
                               index=index, reserve_blocks=blocks)  # fmt: skip
            router.requests[rid] = rr
            router._try_reserve(rr)
            assert (rr.decode, rr.executor) == chosen, (rid, chosen)
            placed.add(chosen)
        finally:
            router.sock.close(0)
            router.ctx.term()
    decodes = {d for d, _ in placed if d}
    assert decodes == {"decode-0", "decode-1"}
    waited = any(chosen == (None, None) for kind, _, _, chosen in decisions if kind == "decode")
    offloaded = any(e for _, e in placed)
    assert offloaded == (policy != "none")
    assert waited or policy != "none"  # the small decode pools make the baseline wait
