"""BlockManager: exact free counts, prefix sharing by reference count, cache revival, collisions."""

from __future__ import annotations

import pytest

from engine import kv_cache
from engine.kv_cache import BlockManager, OutOfBlocksError
from engine.sequence import SamplingParams, Sequence

BLOCK = 4


def make_seq(token_ids: list[int], request_id: str = "r") -> Sequence:
    return Sequence(request_id, token_ids, SamplingParams(max_tokens=8, temperature=0))


def compute_all(bm: BlockManager, seq: Sequence) -> None:
    """What the engine does after a step that computed every token of `seq`."""
    seq.num_computed_tokens = seq.num_tokens
    bm.commit_computed_blocks(seq)


def test_allocate_append_free_exact_counts() -> None:
    bm = BlockManager(num_blocks=10, block_size=BLOCK)
    seq = make_seq(list(range(10)))  # 3 blocks: 4 + 4 + 2
    bm.allocate(seq)
    assert len(seq.block_table) == 3
    assert len(set(seq.block_table)) == 3
    assert bm.num_free_blocks == 7
    assert seq.num_computed_tokens == 0
    compute_all(bm, seq)
    # Tokens 11 and 12 fit in the third block; the 13th needs a fourth.
    for token, free_after in [(10, 7), (11, 7), (12, 6), (13, 6)]:
        seq.append_token(token, None)
        assert bm.can_append(seq)
        bm.append_slots(seq)
        assert bm.num_free_blocks == free_after
        assert len(seq.block_table) == bm.blocks_needed(seq.num_tokens)
    bm.free(seq)
    assert bm.num_free_blocks == 10
    assert seq.block_table == [] and seq.block_hashes == [] and seq.num_computed_tokens == 0


def test_allocate_without_room_raises() -> None:
    bm = BlockManager(num_blocks=2, block_size=BLOCK)
    seq = make_seq(list(range(9)))  # needs 3 blocks
    assert not bm.can_allocate(seq)
    with pytest.raises(OutOfBlocksError):
        bm.allocate(seq)
    assert bm.num_free_blocks == 2 and seq.block_table == []


def test_append_without_room_raises() -> None:
    bm = BlockManager(num_blocks=1, block_size=BLOCK)
    seq = make_seq(list(range(4)))
    bm.allocate(seq)
    seq.append_token(4, None)
    assert not bm.can_append(seq)
    with pytest.raises(OutOfBlocksError):
        bm.append_slots(seq)


def test_prefix_shared_only_after_commit() -> None:
    bm = BlockManager(num_blocks=10, block_size=BLOCK)
    prompt = list(range(100, 110))  # 2 full blocks + 2 tokens
    first = make_seq(prompt, "a")
    bm.allocate(first)
    # Allocated but not computed: nothing to share yet.
    early = make_seq(prompt, "early")
    bm.allocate(early)
    assert early.num_computed_tokens == 0
    assert set(early.block_table).isdisjoint(first.block_table)
    bm.free(early)

    compute_all(bm, first)
    assert len(first.block_hashes) == 2
    second = make_seq(prompt + [7, 8], "b")
    free_before = bm.num_free_blocks
    bm.allocate(second)
    assert second.block_table[:2] == first.block_table[:2]
    assert second.block_table[2] != first.block_table[2]
    assert second.num_computed_tokens == second.num_cached_prompt_tokens == 2 * BLOCK
    assert [bm.blocks[b].ref_count for b in first.block_table] == [2, 2, 1]
    assert bm.num_free_blocks == free_before - 1  # only the unshared tail block is new
    assert bm.prefix_hits == 2

    bm.free(first)
    assert [bm.blocks[b].ref_count for b in second.block_table[:2]] == [1, 1]
    bm.free(second)
    assert bm.num_free_blocks == 10


def test_partial_block_is_not_shared() -> None:
    bm = BlockManager(num_blocks=10, block_size=BLOCK)
    first = make_seq(list(range(6)), "a")  # one full block and a half
    bm.allocate(first)
    compute_all(bm, first)
    assert len(first.block_hashes) == 1
    second = make_seq(list(range(7)), "b")
    bm.allocate(second)
    assert second.num_computed_tokens == BLOCK
    assert second.block_table[0] == first.block_table[0]
    assert second.block_table[1] != first.block_table[1]


def test_at_least_one_token_left_to_compute() -> None:
    bm = BlockManager(num_blocks=10, block_size=BLOCK)
    prompt = list(range(2 * BLOCK))  # exactly two full blocks
    first = make_seq(prompt, "a")
    bm.allocate(first)
    compute_all(bm, first)
    bm.free(first)
    again = make_seq(prompt, "b")
    bm.allocate(again)
    # The last block is cached too, but reusing it would leave no token to produce logits from.
    assert again.num_computed_tokens == BLOCK
    assert again.num_uncomputed_tokens == BLOCK
    assert len(again.block_table) == 2


