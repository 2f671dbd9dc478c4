"""The load-aware offload policy on constructed cluster states: it offloads while the executor's
attention hides behind the decode worker's local per-layer work, stops at the overlap window,
at the pool's reserve and at the TPOT SLO, gives requests the decode worker has no KV room for
the whole window, and corrects its model from measured times."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from scheduler.cost_model import CostModel
from scheduler.load_aware import LoadAwarePolicy
from scheduler.offload_policy import (
    ClusterView,
    DecodeLoad,
    ExecutorLoad,
    OffloadCandidate,
    PolicyError,
)
from scheduler.policies import parse_policy

# Decode step 4 + 0.1/request + 0.001/local token (ms), over 4 layers; executor attention per
# layer 0.1 + 0.0002/offloaded token + 0.01/request.
MODEL = CostModel(
    num_layers=4, decode=(4.0, 0.1, 0.001), attention=(0.1, 0.0002, 0.01), prefill=(1.0, 0.01)
)
PROMPT = 200
NEED = 13  # blocks of 16 for the prompt and the first token


def decode_load(**kw) -> DecodeLoad:
    base = dict(instance="decode-0", batch=10, context_tokens=10_000, free_blocks=500)
    return DecodeLoad(**{**base, **kw})


def executor_load(**kw) -> ExecutorLoad:
    base = dict(
        instance="attention-0", alive=True, num_blocks=1000, free_blocks=900, offloaded=2,
        offloaded_tokens=1000,
    )  # fmt: skip
    return ExecutorLoad(**{**base, **kw})


def candidate(decode=None, executor=None, prompt=PROMPT, need=NEED) -> OffloadCandidate:
    ex = executor or executor_load()
    return OffloadCandidate(
        request_index=0, prompt_tokens=prompt, executor_alive=ex.alive,
        executor_free_blocks=ex.free_blocks, blocks_needed=need,
        view=ClusterView(decode=decode or decode_load(), executor=ex),
    )  # fmt: skip


def test_offloads_while_the_executor_has_headroom():
    policy = LoadAwarePolicy(MODEL)
    a = policy.assess(candidate())
    assert a.offload, a
    # Window: (4 + 0.1 * 11 + 0.001 * 10000) / 4 layers; attention well inside it.
    assert a.window_ms == pytest.approx(15.1 / 4)
    assert a.attention_ms < a.budget_ms


def test_stops_when_the_executor_would_exceed_the_overlap_window():
    policy = LoadAwarePolicy(MODEL)
    ex = executor_load(offloaded=0, offloaded_tokens=0)
    accepted = 0
    while policy.decide(candidate(executor=ex)) and accepted < 1000:
        accepted += 1
        ex = replace(
            ex, offloaded=ex.offloaded + 1, offloaded_tokens=ex.offloaded_tokens + PROMPT + 1,
            free_blocks=ex.free_blocks - NEED,
        )  # fmt: skip
    a = policy.assess(candidate(executor=ex))
    assert 0 < accepted < 1000
    assert a.reason == "executor beyond the overlap window"
    assert a.attention_ms > a.budget_ms
    # The last accepted request still fitted the window.
    before = replace(ex, offloaded=ex.offloaded - 1, offloaded_tokens=ex.offloaded_tokens - 201)
    assert policy.assess(candidate(executor=before)).attention_ms <= a.budget_ms


def test_stops_at_the_pool_reserve():
    policy = LoadAwarePolicy(MODEL, pool_reserve=0.1, prefill_reserve_blocks=5)
    # 1000 blocks: 100 kept free for growth, 5 for prefill.
    assert policy.decide(candidate(executor=executor_load(free_blocks=105 + NEED)))
    a = policy.assess(candidate(executor=executor_load(free_blocks=105 + NEED - 1)))
    assert not a.offload and a.reason == "offload pool at its reserve"


def test_never_breaks_the_slo_in_its_own_model():
    slo = 12.0
    policy = LoadAwarePolicy(MODEL, slo_tpot_ms=slo)
    offloaded = 0
    for batch, context, ex_tokens in itertools.product(
        (1, 8, 32, 64), (0, 2000, 8000, 20000), (0, 1000, 5000)
    ):
        c = candidate(
            decode=decode_load(batch=batch, context_tokens=context),
            executor=executor_load(offloaded_tokens=ex_tokens),
        )
        a = policy.assess(c)
        if a.offload:
            offloaded += 1
            assert a.tpot_ms <= slo
            assert MODEL.decode_step_ms(batch + 1, context) <= slo
        elif MODEL.decode_step_ms(batch + 1, context) > slo:
            assert a.reason == "TPOT SLO"
    assert offloaded > 0
    assert LoadAwarePolicy(MODEL).decide(candidate(decode_load(batch=64, context_tokens=20000)))


def test_prefers_offloading_when_decode_kv_is_short():
    policy = LoadAwarePolicy(MODEL, ample_kv_window_share=0.8)
    # Executor attention at about 90% of the window: too much for a request that fits locally,
    # within the window for one the decode worker has no room for.
    window = MODEL.decode_layer_ms(11, 10_000)
    tokens = int((0.9 * window - 0.1 - 0.01 * 3) / 0.0002) - PROMPT - 1
    ex = executor_load(offloaded_tokens=tokens)
    ample = policy.assess(candidate(decode=decode_load(free_blocks=NEED + 10), executor=ex))
    short = policy.assess(candidate(decode=decode_load(free_blocks=NEED - 1), executor=ex))
    assert not ample.offload and not ample.kv_short
    assert short.offload and short.kv_short
    assert short.attention_ms == pytest.approx(0.9 * window, rel=0.01)


def test_online_correction_moves_predictions_toward_measurements():
    policy = LoadAwarePolicy(MODEL)
    measured = 2 * MODEL.decode_step_ms(10, 10_000)  # the device runs twice as slow as profiled
    errors = []
    for beat in range(20):
        d = decode_load(
            last_batch_size=10, last_context_tokens=10_000, step_time_ms=measured,
            heartbeat_at=float(beat),
        )  # fmt: skip
        a = policy.assess(candidate(decode=d))
        errors.append(abs(a.tpot_ms - 2 * MODEL.decode_step_ms(11, 10_000)))
    assert all(b < a for a, b in zip(errors, errors[1:]))
    assert policy.correction("decode-0").step == pytest.approx(2.0, rel=0.05)
    # One heartbeat is one measurement, however many requests are decided on it.
    ratio = policy.correction("decode-0").step
    for _ in range(5):
        policy.assess(candidate(decode=d))
    assert policy.correction("decode-0").step == ratio


def test_executor_correction_and_wait_excluded_from_the_window():
    policy = LoadAwarePolicy(MODEL)
    predicted = MODEL.attention_layer_ms(1000, 2)
    for beat in range(30):
        ex = executor_load(
            last_offloaded=2, last_offloaded_tokens=1000, attention_time_ms=3 * predicted,
            heartbeat_at=float(beat),
        )  # fmt: skip
        policy.assess(candidate(executor=ex))
    assert policy.correction("attention-0").attention == pytest.approx(3.0, rel=0.05)
    # A decode step that waited on its executor: only the local part measures the window.
    local = MODEL.decode_step_ms(10, 10_000)
    waiting = decode_load(
        last_batch_size=10, last_context_tokens=10_000, step_time_ms=local + 4 * 1.0,
        offload_wait_ms=1.0, heartbeat_at=1.0,
    )  # fmt: skip
    other = LoadAwarePolicy(MODEL)
    other.assess(candidate(decode=waiting))
    assert other.correction("decode-0").step == pytest.approx(1.0)


def test_no_offload_without_a_live_executor_or_decode_worker():
    policy = LoadAwarePolicy(MODEL)
    assert not policy.decide(candidate(executor=executor_load(alive=False)))
    c = candidate()
    assert not policy.decide(replace(c, view=replace(c.view, decode=None)))
    assert not policy.decide(replace(c, view=None))


def test_parse_policy_builds_it_from_the_builtin_profile():
    policy = parse_policy("load-aware", slo_tpot_ms=50.0)
    assert isinstance(policy, LoadAwarePolicy) and policy.needs_view
    assert policy.name == "load-aware" and policy.slo_tpot_ms == 50.0
    assert not parse_policy("always").needs_view
    with pytest.raises(PolicyError):
        LoadAwarePolicy(MODEL, slo_tpot_ms=0)
