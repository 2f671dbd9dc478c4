"""`POST /generate`: the native API. One JSON answer, or NDJSON chunks with `"stream": true`."""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, model_validator

from server.api.errors import error_payload, parse_body
from server.api.prompts import encode_text
from server.api.request_fields import (
    INT32_MAX,
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
from server.api.streaming import (
    ClientGone,
    ClosingStreamingResponse,
    client_gone,
    first_then_rest,
    watched,
)
from server.router.generation import GenerationBackend
from transport.messages import PromptLogprobs, SamplingSpec, TokenOutput


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
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    repetition_penalty: RepetitionPenalty = 1.0
    min_tokens: Annotated[int, Field(ge=0, le=INT32_MAX)] = 0
    logit_bias: LogitBias | None = None
    # With logprobs: each token's best alternatives; prompt_logprobs: per prompt token.
    top_logprobs: LogprobCount = 0
    prompt_logprobs: LogprobCount | None = None

    @model_validator(mode="after")
    def _one_prompt(self) -> GenerateRequest:
        if (self.prompt is None) == (self.prompt_token_ids is None):
            raise ValueError("give exactly one of 'prompt' or 'prompt_token_ids'")
        if self.prompt is not None and not self.prompt:
            raise ValueError("'prompt' is empty")
        if self.prompt_token_ids is not None and not self.prompt_token_ids:
            raise ValueError("'prompt_token_ids' is empty")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        logit_bias_ids(self.logit_bias)
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
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            min_tokens=self.min_tokens,
            logit_bias=logit_bias_ids(self.logit_bias),
            top_logprobs=self.top_logprobs,
            prompt_logprobs=self.prompt_logprobs,
        )


class Accumulated:
    """Joins a request's deltas into the final answer."""

    def __init__(self) -> None:
        self.text, self.token_ids, self.logprobs = "", [], []
        self.top_logprobs: list = []
        self.prompt_logprobs: PromptLogprobs | None = None
        self.finish_reason: str | None = None
        self.prompt_tokens = 0

    def add(self, out: TokenOutput) -> None:
        self.text += out.text
        self.token_ids += out.token_ids
        self.logprobs += out.logprobs or []
        self.top_logprobs += out.top_logprobs or []
        self.prompt_logprobs = self.prompt_logprobs or out.prompt_logprobs
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


def with_alternatives(
    body: dict, request: GenerateRequest, top: list | None, prompt: PromptLogprobs | None
) -> dict:
    """Adds what the request asked for beyond logprobs: per new token, its best alternatives
    as [token id, logprob] pairs; per prompt token (None for the first), its logprob, rank
    and alternatives, on the chunk that carries the first token (or the whole answer)."""
    if request.logprobs and request.top_logprobs:
        body["top_logprobs"] = [[[t, max(lp, -9999.0)] for t, lp in alts] for alts in top or []]
    if request.prompt_logprobs is not None and prompt is not None:
        body["prompt_logprobs"] = [None] + [
            {"logprob": lp, "rank": rank, "top_logprobs": [[t, v] for t, v in alts]}
            for lp, rank, alts in zip(prompt.logprobs, prompt.ranks, prompt.top)
        ]
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
            _ndjson(outputs, len(prompt_ids), body), media_type="application/x-ndjson"
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
    return JSONResponse(with_alternatives(answer, body, total.top_logprobs, total.prompt_logprobs))


async def _ndjson(
    outputs: AsyncIterator[TokenOutput], prompt_tokens: int, request: GenerateRequest
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
                (out.logprobs or []) if request.logprobs else None,
            )
            chunk = with_alternatives(chunk, request, out.top_logprobs, out.prompt_logprobs)
            yield (json.dumps(chunk) + "\n").encode()
    except ClientGone:
        return
    except Exception as exc:  # headers are sent: report the failure in-band, then end
        yield (json.dumps(error_payload(exc)) + "\n").encode()
