"""One worker's engine without a model: the production `Batcher` and `BlockManager` driven as
`LLMEngine` drives them (engine/engine.py): add, reserve, start, step, finish, hold, release,
recompute. A step's sampled token is a placeholder; requests end at `max_tokens` or
`max_model_len` (the benchmark ignores EOS).

Prefix caching is off: the benchmark's prompts are random token ids, so a real run has no
prefix hits either, and placeholders would make every prompt look alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.batcher import Batcher, ScheduledBatch
from engine.config import BatchConfig
from engine.kv_cache import BlockManager, OutOfBlocksError
from engine.sequence import FinishReason, SamplingParams, Sequence, SequenceStatus
from engine.step_timing import EWMA, StepTiming, ewma

if TYPE_CHECKING:
    from server.simulate.report import TokenGaps

PLACEHOLDER = 0


def ewma_over(previous: float, seconds: list[float]) -> float:
    """ewma() over steps of `seconds` in turn (inlined: the same floats)."""
    ms, keep = previous, 1 - EWMA
    for s in seconds:
        sample = s * 1000
        ms = sample if ms == 0.0 else keep * ms + EWMA * sample
    return ms


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
        self._params: dict[int, SamplingParams] = {}

    # Requests -------------------------------------------------------------------------------

    def new_sequence(self, request_id: str, prompt_tokens: int, max_tokens: int, request):
        params = self._params.get(max_tokens)
        if params is None:  # shared by the requests of one length: nothing changes them
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
            self._params[max_tokens] = params
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
        self, batch: ScheduledBatch, seconds: float, now: float, token_gaps: TokenGaps
    ) -> StepResult:
        """What LLMEngine.step does after the runner: commit, sample, finish or hold. Each
        token's gap since the request's previous one goes to `token_gaps`."""
        result = StepResult()
        add_gap = token_gaps.add
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
                add_gap(gap)
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

    def decision_free_steps(self, cap: int, after: ScheduledBatch | None = None) -> int:
        """How many next steps (at most `cap`; with `after`, those after its step) only decode
        every running row by one token, none of them offloaded, nothing admitted or
        preempted (Batcher.decode_steps_without_decision), no row finishing before the last."""
        limit = cap
        for seq in self.batcher.running:
            if seq.executor:
                return 0  # each step asks its executor, which other workers share
            limit = min(limit, seq.stop_at - 1 - seq.num_computed_tokens)
        if after is not None:
            limit -= 1  # its step comes first
        return self.batcher.decode_steps_without_decision(limit, after)

    def finish_decode_steps(
        self, rows: list[SimSequence], ends: list[float], first: int, last: int, token_gaps
    ) -> list[float]:
        """finish_step for steps first..last of a decision-free run (`decision_free_steps`),
        where step i ends at ends[i]: every row samples one token a step, none finishes.
        The same counts and floats, a step's gap is the same for every row after the first.
        Returns the steps' durations."""
        steps = last - first + 1
        seconds = [b - a for a, b in zip(ends[first - 1 : last], ends[first : last + 1])]
        gaps = seconds[1:]
        add_gap = token_gaps.add
        now, end = ends[first], ends[last]
        placeholders = [PLACEHOLDER] * steps
        for seq in rows:
            previous = seq.last_token_at
            if previous:
                gap = now - previous
                add_gap(gap)
                if seq.itl is not None:
                    seq.itl.append(gap)
            if seq.itl is not None:
                seq.itl.extend(gaps)
            seq.num_computed_tokens += steps
            seq.token_ids.extend(placeholders)
            seq.last_token_at = end
        n = len(rows)
        token_gaps.add_each(gaps, n)
        timing = self.timing
        timing.last_batch_size, timing.last_prefill_tokens = n, 0
        timing.generation_tokens_total += n * steps
        timing.step_time_ms = ewma_over(timing.step_time_ms, seconds)
        return seconds

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
        running, waiting = self.batcher.running, self.batcher.waiting
        queued = sum(len(s.token_ids) - s.num_computed_tokens for s in waiting)
        offloaded = context = 0
        for s in running:  # one pass: heartbeats come four times a second from every worker
            queued += len(s.token_ids) - s.num_computed_tokens
            if s.executor:
                offloaded += 1
            else:
                context += s.num_computed_tokens
        return {
            "queued_tokens": queued,
            "num_blocks": self.blocks.num_blocks,
            "num_free_blocks": len(self.blocks.free_block_ids),
            "num_running": len(running),
            "num_waiting": len(waiting),
            "num_preemptions": self.batcher.num_preemptions,
            "requests_total": self.requests_total,
            "num_offloaded": offloaded,
            "context_tokens": context,
            "num_reclaimed": self.num_reclaimed,
            **self.timing.as_dict(),
        }
