"""The OpenAI-compatible request and response bodies (vLLM's flavour, extensions included).

Requests validate strictly (a string where a number belongs is a 400, not a coercion) and refuse
the OpenAI features we do not implement rather than silently ignoring them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from server.api.request_fields import (
    INT32_MAX,
    ChoiceCount,
    LogitBias,
    LogprobCount,
    MinP,
    Penalty,
    RepetitionPenalty,
    Seed,
    Temperature,
    TokenCount,
    TokenId,
    TopK,
    TopP,
    logit_bias_ids,
    request_config,
)
from server.api.structured_outputs import StructuredOutputFields
from transport.messages import SamplingSpec

_REQUEST_CONFIG = request_config(extra="ignore")


class StreamOptions(BaseModel):
    model_config = _REQUEST_CONFIG

    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: with include_usage, usage on every chunk


class SamplingRequest(StructuredOutputFields):
    """The fields `/v1/completions` and `/v1/chat/completions` share."""

    model_config = _REQUEST_CONFIG

    model: str | None = None
    max_tokens: TokenCount | None = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK = -1  # vLLM extension
    min_p: MinP = 0.0
    seed: Seed | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool = False
    n: ChoiceCount = 1  # choices; the router's --max-n bounds it (server/api/choices.py)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    repetition_penalty: RepetitionPenalty = 1.0  # vLLM extension
    min_tokens: Annotated[int, Field(ge=0, le=INT32_MAX)] = 0  # vLLM extension
    logit_bias: LogitBias | None = None
    prompt_logprobs: LogprobCount | None = None  # vLLM extension
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # Many clients send `null` for every field they leave unset; vLLM reads that as the default.
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {k: v for k, v in data.items() if v is not None or k not in fields}

    @model_validator(mode="after")
    def _supported(self) -> SamplingRequest:
        logit_bias_ids(self.logit_bias)  # keys that are no token ids: a 400 here
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        if any(not s for s in self.stop_strings()):
            raise ValueError("stop strings must be non-empty")
        return self

    @property
    def candidates(self) -> int:
        """The sequences to sample (completions' best_of may ask for more than n)."""
        return self.n

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        options = self.stream_options
        return options is not None and options.include_usage and options.continuous_usage_stats

    def sampling(
        self,
        max_tokens: int,
        logprobs: bool,
        top_logprobs: int = 0,
        prompt_logprobs: int | None = None,
    ) -> SamplingSpec:
        return SamplingSpec(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=-1 if self.top_k == 0 else self.top_k,
            min_p=self.min_p,
            seed=self.seed,
            stop=self.stop_strings(),
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            min_tokens=self.min_tokens,
            logit_bias=logit_bias_ids(self.logit_bias),
            top_logprobs=top_logprobs,
            prompt_logprobs=prompt_logprobs,
        )


class CompletionRequest(SamplingRequest):
    # One prompt: text, or token ids; a one-element batch of either is unwrapped.
    prompt: str | list[TokenId]
    logprobs: LogprobCount | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: ChoiceCount | None = None  # vLLM v0's: sample best_of, return the n most likely

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, prompt: Any) -> Any:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty")
            return prompt
        if not isinstance(prompt, list):
            raise ValueError("prompt must be a string or a list of token ids")
        if not prompt:
            raise ValueError("the prompt is empty")
        if not all(type(t) is int and 0 <= t <= INT32_MAX for t in prompt):
            raise ValueError(
                f"prompt must be a string or a list of token ids in [0, {INT32_MAX}] "
                "(only one prompt per request)"
            )
        return prompt

    @model_validator(mode="after")
    def _completion_supported(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of={self.best_of} must be at least n={self.n}")
        if self.stream and self.candidates > self.n:
            raise ValueError(
                "best_of cannot be streamed: the best choices are known only once all "
                "are complete; drop best_of or stream"
            )
        return self

    @property
    def candidates(self) -> int:
        """The sequences to sample, of which the n most likely are returned."""
        return self.best_of or self.n


class ContentPart(BaseModel):
    model_config = _REQUEST_CONFIG

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = _REQUEST_CONFIG

    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, content: Any) -> Any:
        if isinstance(content, list) and any(p.type != "text" or p.text is None for p in content):
            raise ValueError(
                "only text content parts ({'type': 'text', 'text': ...}) are supported"
            )
        return content

    def for_template(self) -> dict[str, str]:
        content = self.content
        if isinstance(content, list):
            content = "\n".join(p.text or "" for p in content)
        message = {"role": self.role, "content": content or ""}
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: TokenCount | None = None
    logprobs: bool = False
    top_logprobs: LogprobCount | None = None
    tools: list[dict[str, Any]] | None = None
    # "auto" (the default with tools) | "none" | "required" | {"type": "function", ...}
    tool_choice: Literal["auto", "none", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _chat_supported(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return self

    @property
    def completion_limit(self) -> int | None:
        # max_completion_tokens replaced max_tokens in the OpenAI API; the newer one wins.
        return self.max_completion_tokens or self.max_tokens


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    text_offset: list[int]
    token_logprobs: list[float | None]
    tokens: list[str]
    # Per token: its best alternatives and itself, by text (None for an echoed first token).
    top_logprobs: list[dict[str, float] | None] | None = None


# vLLM's prompt_logprobs: per prompt token (None for the first), token id -> {"logprob",
# "rank", "decoded_token"}, the prompt's own token first, then the best alternatives.
PromptLogprobsJSON = list[dict[str, dict[str, Any]] | None]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None
    prompt_logprobs: PromptLogprobsJSON | None = None


class Completion(BaseModel):
    """A whole `/v1/completions` answer, or one chunk of its stream (then `usage` is null)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(BaseModel):
    token: str
    logprob: float | None
    bytes: list[int]
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobsJSON | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    # {"role": "assistant"} first, then {"content": ...} and {"tool_calls": [...]} pieces
    delta: dict[str, Any]
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    prompt_logprobs: PromptLogprobsJSON | None = None
