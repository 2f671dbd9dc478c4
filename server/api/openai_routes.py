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

from server.api.choices import (
    DEFAULT_MAX_N,
    Choices,
    chat_usage_chunk,
    check_choices,
    completion_usage_chunk,
)
from server.api.errors import MAPPED_ERRORS, error_response, exception_response, parse_body
from server.api.openai_format import (
    DEFAULT_COMPLETION_TOKENS,
    Reply,
    chat_answer,
    chat_events,
    chat_prompt,
    check_model,
    completion_answer,
    completion_events,
    completion_prompt,
    fit,
    new_reply,
    reply_sampling,
)
from server.api.openai_schemas import ChatCompletionRequest, CompletionRequest
from server.api.streaming import (
    ClientGone,
    ClosingStreamingResponse,
    client_gone,
    first_then_rest,
    watched,
)
from server.api.structured_outputs import with_structured
from server.api.tool_calls import (
    ToolCallStream,
    chat_structured,
    parses_tool_calls,
    with_tool_calls,
)
from server.router.generation import GenerationBackend
from transport.messages import SamplingSpec, TokenOutput

log = logging.getLogger(__name__)


def openai_routes(backend: GenerationBackend, max_n: int = DEFAULT_MAX_N) -> APIRouter:
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
        return await _answer(lambda: _complete(backend, request, max_n))

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _answer(lambda: _chat(backend, request, max_n))

    return router


async def _answer(handler: Callable[[], Awaitable[Response]]) -> Response:
    try:
        return await handler()
    except ClientGone:
        return client_gone()
    except MAPPED_ERRORS as exc:
        return exception_response(exc)


async def _complete(backend: GenerationBackend, request: Request, max_n: int) -> Response:
    body: CompletionRequest = await parse_body(request, CompletionRequest)
    check_model(backend, body.model)
    check_choices(body, max_n)
    prompt = await completion_prompt(backend, body)
    max_tokens = fit(backend.max_model_len, len(prompt), body.max_tokens, DEFAULT_COMPLETION_TOKENS)
    reply = new_reply(backend, "cmpl", body, prompt, body.logprobs is not None, body.logprobs or 0)
    if body.echo:
        reply.echo = (
            body.prompt if isinstance(body.prompt, str) else backend.tokenizer.decode(prompt)
        )
    sampling = reply_sampling(reply, body, max_tokens)
    if body.structured is not None:
        sampling = await with_structured(sampling, lambda: body.structured)
    if body.candidates > 1:
        return await _complete_choices(backend, request, body, reply, prompt, sampling)
    outputs = watched(request, backend.generate(reply.id, prompt, sampling))
    outputs = await first_then_rest(outputs)  # a refused request fails here, before any 200
    if body.stream:
        return _event_stream(completion_events(reply, outputs), outputs)
    async for out in outputs:
        reply.add(out)
    return _json(completion_answer(reply))


async def _chat(backend: GenerationBackend, request: Request, max_n: int) -> Response:
    body: ChatCompletionRequest = await parse_body(request, ChatCompletionRequest)
    check_model(backend, body.model)
    check_choices(body, max_n)
    prompt = await chat_prompt(backend, body)
    max_tokens = fit(backend.max_model_len, len(prompt), body.completion_limit, None)
    reply = new_reply(backend, "chatcmpl", body, prompt, body.logprobs, body.top_logprobs or 0)
    sampling = reply_sampling(reply, body, max_tokens)
    if body.structured is not None or body.tool_choice is not None or body.tools:
        sampling = await with_structured(sampling, lambda: chat_structured(body))
    if body.n > 1:
        return await _chat_choices(backend, request, body, reply, prompt, sampling)
    outputs = watched(request, backend.generate(reply.id, prompt, sampling))
    outputs = await first_then_rest(outputs)
    tools = parses_tool_calls(body.tools, body.tool_choice)
    if body.stream:
        events = chat_events(reply, outputs, ToolCallStream() if tools else None)
        return _event_stream(events, outputs)
    async for out in outputs:
        reply.add(out)
    answer = chat_answer(reply)
    return _json(with_tool_calls(answer) if tools else answer)


async def _complete_choices(
    backend: GenerationBackend,
    request: Request,
    body: CompletionRequest,
    reply: Reply,
    prompt: list[int],
    sampling: SamplingSpec,
) -> Response:
    choices = Choices(backend, reply, prompt, sampling, body.candidates, body.n)
    await choices.start(request)  # a refused child fails the request here, before any 200
    if body.stream:
        events = choices.events(request, completion_events, completion_usage_chunk)
        return _event_stream(events, choices)
    return _json(await choices.answer(request, completion_answer))


async def _chat_choices(
    backend: GenerationBackend,
    request: Request,
    body: ChatCompletionRequest,
    reply: Reply,
    prompt: list[int],
    sampling: SamplingSpec,
) -> Response:
    choices = Choices(backend, reply, prompt, sampling, body.n, body.n)
    await choices.start(request)
    tools = parses_tool_calls(body.tools, body.tool_choice)
    if body.stream:
        events = choices.events(
            request,
            lambda r, outs: chat_events(r, outs, ToolCallStream() if tools else None),
            chat_usage_chunk,
        )
        return _event_stream(events, choices)
    answer = await choices.answer(request, chat_answer)
    return _json(with_tool_calls(answer) if tools else answer)


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
