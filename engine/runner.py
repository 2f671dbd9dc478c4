"""Runs one scheduled batch on the device: owns the model, the KV pool and the attention backend,
turns a `ScheduledBatch` into flat input tensors and attention metadata, and samples.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from attention.backend import AttentionBackend, AttentionMetadata
from attention.remote import RemoteAttention
from attention.selector import select_backend
from engine.batcher import ScheduledBatch
from engine.config import EngineConfig, ModelConfig, parse_dtype
from engine.sampler import sample
from engine.sequence import Sequence
from engine.weights import build_model

log = logging.getLogger(__name__)


@dataclass
class StepOutput:
    # Sequences that produced a token this step, with the token and its logprob (if asked).
    sampled: list[tuple[Sequence, int, float | None]]


def kv_block_bytes(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim
    return per_token * block_size * torch.empty((), dtype=dtype).element_size()


KVPoolFactory = Callable[[tuple[int, ...], torch.dtype, torch.device], torch.Tensor]


class ModelRunner:
    def __init__(
        self,
        config: EngineConfig,
        model_config: ModelConfig,
        model_dir: Path | None,
        kv_pool_factory: KVPoolFactory | None = None,
        remote: RemoteAttention | None = None,
    ):
        self.remote = remote
        self.config = config
        self.model_config = model_config
        self.device = torch.device(config.device)
        self.dtype = parse_dtype(config.dtype)
        self.block_size = config.cache.block_size
        self.model = build_model(
            model_config,
            model_dir,
            config.load_format,
            self.dtype,
            self.device,
            max_positions=config.batch.max_model_len,
            seed=config.seed,
        )
        cfg = model_config
        backend_cls = select_backend(
            config.attention_backend, self.device, self.dtype, self.block_size
        )
        self.backend: AttentionBackend = backend_cls(
            cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.head_dim**-0.5
        )
        self.num_blocks = self._decide_num_blocks()
        # [num_layers, 2 (k, v), num_blocks, block_size, num_kv_heads, head_dim]
        shape = (
            cfg.num_layers,
            2,
            self.num_blocks,
            self.block_size,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        # A decode worker's pool is allocated by its data plane, where prefill workers reach it.
        factory = kv_pool_factory or _zeros
        self.kv_pool = factory(shape, self.dtype, self.device)
        log.info(
            "model loaded: %s, %s on %s, attention backend %s, %d KV blocks of %d tokens",
            cfg.architecture,
            self.dtype,
            self.device,
            self.backend.name,
            self.num_blocks,
            self.block_size,
        )

    def _decide_num_blocks(self) -> int:
        cache = self.config.cache
        if cache.num_blocks is not None:
            return cache.num_blocks
        block_bytes = kv_block_bytes(self.model_config, self.block_size, self.dtype)
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = free - (1 - cache.gpu_memory_utilization) * total
        else:
            budget = cache.cpu_kv_cache_gib * (1 << 30)
        num_blocks = int(budget // block_bytes)
        if num_blocks < 1:
            raise MemoryError(
                f"no memory left for the KV cache on {self.device} ({block_bytes} bytes a block)"
            )
        return num_blocks

    @torch.inference_mode()
    def forward(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, list[Sequence]]:
        """Final hidden states of every scheduled token, the rows to sample, their sequences."""
        input_ids, positions, meta, logit_rows, sampling = self._prepare(batch)
        hidden = self.model(input_ids, positions, self.kv_pool, meta, self.backend)
        return hidden, logit_rows, sampling

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepOutput:
        hidden, logit_rows, sampling = self.forward(batch)
        if not sampling:
            return StepOutput([])
        logits = self.model.logits(hidden[logit_rows])
        tokens, logprobs = sample(
            logits, [s.params for s in sampling], [s.next_token_generator() for s in sampling]
        )
        return StepOutput(
            [
                (seq, tok, None if logprobs is None or not seq.params.logprobs else logprobs[i])
                for i, (seq, tok) in enumerate(zip(sampling, tokens))
            ]
        )

    def _prepare(self, batch: ScheduledBatch):
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logit_rows: list[int] = []
        sampling: list[Sequence] = []
        prefill_query_lens: list[int] = []
        prefill_seq_lens: list[int] = []
        prefill_tables: list[list[int]] = []
        decode_seq_lens: list[int] = []
        decode_tables: list[list[int]] = []
        offloaded: dict[str, list[tuple[str, int]]] = {}
        for seq, num_new in self._row_order(batch):
            start = seq.num_computed_tokens
            end = start + num_new
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            if end == seq.num_tokens:
                logit_rows.append(len(input_ids) - 1)
                sampling.append(seq)
            if seq.executor:
                offloaded.setdefault(seq.executor, []).append((seq.request_id, start))
                continue
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            if num_new > 1:
                prefill_query_lens.append(num_new)
                prefill_seq_lens.append(end)
                prefill_tables.append(table)
            else:
                decode_seq_lens.append(end)
                decode_tables.append(table)
        dev = self.device

        def ints(values, dtype=torch.int32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=dev)

        query_start = [0]
        for n in prefill_query_lens:
            query_start.append(query_start[-1] + n)
        meta = AttentionMetadata(
            slot_mapping=ints(slots, torch.int64),
            num_prefill_tokens=query_start[-1],
            prefill_query_start=ints(query_start),
            prefill_seq_lens=ints(prefill_seq_lens),
            prefill_block_tables=self._pad_tables(prefill_tables),
            prefill_query_lens_host=prefill_query_lens,
            prefill_seq_lens_host=prefill_seq_lens,
            decode_seq_lens=ints(decode_seq_lens),
            decode_block_tables=self._pad_tables(decode_tables),
            decode_max_seq_len=max(decode_seq_lens, default=0),
        )
        if offloaded:
            assert self.remote is not None, "offloaded sequences need a remote attention client"
            meta.remote = self.remote.begin_step(len(slots), list(offloaded.items()))
        return (
            ints(input_ids, torch.int64),
            ints(positions, torch.int64),
            meta,
            ints(logit_rows, torch.int64),
            sampling,
        )

    @staticmethod
    def _row_order(batch: ScheduledBatch) -> list[tuple[Sequence, int]]:
        """Prompt chunks, local decodes, then offloaded decodes grouped by executor."""
        local = [e for e in batch.entries if not e[0].executor]
        remote = sorted((e for e in batch.entries if e[0].executor), key=lambda e: e[0].executor)
        return local + remote

    def _pad_tables(self, tables: list[list[int]]) -> torch.Tensor:
        width = max((len(t) for t in tables), default=0)
        padded = [t + [0] * (width - len(t)) for t in tables]
        return torch.tensor(padded, dtype=torch.int32, device=self.device).reshape(
            len(tables), width
        )


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype, device=device)
