"""The one interface every attention backend implements, and the per-step metadata it reads.

A step's tokens are laid out prefill-first: sequences computing more than one new token
(prompt chunks) come first, then sequences decoding exactly one token. Each backend writes the
new k, v into the paged cache, then runs (a) causal prefill attention over the new tokens with
their cached context and (b) paged decode attention for one query per sequence.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from attention.remote import RemoteStep


@dataclass
class AttentionMetadata:
    # Where each new token's k, v go in the flat cache: block_id * block_size + offset. [num_tokens]
    slot_mapping: torch.Tensor
    num_prefill_tokens: int
    # Prefill part: P sequences.
    prefill_query_start: torch.Tensor  # [P + 1] int32, cumulative new-token counts
    prefill_seq_lens: torch.Tensor  # [P] int32, cached tokens after this step (context + new)
    prefill_block_tables: torch.Tensor  # [P, max_blocks] int32
    prefill_query_lens_host: list[int]
    prefill_seq_lens_host: list[int]
    # Decode part: D sequences, one new token each.
    decode_seq_lens: torch.Tensor  # [D] int32, including the new token
    decode_block_tables: torch.Tensor  # [D, max_blocks] int32
    decode_max_seq_len: int
    # Offloaded decodes, after every local token: their attention runs on executors.
    remote: RemoteStep | None = None

    @property
    def num_prefills(self) -> int:
        return len(self.prefill_query_lens_host)

    @property
    def num_decodes(self) -> int:
        return int(self.decode_seq_lens.shape[0])

    @property
    def prefill_has_context(self) -> bool:
        return any(s != q for q, s in zip(self.prefill_query_lens_host, self.prefill_seq_lens_host))


class AttentionBackend(ABC):
    """k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim] for one layer."""

    name: str = "abstract"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        self.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        n = meta.num_prefill_tokens
        if meta.num_decodes == 0:
            return self.prefill(q, k, v, k_cache, v_cache, meta)
        if n == 0:
            return self.decode_with(q, k_cache, v_cache, meta)
        out = torch.empty_like(q)
        out[:n] = self.prefill(q[:n], k[:n], v[:n], k_cache, v_cache, meta)
        out[n:] = self.decode_with(q[n:], k_cache, v_cache, meta)
        return out

    def decode_with(self, q, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        return self.decode(
            q,
            k_cache,
            v_cache,
            meta.decode_seq_lens,
            meta.decode_block_tables,
            meta.decode_max_seq_len,
        )

    @staticmethod
    def write_kv(
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        flat_k = k_cache.view(-1, *k_cache.shape[2:])
        flat_v = v_cache.view(-1, *v_cache.shape[2:])
        flat_k.index_copy_(0, slot_mapping, k)
        flat_v.index_copy_(0, slot_mapping, v)

    @abstractmethod
    def prefill(
        self,
        q: torch.Tensor,  # [num_prefill_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_prefill_tokens, num_kv_heads, head_dim], already in the cache
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor: ...

    @abstractmethod
    def decode(
        self,
        q: torch.Tensor,  # [num_decodes, num_heads, head_dim]
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        seq_lens: torch.Tensor,  # [num_decodes] int32, including the new token
        block_tables: torch.Tensor,  # [num_decodes, max_blocks] int32
        max_seq_len: int,
    ) -> torch.Tensor:
        """Paged decode attention; also what the attention executor runs for offloaded sequences."""
