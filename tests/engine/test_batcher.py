"""Batcher: token budget, max_num_seqs, chunked prefill, prefill-first layout, preemption, abort."""

from __future__ import annotations

import itertools

from engine.batcher import Batcher, ScheduledBatch
from engine.config import BatchConfig
from engine.kv_cache import BlockManager
from engine.sequence import FinishReason, SamplingParams, Sequence, SequenceStatus


def make_batcher(
    num_blocks: int = 64,
    block_size: int = 4,
    max_num_batched_tokens: int = 64,
    max_num_seqs: int = 8,
    chunked: bool = True,
    prefix_caching: bool = True,
) -> Batcher:
    config = BatchConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=1024,
        enable_chunked_prefill=chunked,
    )
    return Batcher(config, BlockManager(num_blocks, block_size, prefix_caching))


_first_token = itertools.count(0, 1000)


def add(batcher: Batcher, num_tokens: int, request_id: str) -> Sequence:
    """A new request whose tokens no other request shares (no accidental prefix hits)."""
    first = next(_first_token)
    seq = Sequence(
        request_id, list(range(first, first + num_tokens)), SamplingParams(temperature=0)
    )
    batcher.add(seq)
    return seq


def complete_step(batcher: Batcher, batch: ScheduledBatch) -> None:
    """What the engine does after running a batch: count computed tokens, sample where due."""
    for seq, num_new in batch.entries:
        seq.num_computed_tokens += num_new
        batcher.blocks.commit_computed_blocks(seq)
        if seq.num_computed_tokens == seq.num_tokens:
            seq.append_token(7, None)


def step(batcher: Batcher) -> ScheduledBatch:
    batch = batcher.schedule()
    for seq, _ in batch.entries:
        # Every scheduled sequence has a KV slot for each of its tokens, the new ones included.
        assert len(seq.block_table) == batcher.blocks.blocks_needed(seq.num_tokens)
    complete_step(batcher, batch)
    return batch


def plan(batch: ScheduledBatch) -> list[tuple[str, int]]:
    return [(seq.request_id, n) for seq, n in batch.entries]


def test_token_budget_respected() -> None:
    batcher = make_batcher(max_num_batched_tokens=16)
    for i in range(5):
        add(batcher, 10, f"r{i}")
    sizes = []
    while batcher.has_unfinished() and len(sizes) < 20:
        batch = step(batcher)
        assert 0 < batch.num_tokens <= 16
        sizes.append(batch.num_tokens)
        for seq in list(batcher.running):
            if seq.num_output_tokens >= 3:
                batcher.finish(seq, FinishReason.LENGTH)
    assert sizes[0] == 16  # one whole prompt and a 6-token chunk of the next
    assert sum(sizes) == 5 * 10 + 5 * 2  # every prompt token once, then 2 decodes each
    assert batcher.blocks.num_free_blocks == batcher.blocks.num_blocks


def test_max_num_seqs_respected() -> None:
    batcher = make_batcher(max_num_seqs=2)
    seqs = [add(batcher, 5, f"r{i}") for i in range(4)]
    batch = step(batcher)
    assert plan(batch) == [("r0", 5), ("r1", 5)]
    assert len(batcher.running) == 2 and len(batcher.waiting) == 2
    assert plan(step(batcher)) == [("r0", 1), ("r1", 1)]
    batcher.finish(seqs[0], FinishReason.STOP)
    batch = step(batcher)
    assert plan(batch) == [("r2", 5), ("r1", 1)]
    assert len(batcher.running) == 2


def test_chunked_prefill_splits_long_prompt() -> None:
    batcher = make_batcher(max_num_batched_tokens=16)
    seq = add(batcher, 40, "long")
    assert plan(step(batcher)) == [("long", 16)]
    assert seq.num_output_tokens == 0  # no token sampled from a partial prompt
    assert plan(step(batcher)) == [("long", 16)]
    assert plan(step(batcher)) == [("long", 8)]
    assert seq.num_output_tokens == 1
    assert plan(step(batcher)) == [("long", 1)]
    assert seq.num_computed_tokens == 41


def test_no_chunking_waits_for_room() -> None:
    batcher = make_batcher(max_num_batched_tokens=16, chunked=False)
    add(batcher, 10, "a")
    add(batcher, 10, "b")
    assert plan(step(batcher)) == [("a", 10)]
    # b does not fit next to a's decode without chunking: it waits, holding no blocks.
    waiting = batcher.waiting[0]
    assert waiting.block_table == []
    assert plan(step(batcher)) == [("b", 10), ("a", 1)]


