"""Reference attention backend in plain PyTorch: runs on CPU and GPU, defines correct results.

Prefill and decode both read keys and values back from the paged cache through block tables, so
chunked prefill and prefix-cache hits see exactly what a later decode step sees. Decode runs the
whole batch at once, batch-invariantly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attention.backend import AttentionBackend, AttentionMetadata
from attention.prefill_sdpa import prefill_attention


class TorchAttention(AttentionBackend):
    name = "torch"

    def prefill(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        return prefill_attention(q, k, v, k_cache, v_cache, meta, self.scale)

    def decode(self, q, k_cache, v_cache, seq_lens, block_tables, max_seq_len) -> torch.Tensor:
        # The whole batch at once, every sequence padded to the longest one's blocks, and still
        # batch-invariant (a sequence's output is the same whatever its batch mates, here or on
        # an attention executor): scores reduce over head_dim only; a padded key's score is
        # exactly -inf, so its weight is exactly 0, and the weighted sum over keys adds each
        # sequence's own keys in order, then exact zeros. The test of that is bitwise
        # (tests/attention/test_torch_backend_decode.py).
        num_seqs = q.shape[0]
        if num_seqs == 0:
            return torch.empty_like(q)
        block_size = k_cache.shape[1]
        ctx = -(-max_seq_len // block_size) * block_size
        blocks = block_tables[:, : ctx // block_size].long()
        # Keys gathered as rows of a 2-D view (index_select's fast path): [num_seqs, ctx, kv, D].
        keys = k_cache.flatten(1).index_select(0, blocks.reshape(-1))
        keys = keys.view(num_seqs, ctx, self.num_kv_heads, self.head_dim)
        padding = torch.arange(ctx, device=q.device)[None, :] >= seq_lens[:, None]
        probs = self._probs(q, keys, padding)  # [num_kv_heads, num_seqs, group, ctx]
        out = self._weighted_values(probs, v_cache, blocks, padding)
        return out.transpose(0, 1).reshape(q.shape)

    def _weighted_values(self, probs, v_cache, blocks, padding) -> torch.Tensor:
        """sum over keys of probs * values, [num_kv_heads, num_seqs, group, head_dim]. Values
        are never gathered: an embedding bag sums each head's weighted value rows straight from
        the cache. A padded slot reads the sequence's own first value, with weight 0, so another
        request's stale inf or nan can never leak in as 0 * inf."""
        num_seqs, ctx = padding.shape
        block_size = v_cache.shape[1]
        pos = torch.arange(ctx, device=padding.device)
        slots = blocks[:, pos // block_size] * block_size + pos % block_size  # [num_seqs, ctx]
        slots = torch.where(padding, slots[:, :1], slots)
        heads = torch.arange(self.num_kv_heads, device=padding.device)[:, None, None, None]
        rows = (slots[None, :, None, :] * self.num_kv_heads + heads).expand(probs.shape)
        out = F.embedding_bag(
            rows.reshape(-1, ctx),
            v_cache.view(-1, self.head_dim),  # [num_blocks * block_size * num_kv_heads, D]
            mode="sum",
            per_sample_weights=probs.view(-1, ctx),
        )
        return out.view(self.num_kv_heads, num_seqs, -1, self.head_dim)

    def _probs(self, q, keys, padding) -> torch.Tensor:
        """Attention weights [num_kv_heads, num_seqs, group, ctx], one batched matmul per kv
        head over strided views (no copy of K per query head), softmax in float32."""
        num_seqs, ctx = padding.shape
        group = self.num_heads // self.num_kv_heads
        q_grouped = (q * self.scale).reshape(num_seqs, self.num_kv_heads, group, self.head_dim)
        probs = q.new_empty(self.num_kv_heads, num_seqs, group, ctx)
        for h in range(self.num_kv_heads):
            scores = torch.bmm(q_grouped[:, h], keys[:, :, h].transpose(1, 2)).float()
            scores.masked_fill_(padding[:, None, :], float("-inf"))
            probs[h] = scores.softmax(-1)
        return probs
