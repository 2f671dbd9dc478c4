"""What a simulated run reports: `adrenaline bench`'s figures from the requests' timestamps
(server.bench.metrics, unchanged), and the paper's utilisation figures per role metered from
each step: prefill HBM capacity and bandwidth used, decode compute used (decoding, not the
prompts a decode worker recomputes), decode batch size.
"""

from __future__ import annotations

from array import array

import numpy as np

from server.bench.metrics import PERCENTILES, RequestRecord, aggregate
from server.simulate.hardware import GPU


class Meter:
    """Sums over one run's window (begin .. end) of what the workers' steps did."""

    def __init__(self) -> None:
        self.begin_at = self.end_at = 0.0
        self._reset()

    def _reset(self) -> None:
        self.prefill_bytes = self.prefill_flops = self.prefill_busy_s = 0.0
        self.executor_bytes = 0.0
        self.decode_flops = self.decode_bytes = self.decode_busy_s = 0.0
        self.decode_recompute_flops = 0.0
        self.decode_row_seconds = 0.0
        self.decode_steps = 0
        self.max_decode_batch = 0
        self.prefill_used_blocks: list[int] = []  # sampled at each prefill heartbeat
        self.decode_used_blocks: list[int] = []

    def begin(self, sim) -> None:
        self._reset()
        self.begin_at = sim.loop.now
        sim.token_gaps.clear()
        self.offloaded_before = sim.router.counters.offloaded
        self.finished_before = sim.router.counters.finished

    def end(self, sim) -> None:
        self.end_at = sim.loop.now
        self.offloaded = sim.router.counters.offloaded - self.offloaded_before
        self.finished = sim.router.counters.finished - self.finished_before

    def prefill_step(self, worker, t, ms: float) -> None:
        self.prefill_bytes += t.bytes
        self.prefill_flops += t.flops
        self.prefill_busy_s += ms / 1000

    def executor_step(self, executor, kv_bytes: float) -> None:
        self.executor_bytes += kv_bytes

    def decode_step(self, worker, t, rows: int, seconds: float) -> None:
        # Prompts a decode worker prefills again (preempted for KV room, or reclaimed from an
        # executor) are kept apart: the paper's decode compute is that of decoding.
        self.decode_flops += t.flops - t.prefill_flops
        self.decode_recompute_flops += t.prefill_flops
        self.decode_bytes += t.bytes
        self.decode_busy_s += seconds
        self.decode_row_seconds += rows * seconds
        self.decode_steps += 1

    def decode_run_steps(self, flops: float, nbytes: float, rows: int, seconds: list[float]):
        """decode_step for a run of steps (server/simulate/decode_run.py), their sums given."""
        self.decode_flops += flops
        self.decode_bytes += nbytes
        for s in seconds:
            self.decode_busy_s += s
            self.decode_row_seconds += rows * s
        self.decode_steps += len(seconds)

    def heartbeat(self, sim, process, stats) -> None:
        if process.role == "decode":
            self.max_decode_batch = max(self.max_decode_batch, stats.num_running)
            self.decode_used_blocks.append(stats.num_blocks - stats.num_free_blocks)
        elif process.role == "prefill":
            used = stats.num_blocks - stats.num_free_blocks
            if process.executor is not None:
                ex = process.executor.blocks
                used += ex.num_blocks - ex.num_free_blocks
            self.prefill_used_blocks.append(used)

    def utilisation(self, sim, device: GPU | None) -> dict:
        """The paper's four figures (fractions of the device), the offload ratio, and the
        absolute rates behind them."""
        cfg = sim.config
        duration = max(self.end_at - self.begin_at, 1e-9)
        weights = sim.shape.weight_bytes
        prefill_kv = float(np.mean(self.prefill_used_blocks or [0])) * sim.block_bytes
        decode_kv = float(np.mean(self.decode_used_blocks or [0])) * sim.block_bytes
        prefill_bw = (self.prefill_bytes + self.executor_bytes) / duration / cfg.num_prefill
        decode_flops = self.decode_flops / duration / cfg.num_decode
        out = {
            "prefill_hbm_capacity_used": None,
            "prefill_hbm_bandwidth_used": None,
            "decode_compute_used": None,
            "decode_batch_size": self.decode_row_seconds / self.decode_busy_s
            if self.decode_busy_s
            else 0.0,
            "offload_ratio": self.offloaded / max(1, self.finished),
            "prefill_kv_bytes": prefill_kv,
            "decode_kv_bytes": decode_kv,
            "prefill_bandwidth_bytes_per_s": prefill_bw,
            "decode_flops_per_s": decode_flops,
            "decode_recompute_flops_per_s": self.decode_recompute_flops / duration / cfg.num_decode,
            "prefill_busy": self.prefill_busy_s / duration / cfg.num_prefill,
            "decode_busy": self.decode_busy_s / duration / cfg.num_decode,
        }
        if device is not None:
            out["prefill_hbm_capacity_used"] = (weights + prefill_kv) / device.hbm_bytes
            out["prefill_hbm_bandwidth_used"] = prefill_bw / device.hbm_bandwidth
            out["decode_compute_used"] = decode_flops / device.peak_flops
        return out


