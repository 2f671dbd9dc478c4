"""The triton backend's prefill hands SDPA what its fused kernels take: 4-D tensors with
enable_gqa and a lower-right causal bias, never 3-D tensors (the math kernel, whose scores for an
8k-token prompt with 32 heads take ~8 GB) nor repeated K/V; and it computes causal attention
over each sequence's context exactly as a plain reference does."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.nn.attention import SDPBackend

from attention.triton_backend import TritonAttention, sdpa_inputs

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 8, 2, 16, 4


def fused_choice(q4, k4, v4, bias) -> SDPBackend:
    mask = None if bias is None else bias._materialize(q4.device)
    choice = torch._fused_sdp_choice(
        q4, k4, v4, attn_mask=mask, dropout_p=0.0, is_causal=bias is None, scale=None,
        enable_gqa=True,
    )  # fmt: skip
    return SDPBackend(choice)


@pytest.mark.parametrize("q_len, seq_len", [(6, 6), (5, 13)], ids=["no context", "context"])
def test_prefill_builds_fused_kernel_inputs(q_len, seq_len) -> None:
    q = torch.randn(q_len, HEADS, HEAD_DIM)
    keys = torch.randn(seq_len, KV_HEADS, HEAD_DIM)
    q4, k4, v4, bias = sdpa_inputs(q, keys, keys)
    assert q4.shape == (1, HEADS, q_len, HEAD_DIM) and k4.shape == (1, KV_HEADS, seq_len, HEAD_DIM)
    assert k4.untyped_storage().data_ptr() == keys.untyped_storage().data_ptr()  # a view
    assert (bias is None) == (q_len == seq_len)
    assert fused_choice(q4, k4, v4, bias) == SDPBackend.FLASH_ATTENTION
    # What the old 3-D call got for the same shapes:
    kk = keys.repeat_interleave(HEADS // KV_HEADS, dim=1).transpose(0, 1)[:, :q_len]
    old = torch._fused_sdp_choice(q.transpose(0, 1), kk, kk, is_causal=True)
    assert SDPBackend(old) == SDPBackend.MATH


def reference(q, keys, values, scale):
    """[q_len, H, D] causal attention, query j at position seq_len - q_len + j, in float64."""
    q_len, seq_len = q.shape[0], keys.shape[0]
    group = HEADS // KV_HEADS
    k = keys.double().repeat_interleave(group, dim=1)
    v = values.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    allowed = torch.arange(seq_len - q_len, seq_len)[:, None] >= torch.arange(seq_len)[None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def test_prefill_with_and_without_context_matches_a_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    backend = TritonAttention(HEADS, KV_HEADS, HEAD_DIM, HEAD_DIM**-0.5)
    # Sequence 0: a fresh 6-token prompt. Sequence 1: 5 new tokens after 8 cached ones.
    q_lens, seq_lens = [6, 5], [6, 13]
    num_blocks = 8
    k_cache = torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, generator=gen)
    v_cache = torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, generator=gen)
    tables = torch.tensor([[0, 1, 0, 0], [5, 2, 7, 3]], dtype=torch.int32)
    q = torch.randn(sum(q_lens), HEADS, HEAD_DIM, generator=gen)
    k = torch.randn(sum(q_lens), KV_HEADS, HEAD_DIM, generator=gen)
    v = torch.randn(sum(q_lens), KV_HEADS, HEAD_DIM, generator=gen)
    meta = SimpleNamespace(prefill_query_lens_host=q_lens, prefill_seq_lens_host=seq_lens,
                           prefill_block_tables=tables)  # fmt: skip
    out = backend.prefill(q, k, v, k_cache, v_cache, meta)
    torch.testing.assert_close(
        out[:6].double(), reference(q[:6], k[:6], v[:6], backend.scale), atol=1e-5, rtol=1e-5
    )
    blocks = tables[1].long()
    keys = k_cache[blocks].flatten(0, 1)[:13]
    values = v_cache[blocks].flatten(0, 1)[:13]
    torch.testing.assert_close(
        out[6:].double(), reference(q[6:], keys, values, backend.scale), atol=1e-5, rtol=1e-5
    )
