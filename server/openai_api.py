"""vLLM-compatible OpenAI routes over any `GenerationBackend`: `/v1/completions`,
`/v1/chat/completions` (JSON or server-sent events) and `/v1/models`. A client that disconnects,
streaming or not, closes the backend's iterator, which aborts its request.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from engine.sequence import InvalidRequestError
from engine.tokenizer import Tokenizer
from server.generation import GenerationBackend, Overloaded, Unavailable
from server.http_errors import error_response, parse_body, validation_message
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
from transport.messages import TokenOutput

log = logging.getLogger(__name__)

DEFAULT_COMPLETION_TOKENS = (
    16  # OpenAI's default for /v1/completions; chat defaults to the room left
)


class UnknownModel(LookupError):
    """The request names a model this server does not serve (HTTP 404)."""


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was complete."""


def openai_routes(backend: GenerationBackend) -> APIRouter:
    router = APIRouter()
    started = int(time.time())

    @router.get("/v1/models")
    async def models() -> dict:
        card = {
            "id": backend.model_name,
            "object": "model",
            "created": started,
            "owned_by": "adrenaline",
            "root": backend.model_name,
            "parent": None,
            "max_model_len": backend.max_model_len,
        }
        return {"object": "list", "data": [card]}

    @router.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _answer(lambda: _complete(backend, request))

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _answer(lambda: _chat(backend, request))

    return router


def error_for(exc: Exception) -> Response | None:
    """The HTTP error for a failed request, or None if `exc` is not one we map."""
    if isinstance(exc, RequestValidationError):
        return error_response(400, validation_message(exc.errors()), "invalid_request_error")
    if isinstance(exc, InvalidRequestError):
        return error_response(400, str(exc), "invalid_request_error")
    if isinstance(exc, UnknownModel):
        return error_response(404, str(exc), "not_found_error")
    if isinstance(exc, Overloaded):
        headers = {"Retry-After": str(exc.retry_after)}
        return error_response(429, str(exc), "rate_limit_exceeded", headers)
    if isinstance(exc, Unavailable):
        return error_response(503, str(exc), "service_unavailable")
    return None


async def _answer(handler: Callable[[], Awaitable[Response]]) -> Response:
    try:
        return await handler()
    except ClientGone:
        log.info("client disconnected; request aborted")
        return Response(status_code=499)  # nobody reads it; nginx's code for a closed client
    except Exception as exc:
        response = error_for(exc)
        if response is None:
            raise
        return response


@dataclass
class _Reply:
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
        self.token_logprobs += _logprobs_of(out)
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


def _logprobs_of(out: TokenOutput) -> list[float | None]:
    return list(out.logprobs) if out.logprobs is not None else [None] * len(out.token_ids)


async def _complete(backend: GenerationBackend, request: Request) -> Response:
    body: CompletionRequest = await parse_body(request, CompletionRequest)
    _check_model(backend, body.model)
    prompt = body.prompt if isinstance(body.prompt, list) else backend.tokenizer.encode(body.prompt)
    max_tokens = _fit(
        backend.max_model_len, len(prompt), body.max_tokens, DEFAULT_COMPLETION_TOKENS
    )
    reply = _reply(backend, "cmpl", body, len(prompt), logprobs=body.logprobs is not None)
    sampling = body.sampling(max_tokens, reply.logprobs)
    outputs = _watched(request, backend.generate(reply.id, prompt, sampling))
    first = await anext(outputs, None)  # a refused request fails here, before any 200 goes out
    outputs = _prepend(first, outputs)
    if body.stream:
        return _event_stream(_completion_events(reply, outputs), outputs)
    async for out in outputs:
        reply.add(out)
    logprobs = _completion_logprobs(reply, reply.token_ids, reply.token_logprobs, 0)
    choice = CompletionChoice(text=reply.text, finish_reason=reply.finish_reason, logprobs=logprobs)
    return _json(_completion(reply, [choice], reply.usage()))


async def _chat(backend: GenerationBackend, request: Request) -> Response:
    body: ChatCompletionRequest = await parse_body(request, ChatCompletionRequest)
    _check_model(backend, body.model)
    messages = [m.for_template() for m in body.messages]
    text = backend.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    # The template already wrote any BOS; adding special tokens again would double it.
    prompt = backend.tokenizer.encode(text, add_special_tokens=False)
    max_tokens = _fit(backend.max_model_len, len(prompt), body.completion_limit, None)
    reply = _reply(backend, "chatcmpl", body, len(prompt), logprobs=body.logprobs)
    sampling = body.sampling(max_tokens, reply.logprobs)
    outputs = _watched(request, backend.generate(reply.id, prompt, sampling))
    outputs = _prepend(await anext(outputs, None), outputs)
    if body.stream:
        return _event_stream(_chat_events(reply, outputs), outputs)
    async for out in outputs:
        reply.add(out)
    choice = ChatChoice(
        message=AssistantMessage(content=reply.text),
        finish_reason=reply.finish_reason,
        logprobs=_chat_logprobs(reply, reply.token_ids, reply.token_logprobs),
    )
    response = ChatCompletion(
        id=reply.id,
        created=reply.created,
        model=reply.model,
        choices=[choice],
        usage=reply.usage(),
    )
    return _json(response)


def _check_model(backend: GenerationBackend, model: str | None) -> None:
    if model is not None and model != backend.model_name:
        raise UnknownModel(
            f"The model `{model}` does not exist; this server serves `{backend.model_name}`"
        )


def _fit(max_model_len: int, prompt_len: int, requested: int | None, default: int | None) -> int:
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


