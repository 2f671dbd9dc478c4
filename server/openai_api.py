"""vLLM-compatible OpenAI routes over any `GenerationBackend`: `/v1/completions`,
`/v1/chat/completions` (JSON or server-sent events) and `/v1/models`. A client that disconnects,
streaming or not, closes the backend's iterator, which aborts its request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from server.generation import GenerationBackend
from server.http_errors import MAPPED_ERRORS, error_response, exception_response, parse_body
from server.openai_format import (
    DEFAULT_COMPLETION_TOKENS,
    chat_answer,
    chat_events,
    chat_prompt,
    check_model,
    completion_answer,
    completion_events,
    completion_prompt,
    fit,
    new_reply,
)
from server.openai_protocol import ChatCompletionRequest, CompletionRequest
from transport.messages import TokenOutput

log = logging.getLogger(__name__)


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


async def _answer(handler: Callable[[], Awaitable[Response]]) -> Response:
    try:
        return await handler()
    except ClientGone:
        log.info("client disconnected; request aborted")
        return Response(status_code=499)  # nobody reads it; nginx's code for a closed client
    except MAPPED_ERRORS as exc:
        return exception_response(exc)


async def _complete(backend: GenerationBackend, request: Request) -> Response:
    body: CompletionRequest = await parse_body(request, CompletionRequest)
    check_model(backend, body.model)
    prompt = completion_prompt(backend, body)
    max_tokens = fit(backend.max_model_len, len(prompt), body.max_tokens, DEFAULT_COMPLETION_TOKENS)
    reply = new_reply(backend, "cmpl", body, len(prompt), logprobs=body.logprobs is not None)
    sampling = body.sampling(max_tokens, reply.logprobs)
    outputs = _watched(request, backend.generate(reply.id, prompt, sampling))
    first = await anext(outputs, None)  # a refused request fails here, before any 200 goes out
    outputs = _prepend(first, outputs)
    if body.stream:
        return _event_stream(completion_events(reply, outputs), outputs)
    async for out in outputs:
        reply.add(out)
    return _json(completion_answer(reply))


async def _chat(backend: GenerationBackend, request: Request) -> Response:
    body: ChatCompletionRequest = await parse_body(request, ChatCompletionRequest)
    check_model(backend, body.model)
    prompt = chat_prompt(backend, body)
    max_tokens = fit(backend.max_model_len, len(prompt), body.completion_limit, None)
    reply = new_reply(backend, "chatcmpl", body, len(prompt), logprobs=body.logprobs)
    sampling = body.sampling(max_tokens, reply.logprobs)
    outputs = _watched(request, backend.generate(reply.id, prompt, sampling))
    outputs = _prepend(await anext(outputs, None), outputs)
    if body.stream:
        return _event_stream(chat_events(reply, outputs), outputs)
    async for out in outputs:
        reply.add(out)
    return _json(chat_answer(reply))


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
        if isinstance(exc, MAPPED_ERRORS):
            response = exception_response(exc)
        else:
            log.exception("stream failed")
            response = error_response(500, f"internal error: {exc!r}", "internal_error")
        yield f"data: {response.body.decode()}\n\n"
    finally:
        # Closing `events` leaves the outputs it iterates suspended; closing those aborts.
        await events.aclose()  # type: ignore[attr-defined]
        await outputs.aclose()  # type: ignore[attr-defined]
    yield "data: [DONE]\n\n"


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
