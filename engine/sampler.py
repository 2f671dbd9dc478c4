"""Per-request sampling: greedy, temperature, top-k, top-p, min-p, seeded generators, logprobs.

Each request draws from its own generator, so a seeded request gets the same tokens whatever
else shares its batch. Log-probabilities are of the model's raw distribution, as vLLM reports.
"""

from __future__ import annotations

import torch

from engine.sequence import SamplingParams


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


def sample(
    logits: torch.Tensor,  # [batch, vocab] float32
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> tuple[list[int], list[float] | None]:
    tokens = logits.argmax(-1)
    drawn = [i for i, p in enumerate(params) if not p.greedy]
    if drawn:
        tokens[drawn] = draw(
            logits[drawn], [params[i] for i in drawn], [generators[i] for i in drawn]
        )
    token_list = tokens.tolist()
    if not any(p.logprobs for p in params):
        return token_list, None
    logprobs = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None]).squeeze(1)
    return token_list, logprobs.tolist()


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
