"""A request's text to prompt token ids, off the event loop so /health and every stream keep
answering while a long prompt is tokenized; a text too long for the context is refused before
any tokenizing.
"""

from __future__ import annotations

import asyncio
import functools

from engine.sequence import InvalidRequestError
from engine.tokenizer import Tokenizer
from server.router.generation import GenerationBackend


async def encode_text(backend: GenerationBackend, text: str) -> list[int]:
    def encode() -> list[int]:
        check_prompt_chars(backend, len(text))
        return backend.tokenizer.encode(text)

    return await asyncio.to_thread(encode)


async def encode_chat(
    backend: GenerationBackend, messages: list[dict], tools: list[dict] | None = None
) -> list[int]:
    """`tools`: the request's tool definitions, for a chat template that renders them."""

    def render_and_encode() -> list[int]:
        text = backend.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tools=tools
        )
        check_prompt_chars(backend, len(text))
        # The template already wrote any BOS; adding special tokens again would double it.
        return backend.tokenizer.encode(text, add_special_tokens=False)

    return await asyncio.to_thread(render_and_encode)


def check_prompt_chars(backend: GenerationBackend, num_chars: int) -> None:
    """A 400 for a text that must tokenize to more tokens than the context holds."""
    context = backend.max_model_len
    if not context:
        return  # no live worker yet: the backend refuses the request itself
    # Twice the most characters one token stands for: a normalizer may shrink text before it is
    # tokenized (NFC joins a letter and its combining accents), so the bound stays generous.
    limit = 2 * context * max_token_chars(backend.tokenizer)
    if num_chars > limit:
        raise InvalidRequestError(
            f"This model's maximum context length is {context} tokens, but the prompt has "
            f"{num_chars} characters, more than {context} tokens can hold (at most {limit}); "
            "shorten the prompt"
        )


@functools.cache
def max_token_chars(tokenizer: Tokenizer) -> int:
    """The most characters one token stands for: its vocabulary's longest text (special tokens
    too, as a prompt may spell them), plus the word-start space SentencePiece decodes away."""
    texts = (tokenizer.decode([i], skip_special_tokens=False) for i in range(tokenizer.vocab_size))
    return max(map(len, texts), default=1) + 1
