"""Prefill on one engine, decode on another, KV copied between their pools: the tokens must be
exactly those of one engine doing both, greedy and seeded alike, and every block comes back."""

from __future__ import annotations

import pytest
import torch

from engine.engine import Handoff
from engine.llm import LLM
from engine.sequence import SamplingParams

# The last fills its blocks exactly: the decode side reserves one block more than it receives.
PROMPTS = [[5, 9, 33, 120, 7], list(range(40, 77)), [300, 301, 302] * 7, list(range(100, 132))]


@pytest.fixture(scope="module")
def engines():
    kwargs = dict(num_blocks=64, block_size=16, max_model_len=256, max_num_seqs=8)
    return LLM("tiny", **kwargs), LLM("tiny", **kwargs), LLM("tiny", **kwargs)


def run_disaggregated(prefill: LLM, decode: LLM, prompts, params: SamplingParams):
    p, d = prefill.engine, decode.engine
    for i, prompt in enumerate(prompts):
        p.add_request(f"r{i}", prompt, SamplingParams(**vars(params)), handoff=True)
    firsts = {}
    while p.has_unfinished():
        for out in p.step():
            firsts[out.request_id] = out
    results = {}
    for rid, out in firsts.items():
        if out.finished:
            results[rid] = out.token_ids
            continue
        assert out.handoff
        src = p.held_block_table(rid)
        handoff = Handoff(
            out.prompt_token_ids, out.token_ids, None, SamplingParams(**vars(params)),
            len(out.new_text),
        )  # fmt: skip
        dst = d.reserve_prefilled(rid, handoff)
        assert len(dst) >= len(src)
        d.runner.kv_pool[:, :, dst[: len(src)]] = p.runner.kv_pool[:, :, src]
        p.release(rid)
        d.start_prefilled(rid)
    while d.has_unfinished():
        for out in d.step():
            if out.finished:
                results[out.request_id] = out.token_ids
    return [results[f"r{i}"] for i in range(len(prompts))]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=20, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True),
        # Penalties follow from prompt + outputs, which the hand-off carries.
        SamplingParams(
            max_tokens=20,
            temperature=0,
            frequency_penalty=1.0,
            presence_penalty=0.5,
            repetition_penalty=1.3,
            logit_bias={130: -5.0},
            min_tokens=10,
        ),  # fmt: skip
    ],
    ids=["greedy", "seeded", "penalized"],
)
def test_handoff_matches_single_engine(engines, params):
    single, prefill, decode = engines
    expected = [o.token_ids for o in single.generate(PROMPTS, params)]
    assert run_disaggregated(prefill, decode, PROMPTS, params) == expected
    for llm in engines:
        stats = llm.engine.stats()
        assert stats["num_free_blocks"] == stats["num_blocks"]


def test_first_token_that_ends_the_request_is_not_handed_off(engines):
    _, prefill, decode = engines
    params = SamplingParams(max_tokens=1, temperature=0)
    outs = run_disaggregated(prefill, decode, PROMPTS[:1], params)
    assert len(outs[0]) == 1
    assert prefill.engine.stats()["num_free_blocks"] == prefill.engine.stats()["num_blocks"]


def test_abort_of_held_and_reserved_requests_frees_blocks(engines):
    _, prefill, decode = engines
    p, d = prefill.engine, decode.engine
    p.add_request("held", PROMPTS[1], SamplingParams(max_tokens=5, temperature=0), handoff=True)
    while p.has_unfinished():
        p.step()
    assert p.stats()["num_free_blocks"] < p.stats()["num_blocks"]
    dst = d.reserve_prefilled(
        "held", Handoff(PROMPTS[1], [3], None, SamplingParams(max_tokens=5), 0)
    )
    assert len(dst) == 3  # 38 tokens in 16-token blocks
    assert p.abort("held") and d.abort("held")
    for engine in (p, d):
        assert engine.stats()["num_free_blocks"] == engine.stats()["num_blocks"]


def test_choices_of_one_prompt_share_its_blocks_on_the_decode_side(engines):
    """n > 1 on the decode worker: a second choice of the same prompt reuses the first one's
    full prompt blocks (nothing copied into them), and both decode exactly as one engine."""
    single, prefill, decode = engines
    p, d = prefill.engine, decode.engine
    prompt = list(range(200, 237))  # 37 tokens, new to these engines: 2 full blocks + 5
    params = [
        SamplingParams(max_tokens=12, temperature=1.0, seed=seed, ignore_eos=True)
        for seed in (7, 8)
    ]
    expected = [single.generate([prompt], sp)[0].token_ids for sp in params]
    shared_counts, results = [], {}
    for i, sp in enumerate(params):
        rid = f"choice-{i}"
        p.add_request(rid, prompt, SamplingParams(**vars(sp)), handoff=True)
        while p.has_unfinished():
            (out,) = [o for o in p.step() if o.request_id == rid] or [None]
        src = p.held_block_table(rid)
        handoff = Handoff(prompt, out.token_ids, None, SamplingParams(**vars(sp)), 0)
        table, shared = d.reserve_prefilled_sharing(rid, handoff)
        shared_counts.append(shared)
        before = d.runner.kv_pool[:, :, table[:shared]].clone()
        d.runner.kv_pool[:, :, table[shared : len(src)]] = p.runner.kv_pool[:, :, src[shared:]]
        assert torch.equal(d.runner.kv_pool[:, :, table[:shared]], before)
        p.release(rid)
        d.start_prefilled(rid)
    assert shared_counts == [0, 2]
    while d.has_unfinished():
        for out in d.step():
            if out.finished:
                results[out.request_id] = out.token_ids
    assert [results["choice-0"], results["choice-1"]] == expected
    assert expected[0] != expected[1]  # the choices really differ past the shared prompt
    for llm in engines:
        stats = llm.engine.stats()
        assert stats["num_free_blocks"] == stats["num_blocks"]
