"""One worker's engine without a model: the production `Batcher` and `BlockManager` driven as
`LLMEngine` drives them (engine/engine.py): add, reserve, start, step, finish, hold, release,
recompute. A step's sampled token is a placeholder; requests end at `max_tokens` or
`max_model_len` (the benchmark ignores EOS).

Prefix caching is off: the benchmark's prompts are random token ids, so a real run has no
prefix hits either, and placeholders would make every prompt look alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.batcher import Batcher, ScheduledBatch
from engine.config import BatchConfig
from engine.kv_cache import BlockManager, OutOfBlocksError
from engine.sequence import FinishReason, SamplingParams, Sequence, SequenceStatus
from engine.step_timing import StepTiming, ewma

PLACEHOLDER = 0


@dataclass(eq=False)
class SimSequence(Sequence):
    """A sequence with the timestamps the benchmark needs. Compared by identity: request ids
    are unique, and the batcher's list removals need not compare every field."""

    __eq__ = object.__eq__
    __hash__ = object.__hash__

    request: object = None  # the router's SimRequest
    last_token_at: float = 0.0
    itl: list[float] | None = None  # kept per request only when asked (small runs)
    stop_at: int = 0  # token count at which it ends: max_tokens or max_model_len
    remote: Sequence | None = None  # offloaded: the executor's record of it


@dataclass
class StepResult:
    finished: list[SimSequence] = field(default_factory=list)
    held: list[SimSequence] = field(default_factory=list)  # prefill: first token, KV kept


class SimEngine:
    def __init__(self, batch: BatchConfig, num_blocks: int, block_size: int) -> None:
        self.config = batch
        self.max_model_len = batch.max_model_len
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
        self.batcher = Batcher(batch, self.blocks)
        self.requests: dict[str, SimSequence] = {}
        self.requests_total = 0
        self.timing = StepTiming()
        self.num_reclaimed = 0

    # Requests -------------------------------------------------------------------------------

    def new_sequence(self, request_id: str, prompt_tokens: int, max_tokens: int, request):
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        stop_at = min(prompt_tokens + max_tokens, self.max_model_len)
        return SimSequence(
            request_id, [PLACEHOLDER] * prompt_tokens, params, request=request, stop_at=stop_at
        )

    def add_request(self, seq: SimSequence, handoff: bool) -> None:
        seq.handoff = handoff
        self.requests[seq.request_id] = seq
        self.requests_total += 1
        self.batcher.add(seq)

    def reserve_prefilled(self, seq: SimSequence) -> list[int]:
        """`seq` carries the prompt and the first token (prefill computed all but its KV)."""
        if not self.blocks.can_allocate(seq, use_prefix_cache=False):
            raise OutOfBlocksError(f"no free KV blocks for {seq.request_id} on this decode worker")
        self.blocks.allocate(seq, use_prefix_cache=False)
        seq.status = SequenceStatus.RESERVED
        self.requests[seq.request_id] = seq
        self.requests_total += 1
        return list(seq.block_table)

    def start_prefilled(self, request_id: str) -> None:
        seq = self.requests[request_id]
        seq.num_computed_tokens = seq.num_tokens - 1
        self.batcher.add_prefilled(seq)

    def start_offloaded(self, seq: SimSequence, executor: str) -> None:
        seq.executor = executor
        seq.num_computed_tokens = seq.num_tokens - 1
        seq.status = SequenceStatus.RESERVED
        self.requests[seq.request_id] = seq
        self.requests_total += 1
        self.batcher.add_prefilled(seq)

    def release(self, request_id: str) -> SimSequence | None:
        """Frees a held (or finished elsewhere) request's KV; abort and release alike."""
        seq = self.requests.pop(request_id, None)
        if seq is not None:
            self.batcher.finish(seq, FinishReason.STOP)
        return seq

    def reclaim(self, executor: str) -> list[SimSequence]:
        """An executor refused a step: its requests are prefilled again here (as
        LLMEngine._reclaim_offloaded)."""
        taken = []
        for seq in list(self.requests.values()):
            if seq.executor != executor or seq.status is SequenceStatus.FINISHED:
                continue
            seq.executor = ""
            self.batcher.recompute(seq)
            self.num_reclaimed += 1
            taken.append(seq)
        return taken

    def has_unfinished(self) -> bool:
        return self.batcher.has_unfinished()

    # Steps ----------------------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch:
        return self.batcher.schedule()

    def finish_step(
        self, batch: ScheduledBatch, seconds: float, now: float, itl_counts: dict[float, int]
    ) -> StepResult:
        """What LLMEngine.step does after the runner: commit, sample, finish or hold. Each
        token's gap since the request's previous one is counted in `itl_counts`."""
        result = StepResult()
        counts = itl_counts
        prefill = sampled = 0  # StepTiming.record_step's counts, in this one pass
        for seq, n in batch.entries:
            if seq.num_computed_tokens < seq.num_prompt_tokens:
                prefill += n
            done = seq.num_computed_tokens + n
            seq.num_computed_tokens = done
            tokens = seq.token_ids
            if done != len(tokens):
                continue  # a prompt chunk that does not reach the end samples nothing
            sampled += 1
            tokens.append(PLACEHOLDER)
            last = seq.last_token_at
            if last:
                gap = now - last
                counts[gap] = counts.get(gap, 0) + 1
                if seq.itl is not None:
                    seq.itl.append(gap)
            seq.last_token_at = now
            if done >= seq.stop_at - 1:  # LLMEngine._check_finished: LENGTH
                self.batcher.finish(seq, FinishReason.LENGTH)
                self.requests.pop(seq.request_id, None)
                result.finished.append(seq)
            elif seq.handoff:
                self.batcher.hold(seq)
                result.held.append(seq)
        self._record_step(len(batch.entries), prefill, sampled, seconds)
        return result

    def _record_step(self, rows: int, prefill: int, sampled: int, seconds: float) -> None:
        """engine.step_timing.StepTiming.record_step from counts the step loop already took
        (tests/server/test_simulate.py checks they agree)."""
        timing = self.timing
        timing.last_batch_size = rows
        timing.last_prefill_tokens = prefill
        timing.prompt_tokens_total += prefill
        timing.generation_tokens_total += sampled
        if prefill == 0:
            timing.step_time_ms = ewma(timing.step_time_ms, seconds * 1000)

    def stats(self) -> dict:
        """engine.stats()'s fields that heartbeats carry."""
        running = self.batcher.running
        return {
            "queued_tokens": sum(
                len(s.token_ids) - s.num_computed_tokens
                for queue in (self.batcher.waiting, running)
                for s in queue
            ),
            "num_blocks": self.blocks.num_blocks,
            "num_free_blocks": self.blocks.num_free_blocks,
            "num_running": len(running),
            "num_waiting": len(self.batcher.waiting),
            "num_preemptions": self.batcher.num_preemptions,
            "requests_total": self.requests_total,
            "num_offloaded": sum(1 for s in running if s.executor),
            "context_tokens": sum(s.num_computed_tokens for s in running if not s.executor),
            "num_reclaimed": self.num_reclaimed,
            **self.timing.as_dict(),
        }
