"""The side-by-side report of `adrenaline bench --compare`: table rows per policy and rate, the
throughput ratio, and the PNG plot (inf plotted as a category)."""

from __future__ import annotations

import math

from server.bench.compare import format_comparison, plot_comparison


def row(policy: str, rate: float, throughput: float) -> dict:
    return {
        "policy": policy, "request_rate": rate, "completed": 10, "request_throughput": 2.0,
        "output_throughput": throughput, "request_goodput": None, "mean_ttft_ms": 12.5,
        "p99_ttft_ms": 30.0, "mean_tpot_ms": 4.0, "p99_tpot_ms": 9.0, "max_decode_batch": 7,
        "offload_ratio": 0.5 if policy != "none" else 0.0, "tpots_ms": [3.0, 4.0, 5.0],
    }  # fmt: skip


def test_table_puts_policies_side_by_side_with_the_ratio(tmp_path):
    results = {
        "none": [row("none", 5.0, 100.0), row("none", math.inf, 200.0)],
        "load-aware": [row("load-aware", 5.0, 110.0), row("load-aware", math.inf, 300.0)],
    }
    table = format_comparison(results, [5.0, math.inf])
    assert "request rate 5 req/s" in table and "request rate inf req/s" in table
    assert "load-aware / none output throughput: 1.10x" in table
    assert "load-aware / none output throughput: 1.50x" in table
    batch_line = next(line for line in table.splitlines() if "decode batch size" in line)
    assert batch_line.split()[-2:] == ["7", "7"]
    plot = tmp_path / "compare.png"
    plot_comparison(results, str(plot))
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