def _reply(
    backend: GenerationBackend, kind: str, body: SamplingRequest, prompt_tokens: int, logprobs: bool
) -> _Reply:
    return _Reply(
        id=f"{kind}-{uuid.uuid4().hex}",
        model=backend.model_name,
        tokenizer=backend.tokenizer,
        prompt_tokens=prompt_tokens,
        logprobs=logprobs,
        include_usage=body.include_usage,
    )


def _completion(reply: _Reply, choices: list[CompletionChoice], usage: Usage | None) -> Completion:
    return Completion(
        id=reply.id, created=reply.created, model=reply.model, choices=choices, usage=usage
    )


def _completion_logprobs(
    reply: _Reply, token_ids: list[int], logprobs: list[float | None], offset: int
) -> CompletionLogprobs | None:
    if not reply.logprobs:
        return None
    tokens = reply.token_texts(token_ids)
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return CompletionLogprobs(text_offset=offsets, token_logprobs=logprobs, tokens=tokens)


def _chat_logprobs(
    reply: _Reply, token_ids: list[int], logprobs: list[float | None]
) -> ChatLogprobs | None:
    if not reply.logprobs:
        return None
    entries = [
        ChatTokenLogprob(token=text, logprob=lp, bytes=list(text.encode()))
        for text, lp in zip(reply.token_texts(token_ids), logprobs)
    ]
    return ChatLogprobs(content=entries)


async def _completion_events(
    reply: _Reply, outputs: AsyncIterator[TokenOutput]
) -> AsyncIterator[str]:
    async for out in outputs:
        offset = len(reply.text)
        reply.add(out)
        if not (out.text or out.finished or (reply.logprobs and out.token_ids)):
            continue  # the detokenizer held this token back (a partial stop string or UTF-8)
        logprobs = _completion_logprobs(reply, out.token_ids, _logprobs_of(out), offset)
        choice = CompletionChoice(text=out.text, finish_reason=out.finish_reason, logprobs=logprobs)
        yield _sse(_completion(reply, [choice], None))
    if reply.include_usage:
        yield _sse(_completion(reply, [], reply.usage()))


async def _chat_events(reply: _Reply, outputs: AsyncIterator[TokenOutput]) -> AsyncIterator[str]:
    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        return _sse(
            ChatCompletionChunk(
                id=reply.id, created=reply.created, model=reply.model, choices=choices, usage=usage
            )
        )

    yield chunk([ChatChunkChoice(delta={"role": "assistant"})])
    async for out in outputs:
        reply.add(out)
        if not (out.text or out.finished or (reply.logprobs and out.token_ids)):
            continue
        logprobs = _chat_logprobs(reply, out.token_ids, _logprobs_of(out))
        delta = {"content": out.text} if out.text or not out.finished else {}
        yield chunk(
            [ChatChunkChoice(delta=delta, finish_reason=out.finish_reason, logprobs=logprobs)]
        )
    if reply.include_usage:
        yield chunk([], reply.usage())


class _EventStream(StreamingResponse):
    """Closes its body however the response ends, so a client that leaves aborts its request
    (Starlette cancels a stream on disconnect but leaves the generator suspended)."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


def _event_stream(
    events: AsyncIterator[str], outputs: AsyncIterator[TokenOutput]
) -> StreamingResponse:
    return _EventStream(_terminated(events, outputs), media_type="text/event-stream")


async def _terminated(
    events: AsyncIterator[str], outputs: AsyncIterator[TokenOutput]
) -> AsyncIterator[str]:
    """`events` then `[DONE]`; a failure mid-stream becomes an error event, as vLLM sends it."""
    try:
        async for event in events:
            yield event
    except ClientGone:
        return
    except Exception as exc:
        response = error_for(exc)
        if response is None:
            log.exception("stream failed")
            response = error_response(500, f"internal error: {exc!r}", "internal_error")
        yield f"data: {response.body.decode()}\n\n"
    finally:
        # Closing `events` leaves the outputs it iterates suspended; closing those aborts.
        await events.aclose()  # type: ignore[attr-defined]
        await outputs.aclose()  # type: ignore[attr-defined]
    yield "data: [DONE]\n\n"


def _sse(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


def _json(payload: BaseModel) -> Response:
    return Response(payload.model_dump_json(), media_type="application/json")


async def _prepend(
    first: TokenOutput | None, rest: AsyncIterator[TokenOutput]
) -> AsyncIterator[TokenOutput]:
    try:
        if first is None:
            return
        yield first
        async for out in rest:
            yield out
    finally:
        await rest.aclose()  # type: ignore[attr-defined]


async def _watched(
    request: Request, stream: AsyncIterator[TokenOutput]
) -> AsyncIterator[TokenOutput]:
    """`stream`'s outputs, raising ClientGone as soon as the client disconnects. `stream` is
    closed however this ends, which aborts the request if it had not finished."""
    gone = asyncio.ensure_future(_disconnect(request))
    step: asyncio.Future | None = None
    try:
        while True:
            step = asyncio.ensure_future(_next(stream))
            await asyncio.wait({step, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                raise ClientGone()
            out = step.result()
            if out is None:
                return
            yield out
    finally:
        gone.cancel()
        if step is not None and not step.done():
            step.cancel()
            await asyncio.wait({step})
        if step is not None and not step.cancelled():
            step.exception()  # retrieved, so asyncio does not log it as lost
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


async def _next(stream: AsyncIterator[TokenOutput]) -> TokenOutput | None:
    try:
        return await anext(stream)
    except StopAsyncIteration:
        return None


async def _disconnect(request: Request) -> None:
    # The body is already read, so the next ASGI message is the disconnect (or the server's
    # own disconnect once the response is complete, by which time this task is cancelled).
    while (await request.receive())["type"] != "http.disconnect":
        pass
