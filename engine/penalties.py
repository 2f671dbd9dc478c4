"""Per-request logit adjustments, batched on the device, in vLLM's order: logit_bias and
min_tokens first, then the repetition, frequency and presence penalties. Everything follows
from a sequence's params and token ids, so a request handed off or migrated (which carries
prompt + outputs) is adjusted exactly as it would have been where it started.
"""

from __future__ import annotations

import numpy as np
import torch

from engine.sequence import Sequence


def adjust_logits(
    logits: torch.Tensor,  # [rows, vocab] float32, one row per sequence in `seqs`
    seqs: list[Sequence],
    eos_token_ids: tuple[int, ...],
) -> torch.Tensor:
    """`logits` with each row's bias, min_tokens mask and penalties applied (in place); a batch
    where no request asks for any returns at once."""
    rows = [i for i, seq in enumerate(seqs) if seq.params.adjusts_logits]
    if not rows:
        return logits
    chosen = [seqs[i] for i in rows]
    _add_bias(logits, rows, chosen)
    _bar_stops(logits, rows, chosen, eos_token_ids)
    penalized = [(r, s) for r, s in zip(rows, chosen) if _penalized(s)]
    if penalized:
        index = torch.tensor([r for r, _ in penalized], device=logits.device)
        logits[index] = apply_penalties(logits[index], [s for _, s in penalized])
    return logits


def _penalized(seq: Sequence) -> bool:
    p = seq.params
    return bool(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0)


def _add_bias(logits: torch.Tensor, rows: list[int], seqs: list[Sequence]) -> None:
    pairs = [(r, t, b) for r, s in zip(rows, seqs) for t, b in (s.params.logit_bias or {}).items()]
    if not pairs:
        return
    row, token, bias = zip(*pairs)
    index = (_long(row, logits.device), _long(token, logits.device))
    logits.index_put_(index, torch.tensor(bias, dtype=logits.dtype, device=logits.device), True)


def _bar_stops(
    logits: torch.Tensor, rows: list[int], seqs: list[Sequence], eos_token_ids: tuple[int, ...]
) -> None:
    """Below min_tokens, no EOS (unless ignored) and no stop token can be sampled."""
    pairs = []
    for row, seq in zip(rows, seqs):
        p = seq.params
        if seq.num_output_tokens < p.min_tokens:
            stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
            pairs += [(row, t) for t in stops]
    if pairs:
        row, token = zip(*pairs)
        index = (_long(row, logits.device), _long(token, logits.device))
        logits.index_put_(index, torch.tensor(float("-inf"), device=logits.device))


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """logits: [rows, vocab]. The repetition penalty divides the positive logits (multiplies
    the negative ones) of tokens seen in prompt or output; the frequency penalty subtracts
    once per occurrence in the output, the presence penalty once per token that occurred."""
    device, vocab = logits.device, logits.shape[-1]
    output_counts = token_counts([s.output_token_ids for s in seqs], vocab, device)
    in_output = output_counts > 0
    repetition = _column([s.params.repetition_penalty for s in seqs], device)
    if bool((repetition != 1.0).any()):
        prompts = token_counts([s.prompt_token_ids for s in seqs], vocab, device)
        seen = in_output | (prompts > 0)
        factor = torch.where(seen, repetition, 1.0)
        logits = torch.where(logits > 0, logits / factor, logits * factor)
    logits = logits - _column([s.params.frequency_penalty for s in seqs], device) * output_counts
    return logits - _column([s.params.presence_penalty for s in seqs], device) * in_output


def token_counts(token_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[len(token_lists), vocab] float32: how often each token occurs in each list, by one
    scatter_add over all lists' tokens at once."""
    lengths = np.fromiter((len(t) for t in token_lists), dtype=np.int64, count=len(token_lists))
    flat = np.fromiter(
        (t for tokens in token_lists for t in tokens), dtype=np.int64, count=int(lengths.sum())
    )
    index = np.repeat(np.arange(len(token_lists)), lengths) * vocab + flat
    counts = torch.zeros(len(token_lists) * vocab, dtype=torch.float32, device=device)
    index_gpu = torch.from_numpy(index).to(device)
    counts.scatter_add_(0, index_gpu, torch.ones(len(index), dtype=torch.float32, device=device))
    return counts.view(len(token_lists), vocab)


def _column(values: list[float], device: torch.device) -> torch.Tensor:  # [rows, 1]
    return torch.tensor(values, dtype=torch.float32, device=device)[:, None]


def _long(values, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)
