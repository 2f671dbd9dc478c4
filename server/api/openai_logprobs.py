"""Log-probabilities in the OpenAI API's shapes: completions' parallel lists (tokens,
token_logprobs, top_logprobs, text_offset), chat's per-token entries with alternatives, and
vLLM's prompt_logprobs; for completions' echo, the prompt's tokens lead the lists.
"""

from __future__ import annotations

from server.api.openai_reply import Reply
from server.api.openai_schemas import (
    ChatLogprobs,
    ChatTokenLogprob,
    ChatTopLogprob,
    CompletionLogprobs,
    PromptLogprobsJSON,
)

Alternatives = list[tuple[int, float]] | None  # (token id, logprob), best first


def finite(logprob: float) -> float:
    # -inf (a token barred by logit_bias or min_tokens) is no JSON number; vLLM's floor.
    return max(logprob, -9999.0)


def completion_logprobs(
    reply: Reply,
    token_ids: list[int],
    logprobs: list[float | None],
    tops: list[Alternatives],
    offset: int,
    with_echo: bool,
) -> CompletionLogprobs | None:
    """The lists for `token_ids`, whose text starts at `offset`; `with_echo`: the echoed
    prompt's tokens first, from offset 0."""
    if not reply.logprobs:
        return None
    texts, values, alternatives, offsets = [], [], [], []
    if with_echo and reply.echo is not None:
        texts, values, alternatives = _echoed(reply)
        offsets = _offsets(texts, 0)
    new_texts = reply.token_texts(token_ids)
    texts += new_texts
    values += [None if lp is None else finite(lp) for lp in logprobs]
    alternatives += [
        _by_text(reply, top, token, lp) for top, token, lp in zip(tops, token_ids, logprobs)
    ]
    offsets += _offsets(new_texts, offset)
    return CompletionLogprobs(
        text_offset=offsets,
        token_logprobs=values,
        tokens=texts,
        top_logprobs=alternatives if reply.top_logprobs else None,
    )


def _echoed(reply: Reply) -> tuple[list[str], list[float | None], list[dict[str, float] | None]]:
    """The prompt's tokens, logprobs and alternatives (the first token has none)."""
    ids = reply.prompt_token_ids
    texts = reply.token_texts(ids)
    prompt = reply.prompt
    if prompt is None:  # nothing reported (a backend without prompt logprobs)
        return texts, [None] * len(ids), [None] * len(ids)
    values: list[float | None] = [None, *(finite(lp) for lp in prompt.logprobs)]
    alternatives = [None] + [
        _by_text(reply, top, token, lp)
        for top, token, lp in zip(prompt.top, ids[1:], prompt.logprobs)
    ]
    return texts, values, alternatives


def _by_text(reply: Reply, top: Alternatives, token: int, logprob: float | None):
    """Completions' alternatives: the best `top_logprobs` and the token itself, by text."""
    if not reply.top_logprobs:
        return None
    chosen = list(top or [])[: reply.top_logprobs]
    if logprob is not None:
        chosen.append((token, logprob))
    out: dict[str, float] = {}
    for token_id, value in chosen:
        out.setdefault(reply.token_texts([token_id])[0], finite(value))
    return out


def _offsets(texts: list[str], offset: int) -> list[int]:
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    return offsets


def chat_logprobs(
    reply: Reply, token_ids: list[int], logprobs: list[float | None], tops: list[Alternatives]
) -> ChatLogprobs | None:
    if not reply.logprobs:
        return None
    entries = [
        ChatTokenLogprob(
            token=text,
            logprob=None if lp is None else finite(lp),
            bytes=list(text.encode()),
            top_logprobs=_chat_alternatives(reply, top),
        )
        for text, lp, top in zip(reply.token_texts(token_ids), logprobs, tops)
    ]
    return ChatLogprobs(content=entries)


def _chat_alternatives(reply: Reply, top: Alternatives) -> list[ChatTopLogprob]:
    chosen = list(top or [])[: reply.top_logprobs]
    texts = reply.token_texts([t for t, _ in chosen])
    return [
        ChatTopLogprob(token=text, logprob=finite(lp), bytes=list(text.encode()))
        for text, (_, lp) in zip(texts, chosen)
    ]


def prompt_logprobs_json(reply: Reply) -> PromptLogprobsJSON | None:
    """vLLM's prompt_logprobs: None for the first token, then per token its own entry and the
    client's number of alternatives, keyed by token id."""
    prompt, k = reply.prompt, reply.prompt_logprobs
    if prompt is None or k is None:
        return None
    entries: PromptLogprobsJSON = [None]
    tokens = reply.prompt_token_ids[1:]
    for token, lp, rank, top in zip(tokens, prompt.logprobs, prompt.ranks, prompt.top):
        entry = {str(token): _entry(reply, token, lp, rank)}
        for i, (alt, alt_lp) in enumerate(top[:k]):
            entry.setdefault(str(alt), _entry(reply, alt, alt_lp, i + 1))
        entries.append(entry)
    return entries


def _entry(reply: Reply, token: int, logprob: float, rank: int) -> dict:
    text = reply.token_texts([token])[0]
    return {"logprob": finite(logprob), "rank": rank, "decoded_token": text}
