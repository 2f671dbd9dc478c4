"""CUDA attention backend: paged decode in our Triton kernel, prefill through torch SDPA.

Prefill without cached context attends over the step's own k, v; prefill with context (chunked
prefill, prefix-cache hits) reads the whole sequence back from the paged cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
                out[start:end] = self._sdpa(q[start:end], k[start:end], v[start:end], None)
            else:
                num_blocks = (seq_len + block_size - 1) // block_size
                blocks = meta.prefill_block_tables[i, :num_blocks].long()
                keys = k_cache[blocks].flatten(0, 1)[:seq_len]  # [seq_len, Hkv, D]
                values = v_cache[blocks].flatten(0, 1)[:seq_len]
                # Query j sits at absolute position (seq_len - q_len) + j.
                query_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
                key_pos = torch.arange(seq_len, device=q.device)
                mask = query_pos[:, None] >= key_pos[None, :]  # [q_len, seq_len]
                out[start:end] = self._sdpa(q[start:end], keys, values, mask)
            start = end
        return out

    def _sdpa(
        self,
        q: torch.Tensor,  # [q_len, H, D]
        keys: torch.Tensor,  # [seq_len, Hkv, D]
        values: torch.Tensor,
        mask: torch.Tensor | None,  # [q_len, seq_len] bool, None for plain causal q_len == seq_len
    ) -> torch.Tensor:  # [q_len, H, D]
        group = self.num_heads // self.num_kv_heads
        if group > 1:
            keys = keys.repeat_interleave(group, dim=1)
            values = values.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1),
            keys.transpose(0, 1),
            values.transpose(0, 1),
            attn_mask=mask,
            is_causal=mask is None,
            scale=self.scale,
        )
        return out.transpose(0, 1)

    def decode(self, q, k_cache, v_cache, seq_lens, block_tables, max_seq_len) -> torch.Tensor:
        return paged_decode_attention(
            q, k_cache, v_cache, seq_lens, block_tables, max_seq_len, self.scale
        )
