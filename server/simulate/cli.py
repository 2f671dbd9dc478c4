"""`adrenaline simulate`: `adrenaline bench`'s command line, answered by a simulated deployment
(`--serve-args` describes it, as for `bench --compare`) on a simulated GPU (`--gpu`) or on the
CPU an `adrenaline profile` measured (`--profile`). Prints bench's tables and writes bench's
`--save-result` JSON, plus the paper's utilisation figures per role.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from engine.config import ConfigError
from scheduler.offload_policy import PolicyError
from server.bench.cli import add_bench_flags
from server.bench.client import (
    BenchError,
    arrival_times,
    build_lengths,
    check_args,
    save_result,
)
from server.bench.compare import (
    _jsonable,
    format_comparison,
    plot_comparison,
    plot_library,
    policy_table,
)
from server.bench.datasets import DatasetError
from server.bench.metrics import format_table
from server.simulate.cluster import Workload
from server.simulate.deployment import Hardware, build, hardware, model_name, parse_serve_args
from server.simulate.hardware import GPUS, HardwareError
from server.simulate.report import bench_result, records

log = logging.getLogger(__name__)

UTILISATION_ROWS = [
    ("prefill_hbm_capacity_used", "prefill HBM capacity used", "{:.1%}"),
    ("prefill_hbm_bandwidth_used", "prefill HBM bandwidth used", "{:.1%}"),
    ("decode_compute_used", "decode compute used", "{:.1%}"),
    ("decode_batch_size", "decode batch size (mean)", "{:.1f}"),
    ("offload_ratio", "offload ratio", "{:.2f}"),
]


# Every assumption with its number (README.md, "Simulate a deployment", gives each its source).
ASSUMPTIONS = """\
assumptions (defaults; README.md, 'Simulate a deployment', gives each its source):
  GPUs        A100-80GB: 312 TFLOP/s dense bf16, 2.039 TB/s, 79.2 GiB; H100: 989 TFLOP/s,
              3.35 TB/s, 79.1 GiB; H200 = H100 compute and H100's fitted efficiencies with
              H200 memory: 4.8 TB/s, 139.8 GiB (no H200 measurements exist)
  operators   a roofline per operator over the model's shapes, efficiencies fitted to the
              per-operator A100/H100 timings of the Vidur project (microsoft/vidur, MIT);
              --profile: the CPU's linear model from `adrenaline profile` instead
  colocation  an executor limited to 20% of the SMs (--sim-sm-share) reaches 60% of HBM
              bandwidth (--sim-executor-bandwidth; the paper's A100 observation); prefill
              runs 1 / (1 - 0.2) = 1.25x slower while its executor holds requests
              (--sim-prefill-slowdown: the SMs it gives up)
  sync        per layer, decode worker <-> executor hand-over: 10 us on GPU (GPU-signalled),
              300 us on CPU (shared-memory channel beside the server's other processes,
              fitted to the real decode worker's layer wait) (--sim-sync-us)
  host        GPU step: 0.3 ms + 6 us a row not hidden (--sim-step-overhead-ms); a control
              message 0.1 ms (--sim-hop-ms); HTTP 0.5 ms each way (--sim-http-ms)
  CPU         with --profile every role shares the cores (--sim-cpu-cores, less
              --sim-cpu-background, or fairly with --sim-cpu-competitors runnable processes
              of other jobs); router 200 us and client 140 us a token, 2.7 ms and 1.7 ms a
              request; decode attention padded to the longest row (the torch backend); an
              executor polling between layers is runnable, but yields to a prefill step
  pools       --gpu-memory-utilization x HBM less weights and activations; the executor's
              share (--offload-memory-fraction) comes out of its prefill worker's pool
  workloads   no prefix-cache hits, no EOS: a request ends at max_tokens or max_model_len
"""


def add_simulate_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "simulate",
        help="bench's experiment on a simulated deployment (GPU or profiled CPU)",
        description="adrenaline bench's experiment, answered by a simulated deployment:\n"
        "replace `bench` by `simulate` in a command line; the hardware is --gpu or --profile.",
        epilog=ASSUMPTIONS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_bench_flags(p)
    for action in p._actions:  # the same flags; two of them mean what a simulation needs
        if action.dest == "model":
            action.help = "a preset or an HF config.json (default: --serve-args' --model)"
        elif action.dest == "url":
            action.help = "unused: nothing is sent (kept so a bench command line works as is)"
    g = p.add_argument_group("simulated hardware (assumptions: README, 'adrenaline simulate')")
    where = g.add_mutually_exclusive_group()
    where.add_argument(
        "--gpu",
        choices=sorted(GPUS),
        default=None,
        help="one GPU per worker, rooflines fitted to Vidur's A100/H100 timings",
    )
    where.add_argument(
        "--profile",
        default=None,
        metavar="FILE",
        help="the CPU `adrenaline profile` measured (default: the built-in one)",
    )
    g.add_argument(
        "--sim-hop-ms",
        type=float,
        default=0.1,
        help="one control message between processes (ZeroMQ)",
    )
    g.add_argument(
        "--sim-http-ms",
        type=float,
        default=0.5,
        help="client to router, and each streamed chunk back",
    )
    g.add_argument(
        "--sim-sm-share", type=float, default=0.2, help="GPU: SMs an executor may use (paper: 20%%)"
    )
    g.add_argument(
        "--sim-executor-bandwidth",
        type=float,
        default=0.6,
        help="GPU: HBM bandwidth an executor reaches at that share (paper: 60%% at 20%%)",
    )
    g.add_argument(
        "--sim-prefill-slowdown",
        type=float,
        default=None,
        help="GPU: prefill time multiplier while its executor holds requests "
        "(default 1 / (1 - SM share))",
    )
    g.add_argument(
        "--sim-sync-us",
        type=float,
        default=None,
        help="per layer, the decode-executor hand-over (default: GPU 10, CPU 300)",
    )
    g.add_argument(
        "--sim-step-overhead-ms",
        type=float,
        default=None,
        help="GPU: host time per step not hidden by the device (default 0.3 + 0.006 per row)",
    )
    c = p.add_argument_group("simulated CPU (with --profile: every role shares the cores)")
    c.add_argument(
        "--sim-cpu-cores",
        type=float,
        default=None,
        help="cores the deployment's processes share (default: this machine's)",
    )
    c.add_argument(
        "--sim-cpu-background",
        type=float,
        default=0.0,
        help="cores other jobs on the machine use meanwhile (sim_vs_real measures it)",
    )
    c.add_argument(
        "--sim-cpu-competitors",
        type=float,
        default=0.0,
        help="or: runnable processes other jobs keep meanwhile, sharing every core fairly "
        "with the deployment's (sim_vs_real measures it; replaces --sim-cpu-background)",
    )
    # Measured here (benchmarks/README.md, sim_vs_real): CPU seconds per output token of the
    # router and the bench client processes over a run of the tiny model.
    c.add_argument(
        "--sim-router-token-us", type=float, default=200.0, help="router CPU per streamed token"
    )
    c.add_argument(
        "--sim-client-token-us",
        type=float,
        default=140.0,
        help="benchmark client CPU per streamed token",
    )
    # Per request (its CPU time over 60 sequential one-token requests of the tiny model, less
    # that token): the router's HTTP handling, checks and messages; the client's request.
    c.add_argument(
        "--sim-router-request-ms", type=float, default=2.7, help="router CPU per HTTP request"
    )
    c.add_argument(
        "--sim-client-request-ms",
        type=float,
        default=1.7,
        help="benchmark client CPU per HTTP request, spent building and sending it",
    )
    g.add_argument("--sim-check-books", action="store_true", help=argparse.SUPPRESS)
    return p


def run_simulate(args: argparse.Namespace) -> int:
    try:
        check_args(args)
        prompt_lens, output_lens = build_lengths(args)
        serve = parse_serve_args(args.serve_args)
        hw = hardware(args, serve)
    except (BenchError, DatasetError, HardwareError, ConfigError, PolicyError) as exc:
        print(f"adrenaline simulate: error: {exc}", file=sys.stderr)
        return 2
    workload = Workload(prompt_lens, output_lens, [], args.max_concurrency)
    try:
        if args.compare:
            return _compare(args, hw, workload)
        return _single(args, serve, hw, workload)
    except (HardwareError, ConfigError, PolicyError) as exc:
        print(f"adrenaline simulate: error: {exc}", file=sys.stderr)
        return 2


def _with_offsets(workload: Workload, rate: float, seed: int) -> Workload:
    offsets = arrival_times(len(workload.prompt_lens), rate, seed)
    return Workload(workload.prompt_lens, workload.output_lens, offsets, workload.max_concurrency)


def simulate_rate(sim, hw: Hardware, workload: Workload, rate: float, args) -> dict:
    started = time.perf_counter()
    reqs = sim.run(_with_offsets(workload, rate, args.seed))
    wall = time.perf_counter() - started
    row = bench_result(sim, reqs, sim.client.duration, args.slo_ttft_ms, args.slo_tpot_ms)
    utilisation = sim.meter.utilisation(sim, hw.device)
    log.info("simulated %d requests at %g req/s in %.1f s wall (%d events)", len(reqs), rate,
             wall, sim.loop.events)  # fmt: skip
    row.update(
        max_decode_batch=sim.meter.max_decode_batch,
        offload_ratio=utilisation["offload_ratio"],
        request_rate=rate,
        tpots_ms=[r.tpot * 1000 for r in records(reqs) if r.success and r.tpot],
        simulated={**utilisation, "hardware": hw.description, "wall_s": round(wall, 2)},
    )
    row["_requests"] = reqs
    return row


def _single(args, serve, hw: Hardware, workload: Workload) -> int:
    sim, _ = build(args, serve, hw)
    row = simulate_rate(sim, hw, workload, args.request_rate, args)
    reqs = row.pop("_requests")
    print(format_table(row, args.request_rate, args.max_concurrency), flush=True)
    print(format_utilisation({"simulated": [row]}, [args.request_rate]), flush=True)
    if args.save_result:
        result = {k: v for k, v in row.items() if k not in ("tpots_ms",)}
        save_result(args.save_result, args, model_name(args, serve), result, records(reqs))
        if not sim.config.keep_itls:
            _note_itls_omitted(args.save_result)
    return 0 if row["completed"] else 1


def _compare(args, hw: Hardware, workload: Workload) -> int:
    if args.plot:
        plot_library()  # before the runs, not after them
    policies = [p.strip() for p in args.compare.split(",") if p.strip()]
    rates = [float(r) for r in (args.request_rates or str(args.request_rate)).split(",")]
    results: dict[str, list[dict]] = {}
    for policy in policies:
        serve = parse_serve_args(args.serve_args, policy)
        sim, _ = build(args, serve, hw)  # a fresh deployment per policy, rates in turn on it
        for rate in rates:
            row = simulate_rate(sim, hw, workload, rate, args)
            row.pop("_requests")
            row["policy"] = policy
            results.setdefault(policy, []).append(row)
    print(format_comparison(results, rates), flush=True)
    print(format_utilisation(results, rates), flush=True)
    if args.save_result:
        Path(args.save_result).write_text(json.dumps(_jsonable(results), indent=2))
    if args.plot:
        plot_comparison(results, args.plot)
    return 0


def format_utilisation(results: dict[str, list[dict]], rates: list[float]) -> str:
    """The paper's figures per policy (simulated), one block per rate."""
    names = list(results)
    lines = []
    for i, rate in enumerate(rates):
        lines.append(f"---- simulated utilisation, {rate:g} req/s " + "-" * 24)
        lines += policy_table(
            results, i, UTILISATION_ROWS, lambda row, key: row["simulated"].get(key)
        )
    hardware = results[names[0]][0]["simulated"]["hardware"]
    lines.append(f"(simulated on {hardware})")
    return "\n".join(lines)


def _note_itls_omitted(path: str) -> None:
    """Large runs keep no per-request gaps (ITL statistics count every gap regardless)."""
    data = json.loads(Path(path).read_text())
    data["itls_omitted"] = True
    Path(path).write_text(json.dumps(data, indent=2))
