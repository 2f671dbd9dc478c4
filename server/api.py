"""The HTTP API of a single-process server: `POST /generate` (JSON or NDJSON stream),
`GET /health`, `GET /stats`. Errors map to status codes in one place, `error_response`.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.engine import RequestOutput
from engine.sequence import InvalidRequestError, SamplingParams
from server.async_engine import AsyncEngine, EngineDeadError
from server.http_errors import error_response, parse_body, validation_message

log = logging.getLogger(__name__)


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    max_tokens: int = Field(default=16)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: bool = False
    stream: bool = False

    @model_validator(mode="after")
    def _one_prompt(self) -> GenerateRequest:
        if (self.prompt is None) == (self.prompt_token_ids is None):
            raise ValueError("give exactly one of 'prompt' or 'prompt_token_ids'")
        if self.prompt is not None and not self.prompt:
            raise ValueError("'prompt' is empty")
        if self.prompt_token_ids is not None and not self.prompt_token_ids:
            raise ValueError("'prompt_token_ids' is empty")
        return self

    def sampling_params(self) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            seed=self.seed,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            logprobs=self.logprobs,
        )


def output_json(out: RequestOutput, stream: bool) -> dict:
    body = {
        "text": out.new_text if stream else out.text,
        "token_ids": out.new_token_ids if stream else out.token_ids,
        "finish_reason": out.finish_reason,
        "usage": {
            "prompt_tokens": len(out.prompt_token_ids),
            "completion_tokens": len(out.token_ids),
        },
    }
    if out.logprobs is not None:
        body["logprobs"] = out.logprobs[-len(out.new_token_ids) :] if stream else out.logprobs
    return body


def create_app(engine: AsyncEngine, model_name: str) -> FastAPI:
    app = FastAPI(title="Adrenaline", version="0.1.0")
    counter = itertools.count()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, validation_message(exc.errors()), "invalid_request_error")

    @app.exception_handler(InvalidRequestError)
    async def _refused(_: Request, exc: InvalidRequestError) -> JSONResponse:
        return error_response(400, str(exc), "invalid_request_error")

    @app.exception_handler(EngineDeadError)
    async def _dead(_: Request, exc: EngineDeadError) -> JSONResponse:
        return error_response(503, str(exc), "service_unavailable")

    @app.get("/health")
    async def health() -> JSONResponse:
        if engine.alive:
            return JSONResponse({"status": "ok", "model": model_name})
        return error_response(503, f"engine stopped: {engine.error!r}", "service_unavailable")

    @app.get("/stats")
    async def stats() -> dict:
        return {"model": model_name, "engine": engine.stats()}

    @app.post("/generate")
    async def generate(request: Request):
        body = await parse_body(request, GenerateRequest)
        params = body.sampling_params()
        tokenizer = engine.engine.tokenizer
        prompt_ids = body.prompt_token_ids or tokenizer.encode(body.prompt or "")
        request_id = f"gen-{next(counter)}"
        stream = engine.generate(request_id, prompt_ids, params)
        first = await anext(stream)  # surfaces a refused request as a 4xx before streaming
        if body.stream:
            return StreamingResponse(
                _ndjson(first, stream, request), media_type="application/x-ndjson"
            )
        last = first
        async for out in stream:
            last = out
        return output_json(last, stream=False)

    return app


async def _ndjson(
    first: RequestOutput, rest: AsyncIterator[RequestOutput], request: Request
) -> AsyncIterator[bytes]:
    yield (json.dumps(output_json(first, stream=True)) + "\n").encode()
    async for out in rest:
        if await request.is_disconnected():
            break  # closing `rest` aborts the request in the engine
        yield (json.dumps(output_json(out, stream=True)) + "\n").encode()
