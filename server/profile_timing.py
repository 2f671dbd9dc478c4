"""How `adrenaline profile` times a call and a decode step, and averages its samples."""

from __future__ import annotations

import statistics
import time

import torch

from engine.engine import Handoff, LLMEngine
from engine.sequence import SamplingParams


def timed(fn, device: torch.device) -> float:
    """Milliseconds one call takes."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - started) * 1000


def typical(values: list[float]) -> float:
    """The mean, without samples over twice the median: a worker pays a step's usual spread
    (allocator, garbage collection, cache misses) on every step, so the lower end alone would
    be optimistic; a sample that long is another process's doing, which the simulator adds
    from its own count of them (--sim-cpu-competitors)."""
    median = statistics.median(values)
    kept = [v for v in values if v <= 2 * median]
    return sum(kept) / len(kept)


def decode_step_ms(
    engine: LLMEngine, tag: str, local: int, remote: int, context: int, steps: int,
    gen: torch.Generator, answering=None,
) -> float:  # fmt: skip
    """Typical ms of a decode step of `local` + `remote` requests at `context`; the remote ones
    offloaded to `answering` (server/profile_offload.py), less its executor end's time."""
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=1 << 20, temperature=0, ignore_eos=True)
    ids = [f"{tag}-{i}" for i in range(local + remote)]
    for i, request_id in enumerate(ids):
        prompt = torch.randint(0, vocab, (context,), generator=gen).tolist()
        if i < local:
            engine.add_request(request_id, prompt, params)
        else:  # as a prefill worker hands it over: the prompt's KV and one sampled token
            handoff = Handoff(prompt, prompt[-1:], None, params, 0)
            engine.start_offloaded(request_id, handoff, answering.executor)
    while any(engine.requests[i].num_computed_tokens < context for i in ids):
        engine.step()
    engine.step()  # one untimed step: allocations settle
    times = []
    for _ in range(steps):
        executor_s = answering.executor_s if answering else 0.0
        ms = timed(engine.step, engine.runner.device)
        if answering is not None:
            ms -= (answering.executor_s - executor_s) * 1000
            answering.drain()
        times.append(ms)
    for request_id in ids:
        engine.abort(request_id)
    if answering is not None:
        answering.drain()
    return typical(times)
