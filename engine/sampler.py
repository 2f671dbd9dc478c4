"""Per-request sampling: greedy, temperature, top-k, top-p, min-p, seeded generators, logprobs.

Each request draws from its own generator, so a seeded request gets the same tokens whatever
else shares its batch. Logits arrive here already biased and penalized (engine/penalties.py);
log-probabilities and their alternatives are of that distribution, before temperature and the
top-k/top-p/min-p filters. vLLM's `--logprobs-mode` offers the two ends (raw_logprobs, its
default, before any processor; processed_logprobs, after temperature and top-k/top-p too);
ours is the point between, the one the OpenAI API's penalties and logit_bias describe.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.sequence import SamplingParams, TopLogprobs


def apply_filters(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits: [vocab] float32, already divided by temperature; returns filtered logits."""
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if params.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits


@dataclass
class Sampled:
    token_ids: list[int]  # [rows]
    # [rows] each sampled token's logprob, when any row asks for logprobs (rows that did not
    # ask get one too); `top`: [rows] best alternatives, None for rows that asked for none.
    logprobs: list[float] | None = None
    top: list[TopLogprobs | None] | None = None


def sample(
    logits: torch.Tensor,  # [batch, vocab] float32
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> tuple[list[int], list[float] | None]:
    sampled = sample_tokens(logits, params, generators)
    return sampled.token_ids, sampled.logprobs


def sample_tokens(
    logits: torch.Tensor,  # [batch, vocab] float32, biased and penalized
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> Sampled:
    tokens = logits.argmax(-1)
    drawn = [i for i, p in enumerate(params) if not p.greedy]
    if drawn:
        tokens[drawn] = draw(
            logits[drawn], [params[i] for i in drawn], [generators[i] for i in drawn]
        )
    sampled = Sampled(tokens.tolist())
    if any(p.logprobs for p in params):
        sampled.logprobs, sampled.top = token_logprobs(logits, tokens, params)
    return sampled


def token_logprobs(
    logits: torch.Tensor,  # [batch, vocab] float32
    tokens: torch.Tensor,  # [batch] sampled ids
    params: list[SamplingParams],
) -> tuple[list[float], list[TopLogprobs | None] | None]:
    """Each sampled token's logprob and, for rows asking for alternatives, the best ones; one
    log_softmax and one top-k for the whole batch."""
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = logprobs.gather(1, tokens[:, None]).squeeze(1).tolist()
    k = max((p.top_logprobs for p in params if p.logprobs), default=0)
    if k == 0:
        return chosen, None
    values, ids = logprobs.topk(k, dim=-1)
    values_list, ids_list = values.tolist(), ids.tolist()
    top = [
        list(zip(ids_list[i][: p.top_logprobs], values_list[i][: p.top_logprobs]))
        if p.logprobs and p.top_logprobs
        else None
        for i, p in enumerate(params)
    ]
    return chosen, top


def prompt_logprobs(
    logits: torch.Tensor,  # [positions, vocab] float32: the raw logits after each position
    next_ids: torch.Tensor,  # [positions] the prompt token that follows each position
    k: int,
) -> list[tuple[float, int, TopLogprobs]]:
    """Per position: the next prompt token's logprob, its rank (1: the most likely) and the k
    best alternatives. Of the raw distribution: prompt tokens are not sampled, so no bias or
    penalty applies (vLLM's note on prompt_logprobs under either logprobs mode)."""
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = logprobs.gather(1, next_ids[:, None]).squeeze(1)
    ranks = (logprobs > chosen[:, None]).sum(-1) + 1
    values, ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], next_ids[:, None][:, :0])
    return [
        (lp, rank, list(zip(i, v)))
        for lp, rank, i, v in zip(chosen.tolist(), ranks.tolist(), ids.tolist(), values.tolist())
    ]


def draw(
    logits: torch.Tensor,  # [rows, vocab] float32
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> torch.Tensor:  # [rows] token ids
    """One draw per row from its temperature-scaled, filtered distribution, the whole batch at
    once; only the noise comes row by row, each row from its own generator."""
    temperatures = torch.tensor([p.temperature for p in params], device=logits.device)
    scaled = logits / temperatures[:, None]
    for row, p in enumerate(params):
        if p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0:
            scaled[row] = apply_filters(scaled[row], p)
    probs = scaled.softmax(-1)
    # Exponential race (Gumbel-max equivalent): argmax(p / E) with E ~ Exp(1) draws from p.
    noise = torch.empty_like(probs)
    for row, generator in enumerate(generators):
        noise[row].exponential_(generator=generator)
    return (probs / noise).argmax(-1)