def test_freed_cached_block_is_revived() -> None:
    bm = BlockManager(num_blocks=4, block_size=BLOCK)
    prompt = list(range(50, 59))  # 2 full blocks + 1
    first = make_seq(prompt, "a")
    bm.allocate(first)
    compute_all(bm, first)
    cached = first.block_table[:2]
    bm.free(first)
    assert bm.num_free_blocks == 4
    later = make_seq(prompt[:8] + [1, 2, 3], "b")
    assert bm.can_allocate(later)
    bm.allocate(later)
    assert later.block_table[:2] == cached
    assert later.num_computed_tokens == 2 * BLOCK
    assert bm.num_free_blocks == 1
    assert [bm.blocks[b].ref_count for b in later.block_table] == [1, 1, 1]


def test_revived_blocks_count_against_free_blocks() -> None:
    bm = BlockManager(num_blocks=3, block_size=BLOCK)
    prompt = list(range(9))
    first = make_seq(prompt, "a")
    bm.allocate(first)
    compute_all(bm, first)
    bm.free(first)
    holder = make_seq([200, 201], "holder")  # takes one block: the least recently freed one
    bm.allocate(holder)
    assert holder.block_table[0] not in first.block_table[:2]
    # 2 cached (free, revived) + 1 fresh = 3 blocks needed, 2 free.
    assert not bm.can_allocate(make_seq(prompt, "c"))


def test_reused_block_loses_its_hash() -> None:
    bm = BlockManager(num_blocks=2, block_size=BLOCK)
    first = make_seq(list(range(5)), "a")
    bm.allocate(first)
    compute_all(bm, first)
    bm.free(first)
    # Fill the whole cache with other tokens: the cached block is overwritten.
    other = make_seq(list(range(100, 108)), "b")
    bm.allocate(other)
    bm.free(other)
    again = make_seq(list(range(5)), "c")
    bm.allocate(again)
    assert again.num_computed_tokens == 0
    assert bm.num_free_blocks == 0


def test_hash_collision_is_not_a_hit(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every block hashes alike: only the stored token ids can tell them apart.
    monkeypatch.setattr(kv_cache, "block_hash", lambda parent, tokens: 42)
    bm = BlockManager(num_blocks=10, block_size=BLOCK)
    first = make_seq([1, 2, 3, 4, 5], "a")
    bm.allocate(first)
    compute_all(bm, first)
    assert bm.hash_to_block == {42: first.block_table[0]}
    other = make_seq([9, 9, 9, 9, 5], "b")
    bm.allocate(other)
    assert other.num_computed_tokens == 0
    assert other.block_table[0] != first.block_table[0]
    assert bm.prefix_hits == 0


def test_prefix_caching_disabled() -> None:
    bm = BlockManager(num_blocks=6, block_size=BLOCK, enable_prefix_caching=False)
    first = make_seq(list(range(9)), "a")
    bm.allocate(first)
    compute_all(bm, first)
    assert first.block_hashes == [] and bm.hash_to_block == {}
    second = make_seq(list(range(9)), "b")
    bm.allocate(second)
    assert second.num_computed_tokens == 0
    assert set(second.block_table).isdisjoint(first.block_table)


def test_freeing_everything_returns_to_full() -> None:
    bm = BlockManager(num_blocks=16, block_size=BLOCK)
    shared = list(range(8))
    seqs = [make_seq(shared + [i] * (i + 1), f"s{i}") for i in range(4)]
    for seq in seqs:
        bm.allocate(seq)
        compute_all(bm, seq)
        seq.append_token(7, None)
        bm.append_slots(seq)
    assert bm.num_free_blocks < 16
    for seq in seqs:
        bm.free(seq)
    assert bm.num_free_blocks == 16
    assert all(b.ref_count == 0 for b in bm.blocks.values())


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_double_free_is_caught(prefix_caching: bool) -> None:
    bm = BlockManager(num_blocks=4, block_size=BLOCK, enable_prefix_caching=prefix_caching)
    seq = make_seq([1, 2, 3])
    bm.allocate(seq)
    table = list(seq.block_table)
    bm.free(seq)
    seq.block_table = table
    with pytest.raises(AssertionError, match="freed twice"):
        bm.free(seq)


def test_a_manager_over_the_tail_of_a_pool_frees_only_its_own_blocks() -> None:
    """An attention executor manages blocks [16, 24) of its prefill worker's pool and decodes
    sequences whose prompt blocks it borrowed from the prefill worker."""
    bm = BlockManager(
        num_blocks=8, block_size=BLOCK, enable_prefix_caching=False, first_block_id=16
    )
    seq = make_seq(list(range(BLOCK * 2)), "lent")
    seq.block_table = [3, 5]  # the prefill worker's blocks, holding the prompt's KV
    seq.num_computed_tokens = BLOCK * 2
    seq.append_token(1, None)
    bm.append_slots(seq)
    assert seq.block_table[:2] == [3, 5] and 16 <= seq.block_table[2] < 24
    assert bm.num_free_blocks == 7
    bm.free(seq)
    assert bm.num_free_blocks == 8
