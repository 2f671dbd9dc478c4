"""Runs one scheduled batch on the device: owns the model, the KV pool and the attention backend,
turns a `ScheduledBatch` into flat input tensors and attention metadata, and samples.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from attention.backend import AttentionBackend, AttentionMetadata
from attention.remote import RemoteAttention
from attention.selector import select_backend
from engine.batcher import ScheduledBatch
from engine.config import EngineConfig, ModelConfig, parse_dtype
from engine.decode_graphs import DecodeGraphs, GraphKey
from engine.kv_budget import kv_block_bytes, kv_pool_budget, num_kv_blocks, peak_bytes
from engine.penalties import adjust_logits
from engine.sampler import prompt_logprobs, sample_tokens
from engine.sequence import Sequence, TopLogprobs
from engine.step_inputs import (
    HostStep,
    StepLayout,
    check_context_lengths,
    dummy_prefill,
    host_step,
    pad_decodes,
    padding_step,
    query_starts,
)
from engine.structured_output import mask_logits
from engine.weights import build_model

__all__ = ["KVPoolFactory", "ModelRunner", "StepOutput", "StepLayout", "kv_block_bytes"]

log = logging.getLogger(__name__)


# Prompt positions whose logits are computed at once for prompt_logprobs ([n, vocab] float32).
PROMPT_LOGPROBS_CHUNK = 512


@dataclass
class StepOutput:
    # Sequences that produced a token this step: the token, its logprob and best alternatives
    # (if asked).
    sampled: list[tuple[Sequence, int, float | None, TopLogprobs | None]]
    # Prompt chunks that asked for prompt logprobs: per predicted prompt token, (logprob, rank,
    # alternatives).
    prompt_logprobs: list[tuple[Sequence, list]] = field(default_factory=list)


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
        # Decode steps replay CUDA graphs on CUDA unless --enforce-eager; padding them to a
        # graph's batch size can be turned on without graphs (pad_decode), as tests do on CPU.
        self.use_graphs = self.device.type == "cuda" and not config.enforce_eager
        pad = self.use_graphs or config.pad_decode
        self.num_blocks = self._decide_num_blocks()
        # Padding rows write their k, v into one block past those the block manager hands out.
        self.pad_block = self.num_blocks
        shape = self._pool_shape(self.num_blocks + pad)
        # A decode worker's pool is allocated by its data plane, where prefill workers reach it.
        factory = kv_pool_factory or _zeros
        self.kv_pool = factory(shape, self.dtype, self.device)
        self.decode_graphs = self._decode_graphs(self.pad_block) if pad else None
        if self.use_graphs:
            self._capture_decode_graphs()
        log.info(
            "model loaded: %s, %s on %s, attention backend %s, %d KV blocks of %d tokens, "
            "decode steps %s",
            cfg.architecture,
            self.dtype,
            self.device,
            self.backend.name,
            self.num_blocks,
            self.block_size,
            "in CUDA graphs" if self.use_graphs else ("padded" if pad else "eager"),
        )

    def _pool_shape(self, num_blocks: int) -> tuple[int, ...]:
        """[num_layers, 2 (k, v), num_blocks, block_size, num_kv_heads, head_dim]"""
        cfg = self.model_config
        return (cfg.num_layers, 2, num_blocks, self.block_size, cfg.num_kv_heads, cfg.head_dim)

    def _decide_num_blocks(self) -> int:
        cache = self.config.cache
        if cache.num_blocks is not None:
            return cache.num_blocks
        block_bytes = kv_block_bytes(self.model_config, self.block_size, self.dtype)
        if self.device.type != "cuda":
            # A fixed size the user picks: host memory is shared with the OS and every other
            # process, and torch keeps no peak counters for it to profile against.
            return num_kv_blocks(int(cache.cpu_kv_cache_gib * (1 << 30)), block_bytes, self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        activations, graphs = self._profile_peaks()
        torch.cuda.empty_cache()  # the scratch pools, so the KV pool can take their memory
        budget = kv_pool_budget(
            total, total - free, cache.gpu_memory_utilization, activations, graphs
        )
        log.info(
            "KV budget %.2f GiB: %.2f GiB in use, activation peak %.2f GiB, CUDA graphs %.2f GiB",
            *(b / (1 << 30) for b in (budget, total - free, activations, graphs)),
        )
        return num_kv_blocks(budget, block_bytes, self.device)

    @torch.inference_mode()
    def _profile_peaks(self) -> tuple[int, int]:
        """Activation peaks in bytes of the largest step the batcher can schedule (a full
        token budget of prompts, and its logits for max_num_seqs rows) and of the largest
        decode graph, each over a scratch pool just large enough for it."""
        batch = self.config.batch
        prefill = dummy_prefill(batch.max_num_batched_tokens, batch.max_model_len, self.block_size)
        scratch = self._pool_shape(int(prefill.block_tables.max()) + 1)
        pool = _zeros(scratch, self.dtype, self.device)

        def run_prefill() -> None:
            self.model.logits(self._eager(prefill, pool)[: batch.max_num_seqs])

        activations = peak_bytes(run_prefill, self.device)
        if not self.use_graphs:
            return activations, 0
        graphs = self._decode_graphs(pad_block=0)
        step = padding_step(graphs.sizes[-1], 0, self.block_size)
        input_ids, positions, meta = graphs.load(step, batch.max_model_len)
        decode = partial(self.model, input_ids, positions, pool, meta, self.backend)
        return activations, peak_bytes(decode, self.device)

    @torch.inference_mode()
    def forward(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, list[Sequence]]:
        """Final hidden states of every scheduled token (and padding row), the rows to sample,
        their sequences."""
        layout, step, padded, sampling = self._prepare(batch)
        if padded:
            hidden = self._forward_decode(layout, step)
        else:
            hidden = self._eager(step, self.kv_pool, layout)
        return hidden, self._on_device(step.sample_tokens), sampling

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepOutput:
        hidden, logit_rows, sampling = self.forward(batch)
        prompt = self._prompt_logprobs(batch, hidden)
        if not sampling:
            return StepOutput([], prompt)
        logits = self.model.logits(hidden[logit_rows])
        logits = adjust_logits(logits, sampling, self.model_config.eos_token_ids)
        mask_logits(logits, sampling)
        out = sample_tokens(
            logits, [s.params for s in sampling], [s.next_token_generator() for s in sampling]
        )
        logprobs = out.logprobs or [None] * len(sampling)
        top = out.top or [None] * len(sampling)
        rows = zip(sampling, out.token_ids, logprobs, top)
        return StepOutput(
            [(seq, tok, lp if seq.params.logprobs else None, alt) for seq, tok, lp, alt in rows],
            prompt,
        )

    def _prompt_logprobs(self, batch: ScheduledBatch, hidden: torch.Tensor):
        """For prompt chunks that asked: the logprobs of each prompt token the chunk predicts
        (the one after each of its positions), from position len(seq.prompt_logprobs) on, so
        a chunk recomputed after preemption reports nothing twice."""
        if not any(seq.wants_prompt_logprobs for seq, _ in batch.entries):
            return []
        layout = StepLayout.of(self._row_order(batch))
        found = []
        for row, seq in enumerate(layout.seqs):
            start, end = int(layout.starts[row]), int(layout.ends[row])
            first = max(start, len(seq.prompt_logprobs))
            last = min(end, seq.num_prompt_tokens - 1)  # the last prompt token predicts output
            if not seq.wants_prompt_logprobs or first >= last:
                continue
            entries = []
            for a in range(first, last, PROMPT_LOGPROBS_CHUNK):  # bounds the [n, vocab] logits
                b = min(a + PROMPT_LOGPROBS_CHUNK, last)
                flat = int(layout.first_tokens[row]) + np.arange(a, b) - start
                next_ids = self._on_device(np.asarray(seq.token_ids[a + 1 : b + 1]))
                logits = self.model.logits(hidden[self._on_device(flat)])
                entries += prompt_logprobs(logits, next_ids, seq.params.prompt_logprobs or 0)
            found.append((seq, entries))
        return found

    def _prepare(self, batch: ScheduledBatch):
        """A step's layout, its host inputs (a decode step padded to its bucket when decode
        steps are padded), whether it was, and the sequences to sample in row order."""
        layout = StepLayout.of(self._row_order(batch))
        step = host_step(layout, self.block_size)
        bucket = None
        if self.decode_graphs is not None and not step.num_prefills:
            bucket = self.decode_graphs.bucket(step.num_tokens)
        if bucket is not None:
            step = pad_decodes(step, bucket, self.pad_block, self.block_size)
        return layout, step, bucket is not None, [layout.seqs[i] for i in layout.sample_rows()]

    def _eager(
        self, step: HostStep, pool: torch.Tensor, layout: StepLayout | None = None
    ) -> torch.Tensor:  # [num_tokens, hidden]
        meta = self._metadata(step)
        if layout is not None:
            self._begin_remote(meta, layout, step)
        input_ids, positions = self._on_device(step.token_ids), self._on_device(step.positions)
        return self.model(input_ids, positions, pool, meta, self.backend)

    def _forward_decode(self, layout: StepLayout, step: HostStep) -> torch.Tensor:
        """A padded decode step over the static buffers: its graph's replay, or the same inputs
        run eagerly (on CPU, with --enforce-eager, or when the step cannot be a graph)."""
        graphs, key = self.decode_graphs, self._graph_key(layout, step)
        max_seq_len = self.config.batch.max_model_len if key else step.max_seq_len
        input_ids, positions, meta = graphs.load(step, max_seq_len)
        # A key's first step runs eagerly (the warm-up: running it twice would repeat an
        # offloaded step's exchange with its executors); from its second on, a graph runs it.
        graphed = key is not None and (key in graphs.graphs or key in graphs.seen)
        self._begin_remote(meta, layout, step, graphed)
        forward = partial(self.model, input_ids, positions, self.kv_pool, meta, self.backend)
        if not graphed:
            if key is not None:
                graphs.seen.add(key)
            return forward()
        if key not in graphs.graphs:
            graphs.capture(key, forward, warm_up=False)
        hidden = graphs.replay(key, forward)
        if meta.remote is not None:
            meta.remote.replayed()  # raises for a refused or timed-out step, as eager ones do
        return hidden

    def _graph_key(self, layout: StepLayout, step: HostStep) -> GraphKey | None:
        if not self.use_graphs:
            return None
        groups = tuple((executor, len(rows)) for executor, rows in layout.offloaded_groups())
        if not groups:
            return step.num_tokens, step.num_local_tokens, (), 0
        # The per-layer channel's signals take per-step sequence numbers as launch arguments
        # unless the channel keeps them in device memory and says so (graph_safe): steps with
        # offloaded rows over any other channel run eagerly, padded all the same.
        if not getattr(self.remote, "graph_safe", False):
            return None
        generation = self.remote.links_generation
        self.decode_graphs.links_changed(generation)
        return step.num_tokens, step.num_local_tokens, groups, generation

    def _begin_remote(
        self, meta: AttentionMetadata, layout: StepLayout, step: HostStep, graphed: bool = False
    ) -> None:
        if layout.num_local < len(layout.seqs):
            assert self.remote is not None, "offloaded sequences need a remote attention client"
            meta.remote = self.remote.begin_step(
                step.num_local_tokens, layout.offloaded_groups(), graphed=graphed
            )

    def _metadata(self, step: HostStep) -> AttentionMetadata:
        """The step's attention metadata on the device (eager steps)."""
        check_context_lengths(step, step.max_seq_len, self.block_size)
        num_prefills, to_device = step.num_prefills, self._on_device
        return AttentionMetadata(
            slot_mapping=to_device(step.slot_mapping),
            num_prefill_tokens=int(step.query_lens.sum()),
            prefill_query_start=to_device(query_starts(step.query_lens)),
            prefill_seq_lens=to_device(step.prefill_seq_lens),
            prefill_block_tables=to_device(step.block_tables[:num_prefills]),
            prefill_query_lens_host=step.query_lens.tolist(),
            prefill_seq_lens_host=step.prefill_seq_lens.tolist(),
            decode_seq_lens=to_device(step.decode_seq_lens),
            decode_block_tables=to_device(step.block_tables[num_prefills:]),
            decode_max_seq_len=int(step.decode_seq_lens.max(initial=0)),
        )

    def _decode_graphs(self, pad_block: int) -> DecodeGraphs:
        batch, cfg = self.config.batch, self.model_config
        return DecodeGraphs(batch.max_num_seqs, batch.max_model_len, self.block_size, pad_block,
                            cfg.hidden_size, self.dtype, self.device)  # fmt: skip

    @torch.inference_mode()
    def _capture_decode_graphs(self) -> None:
        """One graph per bucket, largest first so that smaller ones reuse its pool memory,
        each over padding rows only (they write the padding block alone)."""
        graphs, max_len = self.decode_graphs, self.config.batch.max_model_len
        for rows in reversed(graphs.sizes):
            step = padding_step(rows, self.pad_block, self.block_size)
            input_ids, positions, meta = graphs.load(step, max_len)
            forward = partial(self.model, input_ids, positions, self.kv_pool, meta, self.backend)
            graphs.capture((rows, rows, (), 0), forward, warm_up=True)
        log.info("captured CUDA graphs for decode batches of %s", graphs.sizes)

    def _on_device(self, values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(values).to(self.device)

    @staticmethod
    def _row_order(batch: ScheduledBatch) -> list[tuple[Sequence, int]]:
        """Prompt chunks, local decodes, then offloaded decodes grouped by executor."""
        local = [e for e in batch.entries if not e[0].executor]
        remote = sorted((e for e in batch.entries if e[0].executor), key=lambda e: e[0].executor)
        return local + remote


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype, device=device)
