"""The torch and triton backends' prefill (attention.prefill_sdpa) hands SDPA what its fused
kernels take: 4-D tensors with enable_gqa and a lower-right causal bias, never 3-D tensors (the
math kernel, whose scores for an 8k-token prompt with 32 heads take ~8 GB) nor repeated K/V; and
it computes causal attention over each sequence's context exactly as a plain reference and the
old 3-D math path do, chunked prefill over a cached prefix included."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.nn.attention import SDPBackend
from torch.overrides import TorchFunctionMode

from attention.backend import AttentionMetadata
from attention.prefill_sdpa import sdpa_inputs
from attention.torch_backend import TorchAttention
from attention.triton_backend import TritonAttention

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


BACKENDS = [TorchAttention, TritonAttention]


def old_math_prefill(q, keys, values, scale):
    """The torch backend's prefill before the fused path: 3-D SDPA over repeated K/V with an
    explicit lower-right boolean mask."""
    q_len, seq_len = q.shape[0], keys.shape[0]
    group = q.shape[1] // keys.shape[1]
    allowed = torch.arange(seq_len - q_len, seq_len)[:, None] >= torch.arange(seq_len)[None]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1),
        keys.repeat_interleave(group, dim=1).transpose(0, 1),
        values.repeat_interleave(group, dim=1).transpose(0, 1),
        attn_mask=allowed,
        scale=scale,
    )
    return out.transpose(0, 1)


def prefill_meta(q_lens, seq_lens, tables, block_size=BLOCK):
    """AttentionMetadata of a prefill-only step: each sequence's q_len new tokens are the last
    of its seq_len, written to the slots its block table names."""
    slots = []
    for q_len, seq_len, table in zip(q_lens, seq_lens, tables.tolist()):
        for pos in range(seq_len - q_len, seq_len):
            slots.append(table[pos // block_size] * block_size + pos % block_size)
    starts = torch.tensor([0, *q_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots), num_prefill_tokens=sum(q_lens),
        prefill_query_start=starts, prefill_seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        prefill_block_tables=tables, prefill_query_lens_host=list(q_lens),
        prefill_seq_lens_host=list(seq_lens), decode_seq_lens=torch.zeros(0, dtype=torch.int32),
        decode_block_tables=torch.zeros(0, tables.shape[1], dtype=torch.int32),
        decode_max_seq_len=0,
    )  # fmt: skip


class SdpaCalls(TorchFunctionMode):
    """Records each top-level call to SDPA (args, kwargs) while active."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[tuple, dict]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.seen.append((args, kwargs))
        return func(*args, **kwargs)


@pytest.mark.parametrize("backend_cls", BACKENDS, ids=lambda c: c.name)
@pytest.mark.parametrize("kv_heads", [HEADS, HEADS // 4], ids=["group 1", "group 4"])
def test_backend_hands_sdpa_fused_kernel_inputs(backend_cls, kv_heads) -> None:
    """What each backend really passes to SDPA, for a fresh prompt and a chunk after a cached
    prefix, is what SDPA's fused (flash) kernel takes."""
    sdpa_calls = SdpaCalls()
    backend = backend_cls(HEADS, kv_heads, HEAD_DIM, HEAD_DIM**-0.5)
    q_lens, seq_lens = [6, 5], [6, 13]
    tables = torch.tensor([[0, 1, 0, 0], [5, 2, 7, 3]], dtype=torch.int32)
    k_cache = torch.randn(8, BLOCK, kv_heads, HEAD_DIM)
    k = torch.randn(11, kv_heads, HEAD_DIM)
    with sdpa_calls:
        backend.prefill(torch.randn(11, HEADS, HEAD_DIM), k, k, k_cache, k_cache,
                        prefill_meta(q_lens, seq_lens, tables))  # fmt: skip
    assert len(sdpa_calls.seen) == 2
    for call, q_len, seq_len in zip(sdpa_calls.seen, q_lens, seq_lens):
        (q4, k4, v4), bias = call[0], call[1].get("attn_mask")
        is_causal, gqa = call[1].get("is_causal", False), call[1].get("enable_gqa", False)
        assert q4.shape == (1, HEADS, q_len, HEAD_DIM) and k4.shape == (
            1,
            kv_heads,
            seq_len,
            HEAD_DIM,
        )
        assert gqa and is_causal == (bias is None) == (q_len == seq_len)
        assert fused_choice(q4, k4, v4, bias) == SDPBackend.FLASH_ATTENTION


@pytest.mark.parametrize("backend_cls", BACKENDS, ids=lambda c: c.name)
@pytest.mark.parametrize("kv_heads", [HEADS, HEADS // 4], ids=["group 1", "group 4"])
def test_chunked_prefill_over_a_cached_prefix_equals_the_old_math_path(backend_cls, kv_heads):
    """A 14-token prompt prefilled in chunks of 5, 6 and 3 tokens (each later chunk reads the
    earlier ones back from the paged cache) gives, row for row, what one whole-prompt prefill
    gives, and what the old 3-D math path gives over the same keys."""
    gen = torch.Generator().manual_seed(kv_heads)
    backend = backend_cls(HEADS, kv_heads, HEAD_DIM, HEAD_DIM**-0.5)
    seq_len = 14
    q = torch.randn(seq_len, HEADS, HEAD_DIM, generator=gen)
    k = torch.randn(seq_len, kv_heads, HEAD_DIM, generator=gen)
    v = torch.randn(seq_len, kv_heads, HEAD_DIM, generator=gen)
    table = torch.tensor([[6, 1, 4, 2]], dtype=torch.int32)  # scattered blocks

    def run(chunks):
        k_cache = torch.full((8, BLOCK, kv_heads, HEAD_DIM), float("nan"))
        v_cache = k_cache.clone()  # nan: a read past the sequence's own keys would show
        outs, done = [], 0
        for n in chunks:
            meta = prefill_meta([n], [done + n], table)
            rows = slice(done, done + n)
            outs.append(backend.forward(q[rows], k[rows], v[rows], k_cache, v_cache, meta))
            done += n
        return torch.cat(outs)

    whole, chunked = run([seq_len]), run([5, 6, 3])
    old = old_math_prefill(q, k, v, backend.scale)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked, old, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(old.double(), reference_grouped(q, k, v, backend.scale),
                               atol=1e-5, rtol=1e-5)  # fmt: skip


def reference_grouped(q, keys, values, scale):
    """The float64 reference for any GQA group."""
    group = q.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(group, dim=1)
    v = values.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    q_len, seq_len = q.shape[0], keys.shape[0]
    allowed = torch.arange(seq_len - q_len, seq_len)[:, None] >= torch.arange(seq_len)[None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
