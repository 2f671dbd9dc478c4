"""Paged decode attention in Triton with split-KV (flash-decoding).

Stage 1 splits each sequence into slices and runs one program per (sequence, kv head, slice); the
program serves all query heads of that kv head's GQA group at once and writes a float32 partial
(normalised output, log-sum-exp). Stage 2 merges the slices of each (sequence, head).

Under TRITON_INTERPRET=1 the same kernels run on the host over CPU tensors (slowly): that is how
they are tested without a GPU, and what `--attention-backend triton` runs on CPU. Triton reads it
when it is imported and when it wraps a kernel, so it must be set before triton is first imported.
"""

from __future__ import annotations

import functools
import math
import os

import torch

from attention.colocation import executor_sm_count

try:
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except ImportError:
    TRITON_AVAILABLE = False

# Whether the kernels below are wrapped for the interpreter: fixed for the process at import.
_interpret_env = os.environ.get("TRITON_INTERPRET", "").lower()
INTERPRETED = TRITON_AVAILABLE and _interpret_env in ("1", "true", "on")

_LOG2E = 1.4426950408889634
_MAX_SPLITS = 64
# tl.dot needs every operand dimension to be at least 16.
_MIN_DOT_DIM = 16
# The interpreter has no SMs; plan splits as for an H100/H200 so it runs the grid they would.
_HOST_SM_COUNT = 132


