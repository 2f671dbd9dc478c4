"""CUDA attention backends against the PyTorch reference in float32, and backend selection.

Block tables hand out shuffled, non-contiguous block ids, and the rest of the cache holds random
values, so a kernel that reads the wrong block or past a sequence's end fails the comparison.
"""

from __future__ import annotations

import pytest
import torch

from attention import flash_attn_backend, triton_decode
from attention.backend import AttentionBackend, AttentionMetadata
from attention.flash_attn_backend import FLASH_ATTN_AVAILABLE, FlashAttention
from attention.selector import AttentionBackendError, select_backend
from attention.torch_backend import TorchAttention
from attention.triton_backend import TritonAttention
from attention.triton_decode import TRITON_AVAILABLE, paged_decode_attention, split_plan

CUDA = torch.cuda.is_available()
needs_triton_gpu = pytest.mark.skipif(
    not (CUDA and TRITON_AVAILABLE), reason="needs a CUDA device and the triton package"
)
needs_flash_attn_gpu = pytest.mark.skipif(
    not (CUDA and FLASH_ATTN_AVAILABLE), reason="needs a CUDA device and the flash-attn package"
)
ATOL = RTOL = 2e-2
MAX_LEN = 2000

dtypes = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
heads = pytest.mark.parametrize("num_heads,num_kv_heads", [(8, 2), (8, 8)], ids=["gqa", "mha"])
head_dims = pytest.mark.parametrize("head_dim", [64, 128])


