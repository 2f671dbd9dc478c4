"""The attention executor (the paper's central idea): decode attention for offloaded requests,
run beside a prefill worker on its device, over the prefill worker's own KV pool.

The prompt's KV stays in the blocks prefill wrote (lent by the prefill worker); the executor
grows each request by one token per step in its own share of the pool (the tail block ids), and
for each decode step a decode worker announces, appends every layer's new k, v and runs paged
decode attention on the q it is sent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from attention.backend import AttentionBackend
from engine.kv_cache import BlockManager, OutOfBlocksError
from engine.sequence import SamplingParams, Sequence
from engine.step_timing import ewma

log = logging.getLogger(__name__)


class StepError(RuntimeError):
    """A step names a request this executor cannot serve."""


@dataclass
class PreparedStep:
    slots: torch.Tensor  # [n] where each row's new k, v go in the flat pool
    seq_lens: torch.Tensor  # [n] int32, including the new token
    block_tables: torch.Tensor  # [n, max_blocks] int32
    max_seq_len: int


class AttentionExecutor:
    def __init__(
        self,
        pool: torch.Tensor,  # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
        backend: AttentionBackend,
        first_block_id: int = 0,
        num_blocks: int | None = None,
    ) -> None:
        """Owns blocks [first_block_id, first_block_id + num_blocks) of the shared pool."""
        self.pool = pool
        self.backend = backend
        self.block_size = pool.shape[3]
        owned = pool.shape[2] - first_block_id if num_blocks is None else num_blocks
        self.blocks = BlockManager(
            owned, self.block_size, enable_prefix_caching=False, first_block_id=first_block_id
        )
        # Token ids are not needed here, only counts: placeholders stand in for them.
        self.requests: dict[str, Sequence] = {}
        self.requests_total = 0
        self.attention_time_ms = 0.0  # moving average of one layer's attention for one step

    @property
    def num_layers(self) -> int:
        return self.pool.shape[0]

    def adopt(self, request_id: str, lent_blocks: list[int], num_prompt_tokens: int) -> None:
        """Takes over a prefilled request: its prompt's KV is in `lent_blocks` already; room for
        the first generated token comes from this executor's own blocks when needed."""
        if request_id in self.requests:
            raise StepError(f"request {request_id!r} is already offloaded here")
        if len(lent_blocks) * self.block_size < num_prompt_tokens:
            raise StepError(f"{request_id}: {len(lent_blocks)} blocks cannot hold the prompt")
        seq = Sequence(request_id, [0] * (num_prompt_tokens + 1), SamplingParams())
        seq.block_table = list(lent_blocks)
        if not self.blocks.can_append(seq):
            raise OutOfBlocksError(f"offload pool has no room for {request_id}")
        self.blocks.append_slots(seq)
        seq.num_computed_tokens = num_prompt_tokens
        self.requests[request_id] = seq
        self.requests_total += 1

    def release(self, request_id: str) -> None:
        seq = self.requests.pop(request_id, None)
        if seq is not None:
            self.blocks.free(seq)

    def prepare(self, request_ids: list[str], positions: list[int]) -> PreparedStep:
        """Checks the step against what is held here and makes room for each new token."""
        tables, lens, slots = [], [], []
        for request_id, position in zip(request_ids, positions):
            seq = self.requests.get(request_id)
            if seq is None:
                raise StepError(f"request {request_id!r} has no KV here")
            # A step may be replayed at the same position when the decode worker lost it
            # elsewhere (another executor failed) after this one had committed it.
            if position not in (seq.num_computed_tokens, seq.num_computed_tokens - 1):
                raise StepError(
                    f"{request_id}: step writes position {position}, pool holds "
                    f"{seq.num_computed_tokens} tokens"
                )
            while seq.num_tokens <= position:
                seq.token_ids.append(0)
            if not self.blocks.can_append(seq):
                raise OutOfBlocksError(f"offload pool is full growing {request_id}")
            self.blocks.append_slots(seq)
            block = seq.block_table[position // self.block_size]
            slots.append(block * self.block_size + position % self.block_size)
            lens.append(position + 1)
            tables.append(seq.block_table)
        width = max((len(t) for t in tables), default=0)
        device = self.pool.device
        return PreparedStep(
            slots=torch.tensor(slots, dtype=torch.int64, device=device),
            seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
            block_tables=torch.tensor(
                [t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device
            ).reshape(len(tables), width),
            max_seq_len=max(lens, default=0),
        )

    def commit(self, request_ids: list[str], positions: list[int]) -> None:
        """The step's tokens are in the pool for every layer."""
        for request_id, position in zip(request_ids, positions):
            self.requests[request_id].num_computed_tokens = position + 1

    def attend(
        self,
        layer: int,
        step: PreparedStep,
        q: torch.Tensor,  # [n, num_heads, head_dim]
        k: torch.Tensor,  # [n, num_kv_heads, head_dim]
        v: torch.Tensor,
    ) -> torch.Tensor:  # [n, num_heads, head_dim]
        k_cache, v_cache = self.pool[layer, 0], self.pool[layer, 1]
        self.backend.write_kv(k, v, k_cache, v_cache, step.slots)
        return self.backend.decode(
            q, k_cache, v_cache, step.seq_lens, step.block_tables, step.max_seq_len
        )

    def record_attention(self, seconds: float) -> None:
        self.attention_time_ms = ewma(self.attention_time_ms, seconds * 1000)

    def stats(self) -> dict:
        return {
            "num_running": len(self.requests),
            "num_waiting": 0,
            "num_free_blocks": self.blocks.num_free_blocks,
            "num_blocks": self.blocks.num_blocks,
            "queued_tokens": 0,
            "num_preemptions": 0,
            "requests_total": self.requests_total,
            "num_offloaded": len(self.requests),
            "context_tokens": sum(s.num_computed_tokens for s in self.requests.values()),
            "attention_time_ms": round(self.attention_time_ms, 4),
        }
