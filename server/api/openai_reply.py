"""One OpenAI request's identity and running totals (`Reply`), shared by its JSON and streamed
forms and read by the log-probability shapes (server/api/openai_logprobs.py) and the answers
built from it (server/api/openai_format.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from engine.tokenizer import Tokenizer
from server.api.openai_schemas import Usage
from transport.messages import PromptLogprobs, TokenOutput


@dataclass
class Reply:
    """One request's identity and running totals, shared by its JSON and streamed forms."""

    id: str
    model: str
    tokenizer: Tokenizer
    prompt_tokens: int
    logprobs: bool
    include_usage: bool
    continuous_usage: bool = False  # usage on every streamed chunk, not only the last
    created: int = field(default_factory=lambda: int(time.time()))
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    finish_reason: str | None = None
    top_logprobs: int = 0  # alternatives the client asked for per output token
    prompt_logprobs: int | None = None  # alternatives per prompt token (vLLM's extension)
    # Completions' echo: the prompt's text and ids, prepended to the answer (and its
    # logprobs, when asked, with `top_logprobs` alternatives each).
    echo: str | None = None
    prompt_token_ids: list[int] = field(default_factory=list)
    token_top: list[list[tuple[int, float]] | None] = field(default_factory=list)
    prompt: PromptLogprobs | None = None  # arrives with the first output
    index: int = 0  # which of the request's choices this is (n > 1: see server/api/choices.py)

    def add(self, out: TokenOutput) -> None:
        self.text += out.text
        self.token_ids += out.token_ids
        self.token_logprobs += logprobs_of(out)
        self.token_top += out.top_logprobs or [None] * len(out.token_ids)
        self.prompt = self.prompt or out.prompt_logprobs
        self.finish_reason = out.finish_reason or self.finish_reason

    def usage(self) -> Usage:
        done = len(self.token_ids)
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=done,
            total_tokens=self.prompt_tokens + done,
        )

    def chunk_usage(self) -> Usage | None:
        """A streamed chunk's usage: the totals so far with continuous_usage_stats."""
        return self.usage() if self.continuous_usage else None

    def token_texts(self, token_ids: list[int]) -> list[str]:
        return [self.tokenizer.decode([t], skip_special_tokens=False) for t in token_ids]

    @property
    def internal_prompt_logprobs(self) -> int | None:
        """The alternatives per prompt token the engine must report: the client's, or
        more for echo with logprobs (its prompt tokens come with the same alternatives)."""
        echoed = self.top_logprobs if self.echo is not None and self.logprobs else None
        asked = [n for n in (self.prompt_logprobs, echoed) if n is not None]
        return max(asked) if asked else None


def logprobs_of(out: TokenOutput) -> list[float | None]:
    return list(out.logprobs) if out.logprobs is not None else [None] * len(out.token_ids)