if TRITON_AVAILABLE:

    @triton.jit
    def _split_kv_kernel(
        Q,  # [B, H, D]
        K,  # [num_blocks, BLOCK_SIZE, KVH, D]
        V,
        Block_tables,  # [B, max_blocks] int32
        Seq_lens,  # [B] int32
        Mid_o,  # [B, H, num_splits, D] float32
        Mid_lse,  # [B, H, num_splits] float32, base 2
        scale_log2,
        split_len,
        stride_qb,
        stride_qh,
        stride_kb,
        stride_ks,
        stride_kh,
        stride_vb,
        stride_vs,
        stride_vh,
        stride_btb,
        stride_mob,
        stride_moh,
        stride_mos,
        stride_mlb,
        stride_mlh,
        GROUP: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr,
        # The interpreter multiplies bfloat16 bit patterns as ints (triton-lang/triton#11584).
        DOT_IN_FP32: tl.constexpr,
    ):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        seq_len = tl.load(Seq_lens + b)
        split_start = split * split_len
        split_end = tl.minimum(split_start + split_len, seq_len)
        # Splits past the end of a short sequence write nothing; stage 2 never reads them.
        if split_end > split_start:
            g = tl.arange(0, BLOCK_G)
            d = tl.arange(0, BLOCK_D)
            n = tl.arange(0, BLOCK_N)
            heads = kvh * GROUP + g
            g_mask = g < GROUP
            d_mask = d < HEAD_DIM
            q = tl.load(
                Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=g_mask[:, None] & d_mask[None, :],
                other=0.0,
            )
            if DOT_IN_FP32:
                q = q.to(tl.float32)
            m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
            acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
            table = Block_tables + b * stride_btb
            # Every tile starts below split_end, so it holds at least one live key and m_i
            # is finite after the first tile (no -inf - -inf).
            for start in range(split_start, split_end, BLOCK_N):
                tok = start + n
                tok_mask = tok < split_end
                block_id = tl.load(table + tok // BLOCK_SIZE, mask=tok_mask, other=0)
                # int64: block_id * stride_kb overflows int32 on large caches.
                row = block_id.to(tl.int64)[:, None]
                slot = (tok % BLOCK_SIZE)[:, None]
                kv_mask = tok_mask[:, None] & d_mask[None, :]
                k = tl.load(
                    K + row * stride_kb + slot * stride_ks + kvh * stride_kh + d[None, :],
                    mask=kv_mask,
                    other=0.0,
                )
                if DOT_IN_FP32:
                    k = k.to(tl.float32)
                qk = tl.dot(q, tl.trans(k)) * scale_log2  # [BLOCK_G, BLOCK_N]
                qk = tl.where(tok_mask[None, :], qk, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(qk, 1))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(qk - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                v = tl.load(
                    V + row * stride_vb + slot * stride_vs + kvh * stride_vh + d[None, :],
                    mask=kv_mask,
                    other=0.0,
                )
                p = p.to(v.dtype)  # rounded as the GPU's MMA takes it, also when widened below
                if DOT_IN_FP32:
                    p = p.to(tl.float32)
                    v = v.to(tl.float32)
                acc = acc * alpha[:, None] + tl.dot(p, v)
                m_i = m_new
            tl.store(
                Mid_o
                + b * stride_mob
                + heads[:, None] * stride_moh
                + split * stride_mos
                + d[None, :],
                acc / l_i[:, None],
                mask=g_mask[:, None] & d_mask[None, :],
            )
            tl.store(
                Mid_lse + b * stride_mlb + heads * stride_mlh + split,
                m_i + tl.log2(l_i),
                mask=g_mask,
            )

    @triton.jit
    def _merge_splits_kernel(
        Mid_o,  # [B, H, num_splits, D] float32
        Mid_lse,  # [B, H, num_splits] float32, base 2
        Seq_lens,  # [B] int32
        Out,  # [B, H, D]
        split_len,
        num_splits,
        stride_mob,
        stride_moh,
        stride_mos,
        stride_mlb,
        stride_mlh,
        stride_ob,
        stride_oh,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        seq_len = tl.load(Seq_lens + b)
        num_live = tl.minimum((seq_len + split_len - 1) // split_len, num_splits)
        d = tl.arange(0, BLOCK_D)
        d_mask = d < HEAD_DIM
        mid_o = Mid_o + b * stride_mob + h * stride_moh
        mid_lse = Mid_lse + b * stride_mlb + h * stride_mlh
        m = -float("inf")
        total = 0.0
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for s in range(0, num_live):
            lse = tl.load(mid_lse + s)
            o = tl.load(mid_o + s * stride_mos + d, mask=d_mask, other=0.0)
            m_new = tl.maximum(m, lse)
            alpha = tl.exp2(m - m_new)
            w = tl.exp2(lse - m_new)
            acc = acc * alpha + w * o
            total = total * alpha + w
            m = m_new
        # total >= 1 whenever a split ran; it is 0 only for padding rows with seq_len 0,
        # which then get zeros instead of NaN.
        out = acc / tl.maximum(total, 1e-20)
        tl.store(Out + b * stride_ob + h * stride_oh + d, out.to(Out.dtype.element_ty), mask=d_mask)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(x: int) -> int:
    return 1 << max(0, math.ceil(math.log2(x)))


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return _HOST_SM_COUNT
    # An executor in a green-context partition has only part of the GPU: plan for that part.
    return executor_sm_count() or _cuda_sm_count(device.index or 0)


@functools.cache
def _cuda_sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def split_plan(
    batch: int, num_kv_heads: int, max_seq_len: int, block_n: int, sm_count: int
) -> tuple[int, int]:
    """(num_splits, split_len): about two programs per SM, no split shorter than two key tiles.

    Depends only on host ints, so a CUDA graph captured at one (batch, max_seq_len) replays with
    the same grid and scratch sizes.
    """
    max_seq_len = max(max_seq_len, 1)
    wanted = _cdiv(2 * sm_count, batch * num_kv_heads)
    most = _cdiv(max_seq_len, 2 * block_n)
    num_splits = max(1, min(wanted, most, _MAX_SPLITS))
    split_len = _cdiv(_cdiv(max_seq_len, num_splits), block_n) * block_n
    return _cdiv(max_seq_len, split_len), split_len


def paged_decode_attention(
    q: torch.Tensor,  # [B, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,  # [B] int32, including the new token; each <= max_seq_len
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    max_seq_len: int,
    scale: float,
    out: torch.Tensor | None = None,  # [B, num_heads, head_dim], last dim contiguous
) -> torch.Tensor:
    """One query token per sequence against its paged cache. No host syncs: graph-capturable."""
    if not TRITON_AVAILABLE:
        raise RuntimeError("paged_decode_attention needs the triton package")
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if head_dim > 256 or k_cache.shape[-1] != head_dim:
        raise ValueError(f"head_dim {head_dim} unsupported or different from the cache's")
    if q.dtype != k_cache.dtype or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"q {q.dtype} and the kv cache {k_cache.dtype} must share a dtype")
    # Before `out` is shaped like q: empty_like keeps a non-unit last stride.
    q = q if q.stride(-1) == 1 else q.contiguous()
    if out is None:
        out = torch.empty_like(q)
    if batch == 0:
        return out
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("the kv cache and out need a contiguous last dimension")
    seq_lens = seq_lens.to(torch.int32).contiguous()
    block_tables = block_tables.to(torch.int32).contiguous()

    group = num_heads // num_kv_heads
    block_d = max(_next_pow2(head_dim), _MIN_DOT_DIM)
    # Key tiles of at most 16 KiB keep two pipelined k, v stages well inside shared memory.
    block_n = max(_MIN_DOT_DIM, min(64, 16384 // (block_d * q.element_size())))
    num_splits, split_len = split_plan(
        batch, num_kv_heads, max_seq_len, block_n, _sm_count(q.device)
    )
    mid_o = torch.empty(
        (batch, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device
    )
    mid_lse = torch.empty((batch, num_heads, num_splits), dtype=torch.float32, device=q.device)

    _split_kv_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, mid_o, mid_lse,
        scale * _LOG2E, split_len,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1),
        GROUP=group,
        BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim,
        BLOCK_G=max(_next_pow2(group), _MIN_DOT_DIM),
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        DOT_IN_FP32=INTERPRETED and q.dtype == torch.bfloat16,
        num_warps=4,
        num_stages=2,
    )  # fmt: skip
    _merge_splits_kernel[(batch, num_heads)](
        mid_o, mid_lse, seq_lens, out,
        split_len, num_splits,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        num_warps=4,
    )  # fmt: skip
    return out
