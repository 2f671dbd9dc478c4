"""How many KV blocks a worker's pool gets: the budget arithmetic (pure, tested on CPU) and, on
CUDA, the profiling pass that measures the largest step's activation peak before the pool is
allocated, as vLLM does (issue 11, defect 13).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.config import ModelConfig


def kv_block_bytes(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim
    return per_token * block_size * torch.empty((), dtype=dtype).element_size()


def kv_pool_budget(
    total_bytes: int,
    in_use_bytes: int,
    utilization: float,
    activation_peak_bytes: int,
    graph_pool_bytes: int = 0,
) -> int:
    """Bytes the KV pool may take: this worker's share of the device (total * utilization),
    less what was in use before the pool (weights, the CUDA context, other processes on the
    device), less the activation peak of the largest step and what CUDA graphs keep."""
    share = int(total_bytes * utilization)
    return share - in_use_bytes - activation_peak_bytes - graph_pool_bytes


def num_kv_blocks(budget_bytes: int, block_bytes: int, device: torch.device) -> int:
    num_blocks = max(budget_bytes, 0) // block_bytes
    if num_blocks < 1:
        raise MemoryError(
            f"no memory left for the KV cache on {device} ({block_bytes} bytes a block, "
            f"{budget_bytes} bytes of budget); raise --gpu-memory-utilization, lower "
            "--max-num-batched-tokens or --max-num-seqs, or pick a smaller model"
        )
    return num_blocks


def peak_bytes(run: Callable[[], object], device: torch.device) -> int:
    """CUDA memory `run` allocated at its peak above what was allocated before it; the
    allocator's cache is emptied afterwards so that the pool can take that memory."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    torch.cuda.empty_cache()
    return peak