def test_prompt_chunks_come_before_decodes() -> None:
    batcher = make_batcher(max_num_batched_tokens=64)
    add(batcher, 3, "a")
    add(batcher, 4, "b")
    step(batcher)
    add(batcher, 9, "c")
    batch = step(batcher)
    assert plan(batch) == [("c", 9), ("a", 1), ("b", 1)]
    counts = [n for _, n in batch.entries]
    assert counts == sorted(counts, reverse=True)


def test_preemption_frees_last_running() -> None:
    # 6 blocks of 4: three 8-token prompts fill them; each first decode needs a third block.
    batcher = make_batcher(num_blocks=6, block_size=4)
    a, b, c = (add(batcher, 8, name) for name in "abc")
    step(batcher)
    assert batcher.blocks.num_free_blocks == 0
    late = add(batcher, 4, "late")
    batch = step(batcher)
    assert batch.preempted == [c]  # the most recently admitted
    assert plan(batch) == [("a", 1), ("b", 1)]  # c's two blocks let both a and b grow
    assert batcher.running == [a, b]
    assert list(batcher.waiting) == [c, late]  # the victim goes to the front of the queue
    assert c.status is SequenceStatus.WAITING
    assert c.block_table == [] and c.num_computed_tokens == 0
    assert c.num_tokens == 9  # tokens are kept, the KV is recomputed later
    assert c.num_preemptions == batcher.num_preemptions == 1
    assert batcher.blocks.num_free_blocks == 0


def test_preempted_sequence_recomputes_prompt_and_outputs() -> None:
    batcher = make_batcher(num_blocks=4, block_size=4, prefix_caching=False)
    a = add(batcher, 8, "a")
    b = add(batcher, 8, "b")
    step(batcher)
    batch = step(batcher)
    assert batch.preempted == [b]
    batcher.finish(a, FinishReason.STOP)
    # b comes back with all 9 tokens (prompt + its first output) to recompute.
    assert plan(step(batcher)) == [("b", 9)]
    assert b.status is SequenceStatus.RUNNING
    assert b.num_output_tokens == 2


def test_preempted_sequence_reuses_its_cached_prefix() -> None:
    batcher = make_batcher(num_blocks=4, block_size=4)
    a = add(batcher, 8, "a")
    b = add(batcher, 8, "b")
    step(batcher)
    step(batcher)  # b preempted; a took one of b's freed blocks (b's tail, freed first)
    batcher.finish(a, FinishReason.STOP)
    assert plan(step(batcher)) == [("b", 5)]  # b's first block survived in the prefix cache
    assert b.num_cached_prompt_tokens == 4


def test_sequence_preempts_itself_when_last() -> None:
    batcher = make_batcher(num_blocks=5, block_size=4)
    a = add(batcher, 8, "a")
    b = add(batcher, 8, "b")
    step(batcher)
    assert batcher.blocks.num_free_blocks == 1
    batch = step(batcher)  # a takes the free block, then b has nobody later to preempt
    assert batch.preempted == [b]
    assert plan(batch) == [("a", 1)]
    assert batcher.running == [a] and list(batcher.waiting) == [b]


def test_no_admission_in_a_step_that_preempts() -> None:
    batcher = make_batcher(num_blocks=4, block_size=4)
    add(batcher, 8, "a")
    add(batcher, 8, "b")
    step(batcher)
    add(batcher, 1, "late")  # would fit in the block left after the preemption
    batch = step(batcher)
    assert batch.preempted
    assert "late" not in [r for r, _ in plan(batch)]


def test_waiting_prompt_without_blocks_stays_waiting() -> None:
    batcher = make_batcher(num_blocks=3, block_size=4)
    add(batcher, 8, "a")
    big = add(batcher, 12, "big")
    assert plan(step(batcher)) == [("a", 8)]
    assert list(batcher.waiting) == [big] and big.block_table == []


def test_abort_from_waiting_and_running_frees_blocks() -> None:
    batcher = make_batcher(num_blocks=8, block_size=4, max_num_seqs=1)
    running = add(batcher, 6, "running")
    waiting = add(batcher, 6, "waiting")
    step(batcher)
    assert running.status is SequenceStatus.RUNNING and waiting.status is SequenceStatus.WAITING
    assert batcher.blocks.num_free_blocks == 6
    batcher.finish(waiting, FinishReason.ABORT)
    assert waiting.status is SequenceStatus.FINISHED
    assert waiting.finish_reason is FinishReason.ABORT
    assert not batcher.waiting
    batcher.finish(running, FinishReason.ABORT)
    assert running.finish_reason is FinishReason.ABORT and not batcher.running
    assert batcher.blocks.num_free_blocks == 8
    assert not batcher.has_unfinished()
    assert not batcher.schedule()
