"""A request as the engine sees it: sampling parameters, token ids, block table, status."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from engine.grammar_state import GrammarSpec, GrammarState


class InvalidRequestError(ValueError):
    """A request the engine refuses, with a message for the client (HTTP 400)."""


MAX_LOGPROBS = 20  # alternatives per token, as OpenAI and vLLM's default --max-logprobs

# A sampled or prompt token's best alternatives, best first: [(token id, logprob)].
TopLogprobs = list[tuple[int, float]]


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
    # Logit adjustments, vLLM's semantics: bias per token id in [-100, 100]; presence and
    # frequency penalties (OpenAI's, over output tokens) in [-2, 2]; the repetition penalty
    # over prompt and output (> 0, 1 is off); EOS and stop tokens barred until min_tokens.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    logit_bias: dict[int, float] | None = None
    # Alternatives reported beside each sampled token (with `logprobs`), and per prompt token
    # (None: no prompt logprobs; 0: only the prompt token's own). At most MAX_LOGPROBS.
    top_logprobs: int = 0
    prompt_logprobs: int | None = None
    # The grammar the output must follow (engine/structured_output.py), or None.
    structured: GrammarSpec | None = None

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
        self._validate_adjustments()

    def _validate_adjustments(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise InvalidRequestError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not self.repetition_penalty > 0:
            raise InvalidRequestError(
                f"repetition_penalty must be > 0 (1 is off), got {self.repetition_penalty}"
            )
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequestError(
                f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}"
            )
        if any(not -100 <= b <= 100 for b in (self.logit_bias or {}).values()):
            raise InvalidRequestError("logit_bias values must be in [-100, 100]")
        for name in ("top_logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise InvalidRequestError(f"{name} must be in [0, {MAX_LOGPROBS}], got {value}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def adjusts_logits(self) -> bool:
        """Whether any bias or penalty changes this request's logits before sampling."""
        return bool(
            self.logit_bias
            or self.min_tokens
            or self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
        )


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
    # With params.top_logprobs: the best alternatives of each token sampled here (a request
    # continued from elsewhere has only its newer tokens' entries).
    output_top_logprobs: list[TopLogprobs] = field(default_factory=list)
    # With params.prompt_logprobs: per prompt token after the first, (logprob, rank, top).
    prompt_logprobs: list[tuple[float, int, TopLogprobs]] = field(default_factory=list)
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
    # With params.structured: its matcher, which replays outputs generated elsewhere.
    grammar: GrammarState | None = None
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

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Prompt logprobs still to compute: asked for, and no token sampled yet (a request
        continued from elsewhere reported them there). Its prompt skips the prefix cache."""
        return self.params.prompt_logprobs is not None and self.num_output_tokens == 0

    def append_token(
        self, token_id: int, logprob: float | None, top: TopLogprobs | None = None
    ) -> None:
        self.token_ids.append(token_id)
        if logprob is not None:
            self.output_logprobs.append(logprob)
        if top is not None:
            self.output_top_logprobs.append(top)

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