class Step:
    """One step's tensors: prefill sequences (context, new tokens) first, then decodes."""

    def __init__(
        self,
        prefills: list[tuple[int, int]],  # (context_len, query_len)
        decode_lens: list[int],  # seq_len including the new token
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        block_size: int = 16,
        seed: int = 0,
    ):
        gen = torch.Generator().manual_seed(seed)
        seq_lens = [c + q for c, q in prefills] + decode_lens
        query_lens = [q for _, q in prefills] + [1] * len(decode_lens)
        blocks_per_seq = [-(-s // block_size) for s in seq_lens]
        num_blocks = sum(blocks_per_seq) + 7
        ids = torch.randperm(num_blocks, generator=gen).to(torch.int32)
        tables = torch.zeros(len(seq_lens), max(blocks_per_seq), dtype=torch.int32)
        used = 0
        for i, n in enumerate(blocks_per_seq):
            tables[i, :n] = ids[used : used + n]
            used += n
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k_cache = torch.randn(shape, generator=gen).to(dtype)
        self.v_cache = torch.randn(shape, generator=gen).to(dtype)

        # New tokens' k, v are taken from the cache, so writing them back changes nothing.
        slots = []
        for i, (s, q) in enumerate(zip(seq_lens, query_lens, strict=True)):
            pos = torch.arange(s - q, s)
            slots.append(tables[i, pos // block_size].long() * block_size + pos % block_size)
        slot_mapping = torch.cat(slots)
        self.k = self.k_cache.flatten(0, 1)[slot_mapping]
        self.v = self.v_cache.flatten(0, 1)[slot_mapping]
        self.q = torch.randn(len(slot_mapping), num_heads, head_dim, generator=gen).to(dtype)

        p = len(prefills)
        prefill_query_lens = query_lens[:p]
        self.meta = AttentionMetadata(
            slot_mapping=slot_mapping,
            num_prefill_tokens=sum(prefill_query_lens),
            prefill_query_start=torch.tensor([0, *prefill_query_lens], dtype=torch.int32).cumsum(
                0, dtype=torch.int32
            ),
            prefill_seq_lens=torch.tensor(seq_lens[:p], dtype=torch.int32),
            prefill_block_tables=tables[:p],
            prefill_query_lens_host=prefill_query_lens,
            prefill_seq_lens_host=seq_lens[:p],
            decode_seq_lens=torch.tensor(decode_lens, dtype=torch.int32),
            decode_block_tables=tables[p:],
            decode_max_seq_len=max(decode_lens, default=0),
        )
        self.scale = head_dim**-0.5
        self.dims = (num_heads, num_kv_heads, head_dim)

    def run(self, backend_cls: type[AttentionBackend], dtype: torch.dtype | None = None):
        """Runs forward on fresh cuda copies, in dtype when given."""

        def dev(t: torch.Tensor) -> torch.Tensor:
            t = t.cuda()
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t

        meta = AttentionMetadata(
            **{
                name: dev(value) if isinstance(value, torch.Tensor) else value
                for name, value in vars(self.meta).items()
            }
        )
        backend = backend_cls(*self.dims, self.scale)
        return backend.forward(
            dev(self.q), dev(self.k), dev(self.v), dev(self.k_cache), dev(self.v_cache), meta
        )

    def check(self, backend_cls: type[AttentionBackend]) -> None:
        out = self.run(backend_cls)
        assert out.dtype == self.q.dtype and out.shape == self.q.shape
        ref = self.run(TorchAttention, torch.float32)
        torch.testing.assert_close(out.float(), ref, atol=ATOL, rtol=RTOL)


def random_lens(n: int, seed: int, low: int = 1, high: int = MAX_LEN) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(low, high + 1, (n,), generator=gen).tolist()


@pytest.mark.gpu
@needs_triton_gpu
@dtypes
@heads
@head_dims
def test_triton_decode(dtype, num_heads, num_kv_heads, head_dim):
    # Edge lengths: one token, exactly one block, one past a block, the longest.
    lens = [1, 16, 17, MAX_LEN, *random_lens(12, seed=1)]
    Step([], lens, num_heads, num_kv_heads, head_dim, dtype).check(TritonAttention)


@pytest.mark.gpu
@needs_triton_gpu
@dtypes
@heads
@head_dims
def test_triton_prefill_without_context(dtype, num_heads, num_kv_heads, head_dim):
    prefills = [(0, q) for q in [1, 17, *random_lens(4, seed=2)]]
    Step(prefills, [], num_heads, num_kv_heads, head_dim, dtype).check(TritonAttention)


@pytest.mark.gpu
@needs_triton_gpu
@dtypes
@heads
@head_dims
def test_triton_prefill_with_context(dtype, num_heads, num_kv_heads, head_dim):
    contexts = random_lens(4, seed=3, high=1500)
    queries = random_lens(4, seed=4, high=500)
    # One sequence without context rides along in a batch that has context.
    prefills = [(0, 33), (15, 1), *zip(contexts, queries, strict=True)]
    Step(prefills, [], num_heads, num_kv_heads, head_dim, dtype).check(TritonAttention)


@pytest.mark.gpu
@needs_triton_gpu
@dtypes
@heads
def test_triton_mixed_step(dtype, num_heads, num_kv_heads):
    prefills = [(0, 40), (100, 300)]
    Step(prefills, random_lens(6, seed=5), num_heads, num_kv_heads, 128, dtype).check(
        TritonAttention
    )


@pytest.mark.gpu
@needs_triton_gpu
@pytest.mark.parametrize("head_dim", [80, 256])
def test_triton_decode_float32_and_unusual_head_dims(head_dim):
    lens = [1, 255, 1999, *random_lens(5, seed=6)]
    Step([], lens, 16, 4, head_dim, torch.float32).check(TritonAttention)


@pytest.mark.gpu
@needs_triton_gpu
def test_triton_decode_replays_in_cuda_graph():
    step = Step([], [5, 700, 1300, 2000], 8, 2, 128, torch.bfloat16, seed=7)
    q = step.q.cuda()
    k_cache, v_cache = step.k_cache.cuda(), step.v_cache.cuda()
    seq_lens = step.meta.decode_seq_lens.cuda()
    tables = step.meta.decode_block_tables.cuda()
    out = torch.empty_like(q)

    def decode() -> None:
        paged_decode_attention(q, k_cache, v_cache, seq_lens, tables, MAX_LEN, step.scale, out)

    decode()  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode()
    # Shorter sequences (and a padding row of length 0) replay through the same graph.
    seq_lens.copy_(torch.tensor([1, 0, 1000, 1999], dtype=torch.int32))
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    ref = TorchAttention(8, 2, 128, step.scale).decode(
        q.float(), k_cache.float(), v_cache.float(), seq_lens.clamp(min=1), tables, MAX_LEN
    )
    assert torch.all(out[1] == 0)
    for i in (0, 2, 3):
        torch.testing.assert_close(out[i].float(), ref[i], atol=ATOL, rtol=RTOL)


@pytest.mark.gpu
@needs_flash_attn_gpu
@heads
def test_flash_attn_matches_torch(num_heads, num_kv_heads):
    prefills = [(0, 300), (300, 200)]
    step = Step(prefills, [1, 600], num_heads, num_kv_heads, 128, torch.bfloat16, block_size=256)
    step.check(FlashAttention)


def test_select_backend_auto_on_cpu_is_torch():
    cpu = torch.device("cpu")
    assert select_backend("auto", cpu, torch.float32, 16) is TorchAttention
    assert select_backend("torch", cpu, torch.bfloat16, 16) is TorchAttention


@pytest.mark.parametrize("name", ["triton", "flash_attn", "cuda_magic"])
def test_select_backend_explicit_unavailable_raises(name, monkeypatch):
    # The test session may run Triton's interpreter, which makes "triton" usable on CPU.
    monkeypatch.setattr(triton_decode, "INTERPRETED", False)
    with pytest.raises(AttentionBackendError, match=name.split("_")[0]):
        select_backend(name, torch.device("cpu"), torch.bfloat16, 16)


def test_flash_attn_rejects_small_blocks():
    assert not flash_attn_backend.supports(16, torch.bfloat16, torch.device("cuda"))


@pytest.mark.parametrize("batch,max_seq_len", [(1, 1), (1, 2000), (4, 4096), (256, 32768), (3, 0)])
def test_split_plan_covers_the_sequence(batch, max_seq_len):
    num_splits, split_len = split_plan(batch, 8, max_seq_len, block_n=64, sm_count=132)
    assert 1 <= num_splits <= 64 and split_len % 64 == 0
    assert num_splits * split_len >= max_seq_len
    assert (num_splits - 1) * split_len < max(max_seq_len, 1)
