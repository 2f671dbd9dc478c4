"""The simulator's decode compute figure: the arithmetic of decoding, with the prompts a decode
worker prefills again after a preemption metered apart (benchmarks/README.md, sim_paper.py)."""

from __future__ import annotations

import random

import pytest

from engine.config import BatchConfig
from scheduler.cost_model import builtin_profile
from scheduler.policies import parse_policy
from server.simulate.cluster import SimConfig, Simulation, Workload
from server.simulate.hardware import ModelShape, gpu, model_config
from server.simulate.roofline import load_fit
from server.simulate.step_cost import GpuStepCost, StepWork


def _cost(model: str) -> GpuStepCost:
    return GpuStepCost(ModelShape.of(model_config(model), 2), gpu("a100-80g"), load_fit("a100"))


def test_a_steps_prompt_chunks_are_its_prefill_flops():
    cost = _cost("llama-2-7b")
    decode = cost.step(StepWork(tokens=64, sampled=64, local_rows=64, local_kv=64 * 800))
    mixed = cost.step(StepWork(tokens=64 + 1000, sampled=64, prefill=[(1000, 300)],
                               local_rows=64, local_kv=64 * 800))  # fmt: skip
    assert decode.prefill_flops == 0.0
    assert mixed.prefill_flops > 10 * decode.flops  # 1,000 prompt rows against 64 decodes
    assert mixed.flops - mixed.prefill_flops == pytest.approx(decode.flops, rel=1e-9)


def _run(decode_blocks: int) -> tuple[dict[str, float], int]:
    """FLOPs of the decode worker over one run (decoding, recompute), and its preemptions."""
    cost = _cost("tiny")
    config = SimConfig(batch=BatchConfig(max_num_seqs=64, max_num_batched_tokens=1024),
                       prefill_blocks=512, decode_blocks=decode_blocks)  # fmt: skip
    sim = Simulation(config, cost, cost.shape, parse_policy("none", builtin_profile()))
    rng = random.Random(5)
    n = 80
    work = Workload([rng.randint(100, 300) for _ in range(n)],
                    [rng.randint(100, 200) for _ in range(n)], [0.0] * n)  # fmt: skip
    done = sim.run(work)
    assert [r.output_tokens for r in done] == work.output_lens
    u, meter = sim.meter.utilisation(sim, cost.device), sim.meter
    seconds = meter.end_at - meter.begin_at
    flops = {k: u[f"decode_{k}_per_s"] * seconds for k in ("flops", "recompute_flops")}
    return flops, sim.processes["decode-0"].engine.batcher.num_preemptions


def test_recomputed_prompts_are_not_decode_compute():
    roomy, preemptions = _run(decode_blocks=4096)
    assert preemptions == 0 and roomy["recompute_flops"] == 0.0
    tight, preemptions = _run(decode_blocks=64)  # 1,024 tokens for 80 requests of 200-500
    assert preemptions > 20

    # The same tokens decoded at the same contexts: the same decode arithmetic, whichever
    # requests were preempted (each recomputed prompt's last row, which samples a token, is
    # metered with its prompt: well under 1%).
    assert tight["flops"] == pytest.approx(roomy["flops"], rel=0.01)
    assert tight["recompute_flops"] > 0.5 * tight["flops"]
