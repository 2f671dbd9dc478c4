"""What a worker measures about its own steps, for the offload policy and metrics: moving
averages of step time (decode-only steps apart from prefill ones) and token counts."""

from __future__ import annotations

from engine.batcher import ScheduledBatch

EWMA = 0.2  # weight of the newest sample


def ewma(previous: float, sample: float) -> float:
    return sample if previous == 0.0 else (1 - EWMA) * previous + EWMA * sample


class StepTiming:
    def __init__(self) -> None:
        self.step_time_ms = 0.0
        self.last_batch_size = 0
        self.last_prefill_tokens = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    def record_step(self, batch: ScheduledBatch, seconds: float) -> None:
        prefill = sum(
            n for seq, n in batch.entries if seq.num_computed_tokens < seq.num_prompt_tokens
        )
        self.last_batch_size = len(batch.entries)
        self.last_prefill_tokens = prefill
        self.prompt_tokens_total += prefill
        self.generation_tokens_total += sum(
            1 for seq, n in batch.entries if seq.num_computed_tokens + n == seq.num_tokens
        )
        if prefill == 0:  # a pure decode step: what TPOT is made of
            self.step_time_ms = ewma(self.step_time_ms, seconds * 1000)

    def as_dict(self) -> dict:
        return {
            "step_time_ms": round(self.step_time_ms, 3),
            "last_batch_size": self.last_batch_size,
            "last_prefill_tokens": self.last_prefill_tokens,
            "prompt_tokens_total": self.prompt_tokens_total,
            "generation_tokens_total": self.generation_tokens_total,
        }
