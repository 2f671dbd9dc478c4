"""Batcher.decode_steps_without_decision and the KV growth made for such steps at once, against
the real schedule() run step by step: the same block tables and free list, and the step after
the last one predicted decides something (a preemption) when the pool is what ended them."""

from __future__ import annotations

import copy
import random
from dataclasses import replace

import pytest

from engine.batcher import Batcher
from tests.engine.test_batcher import add, complete_step, make_batcher, plan, step


def decoding(seed: int, num_blocks: int) -> Batcher:
    """A batcher whose running sequences all decode (prompts done), their lengths mixed. No
    prefix caching, as the simulator (which commits no computed blocks between such steps)."""
    rng = random.Random(seed)
    batcher = make_batcher(num_blocks=num_blocks, block_size=4, max_num_batched_tokens=256,
                           prefix_caching=False)  # fmt: skip
    for i in range(rng.randint(2, 6)):
        add(batcher, rng.randint(1, 21), f"r{i}")
    while batcher.waiting or any(s.num_computed_tokens < s.num_prompt_tokens
                                 for s in batcher.running):  # fmt: skip
        step(batcher)
    for _ in range(rng.randint(0, 5)):
        step(batcher)
    return batcher


def state(batcher: Batcher) -> tuple:
    return (
        [(s.request_id, list(s.block_table), s.num_tokens) for s in batcher.running],
        list(batcher.blocks.free_block_ids),
    )


@pytest.mark.parametrize("seed", range(12))
def test_predicted_steps_are_what_schedule_does_step_by_step(seed):
    batcher = decoding(seed, num_blocks=random.Random(seed).choice([20, 28, 64]))
    rows = [s.request_id for s in batcher.running]
    steps = batcher.decode_steps_without_decision(limit=40)
    assert steps >= 1
    by_step, at_once, ahead = batcher, copy.deepcopy(batcher), copy.deepcopy(batcher)
    for i in range(steps):
        batch = by_step.schedule()
        assert plan(batch) == [(r, 1) for r in rows] and not batch.preempted, i
        if i < steps - 1:
            complete_step(by_step, batch)
    # At once: the first step's schedule(), then the tokens of the steps before the last, then
    # the KV growth of the rest.
    first = at_once.schedule()
    for _ in range(steps - 1):
        complete_step(at_once, first)
    if steps > 1:
        at_once.grow_for_decode_steps(steps - 1)
    assert state(at_once) == state(by_step)
    # Or the growth before those tokens are appended (`ahead` of the tables).
    first = ahead.schedule()
    if steps > 1:
        ahead.grow_for_decode_steps(steps - 1, ahead=steps - 1)
    for _ in range(steps - 1):
        complete_step(ahead, first)
    assert state(ahead) == state(by_step)
    complete_step(by_step, batch)
    if steps < 40:  # the pool ended them: the next step preempts
        assert by_step.schedule().preempted


@pytest.mark.parametrize("seed", range(6))
def test_predicted_after_a_scheduled_batch_counts_the_calls_after_its_step(seed):
    batcher = decoding(seed, num_blocks=random.Random(seed).choice([20, 28]))
    late = add(batcher, 1, "late")  # admitted by the next schedule(): a decision
    assert batcher.decode_steps_without_decision(limit=40) == 0
    batch = batcher.schedule()
    assert late in batcher.running
    steps = batcher.decode_steps_without_decision(limit=40, after=batch)
    assert 1 <= steps < 40
    rows = [(s.request_id, 1) for s in batcher.running]
    complete_step(batcher, batch)
    for _ in range(steps):
        batch = batcher.schedule()
        assert plan(batch) == rows and not batch.preempted
        complete_step(batcher, batch)
    assert batcher.schedule().preempted


def test_blocks_for_rounds_is_what_the_steps_take():
    batcher = decoding(3, num_blocks=64)
    free = batcher.blocks.num_free_blocks
    need = batcher.blocks.blocks_for_rounds(batcher.running, 9)
    for _ in range(9):
        batch = batcher.schedule()
        complete_step(batcher, batch)
    assert free - batcher.blocks.num_free_blocks == need > 0


def test_nothing_is_predicted_while_a_decision_is_due():
    batcher = decoding(1, num_blocks=64)
    assert batcher.decode_steps_without_decision(limit=5) == 5
    waiting = add(batcher, 8, "late")  # a prompt to admit
    assert batcher.decode_steps_without_decision(limit=5) == 0
    batcher.finish(waiting, reason=None)
    assert batcher.decode_steps_without_decision(limit=5) == 5
    batcher.running[0].num_computed_tokens -= 2  # a chunk to compute, not one token
    assert batcher.decode_steps_without_decision(limit=5) == 0
    batcher.running[0].num_computed_tokens += 2
    rows = len(batcher.running)
    batcher.config = replace(batcher.config, max_num_batched_tokens=rows - 1)
    assert batcher.decode_steps_without_decision(limit=5) == 0
    assert len(batcher.schedule().entries) == rows - 1  # one row waits for the next step
