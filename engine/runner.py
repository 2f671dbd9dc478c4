"""Runs one scheduled batch on the device: owns the model, the KV pool and the attention backend,
turns a `ScheduledBatch` into flat input tensors and attention metadata, and samples.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
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


@dataclass
class StepLayout:
    """Where each row's new tokens sit in a step's flat token list (host arrays). Rows are
    ordered prompt chunks, local decodes, then offloaded decodes."""

    seqs: list[Sequence]
    counts: np.ndarray  # [rows] new tokens of each row
    starts: np.ndarray  # [rows] position of each row's first new token
    num_local: int  # rows [0, num_local) attend here, the others on attention executors
    num_prefills: int  # rows [0, num_prefills) are prompt chunks (more than one token)

    @classmethod
    def of(cls, rows: list[tuple[Sequence, int]]) -> StepLayout:
        seqs = [seq for seq, _ in rows]
        counts = np.array([n for _, n in rows], dtype=np.int64)
        num_local = sum(1 for seq in seqs if not seq.executor)
        return cls(
            seqs=seqs,
            counts=counts,
            starts=np.array([seq.num_computed_tokens for seq in seqs], dtype=np.int64),
            num_local=num_local,
            num_prefills=int((counts[:num_local] > 1).sum()),
        )

    @property
    def ends(self) -> np.ndarray:
        return self.starts + self.counts

    @property
    def first_tokens(self) -> np.ndarray:  # [rows] index of each row's first token in the step
        return np.cumsum(self.counts) - self.counts

    @property
    def token_row(self) -> np.ndarray:  # [tokens] the row each token belongs to
        return np.repeat(np.arange(len(self.seqs)), self.counts)

    @property
    def positions(self) -> np.ndarray:  # [tokens]
        return np.arange(int(self.counts.sum())) - (self.first_tokens - self.starts)[self.token_row]

    def token_ids(self) -> np.ndarray:  # [tokens] int64
        starts, ends = self.starts.tolist(), self.ends.tolist()
        pieces = (seq.token_ids[a:b] for seq, a, b in zip(self.seqs, starts, ends))
        return np.fromiter(
            chain.from_iterable(pieces), dtype=np.int64, count=sum(self.counts.tolist())
        )

    def offloaded_groups(self) -> list[tuple[str, list[tuple[str, int]]]]:
        """Per executor, in row order: (request id, position of its new token)."""
        groups: dict[str, list[tuple[str, int]]] = {}
        offloaded = zip(self.seqs[self.num_local :], self.starts[self.num_local :].tolist())
        for seq, start in offloaded:
            groups.setdefault(seq.executor, []).append((seq.request_id, start))
        return list(groups.items())


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
        """A step's flat inputs: token ids, positions, attention metadata, the rows to sample
        and their sequences. Work per sequence, never per token: arrays are built with numpy."""
        layout = StepLayout.of(self._row_order(batch))
        sample_rows = np.flatnonzero(layout.ends == [seq.num_tokens for seq in layout.seqs])
        last_tokens = layout.first_tokens[sample_rows] + layout.counts[sample_rows] - 1
        return (
            self._on_device(layout.token_ids()),
            self._on_device(layout.positions),
            self._attention_metadata(layout),
            self._on_device(last_tokens),
            [layout.seqs[i] for i in sample_rows.tolist()],
        )

    def _attention_metadata(self, layout: StepLayout) -> AttentionMetadata:
        num_local, num_prefills = layout.num_local, layout.num_prefills
        tables = self._pad_tables([seq.block_table for seq in layout.seqs[:num_local]])
        local = slice(0, int(layout.counts[:num_local].sum()))  # local rows' tokens come first
        positions, bs = layout.positions[local], self.block_size
        blocks = tables[layout.token_row[local], positions // bs].astype(np.int64)
        query_lens = layout.counts[:num_prefills].astype(np.int32)
        prefill_seq_lens = layout.ends[:num_prefills].astype(np.int32)
        decode_seq_lens = layout.ends[num_prefills:num_local].astype(np.int32)
        meta = AttentionMetadata(
            slot_mapping=self._on_device(blocks * bs + positions % bs),
            num_prefill_tokens=int(query_lens.sum()),
            prefill_query_start=self._on_device(query_starts(query_lens)),
            prefill_seq_lens=self._on_device(prefill_seq_lens),
            prefill_block_tables=self._on_device(tables[:num_prefills]),
            prefill_query_lens_host=query_lens.tolist(),
            prefill_seq_lens_host=prefill_seq_lens.tolist(),
            decode_seq_lens=self._on_device(decode_seq_lens),
            decode_block_tables=self._on_device(tables[num_prefills:]),
            decode_max_seq_len=int(decode_seq_lens.max(initial=0)),
        )
        if num_local < len(layout.seqs):
            assert self.remote is not None, "offloaded sequences need a remote attention client"
            meta.remote = self.remote.begin_step(local.stop, layout.offloaded_groups())
        return meta

    def _on_device(self, values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(values).to(self.device)

    @staticmethod
    def _row_order(batch: ScheduledBatch) -> list[tuple[Sequence, int]]:
        """Prompt chunks, local decodes, then offloaded decodes grouped by executor."""
        local = [e for e in batch.entries if not e[0].executor]
        remote = sorted((e for e in batch.entries if e[0].executor), key=lambda e: e[0].executor)
        return local + remote

    @staticmethod
    def _pad_tables(tables: list[list[int]]) -> np.ndarray:
        """[len(tables), longest] int32, zero-padded."""
        width = max((len(t) for t in tables), default=0)
        padded = np.zeros((len(tables), width), dtype=np.int32)
        for row, table in zip(padded, tables):
            row[: len(table)] = table
        return padded


def query_starts(query_lens: np.ndarray) -> np.ndarray:
    """[len + 1] int32 cumulative counts, from 0."""
    return np.concatenate(([0], np.cumsum(query_lens))).astype(np.int32)


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype, device=device)
