"""Reference attention backend in plain PyTorch: runs on CPU and GPU, defines correct results.

Prefill and decode both read keys and values back from the paged cache through block tables, so
chunked prefill and prefix-cache hits see exactly what a later decode step sees.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attention.backend import AttentionBackend, AttentionMetadata


def gather_kv(
    cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table: torch.Tensor,  # [max_blocks] int32
    seq_len: int,
) -> torch.Tensor:  # [seq_len, num_kv_heads, head_dim]
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = cache.index_select(0, block_table[:num_blocks].long())
    return blocks.reshape(-1, *cache.shape[2:])[:seq_len]


class TorchAttention(AttentionBackend):
    name = "torch"

    def prefill(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        out = torch.empty_like(q)
        start = 0
        for i, (q_len, seq_len) in enumerate(
            zip(meta.prefill_query_lens_host, meta.prefill_seq_lens_host)
        ):
            end = start + q_len
            if seq_len == q_len:
                keys, values = k[start:end], v[start:end]
            else:
                table = meta.prefill_block_tables[i]
                keys = gather_kv(k_cache, table, seq_len)
                values = gather_kv(v_cache, table, seq_len)
            out[start:end] = self._causal(q[start:end], keys, values)
            start = end
        return out

    def _causal(self, q, keys, values) -> torch.Tensor:
        # q holds the last q_len positions of a seq_len-long sequence.
        q_len, seq_len = q.shape[0], keys.shape[0]
        query_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        mask = query_pos[:, None] >= torch.arange(seq_len, device=q.device)[None, :]
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1),
            self._expand_kv(keys).transpose(0, 1),
            self._expand_kv(values).transpose(0, 1),
            attn_mask=mask,
            scale=self.scale,
        )
        return out.transpose(0, 1)

    def _expand_kv(self, x: torch.Tensor) -> torch.Tensor:
        group = self.num_heads // self.num_kv_heads
        return x if group == 1 else x.repeat_interleave(group, dim=1)

    def decode(self, q, k_cache, v_cache, seq_lens, block_tables, max_seq_len) -> torch.Tensor:
        # One sequence at a time over exactly its own keys: padding a batch to its longest
        # sequence changes reduction order, and with it the last bits of every row. The
        # reference must give a sequence the same output whatever its batch mates (and whether
        # it runs here or on an attention executor).
        out = torch.empty_like(q)
        for i, seq_len in enumerate(seq_lens.tolist()):
            keys = gather_kv(k_cache, block_tables[i], seq_len)
            values = gather_kv(v_cache, block_tables[i], seq_len)
            out[i] = F.scaled_dot_product_attention(
                q[i].unsqueeze(1),  # [H, 1, D]
                self._expand_kv(keys).transpose(0, 1),
                self._expand_kv(values).transpose(0, 1),
                scale=self.scale,
            ).squeeze(1)
        return out
