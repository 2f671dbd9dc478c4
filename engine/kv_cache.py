"""Paged KV cache bookkeeping: hands out block ids, keeps an exact free count, caches prefixes.

A full block whose KV is computed is registered under hash(parent hash, its token ids); a later
prompt with the same prefix shares it (reference counted) instead of recomputing. A freed block
keeps its hash until it is handed out again, so the cache survives its owner.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from engine.sequence import Sequence


class OutOfBlocksError(RuntimeError):
    """Raised when a caller allocates without checking `can_allocate` / `can_append` first."""


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = field(default_factory=tuple)


def block_hash(parent: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((parent, token_ids))


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        first_block_id: int = 0,
    ):
        """Manages block ids [first_block_id, first_block_id + num_blocks) of a pool (an
        attention executor owns the tail of its prefill worker's pool)."""
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.first_block_id = first_block_id
        ids = range(first_block_id, first_block_id + num_blocks)
        # Least recently freed first, so cached prefixes live longest. With prefix caching an
        # OrderedDict, not a dict: a cached block is revived from the middle, and taking from
        # the front of a dict skips every entry deleted there since its last resize (thousands
        # in a large pool), where an OrderedDict pops its first entry at once.
        self.free_block_ids: OrderedDict[int, None] | deque[int]
        if enable_prefix_caching:
            self.blocks = {i: Block(i) for i in ids}
            self.free_block_ids = OrderedDict.fromkeys(ids)
        else:
            # A block has one owner at a time and nothing revives it: a queue of free ids and
            # a flag per block (a simulated cluster has millions of blocks) say everything.
            self.blocks = {}
            self.free_block_ids = deque(ids)
            self._handed_out = bytearray(num_blocks)
        self.hash_to_block: dict[int, int] = {}
        self.prefix_hits = 0
        self.prefix_queries = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    # Prompt admission -------------------------------------------------------------------

    def _cached_prefix(self, seq: Sequence) -> list[tuple[int, int]]:
        """(hash, block id) of the leading full blocks already computed by earlier requests."""
        # Prompt logprobs need every prompt position's logits: nothing of it may be skipped.
        if not self.enable_prefix_caching or seq.wants_prompt_logprobs:
            return []
        hits: list[tuple[int, int]] = []
        parent = None
        # At least one token must be left to compute, to produce the next token's logits.
        max_blocks = (seq.num_tokens - 1) // self.block_size
        for i in range(max_blocks):
            tokens = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            h = block_hash(parent, tokens)
            block_id = self.hash_to_block.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append((h, block_id))
            parent = h
        return hits

    def can_allocate(self, seq: Sequence, use_prefix_cache: bool = True) -> bool:
        hits = self._cached_prefix(seq) if use_prefix_cache else []
        revived = sum(1 for _, b in hits if self.blocks[b].ref_count == 0)
        fresh = self.blocks_needed(seq.num_tokens) - len(hits)
        return fresh + revived <= self.num_free_blocks

    def allocate(self, seq: Sequence, use_prefix_cache: bool = True) -> None:
        """Gives a waiting sequence blocks for all its tokens, reusing cached prefix blocks.

        Without `use_prefix_cache` every block is fresh: for KV about to be copied in from
        another worker, which must not overwrite blocks other sequences share.
        """
        assert not seq.block_table, f"{seq.request_id} already holds blocks"
        if not self.can_allocate(seq, use_prefix_cache):
            raise OutOfBlocksError(f"not enough free KV blocks for {seq.request_id}")
        hits = self._cached_prefix(seq) if use_prefix_cache else []
        self.prefix_queries += self.blocks_needed(seq.num_tokens)
        self.prefix_hits += len(hits)
        for h, block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_block_ids[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
            seq.block_hashes.append(h)
        seq.block_table += self._take_free_blocks(self.blocks_needed(seq.num_tokens) - len(hits))
        seq.num_computed_tokens = len(hits) * self.block_size
        seq.num_cached_prompt_tokens = seq.num_computed_tokens

    def _take_free_blocks(self, count: int) -> list[int]:
        """The `count` least recently freed blocks, taken (their cached prefixes forgotten)."""
        free = self.free_block_ids
        if not self.enable_prefix_caching:
            popleft, handed_out, first = free.popleft, self._handed_out, self.first_block_id
            taken = [popleft() for _ in range(count)]
            for block_id in taken:
                handed_out[block_id - first] = 1
            return taken
        blocks, hashes, pop = self.blocks, self.hash_to_block, free.popitem
        taken = [pop(last=False)[0] for _ in range(count)]
        for block_id in taken:
            block = blocks[block_id]
            if block.hash is not None and hashes.get(block.hash) == block_id:
                del hashes[block.hash]
            block.hash, block.token_ids, block.ref_count = None, (), 1
        return taken

    # Decode growth ----------------------------------------------------------------------

    # Once per running sequence per step: plain arithmetic, no property or method calls.

    def can_append(self, seq: Sequence) -> bool:
        missing = (len(seq.token_ids) + self.block_size - 1) // self.block_size
        return missing - len(seq.block_table) <= len(self.free_block_ids)

    def append_slots(self, seq: Sequence) -> None:
        """Makes room in the block table for every token of the sequence."""
        size = self.block_size
        missing = (len(seq.token_ids) + size - 1) // size - len(seq.block_table)
        if missing > len(self.free_block_ids):
            raise OutOfBlocksError(f"not enough free KV blocks to grow {seq.request_id}")
        if missing > 0:
            seq.block_table += self._take_free_blocks(missing)

    def blocks_for_rounds(self, seqs: list[Sequence], rounds: int, ahead: int = 0) -> int:
        """Free blocks that `rounds` rounds of `append_slots` over `seqs` take when each round
        finds every sequence one token longer than the last, the first at its current length
        plus `ahead` tokens."""
        size, grown = self.block_size, ahead + rounds - 1
        return sum(
            max(0, (len(s.token_ids) + grown + size - 1) // size - len(s.block_table)) for s in seqs
        )

    def decode_rounds_that_fit(self, seqs: list[Sequence], limit: int, ahead: int = 0) -> int:
        """How many such rounds (at most `limit`) the free blocks cover: the decode steps in
        which none of `seqs` can be preempted."""
        free = self.num_free_blocks
        if limit <= 0 or self.blocks_for_rounds(seqs, limit, ahead) <= free:
            return max(limit, 0)  # usually: pools dwarf a few steps
        low, high = 0, limit - 1
        while low < high:
            mid = (low + high + 1) // 2
            if self.blocks_for_rounds(seqs, mid, ahead) <= free:
                low = mid
            else:
                high = mid - 1
        return low

    def append_slots_stepwise(self, seqs: list[Sequence], rounds: int, ahead: int = 0) -> None:
        """What `rounds` rounds of `append_slots` over `seqs` in order would have done while each
        sequence grew by one token a round, the last at its length plus `ahead` tokens, done
        at once: the same blocks handed out in the same order, so the tables equal the
        step-by-step ones."""
        size = self.block_size
        wanted: list[tuple[int, int]] = []  # (round that needs it, position in seqs) per block
        for i, seq in enumerate(seqs):
            num_tokens = len(seq.token_ids) + ahead
            have = len(seq.block_table)
            if num_tokens <= have * size:
                continue
            first = num_tokens - rounds + 1  # its length at the first round
            for b in range(have, (num_tokens + size - 1) // size):
                wanted.append((max(0, b * size + 1 - first), i))
        if len(wanted) > self.num_free_blocks:
            raise OutOfBlocksError(f"not enough free KV blocks to grow {len(seqs)} sequences")
        wanted.sort()
        for (_, i), block_id in zip(wanted, self._take_free_blocks(len(wanted))):
            seqs[i].block_table.append(block_id)

    def commit_computed_blocks(self, seq: Sequence) -> None:
        """Registers the sequence's newly completed full blocks for prefix reuse."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        parent = seq.block_hashes[-1] if seq.block_hashes else None
        for i in range(len(seq.block_hashes), num_full):
            tokens = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            h = block_hash(parent, tokens)
            block = self.blocks[seq.block_table[i]]
            if block.hash is None and h not in self.hash_to_block:
                block.hash, block.token_ids = h, tokens
                self.hash_to_block[h] = block.block_id
            seq.block_hashes.append(h)
            parent = h

    # Release ----------------------------------------------------------------------------

    def free(self, seq: Sequence) -> None:
        # Freed in reverse so a sequence's tail is reused before its (more shareable) prefix.
        # Blocks outside this manager's range are lent by another one: their owner frees them.
        if self.enable_prefix_caching:
            self._release_shared(seq.block_table)
        else:
            self._release_owned(seq.block_table)
        seq.block_table.clear()
        seq.block_hashes.clear()
        seq.num_computed_tokens = 0

    def _release_shared(self, table: list[int]) -> None:
        blocks, free = self.blocks, self.free_block_ids
        for block_id in reversed(table):
            block = blocks.get(block_id)
            if block is None:
                continue
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                free[block_id] = None

    def _release_owned(self, table: list[int]) -> None:
        """Without prefix caching each block has one owner: freeing it is putting it back."""
        put, handed_out = self.free_block_ids.append, self._handed_out
        first, count = self.first_block_id, self.num_blocks
        for block_id in reversed(table):
            i = block_id - first
            if 0 <= i < count:
                assert handed_out[i], f"block {block_id} freed twice"
                handed_out[i] = 0
                put(block_id)
