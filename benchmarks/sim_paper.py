"""The paper's evaluation projected with `adrenaline simulate` (simulated, not measured): Llama-2
7B and 13B, one prefill and one decode instance, ShareGPT-like and reasoning workloads, `none`
(PD disaggregation) against `load-aware` and static offload ratios, each at capacity (a closed
loop that keeps a queue waiting) and, on A100-80GB, over Poisson rates past saturation; then
H100 and H200. Then 64 GPUs: the prefill:decode split with the highest throughput for each
policy, and one timed run of 100,000 requests on the best split.

    .venv/bin/python benchmarks/sim_paper.py [--quick] [--output results/sim_paper.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from server.bench.client import build_lengths
from server.cli import build_parser
from server.simulate.cli import simulate_rate
from server.simulate.cluster import Workload
from server.simulate.deployment import build, hardware, parse_serve_args

# vLLM's defaults where ours differ (the paper's baseline is vLLM): 256 sequences a batch, 90%
# of HBM; and no admission bound in the way of a saturating load.
SERVE = ("--max-num-seqs 256 --max-num-batched-tokens 4096 --max-model-len 4096 "
         "--gpu-memory-utilization 0.9 --max-pending 1000000")  # fmt: skip
WORKLOADS = {
    "sharegpt": ["--dataset", "synthetic", "--max-input-len", "2048", "--max-output-len", "2048"],
    "reasoning": ["--dataset", "reasoning", "--max-input-len", "1024", "--max-output-len", "3072"],
}
PAPER = {  # the paper's figures, load-aware (Adrenaline) over vLLM PD disaggregation
    ("llama-2-7b", "sharegpt"): "1.47x",
    ("llama-2-13b", "sharegpt"): "1.63x",
    ("llama-2-7b", "reasoning"): "1.60-1.66x",
    ("llama-2-13b", "reasoning"): "1.57-1.68x",
}
SWEEP = (0.5, 1.0, 1.5)  # Poisson rates as multiples of the baseline's capacity (A100)
POLICIES = ("none", "load-aware", "ratio:0.3", "ratio:0.5", "ratio:0.7")
SATURATING = 512  # requests in flight in the closed loop that measures capacity
UTILISATION = ("prefill_hbm_capacity_used", "prefill_hbm_bandwidth_used", "decode_compute_used",
               "decode_batch_size")  # fmt: skip


def args_for(model: str, gpu: str, workload: str, n: int, extra: list[str] = ()):
    return build_parser().parse_args([
        "simulate", "--gpu", gpu, "--num-prompts", str(n), *WORKLOADS[workload],
        "--serve-args", f"--model {model} {SERVE} {' '.join(extra)}", "--disable-tqdm",
    ])  # fmt: skip


def run(args, policy: str, rates: list[float], concurrency: int | None = None) -> list[dict]:
    serve = parse_serve_args(args.serve_args, policy)
    hw = hardware(args, serve)
    sim, _ = build(args, serve, hw)
    workload = Workload(*build_lengths(args), [], concurrency)
    rows = []
    for rate in rates:
        row = simulate_rate(sim, hw, workload, rate, args)
        row.pop("_requests"), row.pop("tpots_ms")
        rows.append(row)
    return rows


def saturated(args, policy: str) -> dict:
    """Throughput with a queue always waiting (a closed loop of SATURATING requests)."""
    return run(args, policy, [float("inf")], concurrency=SATURATING)[0]


def paper_setting(gpu: str, model: str, workload: str, n: dict[str, int], sweep: bool) -> dict:
    args = args_for(model, gpu, workload, n[workload])
    at_capacity = {p: saturated(args, p) for p in POLICIES}
    row = summarise(gpu, model, workload, at_capacity)
    if sweep:
        capacity = at_capacity["none"]["request_throughput"]
        rates = [round(f * capacity, 2) for f in SWEEP]
        row["sweep"] = {p: [_brief(r) for r in run(args, p, rates)]
                        for p in ("none", "load-aware")}  # fmt: skip
    print_settings([row])
    return row


def _brief(r: dict) -> dict:
    keys = ("request_rate", "output_throughput", "median_ttft_ms", "median_tpot_ms",
            "p99_tpot_ms")  # fmt: skip
    return {k: r[k] for k in keys} | {"offload_ratio": r["simulated"]["offload_ratio"]}


def summarise(gpu, model, workload, at_capacity: dict[str, dict]) -> dict:
    base = at_capacity["none"]
    ratio = {p: r["output_throughput"] / base["output_throughput"] for p, r in at_capacity.items()}
    u_none, u_la = base["simulated"], at_capacity["load-aware"]["simulated"]
    return {
        "gpu": gpu, "model": model, "workload": workload,
        "throughput": {p: r["output_throughput"] for p, r in at_capacity.items()},
        "throughput_ratio": ratio,
        "utilisation_ratio": {k: u_la[k] / u_none[k] if u_none[k] else None for k in UTILISATION},
        "utilisation": {p: r["simulated"] for p, r in at_capacity.items()},
        "offload_ratio": u_la["offload_ratio"],
        "paper": PAPER.get((model, workload)) if gpu == "a100-80g" else None,
    }  # fmt: skip


def split_search(gpu: str, model: str, n: dict[str, int], splits: list[int]) -> dict:
    """64 GPUs, prefill:decode = P:(64-P); a closed loop keeps every split saturated. An
    executor serves one decode step at a time (attention/executor_worker.py), so offloading
    across many decode workers queues them on the executors: fewer requests suffice there."""
    found = {}
    for policy in ("none", "load-aware"):
        results = []
        for p in splits:
            args = args_for(model, gpu, "sharegpt", n[policy],
                            ["--num-prefill", str(p), "--num-decode", str(64 - p)])  # fmt: skip
            row = run(args, policy, [float("inf")], concurrency=SATURATING * 32)[0]
            results.append({"prefill": p, "decode": 64 - p,
                            "output_throughput": row["output_throughput"],
                            "request_throughput": row["request_throughput"],
                            "offload_ratio": row["simulated"]["offload_ratio"],
                            "wall_s": row["simulated"]["wall_s"]})  # fmt: skip
        best = max(results, key=lambda r: r["output_throughput"])
        found[policy] = {"best": best, "splits": results}
    return found


def timed_run(gpu: str, model: str, policy: str, split: dict, rate: float, n: int) -> dict:
    """The simulator's own speed: `n` requests over 64 GPUs, wall-clock seconds here."""
    args = args_for(model, gpu, "sharegpt", n, ["--num-prefill", str(split["prefill"]),
                                                "--num-decode", str(split["decode"])])  # fmt: skip
    started = time.perf_counter()
    row = run(args, policy, [rate])[0]
    return {"requests": n, "gpus": 64, "policy": policy,
            "split": f"{split['prefill']}:{split['decode']}", "rate": rate,
            "completed": row["completed"], "output_tokens": row["total_output_tokens"],
            "output_throughput": row["output_throughput"],
            "wall_s": round(time.perf_counter() - started, 1),
            "simulated_s": round(row["duration"], 1)}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    p.add_argument("--skip-64", action="store_true", help="only the 1P1D settings")
    p.add_argument("--output", default="results/sim_paper.json")
    p.add_argument(
        "--split-requests",
        default=None,
        metavar="NONE,LOAD_AWARE",
        help="requests per 64-GPU split, per policy (default 20000,3000)",
    )
    p.add_argument("--timed-requests", type=int, default=None, help="default 100000")
    args = p.parse_args()
    n = {"sharegpt": 400, "reasoning": 150} if args.quick else {"sharegpt": 3000, "reasoning": 800}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Each result is saved as it comes; a run that was stopped picks up where it was.
    report: dict = json.loads(out.read_text()) if out.is_file() and not args.quick else {}
    report.update(serve_args=SERVE, simulated=True)
    done = {(s["gpu"], s["model"], s["workload"]) for s in report.setdefault("settings", [])}
    for gpu in ("a100-80g", "h100", "h200"):
        for model in ("llama-2-7b", "llama-2-13b"):
            for workload in WORKLOADS:
                if (gpu, model, workload) not in done:
                    row = paper_setting(gpu, model, workload, n, sweep=gpu == "a100-80g")
                    report["settings"].append(row)
                    out.write_text(json.dumps(report, indent=2))
    if not args.skip_64 and "timed_run" not in report:
        splits = [8, 16, 24, 32] if args.quick else [8, 16, 24, 32, 40]
        sizes = (
            {"none": 3000, "load-aware": 1000}
            if args.quick
            else {"none": 20000, "load-aware": 3000}
        )
        if args.split_requests:
            sizes = dict(zip(("none", "load-aware"), map(int, args.split_requests.split(","))))
        if "split_search" not in report:
            report["split_search"] = split_search("a100-80g", "llama-2-13b", sizes, splits)
            out.write_text(json.dumps(report, indent=2))
        best = report["split_search"]["none"]["best"]
        rate = round(0.9 * best["request_throughput"], 1)
        timed = args.timed_requests or (10000 if args.quick else 100000)
        report["timed_run"] = timed_run("a100-80g", "llama-2-13b", "none", best, rate, timed)
        print(json.dumps({k: report[k] for k in ("split_search", "timed_run")}, indent=2))
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


def print_settings(settings: list[dict]) -> None:  # one line each, as they finish
    others = [p for p in POLICIES if p not in ("none", "load-aware")]
    print(
        f"{'gpu':<10}{'model':<13}{'workload':<11}{'none tok/s':>11}{'load-aware':>11}"
        + "".join(f"{p:>10}" for p in others)
        + f"{'paper':>12}"
        + "".join(f"{k:>8}" for k in ("P-cap", "P-bw", "D-comp", "D-batch", "offload"))
    )
    for s in settings:
        r, u = s["throughput_ratio"], s["utilisation_ratio"]
        cells = [f"{u[k]:.2f}x" if u[k] else "-" for k in UTILISATION]
        print(f"{s['gpu']:<10}{s['model']:<13}{s['workload']:<11}"
              f"{s['throughput']['none']:>11.0f}{r['load-aware']:>10.2f}x"
              + "".join(f"{r[p]:>9.2f}x" for p in others) + f"{s['paper'] or '':>12}"
              + "".join(f"{c:>8}" for c in cells) + f"{s['offload_ratio']:>8.2f}",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
