"""`POST /generate`: the native API. One JSON answer, or NDJSON chunks with `"stream": true`."""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, model_validator

from server.generation import GenerationBackend
from server.http_errors import error_payload, parse_body
from server.streaming import first_then_rest, until_disconnected
from transport.messages import SamplingSpec, TokenOutput


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    max_tokens: int = 16
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
        if self.max_tokens < 1:
            raise ValueError(f"'max_tokens' must be at least 1, got {self.max_tokens}")
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
    async def generate(request: Request):
        body = await parse_body(request, GenerateRequest)
        spec = body.sampling()
        prompt_ids = body.prompt_token_ids or backend.tokenizer.encode(body.prompt or "")
        stream = backend.generate(f"gen-{next(counter)}", prompt_ids, spec)
        outputs = await first_then_rest(stream)  # a refused request is a 4xx, not a stream
        if body.stream:
            return StreamingResponse(
                _ndjson(outputs, len(prompt_ids), body.logprobs, request),
                media_type="application/x-ndjson",
            )
        total = Accumulated()
        async for out in until_disconnected(outputs, request):
            total.add(out)
        return generate_json(
            total.text,
            total.token_ids,
            total.finish_reason,
            len(prompt_ids),
            len(total.token_ids),
            total.logprobs if body.logprobs else None,
        )

    return router


async def _ndjson(
    outputs: AsyncIterator[TokenOutput], prompt_tokens: int, logprobs: bool, request: Request
) -> AsyncIterator[bytes]:
    completion = 0
    try:
        async for out in until_disconnected(outputs, request):
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
    except Exception as exc:  # headers are sent: report the failure in-band, then end
        yield (json.dumps(error_payload(exc)) + "\n").encode()
