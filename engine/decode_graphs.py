"""Decode steps padded to a batch-size bucket over static input buffers, and on CUDA one captured
graph per bucket (nano-vllm's and vLLM's shape: buffers sized for the largest bucket, graphs
captured largest first into one shared memory pool, replayed after copying the inputs in).

The bookkeeping (buckets, padding, static buffers, per-bucket metadata, slicing) is the same
on every device; on CPU, or with --enforce-eager, the padded step simply runs eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from attention.backend import AttentionMetadata
from engine.step_inputs import HostStep, check_context_lengths

log = logging.getLogger(__name__)

# (bucket, local rows, ((executor, offloaded rows), ...), links generation): what a graph bakes
# in, the shapes and the buffers of the links it posts to (generation 0 without offloaded rows).
GraphKey = tuple[int, int, tuple[tuple[str, int], ...], int]


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then steps of 8, up to the first size that holds max_num_seqs rows."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be positive, got {max_num_seqs}")
    candidates = [1, 2, 4, 8, *range(16, max_num_seqs + 8, 8)]
    last = next(size for size in candidates if size >= max_num_seqs)
    return [size for size in candidates if size <= last]


class DecodeGraphs:
    """Static decode inputs for the largest bucket; a step fills rows [0, bucket) and the
    attention metadata of that bucket is views over them, so a graph captured over those views
    reads each step's inputs when replayed."""

    def __init__(
        self,
        max_num_seqs: int,
        max_model_len: int,
        block_size: int,
        pad_block: int,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.sizes = graph_batch_sizes(max_num_seqs)
        self.max_model_len, self.block_size = max_model_len, block_size
        rows, width = self.sizes[-1], -(-max_model_len // block_size)

        def static(value: int, *shape: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
            return torch.full(shape or (rows,), value, dtype=dtype, device=device)

        # Rows past a step's bucket keep stale but valid values: block ids < the pool's size.
        self.input_ids = static(0)  # [rows]
        self.positions = static(0)  # [rows]
        self.slot_mapping = static(pad_block * block_size)  # [rows]
        self.seq_lens = static(1, dtype=torch.int32)  # [rows]
        self.block_tables = static(pad_block, rows, width, dtype=torch.int32)  # [rows, width]
        self.hidden = torch.zeros(rows, hidden_size, dtype=dtype, device=device)  # graph output
        self._no_prefills = torch.zeros(0, dtype=torch.int32, device=device)
        self.device = device
        self.graphs: dict[GraphKey, torch.cuda.CUDAGraph | CallGraph] = {}
        self.seen: set[GraphKey] = set()  # keys run eagerly once, captured when seen again
        self.links_generation = 0
        self._pool = None  # the memory pool every graph shares

    def bucket(self, num_rows: int) -> int | None:
        return next((size for size in self.sizes if size >= num_rows), None)

    def load(
        self, step: HostStep, max_seq_len: int
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Copies a padded decode step into rows [0, step.num_tokens): its input ids,
        positions and attention metadata as views of the static buffers. A graph sees
        max_seq_len = max_model_len, an eager step its longest sequence."""
        check_context_lengths(step, max_seq_len, self.block_size)
        rows, local = step.num_tokens, step.num_local_tokens
        _copy(self.input_ids[:rows], step.token_ids)
        _copy(self.positions[:rows], step.positions)
        _copy(self.slot_mapping[:local], step.slot_mapping)
        _copy(self.seq_lens[:local], step.decode_seq_lens)
        _copy(self.block_tables[:local, : step.block_tables.shape[1]], step.block_tables)
        return self.input_ids[:rows], self.positions[:rows], self.metadata(local, max_seq_len)

    def metadata(self, num_local: int, max_seq_len: int) -> AttentionMetadata:
        width = -(-max_seq_len // self.block_size)
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:num_local],
            num_prefill_tokens=0,
            prefill_query_start=self._no_prefills,
            prefill_seq_lens=self._no_prefills,
            prefill_block_tables=self.block_tables[:0],
            prefill_query_lens_host=[],
            prefill_seq_lens_host=[],
            decode_seq_lens=self.seq_lens[:num_local],
            decode_block_tables=self.block_tables[:num_local, :width],
            decode_max_seq_len=max_seq_len,
        )

    def replay(self, key: GraphKey, forward: Callable[[], torch.Tensor]) -> torch.Tensor | None:
        """The step's final hidden states [bucket, hidden] from its graph, None without one.
        `forward` is the step's own eager run, which only the stand-in off CUDA calls."""
        graph = self.graphs.get(key)
        if graph is None:
            return None
        if isinstance(graph, CallGraph):
            self.hidden[: key[0]] = forward()
        else:
            graph.replay()
        return self.hidden[: key[0]]

    def links_changed(self, generation: int) -> None:
        """Forgets the graphs over offloaded rows captured over links since replaced."""
        if generation == self.links_generation:
            return
        self.links_generation = generation
        for key in [k for k in (*self.graphs, *self.seen) if k[2] and k[3] != generation]:
            self.graphs.pop(key, None)
            self.seen.discard(key)

    def capture(self, key: GraphKey, forward: Callable[[], torch.Tensor], warm_up: bool) -> None:
        """Records `forward` (hidden states over the static rows of key's bucket). A warm-up
        run first does lazy initialisation (cuBLAS workspaces, Triton compilation) outside the
        graph; a step with offloaded rows has had its eager run instead, since running it
        again would repeat the step's exchange with its executors."""
        rows = key[0]
        if warm_up:
            self.hidden[:rows] = forward()
        if self.device.type != "cuda":
            self.graphs[key] = CallGraph()
            return
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self.hidden[:rows] = forward()
        if self._pool is None:
            self._pool = graph.pool()
        torch.cuda.synchronize()
        self.graphs[key] = graph


class CallGraph:
    """A graph's stand-in off CUDA: its replay runs the step eagerly over the same static
    buffers, with the same metadata views. Nothing is faster for it; it lets the bookkeeping
    around graphs (keys, capture on a key's second step, the host state an offloaded step
    restores after a replay) run, and be tested, on the CPU."""


def _copy(dst: torch.Tensor, values: np.ndarray) -> None:
    dst.copy_(torch.from_numpy(values), non_blocking=True)
