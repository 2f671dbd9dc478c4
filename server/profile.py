"""`adrenaline profile`: measures this device with the real engine pieces and fits the load-aware
policy's cost model: decode step time against batch and context (LLMEngine), executor attention
per layer against offloaded tokens and batch (AttentionExecutor over an offload pool), prefill
time against prompt tokens, and on a CPU the decode worker's own side of offloading against
offloaded rows (server/profile_offload.py). Writes the profile JSON that `serve`/`router
--profile` read.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import replace

import torch

from attention.executor import AttentionExecutor
from attention.selector import select_backend
from engine.config import EngineConfig, ModelConfig, parse_dtype
from engine.engine import LLMEngine
from engine.model_source import resolve_model
from engine.sequence import SamplingParams
from scheduler.cost_model import CostModel, fit_cost_model, fit_linear
from server.profile_grid import GRIDS, Grid
from server.profile_offload import AnsweringExecutor, measure_offloading
from server.profile_timing import decode_step_ms, timed, typical

log = logging.getLogger(__name__)


def run_profile(args: argparse.Namespace, config: EngineConfig) -> int:
    grid = GRIDS[args.grid or ("quick" if args.quick else "full")]
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    model = profile(config, grid)
    model.save(args.output)
    print(f"wrote {args.output}: {model.to_json()}", flush=True)
    return 0


def profile(config: EngineConfig, grid: Grid) -> CostModel:
    cfg = ModelConfig.from_model_dir(resolve_model(config.model))
    limit = min(config.batch.max_model_len, cfg.max_position_embeddings) - grid.steps - 2
    grid = replace(
        grid,
        context=tuple(c for c in grid.context if c <= limit) or (limit,),
        prompts=tuple(p for p in grid.prompts if p <= limit) or (limit,),
    )
    sized = _sized(config, grid)
    answering = None
    if torch.device(config.device).type == "cpu":
        answering = AnsweringExecutor(cfg, sized.batch.max_num_seqs, config.dtype)
    engine = LLMEngine(sized, remote=answering)
    started = time.perf_counter()
    try:
        decode = measure_decode(engine, grid)
        prefill = measure_prefill(engine, grid)
        attention = measure_attention(config, cfg, grid)
        offloaded, exchange = [], []
        if answering is not None:
            per_token = fit_linear([(b, c) for b, c, _ in decode], [t for *_, t in decode])[2]
            offloaded, exchange = measure_offloading(engine, answering, grid.batches,
                                                     grid.context[0], grid.steps, per_token)  # fmt: skip
    finally:
        if answering is not None:
            answering.close()
    log.info("profiled in %.1f s", time.perf_counter() - started)
    return fit_cost_model(cfg.num_layers, decode, attention, prefill, offloaded, exchange,
                          model=config.model, device=config.device)  # fmt: skip


def _sized(config: EngineConfig, grid: Grid) -> EngineConfig:
    """Room for the largest grid point (and one longest sequence, as the engine insists), and
    whole prompts in one step."""
    bs = config.cache.block_size
    most = max(max(grid.batches) * (max(grid.context) + grid.steps + 2), max(grid.prompts))
    blocks = max(max(grid.batches) + -(-most // bs), -(-config.batch.max_model_len // bs)) + 8
    return replace(
        config,
        cache=replace(config.cache, num_blocks=blocks, enable_prefix_caching=False),
        batch=replace(
            config.batch,
            max_num_seqs=max(config.batch.max_num_seqs, max(grid.batches)),
            max_num_batched_tokens=max(config.batch.max_num_batched_tokens, most),
        ),
    )


def measure_decode(engine: LLMEngine, grid: Grid) -> list[tuple[int, int, float]]:
    """(batch, local context tokens, decode step ms) over the grid."""
    gen = torch.Generator().manual_seed(0)
    # The first point runs twice: its first run only warms up the model's kernels and buffers.
    points = [(grid.batches[0], grid.context[0])]
    points += [(b, c) for b in grid.batches for c in grid.context]
    samples = [
        _decode_point(engine, f"d{n}", b, c, grid.steps, gen) for n, (b, c) in enumerate(points)
    ]
    return samples[1:]


def _decode_point(
    engine: LLMEngine, tag: str, batch: int, context: int, steps: int, gen: torch.Generator
) -> tuple[int, int, float]:
    ms = decode_step_ms(engine, tag, batch, 0, context, steps, gen)
    # Context is the KV read per step, at the middle of the timed steps.
    return batch, batch * (context + 1 + steps // 2), ms


def measure_prefill(engine: LLMEngine, grid: Grid) -> list[tuple[int, float]]:
    """(prompt tokens, prefill step ms): whole prompts, one per step."""
    samples = []
    device, vocab = engine.runner.device, engine.model_config.vocab_size
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    gen = torch.Generator().manual_seed(1)
    for tokens in grid.prompts:
        times = []
        for rep in range(1 + max(2, grid.steps // 2)):
            prompt = torch.randint(0, vocab, (tokens,), generator=gen).tolist()
            engine.add_request(f"p{tokens}-{rep}", prompt, params)
            elapsed = timed(engine.step, device)
            engine.abort(f"p{tokens}-{rep}")
            if rep:  # the first of each size is a warm-up
                times.append(elapsed)
        samples.append((tokens, typical(times)))
    return samples


def measure_attention(
    config: EngineConfig, cfg: ModelConfig, grid: Grid
) -> list[tuple[int, int, float]]:
    """(offloaded tokens, batch, ms of one layer's attention) on an executor with one layer."""
    device, dtype = torch.device(config.device), parse_dtype(config.dtype)
    bs = config.cache.block_size
    per_request = -(-(max(grid.context) + 2) // bs)
    lent = max(grid.batches) * per_request  # the prefill worker's blocks, holding the prompts
    blocks = 2 * lent + 8
    pool = torch.zeros(
        (1, 2, blocks, bs, cfg.num_kv_heads, cfg.head_dim), dtype=dtype, device=device
    )
    backend_cls = select_backend(config.attention_backend, device, dtype, bs)
    backend = backend_cls(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.head_dim**-0.5)
    executor = AttentionExecutor(pool, backend, first_block_id=lent)
    samples = []
    for batch in grid.batches:
        for context in grid.context:
            ids = [f"a{batch}-{context}-{i}" for i in range(batch)]
            for i, request_id in enumerate(ids):
                first = i * per_request
                table = list(range(first, first + -(-context // bs)))
                executor.adopt(request_id, table, context)
            step = executor.prepare(ids, [context] * batch)
            q = torch.randn(batch, cfg.num_heads, cfg.head_dim, dtype=dtype, device=device)
            k = torch.randn(batch, cfg.num_kv_heads, cfg.head_dim, dtype=dtype, device=device)

            def attend(step=step, q=q, k=k):
                executor.attend(0, step, q, k, k)

            attend()
            times = [timed(attend, device) for _ in range(grid.steps)]
            samples.append((batch * (context + 1), batch, typical(times)))
            for request_id in ids:
                executor.release(request_id)
    return samples
