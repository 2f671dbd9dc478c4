"""vLLM's small endpoints that clients script against, in vLLM's request and response shapes:
`POST /tokenize` (a prompt, or chat messages through the chat template), `POST /detokenize` and
`GET /version`. Tokenizing runs off the event loop, as for generation.
"""

from __future__ import annotations

import asyncio
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, RootModel, ValidationError, model_validator

from engine.sequence import InvalidRequestError
from server.api.errors import parse_body
from server.api.openai_format import check_model
from server.api.openai_schemas import ChatMessage
from server.api.prompts import check_prompt_chars
from server.api.request_fields import TokenId, request_config
from server.router.generation import GenerationBackend

# Unknown fields are refused, not ignored: a vLLM option we lack (chat_template_kwargs, ...)
# must not silently change what the count means.
_CONFIG = request_config(extra="forbid")


class TokenizeCompletionRequest(BaseModel):
    model_config = _CONFIG

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class TokenizeChatRequest(BaseModel):
    model_config = _CONFIG

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    # The template writes the special tokens it wants; adding them again would double a BOS.
    add_special_tokens: bool = False
    return_token_strs: bool | None = False
    tools: list[dict[str, Any]] | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_ending(cls, data: Any) -> Any:
        # As vLLM: both given true is a contradiction; add_generation_prompt's default is not.
        if isinstance(data, dict) and data.get("continue_final_message") is True:
            if data.get("add_generation_prompt") is True:
                raise ValueError(
                    "continue_final_message and add_generation_prompt cannot both be true"
                )
            data = {**data, "add_generation_prompt": False}
        return data


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = _CONFIG

    model: str | None = None
    tokens: list[TokenId]


class DetokenizeResponse(BaseModel):
    prompt: str


class _JSONObject(RootModel[dict[str, Any]]):
    """Any JSON object: which tokenize request it is depends on its keys."""


def tokenize_routes(backend: GenerationBackend) -> APIRouter:
    router = APIRouter()

    @router.post("/tokenize", response_model_exclude_none=True)
    async def tokenize(request: Request) -> TokenizeResponse:
        body = (await parse_body(request, _JSONObject)).root
        kind = TokenizeChatRequest if "messages" in body else TokenizeCompletionRequest
        try:
            parsed = kind.model_validate(body)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from exc
        check_model(backend, parsed.model)
        tokens = await asyncio.to_thread(_tokenize, backend, parsed)
        strs = None
        if parsed.return_token_strs:
            strs = [backend.tokenizer.id_to_token(t) or "" for t in tokens]
        return TokenizeResponse(
            count=len(tokens), max_model_len=backend.max_model_len, tokens=tokens, token_strs=strs
        )

    @router.post("/detokenize")
    async def detokenize(request: Request) -> DetokenizeResponse:
        body: DetokenizeRequest = await parse_body(request, DetokenizeRequest)
        check_model(backend, body.model)
        vocab = backend.tokenizer.vocab_size
        for i, token in enumerate(body.tokens):
            if token >= vocab:
                raise InvalidRequestError(
                    f"tokens.{i}: token id {token} is outside the vocabulary (0..{vocab - 1})"
                )
        # As vLLM: special tokens are kept, so that detokenize(tokenize(x)) gives x back.
        text = await asyncio.to_thread(
            backend.tokenizer.decode, body.tokens, skip_special_tokens=False
        )
        return DetokenizeResponse(prompt=text)

    @router.get("/version")
    async def server_version() -> dict:
        return {"version": package_version()}

    return router


def _tokenize(
    backend: GenerationBackend, body: TokenizeCompletionRequest | TokenizeChatRequest
) -> list[int]:
    if isinstance(body, TokenizeChatRequest):
        text = backend.tokenizer.apply_chat_template(
            [m.for_template() for m in body.messages],
            add_generation_prompt=body.add_generation_prompt,
            tools=body.tools,
            continue_final_message=body.continue_final_message,
        )
    else:
        text = body.prompt
    check_prompt_chars(backend, len(text))
    return backend.tokenizer.encode(text, add_special_tokens=body.add_special_tokens)


def package_version() -> str:
    try:
        return version("adrenaline")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"
