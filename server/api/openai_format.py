"""The OpenAI wire format on our side of the routes: a request's prompt and completion budget,
and the JSON answer or server-sent event chunks built from the backend's `TokenOutput`s.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

from pydantic import BaseModel

from engine.sequence import InvalidRequestError
from server.api.errors import UnknownModel
from server.api.openai_logprobs import chat_logprobs, completion_logprobs, prompt_logprobs_json
from server.api.openai_reply import Reply, logprobs_of
from server.api.openai_schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    SamplingRequest,
    Usage,
)
from server.api.prompts import encode_chat, encode_text
from server.api.tool_calls import ToolCallStream
from server.router.generation import GenerationBackend
from transport.messages import TokenOutput

DEFAULT_COMPLETION_TOKENS = (
    16  # OpenAI's default for /v1/completions; chat defaults to the room left
)


def new_reply(
    backend: GenerationBackend,
    kind: str,
    body: SamplingRequest,
    prompt: list[int],
    logprobs: bool,
    top_logprobs: int = 0,
) -> Reply:
    return Reply(
        id=f"{kind}-{uuid.uuid4().hex}",
        model=backend.model_name,
        tokenizer=backend.tokenizer,
        prompt_tokens=len(prompt),
        prompt_token_ids=prompt,
        logprobs=logprobs,
        include_usage=body.include_usage,
        continuous_usage=body.continuous_usage,
        top_logprobs=top_logprobs,
        prompt_logprobs=body.prompt_logprobs,
    )


def reply_sampling(reply: Reply, body: SamplingRequest, max_tokens: int):
    """The request's SamplingSpec, with what `reply` needs the engine to report."""
    return body.sampling(
        max_tokens, reply.logprobs, reply.top_logprobs, reply.internal_prompt_logprobs
    )


# ---------------------------------------------------------------- request -> prompt, budget


async def completion_prompt(backend: GenerationBackend, body: CompletionRequest) -> list[int]:
    if isinstance(body.prompt, list):
        return body.prompt
    return await encode_text(backend, body.prompt)


async def chat_prompt(backend: GenerationBackend, body: ChatCompletionRequest) -> list[int]:
    return await encode_chat(backend, [m.for_template() for m in body.messages], tools=body.tools)


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
    choice = CompletionChoice(
        index=reply.index,
        text=(reply.echo or "") + reply.text,
        finish_reason=reply.finish_reason,
        logprobs=completion_logprobs(
            reply,
            reply.token_ids,
            reply.token_logprobs,
            reply.token_top,
            len(reply.echo or ""),
            with_echo=True,
        ),
        prompt_logprobs=prompt_logprobs_json(reply),
    )
    return completion(reply, [choice], reply.usage())


def chat_answer(reply: Reply) -> ChatCompletion:
    """The whole `/v1/chat/completions` answer once `reply` has every output."""
    choice = ChatChoice(
        index=reply.index,
        message=AssistantMessage(content=reply.text),
        finish_reason=reply.finish_reason,
        logprobs=chat_logprobs(reply, reply.token_ids, reply.token_logprobs, reply.token_top),
    )
    return ChatCompletion(
        id=reply.id,
        created=reply.created,
        model=reply.model,
        choices=[choice],
        usage=reply.usage(),
        prompt_logprobs=prompt_logprobs_json(reply),
    )


async def completion_events(
    reply: Reply, outputs: AsyncIterator[TokenOutput]
) -> AsyncIterator[str]:
    first = True  # the first chunk carries the echoed prompt and the prompt logprobs
    async for out in outputs:
        offset = len(reply.echo or "") + len(reply.text)
        reply.add(out)
        if not (first or out.text or out.finished or (reply.logprobs and out.token_ids)):
            continue  # the detokenizer held this token back (a partial stop string or UTF-8)
        tops = out.top_logprobs or [None] * len(out.token_ids)
        logprobs = completion_logprobs(
            reply, out.token_ids, logprobs_of(out), tops, offset, with_echo=first
        )
        choice = CompletionChoice(
            index=reply.index,
            text=(reply.echo or "") * first + out.text,
            finish_reason=out.finish_reason,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs_json(reply) if first else None,
        )
        first = False
        yield sse(completion(reply, [choice], reply.chunk_usage()))
    if reply.include_usage:
        yield sse(completion(reply, [], reply.usage()))


async def chat_events(
    reply: Reply, outputs: AsyncIterator[TokenOutput], tool_calls: ToolCallStream | None = None
) -> AsyncIterator[str]:
    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None, prompt=None) -> str:
        return sse(
            ChatCompletionChunk(
                id=reply.id,
                created=reply.created,
                model=reply.model,
                choices=choices,
                usage=usage,
                prompt_logprobs=prompt,
            )
        )

    role = ChatChunkChoice(index=reply.index, delta={"role": "assistant"})
    yield chunk([role], reply.chunk_usage())
    first = True
    async for out in outputs:
        reply.add(out)
        if not (out.text or out.finished or (reply.logprobs and out.token_ids)):
            continue
        tops = out.top_logprobs or [None] * len(out.token_ids)
        logprobs = chat_logprobs(reply, out.token_ids, logprobs_of(out), tops)
        delta = {"content": out.text} if out.text or not out.finished else {}
        finish_reason = out.finish_reason
        if tool_calls is not None:  # the text split into content and tool-call deltas
            delta, finish_reason = tool_calls.delta(out.text, out.finished, finish_reason)
        choice = ChatChunkChoice(
            index=reply.index, delta=delta, finish_reason=finish_reason, logprobs=logprobs
        )
        prompt = prompt_logprobs_json(reply) if first else None
        yield chunk([choice], reply.chunk_usage(), prompt=prompt)
        first = False
    if reply.include_usage:
        yield chunk([], reply.usage())


def sse(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"
