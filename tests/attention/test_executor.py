"""The attention executor's books: adopting lent prompt blocks, growing in its own blocks,
replaying a step the decode worker lost elsewhere, refusing anything else, freeing exactly."""

from __future__ import annotations

import pytest
import torch

from attention.executor import AttentionExecutor, StepError
from attention.torch_backend import TorchAttention

BLOCK = 4


@pytest.fixture
def executor() -> AttentionExecutor:
    # Blocks [0, 8) are the prefill worker's; [8, 16) are the executor's own.
    pool = torch.zeros(2, 2, 16, BLOCK, 1, 8)
    return AttentionExecutor(pool, TorchAttention(2, 1, 8, 8**-0.5), first_block_id=8)


def test_adopts_lent_blocks_and_grows_in_its_own(executor):
    executor.adopt("r", [2, 5], num_prompt_tokens=8)  # exactly fills both lent blocks
    assert executor.requests["r"].block_table[:2] == [2, 5]
    assert executor.blocks.num_free_blocks == 7  # room for the first generated token
    step = executor.prepare(["r"], [8])
    assert step.slots.tolist() == [executor.requests["r"].block_table[2] * BLOCK]
    executor.commit(["r"], [8])
    executor.release("r")
    assert executor.blocks.num_free_blocks == 8


def test_a_lost_step_may_be_replayed_but_positions_cannot_jump(executor):
    executor.adopt("r", [1], num_prompt_tokens=3)
    executor.prepare(["r"], [3])
    executor.commit(["r"], [3])
    executor.prepare(["r"], [3])  # the decode worker replays the step at the same position
    executor.commit(["r"], [3])
    assert executor.requests["r"].num_computed_tokens == 4
    for bad in (2, 5):
        with pytest.raises(StepError):
            executor.prepare(["r"], [bad])
    with pytest.raises(StepError):
        executor.prepare(["unknown"], [0])
