"""CUDA attention backend: paged decode in our Triton kernel, prefill through torch SDPA
(attention.prefill_sdpa, shared with the torch backend: 4-D inputs with enable_gqa and a
lower-right causal bias, so a fused kernel runs and K/V are never repeated).
"""

from __future__ import annotations

import torch

from attention.backend import AttentionBackend, AttentionMetadata
from attention.prefill_sdpa import prefill_attention
from attention.triton_decode import paged_decode_attention


class TritonAttention(AttentionBackend):
    name = "triton"

    def prefill(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        return prefill_attention(q, k, v, k_cache, v_cache, meta, self.scale)

    def decode(self, q, k_cache, v_cache, seq_lens, block_tables, max_seq_len) -> torch.Tensor:
        return paged_decode_attention(
            q, k_cache, v_cache, seq_lens, block_tables, max_seq_len, self.scale
        )
