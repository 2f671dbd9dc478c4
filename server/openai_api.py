"""vLLM-compatible OpenAI routes over any `GenerationBackend`: `/v1/completions`,
`/v1/chat/completions` (JSON or server-sent events) and `/v1/models`. A client that disconnects,
streaming or not, closes the backend's iterator, which aborts its request.
"""

from __future__ import annotations

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
from server.streaming import (
    ClientGone,
    ClosingStreamingResponse,
    client_gone,
    first_then_rest,
    watched,
)
from transport.messages import TokenOutput

log = logging.getLogger(__name__)


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
        return client_gone()
    except MAPPED_ERRORS as exc:
        return exception_response(exc)


async def _complete(backend: GenerationBackend, request: Request) -> Response:
    body: CompletionRequest = await parse_body(request, CompletionRequest)
    check_model(backend, body.model)
    prompt = await completion_prompt(backend, body)
    max_tokens = fit(backend.max_model_len, len(prompt), body.max_tokens, DEFAULT_COMPLETION_TOKENS)
    reply = new_reply(backend, "cmpl", body, len(prompt), logprobs=body.logprobs is not None)
    sampling = body.sampling(max_tokens, reply.logprobs)
    outputs = watched(request, backend.generate(reply.id, prompt, sampling))
    outputs = await first_then_rest(outputs)  # a refused request fails here, before any 200
    if body.stream:
        return _event_stream(completion_events(reply, outputs), outputs)
    async for out in outputs:
        reply.add(out)
    return _json(completion_answer(reply))


async def _chat(backend: GenerationBackend, request: Request) -> Response:
    body: ChatCompletionRequest = await parse_body(request, ChatCompletionRequest)
    check_model(backend, body.model)
    prompt = await chat_prompt(backend, body)
    max_tokens = fit(backend.max_model_len, len(prompt), body.completion_limit, None)
    reply = new_reply(backend, "chatcmpl", body, len(prompt), logprobs=body.logprobs)
    sampling = body.sampling(max_tokens, reply.logprobs)
    outputs = watched(request, backend.generate(reply.id, prompt, sampling))
    outputs = await first_then_rest(outputs)
    if body.stream:
        return _event_stream(chat_events(reply, outputs), outputs)
    async for out in outputs:
        reply.add(out)
    return _json(chat_answer(reply))


def _event_stream(
    events: AsyncIterator[str], outputs: AsyncIterator[TokenOutput]
) -> StreamingResponse:
    return ClosingStreamingResponse(_terminated(events, outputs), media_type="text/event-stream")


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
