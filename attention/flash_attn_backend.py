"""Attention through the flash-attn package (Dao-AILab), used only when it imports.

Upstream flash-attn 2 reads a paged cache only when the page size (our block_size) is a multiple
of 256: both flash_attn_varlen_func(block_table=...) and flash_attn_with_kvcache check it.
"""

from __future__ import annotations

import torch

from attention.backend import AttentionBackend, AttentionMetadata

try:
    from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

    FLASH_ATTN_AVAILABLE = True
except ImportError:
    FLASH_ATTN_AVAILABLE = False

PAGED_BLOCK_MULTIPLE = 256
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


def supports(block_size: int, dtype: torch.dtype, device: torch.device) -> bool:
    return (
        FLASH_ATTN_AVAILABLE
        and device.type == "cuda"
        and dtype in SUPPORTED_DTYPES
        and block_size % PAGED_BLOCK_MULTIPLE == 0
    )


class FlashAttention(AttentionBackend):
    name = "flash_attn"

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        block_size: int | None = None,
    ):
        if not FLASH_ATTN_AVAILABLE:
            raise RuntimeError("the flash_attn backend needs the flash-attn package installed")
        if head_dim > MAX_HEAD_DIM:
            raise ValueError(f"flash-attn supports head_dim up to {MAX_HEAD_DIM}, got {head_dim}")
        if block_size is not None:
            _check_block_size(block_size)
        super().__init__(num_heads, num_kv_heads, head_dim, scale)

    def prefill(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        query_start = meta.prefill_query_start
        max_query_len = max(meta.prefill_query_lens_host)
        if not meta.prefill_has_context:
            return flash_attn_varlen_func(
                q, k, v,
                cu_seqlens_q=query_start, cu_seqlens_k=query_start,
                max_seqlen_q=max_query_len, max_seqlen_k=max_query_len,
                softmax_scale=self.scale, causal=True,
            )  # fmt: skip
        _check_block_size(k_cache.shape[1])
        seq_lens = meta.prefill_seq_lens.to(torch.int32)
        seq_start = torch.zeros(seq_lens.shape[0] + 1, dtype=torch.int32, device=q.device)
        torch.cumsum(seq_lens, 0, out=seq_start[1:])
        # causal=True aligns the mask bottom-right: query j sees keys up to context + j.
        return flash_attn_varlen_func(
            q, k_cache, v_cache,
            cu_seqlens_q=query_start, cu_seqlens_k=seq_start,
            max_seqlen_q=max_query_len, max_seqlen_k=max(meta.prefill_seq_lens_host),
            softmax_scale=self.scale, causal=True,
            block_table=meta.prefill_block_tables.to(torch.int32),
        )  # fmt: skip

    def decode(self, q, k_cache, v_cache, seq_lens, block_tables, max_seq_len) -> torch.Tensor:
        _check_block_size(k_cache.shape[1])
        out = flash_attn_with_kvcache(
            q.unsqueeze(1),  # [B, 1, H, D]
            k_cache,
            v_cache,
            cache_seqlens=seq_lens.to(torch.int32),
            block_table=block_tables.to(torch.int32),
            softmax_scale=self.scale,
            causal=True,
        )
        return out.squeeze(1)


def _check_block_size(block_size: int) -> None:
    if block_size % PAGED_BLOCK_MULTIPLE:
        raise ValueError(
            f"the flash_attn backend needs block_size a multiple of {PAGED_BLOCK_MULTIPLE} "
            f"(flash-attn's paged KV constraint), got {block_size}; "
            "pick the triton backend or a block size such as 256"
        )