def records(requests) -> list[RequestRecord]:
    out = []
    for r in requests:
        ok = not r.error
        out.append(
            RequestRecord(
                prompt_len=r.prompt_tokens,
                success=ok,
                error=r.error,
                output_tokens=r.output_tokens if ok else 0,
                ttft=r.ttft if ok else 0.0,
                itl=list(r.itl or []),
                e2el=r.e2el if ok else 0.0,
            )  # fmt: skip
        )
    return out


class TokenGaps:
    """Every streamed token's gap since its request's previous token, in seconds: (gap, count)
    pairs as the steps give them, counted once at the end. Millions in a large run: appending
    to two arrays costs a fraction of keeping a dict of them current."""

    def __init__(self) -> None:
        self.gaps, self.counts = array("d"), array("d")

    def clear(self) -> None:
        del self.gaps[:], self.counts[:]

    def add(self, gap: float) -> None:
        self.gaps.append(gap)
        self.counts.append(1)

    def add_each(self, gaps: list[float], count: int) -> None:
        """Each of `gaps`, `count` times."""
        self.gaps.extend(gaps)
        self.counts.extend(array("d", (count,)) * len(gaps))

    def distinct(self) -> tuple[np.ndarray, np.ndarray]:
        """The distinct gaps, ascending, and how many tokens had each."""
        values, inverse = np.unique(np.frombuffer(self.gaps), return_inverse=True)
        return values, np.bincount(inverse, weights=np.frombuffer(self.counts))

    def as_dict(self) -> dict[float, int]:
        return {v: int(c) for v, c in zip(*(a.tolist() for a in self.distinct()))}

    def summary(self) -> dict[str, float]:
        return weighted_summary(*self.distinct())


def weighted_summary(gaps: np.ndarray, weights: np.ndarray) -> dict[str, float]:
    """server.bench.metrics.summarize over a multiset of seconds, distinct `gaps` in ascending
    order with their counts, exactly as numpy's linear-interpolated percentiles over the
    expanded list."""
    if not len(gaps):
        return {"mean": 0.0, **{name: 0.0 for name, _ in PERCENTILES}}
    values = gaps * 1000.0
    cumulative = np.cumsum(weights)
    total = cumulative[-1]

    def at(index: float) -> float:  # the index-th value of the expanded, sorted list
        return float(values[np.searchsorted(cumulative, index, side="right")])

    stats = {"mean": float((values * weights).sum() / total)}
    for name, q in PERCENTILES:
        position = q / 100 * (total - 1)
        lo, hi = np.floor(position), np.ceil(position)
        low, high = at(lo), at(hi)
        stats[name] = low + (high - low) * (position - lo)
    return stats


def bench_result(sim, requests, duration: float, slo_ttft_ms, slo_tpot_ms) -> dict:
    """`adrenaline bench`'s aggregate; ITL from every token's gap (counted, not listed)."""
    recs = records(requests)
    result = aggregate(recs, duration, slo_ttft_ms, slo_tpot_ms)
    for stat, value in sim.token_gaps.summary().items():
        result[f"{stat}_itl_ms"] = value
    return result
