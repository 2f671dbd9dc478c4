"""Continuous batching: decides, step by step, which sequences compute how many tokens.

Running sequences go first (decodes and unfinished prompt chunks), then waiting prompts are
admitted while the token budget, `max_num_seqs` and free KV blocks allow. When a running
sequence cannot grow, the most recently admitted one is preempted and later recomputed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.config import BatchConfig
from engine.kv_cache import BlockManager
from engine.sequence import FinishReason, Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    # (sequence, number of new tokens it computes this step), prompt chunks (> 1 token) first.
    entries: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.entries)

    def __bool__(self) -> bool:
        return bool(self.entries)


class Batcher:
    def __init__(self, config: BatchConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.blocks = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # Sequences whose KV arrived from a prefill worker; they hold blocks and only decode.
        self.prefilled: deque[Sequence] = deque()
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def add_prefilled(self, seq: Sequence) -> None:
        self.prefilled.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.prefilled)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        for seq in list(self.running):  # a copy: preemption removes from running
            if budget <= 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted below by an earlier sequence
            if not self._make_room(seq, batch):
                continue
            num_new = self._chunk(len(seq.token_ids) - seq.num_computed_tokens, budget)
            if num_new == 0:
                break
            scheduled.append((seq, num_new))
            budget -= num_new
        if not batch.preempted:
            budget = self._admit_prefilled(scheduled, budget)
            budget = self._admit_waiting(scheduled, budget)
        # Prompt chunks first, then single-token decodes: the attention metadata layout.
        batch.entries = [e for e in scheduled if e[1] > 1] + [e for e in scheduled if e[1] == 1]
        return batch

    def _chunk(self, remaining: int, budget: int) -> int:
        if remaining <= budget:
            return remaining
        return budget if self.config.enable_chunked_prefill else 0

    def _make_room(self, seq: Sequence, batch: ScheduledBatch) -> bool:
        """Ensures `seq` has blocks for all its tokens, preempting later sequences if needed."""
        if seq.executor:
            return True  # its KV grows in the executor's pool
        while not self.blocks.can_append(seq):
            # Offloaded sequences hold no blocks here: preempting them would free nothing.
            victim = next(s for s in reversed(self.running) if not s.executor)
            self._preempt(victim)
            batch.preempted.append(victim)
            if victim is seq:
                return False
        self.blocks.append_slots(seq)
        return True

    def _preempt(self, seq: Sequence) -> None:
        # Recompute-style preemption: drop the KV, keep the tokens, re-prefill later.
        if seq in self.prefilled:
            self.prefilled.remove(seq)
        else:
            self.running.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _admit_prefilled(self, scheduled: list[tuple[Sequence, int]], budget: int) -> int:
        while self.prefilled and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.prefilled[0]
            if not seq.executor:
                if not self.blocks.can_append(seq):
                    break
                self.blocks.append_slots(seq)
            self.prefilled.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append((seq, seq.num_uncomputed_tokens))
            budget -= seq.num_uncomputed_tokens
        return budget

    def _admit_waiting(self, scheduled: list[tuple[Sequence, int]], budget: int) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if not self.config.enable_chunked_prefill and seq.num_tokens > budget:
                break  # wait for a step with the whole budget free
            if not self.blocks.can_allocate(seq):
                break
            self.blocks.allocate(seq)
            num_new = self._chunk(seq.num_uncomputed_tokens, budget)
            if num_new == 0:
                self.blocks.free(seq)
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append((seq, num_new))
            budget -= num_new
        return budget

    def decode_steps_without_decision(self, limit: int, after: ScheduledBatch | None = None) -> int:
        """How many of the next `schedule()` calls (at most `limit`) cannot decide anything:
        each schedules every running sequence for one token, admitting, chunking and
        preempting nothing, provided each step samples one token per row and nothing is
        added or finished meanwhile. With `after`, the batch just scheduled and not yet run:
        the calls after its step. A simulated clock runs such steps as one event."""
        running = self.running
        if self.waiting or self.prefilled or not running:
            return 0
        if len(running) > self.config.max_num_batched_tokens:
            return 0  # some rows would wait for the next step
        if any(len(s.token_ids) - s.num_computed_tokens != 1 for s in running):
            return 0  # a prompt chunk still to compute
        if after is not None and (after.preempted or len(after.entries) != len(running)):
            return 0  # not every running row with its one token, or a preemption
        local = [s for s in running if not s.executor]
        return self.blocks.decode_rounds_that_fit(local, limit, ahead=after is not None)

    def grow_for_decode_steps(self, steps: int, ahead: int = 0) -> None:
        """The KV growth of `steps` such schedule() calls, made at once once the tokens of the
        steps before each were appended, or before their last `ahead` tokens were (offloaded
        rows grow in their executor)."""
        local = [s for s in self.running if not s.executor]
        self.blocks.append_slots_stepwise(local, steps, ahead)

    def recompute(self, seq: Sequence) -> None:
        """Drops whatever KV the sequence has and queues it to be prefilled again, here."""
        self._preempt(seq)

    def hold(self, seq: Sequence) -> None:
        """Takes a prefilled sequence out of the batch, keeping its blocks for a KV copy."""
        self.running.remove(seq)
        seq.status = SequenceStatus.HELD

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        elif seq in self.prefilled:
            self.prefilled.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
