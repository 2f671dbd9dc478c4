"""`adrenaline bench --compare none,load-aware`: the same workload on the same hardware, one
fresh deployment per offload policy, printed side by side, saved as JSON and a PNG plot.

Besides the client-side figures it samples the router's /stats while the load runs, for what
the policies change inside: the decode batch size reached and the share of requests offloaded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shlex
from collections.abc import Callable
from pathlib import Path

from server.bench.client import (
    arrival_times,
    auth_headers,
    benchmark,
    build_requests,
    http_client,
    request_body,
)
from server.bench.metrics import aggregate
from server.extras import import_extra
from server.launch.serve_process import ServeProcess

ROWS = [
    ("completed", "requests completed", "{:.0f}"),
    ("request_throughput", "request throughput (req/s)", "{:.2f}"),
    ("output_throughput", "output throughput (tok/s)", "{:.1f}"),
    ("request_goodput", "goodput (req/s)", "{:.2f}"),
    ("mean_ttft_ms", "mean TTFT (ms)", "{:.1f}"),
    ("p99_ttft_ms", "p99 TTFT (ms)", "{:.1f}"),
    ("mean_tpot_ms", "mean TPOT (ms)", "{:.2f}"),
    ("p99_tpot_ms", "p99 TPOT (ms)", "{:.2f}"),
    ("max_decode_batch", "decode batch size reached", "{:.0f}"),
    ("offload_ratio", "offload ratio", "{:.2f}"),
]


def add_compare_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("compare policies")
    g.add_argument(
        "--compare",
        default=None,
        metavar="P1,P2",
        help="offload policies to compare, each on a fresh `adrenaline serve`",
    )
    g.add_argument(
        "--request-rates",
        default=None,
        metavar="R1,R2",
        help="with --compare: rates to sweep (default: --request-rate)",
    )
    g.add_argument(
        "--serve-args",
        default="--model tiny",
        help="with --compare: flags for each `adrenaline serve`",
    )
    g.add_argument(
        "--plot",
        default=None,
        metavar="FILE.png",
        help="with --compare: throughput against rate and TPOT CDF",
    )


async def _sample_stats(url: str, seen: dict, stop: asyncio.Event) -> None:
    httpx = http_client()
    async with httpx.AsyncClient(timeout=2, headers=auth_headers()) as client:
        while not stop.is_set():
            try:
                stats = (await client.get(f"{url}/stats")).json()
            except (httpx.HTTPError, ValueError):
                stats = None
            if stats:
                for w in stats["workers"].values():
                    if w["role"] == "decode":
                        seen["max_decode_batch"] = max(seen["max_decode_batch"], w["num_running"])
            await asyncio.sleep(0.2)


async def _run_load(url: str, args, bodies, prompt_lens, offsets):
    seen = {"max_decode_batch": 0}
    stop = asyncio.Event()
    sampler = asyncio.create_task(_sample_stats(url, seen, stop))
    try:
        records, duration = await benchmark(
            url + args.endpoint, bodies, prompt_lens, offsets, args.max_concurrency,
            args.timeout, sse=args.endpoint != "/generate", show_progress=False,
        )  # fmt: skip
    finally:
        stop.set()
        await sampler
    return records, duration, seen


def run_compare(args: argparse.Namespace) -> int:
    httpx = http_client()
    if args.plot:
        plot_library()  # before the runs, not after them
    policies = [p.strip() for p in args.compare.split(",") if p.strip()]
    rates = [float(r) for r in (args.request_rates or str(args.request_rate)).split(",")]
    requests = build_requests(args)
    results: dict[str, list[dict]] = {}
    for policy in policies:
        flags = ["--offload-policy", policy, "--log-level", "WARNING",
                 *shlex.split(args.serve_args)]  # fmt: skip
        server = ServeProcess(flags, startup_timeout=600.0)
        try:
            headers = auth_headers()
            model = httpx.get(f"{server.url}/v1/models", timeout=10, headers=headers).json()[
                "data"
            ][0]["id"]
            bodies = [request_body(args.endpoint, model, r, args.ignore_eos) for r in requests]
            for rate in rates:
                before = httpx.get(f"{server.url}/stats", timeout=10, headers=headers).json()[
                    "requests"
                ]
                offsets = arrival_times(len(requests), rate, args.seed)
                records, duration, seen = asyncio.run(
                    _run_load(server.url, args, bodies, [r.prompt_len for r in requests], offsets)
                )
                after = httpx.get(f"{server.url}/stats", timeout=10, headers=headers).json()[
                    "requests"
                ]
                row = aggregate(records, duration, args.slo_ttft_ms, args.slo_tpot_ms)
                done = max(1, after["finished"] - before["finished"])
                row.update(seen, offload_ratio=(after["offloaded"] - before["offloaded"]) / done,
                           request_rate=rate, policy=policy,
                           tpots_ms=[r.tpot * 1000 for r in records if r.success and r.tpot])  # fmt: skip
                results.setdefault(policy, []).append(row)
        finally:
            server.stop()
    print(format_comparison(results, rates), flush=True)
    if args.save_result:
        Path(args.save_result).write_text(json.dumps(_jsonable(results), indent=2))
    if args.plot:
        plot_comparison(results, args.plot)
    return 0


def policy_table(
    results: dict[str, list[dict]],
    i: int,
    rows: list[tuple[str, str, str]],
    cell: Callable[[dict, str], object],
) -> list[str]:
    """One rate's block of a comparison: a column per policy, a line per (key, label, format);
    cell(row, key) is the value shown ("-" for None)."""
    policies = list(results)
    lines = [f"{'':<30}" + "".join(f"{p:>16}" for p in policies)]
    for key, label, fmt in rows:
        cells = []
        for p in policies:
            value = cell(results[p][i], key)
            cells.append("-" if value is None else fmt.format(value))
        lines.append(f"{label:<30}" + "".join(f"{c:>16}" for c in cells))
    return lines


def format_comparison(results: dict[str, list[dict]], rates: list[float]) -> str:
    policies = list(results)
    lines = []
    for i, rate in enumerate(rates):
        lines.append(f"==== request rate {rate:g} req/s " + "=" * 30)
        lines += policy_table(results, i, ROWS, lambda row, key: row.get(key))
        if len(policies) == 2:
            a, b = (results[p][i]["output_throughput"] for p in policies)
            if a:
                lines.append(f"{policies[1]} / {policies[0]} output throughput: {b / a:.2f}x")
    return "\n".join(lines)


def plot_library():
    """matplotlib's pyplot, drawing to files only."""
    matplotlib = import_extra("matplotlib", "bench", "--plot")
    matplotlib.use("Agg")
    return import_extra("matplotlib.pyplot", "bench", "--plot")


def plot_comparison(results: dict[str, list[dict]], path: str) -> None:
    plt = plot_library()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for policy, rows in results.items():
        # Rates as evenly spaced categories: `inf` has no place on a numeric axis.
        left.plot(range(len(rows)), [r["output_throughput"] for r in rows], marker="o",
                  label=policy)  # fmt: skip
        left.set_xticks(range(len(rows)), [f"{r['request_rate']:g}" for r in rows])
        tpots = sorted(rows[-1]["tpots_ms"])
        if tpots:
            right.plot(tpots, [(i + 1) / len(tpots) for i in range(len(tpots))], label=policy)
    left.set(xlabel="request rate (req/s)", ylabel="output tokens/s", title="Throughput")
    right.set(xlabel="TPOT (ms)", ylabel="fraction of requests", title="TPOT CDF (last rate)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
