"""The torch backend's batched decode attention: correct against plain per-sequence attention,
and batch-invariant bitwise: a sequence's output never depends on its batch mates (how many,
how long, where it sits in the batch), nor on stale inf/nan left in padded cache slots.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attention.torch_backend import TorchAttention

NUM_BLOCKS = 512
TARGET_LEN = 37


def reference_decode(q, k_cache, v_cache, seq_lens, tables, num_kv_heads) -> torch.Tensor:
    """One sequence at a time over exactly its own keys, in float32."""
    out = []
    group = q.shape[1] // num_kv_heads
    for i, seq_len in enumerate(seq_lens.tolist()):
        flat_k = k_cache[tables[i].long()].flatten(0, 1)[:seq_len].float()
        flat_v = v_cache[tables[i].long()].flatten(0, 1)[:seq_len].float()
        out.append(
            F.scaled_dot_product_attention(
                q[i].float().unsqueeze(1),
                flat_k.repeat_interleave(group, 1).transpose(0, 1),
                flat_v.repeat_interleave(group, 1).transpose(0, 1),
            ).squeeze(1)
        )
    return torch.stack(out)


class Batches:
    """A random paged cache and a target sequence whose output is compared across batches."""

    def __init__(self, num_heads, num_kv_heads, head_dim, block_size, dtype) -> None:
        gen = torch.Generator().manual_seed(0)
        shape = (NUM_BLOCKS, block_size, num_kv_heads, head_dim)
        self.k_cache = torch.randn(shape, generator=gen).to(dtype)
        self.v_cache = torch.randn(shape, generator=gen).to(dtype)
        self.block_size = block_size
        # Block 0 is only ever padding here.
        self.order = [b for b in torch.randperm(NUM_BLOCKS, generator=gen).tolist() if b]
        self.target_q = torch.randn(num_heads, head_dim, generator=gen).to(dtype)
        self.gen = gen
        self.backend = TorchAttention(num_heads, num_kv_heads, head_dim, head_dim**-0.5)
        self.num_kv_heads = num_kv_heads

    def run(self, mate_lens: list[int], position: int, extra_width: int = 0):
        """The batch [mates with the target inserted at `position`]; returns (out, inputs)."""
        free = iter(self.order)
        num_blocks = [-(-n // self.block_size) for n in [TARGET_LEN, *mate_lens]]
        tables = [[next(free) for _ in range(n)] for n in num_blocks]  # the target's first
        lens = list(mate_lens)
        lens.insert(position, TARGET_LEN)
        tables.insert(position, tables.pop(0))
        width = max(len(t) for t in tables) + extra_width
        padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        q = torch.randn(len(lens), *self.target_q.shape, generator=self.gen).to(self.k_cache.dtype)
        q[position] = self.target_q
        seq_lens = torch.tensor(lens, dtype=torch.int32)
        out = self.backend.decode(q, self.k_cache, self.v_cache, seq_lens, padded, max(lens))
        return out, (q, seq_lens, padded)


SHAPES = [
    pytest.param(9, 3, 64, 16, id="smollm2-gqa3"),
    pytest.param(8, 1, 64, 16, id="mqa"),
    pytest.param(4, 4, 128, 32, id="mha-d128-bs32"),
]
COMPOSITIONS = [
    ([], 0),
    ([5, 100, 250], 0),
    ([5, 100, 250], 2),
    ([1, 1, 1], 3),
    ([3, 17, 64, 65, 200, 300, 31, 36, 38, 2, 120, 90, 47, 48, 1], 7),
    ([400] * 15, 15),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim, block_size", SHAPES)
def test_a_sequence_gets_the_same_bits_whatever_its_batch(
    num_heads, num_kv_heads, head_dim, block_size, dtype
) -> None:
    batches = Batches(num_heads, num_kv_heads, head_dim, block_size, dtype)
    alone, _ = batches.run([], 0)
    for mates, position in COMPOSITIONS:
        for extra_width in (0, 3):
            out, _ = batches.run(mates, position, extra_width)
            assert torch.equal(out[position], alone[0]), (mates, position, extra_width)


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim, block_size", SHAPES)
def test_batched_decode_matches_per_sequence_attention(
    num_heads, num_kv_heads, head_dim, block_size, dtype, atol
) -> None:
    batches = Batches(num_heads, num_kv_heads, head_dim, block_size, dtype)
    mates, position = COMPOSITIONS[4]
    out, (q, seq_lens, tables) = batches.run(mates, position)
    expected = reference_decode(q, batches.k_cache, batches.v_cache, seq_lens, tables, num_kv_heads)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=atol)


def test_stale_inf_and_nan_in_padded_slots_never_reach_a_row() -> None:
    batches = Batches(9, 3, 64, 16, torch.float32)
    clean, (q, seq_lens, tables) = batches.run([5, 100], 1)
    for cache in (batches.k_cache, batches.v_cache):
        cache[0] = float("inf")  # block 0 pads the short rows' tables
        for row, seq_len in enumerate(seq_lens.tolist()):
            last = tables[row, (seq_len - 1) // 16]
            cache[last, seq_len % 16 or 16 :] = float("nan")  # past the end, in its own block
    out = batches.backend.decode(q, batches.k_cache, batches.v_cache, seq_lens, tables, 100)
    assert torch.equal(out, clean)


def test_empty_batch() -> None:
    batches = Batches(9, 3, 64, 16, torch.float32)
    q = torch.empty(0, 9, 64)
    tables = torch.empty(0, 0, dtype=torch.int32)
    out = batches.backend.decode(
        q, batches.k_cache, batches.v_cache, torch.empty(0, dtype=torch.int32), tables, 0
    )
    assert out.shape == (0, 9, 64)
