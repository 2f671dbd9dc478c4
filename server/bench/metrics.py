"""What `adrenaline bench` reports: one `RequestRecord` per request, aggregated into throughput,
TTFT/TPOT/ITL/E2EL percentiles and goodput, printed as vLLM's table or saved per request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

LATENCIES = (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2EL"))
SECTIONS = {
    "ttft": "Time to First Token",
    "tpot": "Time per Output Token (excl. 1st token)",
    "itl": "Inter-token Latency",
    "e2el": "End-to-end Latency",
}
PERCENTILES = (("median", 50), ("p90", 90), ("p99", 99))
STAT_LABELS = {"mean": "Mean", "median": "Median", "p90": "P90", "p99": "P99"}


@dataclass
class RequestRecord:
    """One request as the client saw it; times in seconds."""

    prompt_len: int
    success: bool = False
    error: str = ""
    output_tokens: int = 0
    ttft: float = 0.0  # send -> first content chunk
    itl: list[float] = field(default_factory=list)  # gaps between content chunks
    e2el: float = 0.0  # send -> end of stream

    @property
    def tpot(self) -> float:
        """Mean time per output token after the first; 0 for a single token (as vLLM)."""
        if self.output_tokens <= 1:
            return 0.0
        return (self.e2el - self.ttft) / (self.output_tokens - 1)


def summarize(values_s: list[float]) -> dict[str, float]:
    """Mean and percentiles in ms (numpy's linear interpolation, as vLLM)."""
    if not values_s:
        return {"mean": 0.0, **{name: 0.0 for name, _ in PERCENTILES}}
    ms = np.asarray(values_s) * 1000.0
    stats = {"mean": float(ms.mean())}
    stats.update({name: float(np.percentile(ms, q)) for name, q in PERCENTILES})
    return stats


def meets_slo(rec: RequestRecord, slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> bool:
    ttft_ok = slo_ttft_ms is None or rec.ttft * 1000.0 <= slo_ttft_ms
    tpot_ok = slo_tpot_ms is None or rec.tpot * 1000.0 <= slo_tpot_ms
    return ttft_ok and tpot_ok


def aggregate(
    records: list[RequestRecord],
    duration: float,
    slo_ttft_ms: float | None = None,
    slo_tpot_ms: float | None = None,
) -> dict:
    ok = [r for r in records if r.success]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    result: dict = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration,
        "request_goodput": None,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
    }
    if slo_ttft_ms is not None or slo_tpot_ms is not None:
        good = sum(meets_slo(r, slo_ttft_ms, slo_tpot_ms) for r in ok)
        result["request_goodput"] = good / duration
    series = {
        "ttft": [r.ttft for r in ok],
        "tpot": [r.tpot for r in ok if r.output_tokens > 1],
        "itl": [gap for r in ok for gap in r.itl],
        "e2el": [r.e2el for r in ok],
    }
    for key, values in series.items():
        for stat, value in summarize(values).items():
            result[f"{stat}_{key}_ms"] = value
    return result


def per_request_arrays(records: list[RequestRecord]) -> dict[str, list]:
    return {
        "input_lens": [r.prompt_len for r in records],
        "output_lens": [r.output_tokens for r in records],
        "successes": [r.success for r in records],
        "ttfts": [r.ttft for r in records],
        "tpots": [r.tpot for r in records],
        "itls": [r.itl for r in records],
        "e2els": [r.e2el for r in records],
        "errors": [r.error for r in records],
    }


def format_table(result: dict, request_rate: float, max_concurrency: int | None) -> str:
    def row(label: str, value) -> str:
        text = f"{value:.2f}" if isinstance(value, float) else str(value)
        return f"{label:<40} {text:<10}"

    lines = [
        "{:=^50}".format(" Serving Benchmark Result "),
        row("Successful requests:", result["completed"]),
        row("Failed requests:", result["failed"]),
        row("Maximum request concurrency:", max_concurrency),
        row("Request rate configured (RPS):", request_rate),
        row("Benchmark duration (s):", result["duration"]),
        row("Total input tokens:", result["total_input_tokens"]),
        row("Total generated tokens:", result["total_output_tokens"]),
        row("Request throughput (req/s):", result["request_throughput"]),
    ]
    if result["request_goodput"] is not None:
        lines.append(row("Request goodput (req/s):", result["request_goodput"]))
    lines += [
        row("Output token throughput (tok/s):", result["output_throughput"]),
        row("Total Token throughput (tok/s):", result["total_token_throughput"]),
    ]
    for key, name in LATENCIES:
        lines.append(f"{SECTIONS[key]:-^50}")
        for stat, label in STAT_LABELS.items():
            lines.append(row(f"{label} {name} (ms):", result[f"{stat}_{key}_ms"]))
    lines.append("=" * 50)
    return "\n".join(lines)
