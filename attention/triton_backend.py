"""CUDA attention backend: paged decode in our Triton kernel, prefill through torch SDPA.

Prefill without cached context attends over the step's own k, v; prefill with context (chunked
prefill, prefix-cache hits) reads the whole sequence back from the paged cache. SDPA gets 4-D
tensors with enable_gqa and a lower-right causal bias, never repeated K/V: with 3-D inputs it
falls back to the math kernel, whose scores for an 8k-token prompt with 32 heads take about
8 GB. (The bias dispatches to flash attention on a GPU; on the CPU torch materializes it for its
own flash kernel.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias, causal_lower_right

from attention.backend import AttentionBackend, AttentionMetadata
from attention.triton_decode import paged_decode_attention


class TritonAttention(AttentionBackend):
    name = "triton"

    def prefill(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        out = torch.empty_like(q)
        block_size = k_cache.shape[1]
        start = 0
        for i, (q_len, seq_len) in enumerate(
            zip(meta.prefill_query_lens_host, meta.prefill_seq_lens_host, strict=True)
        ):
            end = start + q_len
            if seq_len == q_len:
                keys, values = k[start:end], v[start:end]
            else:
                num_blocks = (seq_len + block_size - 1) // block_size
                blocks = meta.prefill_block_tables[i, :num_blocks].long()
                keys = k_cache[blocks].flatten(0, 1)[:seq_len]  # [seq_len, Hkv, D]
                values = v_cache[blocks].flatten(0, 1)[:seq_len]
            q4, k4, v4, bias = sdpa_inputs(q[start:end], keys, values)
            out[start:end] = self._sdpa(q4, k4, v4, bias)[0].transpose(0, 1)
            start = end
        return out

    def _sdpa(self, q4, k4, v4, bias: CausalBias | None) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            q4, k4, v4, attn_mask=bias, is_causal=bias is None, scale=self.scale, enable_gqa=True
        )

    def decode(self, q, k_cache, v_cache, seq_lens, block_tables, max_seq_len) -> torch.Tensor:
        return paged_decode_attention(
            q, k_cache, v_cache, seq_lens, block_tables, max_seq_len, self.scale
        )


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
