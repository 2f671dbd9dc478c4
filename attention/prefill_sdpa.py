"""Causal prefill attention through torch SDPA, the one implementation the torch and triton
backends share. A sequence without cached context attends over the step's own k, v; one with
context (chunked prefill, prefix-cache hits) reads its whole sequence back from the paged cache.

SDPA gets 4-D tensors with enable_gqa and a lower-right causal bias, never repeated K/V: with
3-D inputs it falls back to the math kernel, whose scores for an 8k-token prompt with 32 heads
take about 8 GB. (The bias dispatches to flash attention on a GPU; on the CPU torch materializes
it for its own flash kernel.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias, causal_lower_right

from attention.backend import AttentionMetadata


def gather_kv(
    cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table: torch.Tensor,  # [max_blocks] int32
    seq_len: int,
) -> torch.Tensor:  # [seq_len, num_kv_heads, head_dim]
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = cache.index_select(0, block_table[:num_blocks].long())
    return blocks.reshape(-1, *cache.shape[2:])[:seq_len]


def sdpa_inputs(
    q: torch.Tensor,  # [q_len, H, D]
    keys: torch.Tensor,  # [seq_len, Hkv, D]: the sequence's context, then its q_len new tokens
    values: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, CausalBias | None]:
    """[1, H, q_len, D], [1, Hkv, seq_len, D] x2 views, and the causal bias: query j sits at
    position seq_len - q_len + j (lower right), None for plain causal (q_len == seq_len)."""
    q_len, seq_len = q.shape[0], keys.shape[0]
    bias = None if q_len == seq_len else causal_lower_right(q_len, seq_len)
    return q.transpose(0, 1)[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None], bias


def causal_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
) -> torch.Tensor:  # [q_len, H, D]
    """One sequence: q holds the last q_len positions of its seq_len keys."""
    q4, k4, v4, bias = sdpa_inputs(q, keys, values)
    out = F.scaled_dot_product_attention(
        q4, k4, v4, attn_mask=bias, is_causal=bias is None, scale=scale, enable_gqa=True
    )
    return out[0].transpose(0, 1)


def prefill_attention(
    q: torch.Tensor,  # [num_prefill_tokens, H, D]
    k: torch.Tensor,  # [num_prefill_tokens, Hkv, D], already written to the cache
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [num_prefill_tokens, H, D]
    out = torch.empty_like(q)
    start = 0
    lens = zip(meta.prefill_query_lens_host, meta.prefill_seq_lens_host, strict=True)
    for i, (q_len, seq_len) in enumerate(lens):
        end = start + q_len
        if seq_len == q_len:
            keys, values = k[start:end], v[start:end]
        else:
            table = meta.prefill_block_tables[i]
            keys = gather_kv(k_cache, table, seq_len)
            values = gather_kv(v_cache, table, seq_len)
        out[start:end] = causal_attention(q[start:end], keys, values, scale)
        start = end
    return out
