"""`POST /generate`: the native API. One JSON answer, or NDJSON chunks with `"stream": true`."""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, model_validator

from server.generation import GenerationBackend
from server.http_errors import error_payload, parse_body
from server.prompts import encode_text
from server.request_fields import (
    MinP,
    Seed,
    Temperature,
    TokenCount,
    TokenId,
    TopK,
    TopP,
    request_config,
)
from server.streaming import (
    ClientGone,
    ClosingStreamingResponse,
    client_gone,
    first_then_rest,
    watched,
)
from transport.messages import SamplingSpec, TokenOutput


class GenerateRequest(BaseModel):
    model_config = request_config(extra="forbid")

    prompt: str | None = None
    prompt_token_ids: list[TokenId] | None = None
    max_tokens: TokenCount = 16
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK = -1
    min_p: MinP = 0.0
    seed: Seed | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
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

    def sampling(self) -> SamplingSpec:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingSpec(
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


class Accumulated:
    """Joins a request's deltas into the final answer."""

    def __init__(self) -> None:
        self.text, self.token_ids, self.logprobs = "", [], []
        self.finish_reason: str | None = None
        self.prompt_tokens = 0

    def add(self, out: TokenOutput) -> None:
        self.text += out.text
        self.token_ids += out.token_ids
        self.logprobs += out.logprobs or []
        self.finish_reason = out.finish_reason or self.finish_reason
        self.prompt_tokens = out.prompt_tokens or self.prompt_tokens


def generate_json(
    text: str,
    token_ids: list[int],
    finish_reason,
    prompt_tokens: int,
    completion_tokens: int,
    logprobs: list[float] | None,
) -> dict:
    body = {
        "text": text,
        "token_ids": token_ids,
        "finish_reason": finish_reason,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
    }
    if logprobs is not None:
        body["logprobs"] = logprobs
    return body


def generate_routes(backend: GenerationBackend) -> APIRouter:
    router = APIRouter()
    counter = itertools.count()

    @router.post("/generate")
    async def generate(request: Request) -> Response:
        try:
            return await _generate(backend, request, f"gen-{next(counter)}")
        except ClientGone:
            return client_gone()

    return router


async def _generate(backend: GenerationBackend, request: Request, request_id: str) -> Response:
    body = await parse_body(request, GenerateRequest)
    spec = body.sampling()
    prompt_ids = body.prompt_token_ids or await encode_text(backend, body.prompt or "")
    # Watched from the start: a client gone during prefill aborts its request too.
    outputs = watched(request, backend.generate(request_id, prompt_ids, spec))
    outputs = await first_then_rest(outputs)  # a refused request is a 4xx, not a stream
    if body.stream:
        return ClosingStreamingResponse(
            _ndjson(outputs, len(prompt_ids), body.logprobs), media_type="application/x-ndjson"
        )
    total = Accumulated()
    async for out in outputs:
        total.add(out)
    answer = generate_json(
        total.text,
        total.token_ids,
        total.finish_reason,
        len(prompt_ids),
        len(total.token_ids),
        total.logprobs if body.logprobs else None,
    )
    return JSONResponse(answer)


async def _ndjson(
    outputs: AsyncIterator[TokenOutput], prompt_tokens: int, logprobs: bool
) -> AsyncIterator[bytes]:
    completion = 0
    try:
        async for out in outputs:
            completion += len(out.token_ids)
            chunk = generate_json(
                out.text,
                out.token_ids,
                out.finish_reason,
                prompt_tokens,
                completion,
                (out.logprobs or []) if logprobs else None,
            )
            yield (json.dumps(chunk) + "\n").encode()
    except ClientGone:
        return
    except Exception as exc:  # headers are sent: report the failure in-band, then end
        yield (json.dumps(error_payload(exc)) + "\n").encode()
