"""The OpenAI wire format on our side of the routes: a request's prompt and completion budget,
and the JSON answer or server-sent event chunks built from the backend's `TokenOutput`s.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from pydantic import BaseModel

from engine.sequence import InvalidRequestError
from engine.tokenizer import Tokenizer
from server.generation import GenerationBackend
from server.http_errors import UnknownModel
from server.openai_protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatLogprobs,
    ChatTokenLogprob,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    SamplingRequest,
    Usage,
)
from server.prompts import encode_chat, encode_text
from transport.messages import TokenOutput

DEFAULT_COMPLETION_TOKENS = (
    16  # OpenAI's default for /v1/completions; chat defaults to the room left
)


@dataclass
class Reply:
    """One request's identity and running totals, shared by its JSON and streamed forms."""

    id: str
    model: str
    tokenizer: Tokenizer
    prompt_tokens: int
    logprobs: bool
    include_usage: bool
    created: int = field(default_factory=lambda: int(time.time()))
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, out: TokenOutput) -> None:
        self.text += out.text
        self.token_ids += out.token_ids
        self.token_logprobs += logprobs_of(out)
        self.finish_reason = out.finish_reason or self.finish_reason

    def usage(self) -> Usage:
        done = len(self.token_ids)
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=done,
            total_tokens=self.prompt_tokens + done,
        )

    def token_texts(self, token_ids: list[int]) -> list[str]:
        return [self.tokenizer.decode([t], skip_special_tokens=False) for t in token_ids]


def logprobs_of(out: TokenOutput) -> list[float | None]:
    return list(out.logprobs) if out.logprobs is not None else [None] * len(out.token_ids)


def new_reply(
    backend: GenerationBackend, kind: str, body: SamplingRequest, prompt_tokens: int, logprobs: bool
) -> Reply:
    return Reply(
        id=f"{kind}-{uuid.uuid4().hex}",
        model=backend.model_name,
        tokenizer=backend.tokenizer,
        prompt_tokens=prompt_tokens,
        logprobs=logprobs,
        include_usage=body.include_usage,
    )


# ---------------------------------------------------------------- request -> prompt, budget


async def completion_prompt(backend: GenerationBackend, body: CompletionRequest) -> list[int]:
    if isinstance(body.prompt, list):
        return body.prompt
    return await encode_text(backend, body.prompt)


async def chat_prompt(backend: GenerationBackend, body: ChatCompletionRequest) -> list[int]:
    return await encode_chat(backend, [m.for_template() for m in body.messages])


def check_model(backend: GenerationBackend, model: str | None) -> None:
    if model is not None and model != backend.model_name:
        raise UnknownModel(
            f"The model `{model}` does not exist; this server serves `{backend.model_name}`"
        )


def fit(max_model_len: int, prompt_len: int, requested: int | None, default: int | None) -> int:
    """The completion budget: `requested` if prompt and completion fit the context, else a 400."""
    room = max_model_len - prompt_len
    if room <= 0:
        raise InvalidRequestError(
            f"This model's maximum context length is {max_model_len} tokens, but the prompt has "
            f"{prompt_len} tokens; shorten the prompt"
        )
    if requested is None:
        return room if default is None else min(default, room)
    if requested > room:
        raise InvalidRequestError(
            f"This model's maximum context length is {max_model_len} tokens, but "
            f"{prompt_len + requested} tokens were requested ({prompt_len} in the prompt, "
            f"{requested} for the completion); shorten the prompt or lower max_tokens"
        )
    return requested


# ---------------------------------------------------------------- answers: JSON and SSE


def completion(reply: Reply, choices: list[CompletionChoice], usage: Usage | None) -> Completion:
    return Completion(
        id=reply.id, created=reply.created, model=reply.model, choices=choices, usage=usage
    )


def completion_answer(reply: Reply) -> Completion:
    """The whole `/v1/completions` answer once `reply` has every output."""
    logprobs = completion_logprobs(reply, reply.token_ids, reply.token_logprobs, 0)
    choice = CompletionChoice(text=reply.text, finish_reason=reply.finish_reason, logprobs=logprobs)
    return completion(reply, [choice], reply.usage())


def chat_answer(reply: Reply) -> ChatCompletion:
    """The whole `/v1/chat/completions` answer once `reply` has every output."""
    choice = ChatChoice(
        message=AssistantMessage(content=reply.text),
        finish_reason=reply.finish_reason,
        logprobs=chat_logprobs(reply, reply.token_ids, reply.token_logprobs),
    )
    return ChatCompletion(
        id=reply.id,
        created=reply.created,
        model=reply.model,
        choices=[choice],
        usage=reply.usage(),
    )


def completion_logprobs(
    reply: Reply, token_ids: list[int], logprobs: list[float | None], offset: int
) -> CompletionLogprobs | None:
    if not reply.logprobs:
        return None
    tokens = reply.token_texts(token_ids)
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return CompletionLogprobs(text_offset=offsets, token_logprobs=logprobs, tokens=tokens)


def chat_logprobs(
    reply: Reply, token_ids: list[int], logprobs: list[float | None]
) -> ChatLogprobs | None:
    if not reply.logprobs:
        return None
    entries = [
        ChatTokenLogprob(token=text, logprob=lp, bytes=list(text.encode()))
        for text, lp in zip(reply.token_texts(token_ids), logprobs)
    ]
    return ChatLogprobs(content=entries)


async def completion_events(
    reply: Reply, outputs: AsyncIterator[TokenOutput]
) -> AsyncIterator[str]:
    async for out in outputs:
        offset = len(reply.text)
        reply.add(out)
        if not (out.text or out.finished or (reply.logprobs and out.token_ids)):
            continue  # the detokenizer held this token back (a partial stop string or UTF-8)
        logprobs = completion_logprobs(reply, out.token_ids, logprobs_of(out), offset)
        choice = CompletionChoice(text=out.text, finish_reason=out.finish_reason, logprobs=logprobs)
        yield sse(completion(reply, [choice], None))
    if reply.include_usage:
        yield sse(completion(reply, [], reply.usage()))


async def chat_events(reply: Reply, outputs: AsyncIterator[TokenOutput]) -> AsyncIterator[str]:
    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        return sse(
            ChatCompletionChunk(
                id=reply.id, created=reply.created, model=reply.model, choices=choices, usage=usage
            )
        )

    yield chunk([ChatChunkChoice(delta={"role": "assistant"})])
    async for out in outputs:
        reply.add(out)
        if not (out.text or out.finished or (reply.logprobs and out.token_ids)):
            continue
        logprobs = chat_logprobs(reply, out.token_ids, logprobs_of(out))
        delta = {"content": out.text} if out.text or not out.finished else {}
        yield chunk(
            [ChatChunkChoice(delta=delta, finish_reason=out.finish_reason, logprobs=logprobs)]
        )
    if reply.include_usage:
        yield chunk([], reply.usage())


def sse(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"
