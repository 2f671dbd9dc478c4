"""A request as the engine sees it: sampling parameters, token ids, block table, status."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch


class InvalidRequestError(ValueError):
    """A request the engine refuses, with a message for the client (HTTP 400)."""


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0 disables
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self) -> None:
        if self.max_tokens is None or self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise InvalidRequestError(f"top_k must be -1 (off) or positive, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise InvalidRequestError(f"min_p must be in [0, 1], got {self.min_p}")
        if any(not s for s in self.stop):
            raise InvalidRequestError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sampling_params(spec) -> SamplingParams:
    """SamplingParams from any object with the same fields (e.g. transport's SamplingSpec)."""
    return SamplingParams(
        **{name: getattr(spec, name) for name in SamplingParams.__dataclass_fields__}
    )


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    # Prefill done, KV kept for a decode worker to copy (prefill side of disaggregation).
    HELD = "held"
    # Blocks reserved, waiting for the prefill worker's KV to arrive (decode side).
    RESERVED = "reserved"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass
class Sequence:
    request_id: str
    token_ids: list[int]  # prompt followed by output; grows by one per decode step
    params: SamplingParams
    generator: torch.Generator | None = None
    seed: int = 0  # with `generator`: the root of this request's random stream
    status: SequenceStatus = SequenceStatus.WAITING
    num_prompt_tokens: int = -1
    output_logprobs: list[float] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    # Hashes of the leading full blocks whose KV is computed, for prefix caching.
    block_hashes: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_prompt_tokens: int = 0
    num_preemptions: int = 0
    # Stop after the first token and hold the KV for a decode worker.
    handoff: bool = False
    # Offloaded: the attention executor holding this request's KV; none is kept here.
    executor: str = ""
    finish_reason: FinishReason | None = None
    # Detokenized output and how much of it has been reported to the caller.
    text: str = ""
    text_sent: int = 0
    tokens_sent: int = 0
    # Incremental detokenization (engine/tokenizer.py `detokenize`): text[:text_final] is the
    # final text of output tokens [0, read_offset), decoded with [prefix_offset, read_offset)
    # as context for the next ones. Zeros are a valid start for any outputs (one full decode).
    prefix_offset: int = 0
    read_offset: int = 0
    text_final: int = 0

    def __post_init__(self) -> None:
        self.token_ids = list(self.token_ids)
        if self.num_prompt_tokens < 0:
            self.num_prompt_tokens = len(self.token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def next_token_generator(self) -> torch.Generator | None:
        """The generator for the next token, seeded from (seed, output index): any worker can
        continue a request's random stream from its seed and its tokens alone, so a request
        moved to another worker (hand-off, migration) samples exactly what it would have."""
        if self.generator is not None:
            self.generator.manual_seed(token_seed(self.seed, self.num_output_tokens))
        return self.generator

    def append_token(self, token_id: int, logprob: float | None) -> None:
        self.token_ids.append(token_id)
        if logprob is not None:
            self.output_logprobs.append(logprob)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


_MASK64 = (1 << 64) - 1


def token_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for output token `index` (splitmix64 of seed and index)."""
    z = (seed * 0x9E3779B97F4A7C15 + index + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1
