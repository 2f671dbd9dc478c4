"""What the HTTP layers need from whatever generates tokens (the router, in a deployment).

`generate` yields `TokenOutput` deltas for one request; closing the iterator before the last
one aborts the request everywhere it runs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from engine.tokenizer import Tokenizer
from transport.messages import SamplingSpec, TokenOutput


class Overloaded(RuntimeError):
    """The admission queue is full; the client should retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(RuntimeError):
    """No live worker can take the request (HTTP 503), or one died while serving it."""


class GenerationBackend(Protocol):
    model_name: str
    max_model_len: int
    tokenizer: Tokenizer

    def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingSpec,
        near: str | None = None,
    ) -> AsyncIterator[TokenOutput]: ...
