"""The paper's evaluation projected with `adrenaline simulate` (simulated, not measured): Llama-2
7B and 13B, one prefill and one decode instance, ShareGPT-like and reasoning workloads, `none`
(PD disaggregation) against `load-aware`, rates swept past saturation; on A100-80GB, then H100
and H200. Then 64 GPUs: the prefill:decode split with the highest throughput for each policy,
and one timed run of 100,000 requests on the best split.

    .venv/bin/python benchmarks/sim_paper.py [--quick] [--output results/sim_paper.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from server.bench import build_requests
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
SWEEP = (0.5, 0.75, 1.0, 1.25, 1.5)  # rates as multiples of the baseline's capacity
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
    requests = build_requests(args)
    workload = Workload([r.prompt_len for r in requests], [r.output_len for r in requests], [],
                        concurrency)  # fmt: skip
    rows = []
    for rate in rates:
        row = simulate_rate(sim, hw, workload, rate, args)
        row.pop("_requests"), row.pop("tpots_ms")
        rows.append(row)
    return rows


def capacity(args) -> float:
    """The baseline's request throughput with a queue always waiting (closed loop)."""
    return run(args, "none", [float("inf")], concurrency=1024)[0]["request_throughput"]


def paper_setting(gpu: str, n: dict[str, int]) -> list[dict]:
    out = []
    for model in ("llama-2-7b", "llama-2-13b"):
        for workload in WORKLOADS:
            args = args_for(model, gpu, workload, n[workload])
            rates = [round(f * capacity(args), 2) for f in SWEEP]
            rows = {p: run(args, p, rates) for p in ("none", "load-aware")}
            out.append(summarise(gpu, model, workload, rates, rows))
    return out


def summarise(gpu, model, workload, rates, rows) -> dict:
    best = {p: max(r["output_throughput"] for r in rs) for p, rs in rows.items()}
    top = {p: rs[-1]["simulated"] for p, rs in rows.items()}  # the most saturated rate
    ratios = {k: top["load-aware"][k] / top["none"][k] if top["none"][k] else None
              for k in UTILISATION}  # fmt: skip
    return {
        "gpu": gpu, "model": model, "workload": workload, "rates": rates,
        "throughput": best, "throughput_ratio": best["load-aware"] / best["none"],
        "utilisation_ratio": ratios, "utilisation": top,
        "offload_ratio": top["load-aware"]["offload_ratio"],
        "paper": PAPER.get((model, workload)) if gpu == "a100-80g" else None,
        "by_rate": {p: [{k: r[k] for k in ("request_rate", "output_throughput",
                                           "median_ttft_ms", "median_tpot_ms")} for r in rs]
                    for p, rs in rows.items()},
    }  # fmt: skip


def split_search(gpu: str, model: str, n: int, splits: list[int]) -> dict:
    """64 GPUs, prefill:decode = P:(64-P); a closed loop keeps every split saturated."""
    found = {}
    for policy in ("none", "load-aware"):
        results = []
        for p in splits:
            args = args_for(model, gpu, "sharegpt", n,
                            ["--num-prefill", str(p), "--num-decode", str(64 - p)])  # fmt: skip
            row = run(args, policy, [float("inf")], concurrency=64 * 256)[0]
            results.append({"prefill": p, "decode": 64 - p,
                            "output_throughput": row["output_throughput"],
                            "request_throughput": row["request_throughput"],
                            "wall_s": row["simulated"]["wall_s"]})  # fmt: skip
        best = max(results, key=lambda r: r["output_throughput"])
        found[policy] = {"best": best, "splits": results}
    return found


def timed_run(gpu: str, model: str, split: dict, rate: float, n: int) -> dict:
    args = args_for(model, gpu, "sharegpt", n, ["--num-prefill", str(split["prefill"]),
                                                "--num-decode", str(split["decode"])])  # fmt: skip
    started = time.perf_counter()
    row = run(args, "load-aware", [rate])[0]
    return {"requests": n, "gpus": 64, "split": f"{split['prefill']}:{split['decode']}",
            "rate": rate, "completed": row["completed"],
            "output_tokens": row["total_output_tokens"],
            "wall_s": round(time.perf_counter() - started, 1),
            "simulated_s": round(row["duration"], 1)}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    p.add_argument("--skip-64", action="store_true", help="only the 1P1D settings")
    p.add_argument("--output", default="results/sim_paper.json")
    args = p.parse_args()
    n = {"sharegpt": 300, "reasoning": 120} if args.quick else {"sharegpt": 2000, "reasoning": 600}
    report: dict = {"settings": [], "serve_args": SERVE, "simulated": True}
    for gpu in ("a100-80g", "h100", "h200"):
        report["settings"] += paper_setting(gpu, n)
        print_settings(report["settings"])
    if not args.skip_64:
        splits = [8, 16, 24, 32] if args.quick else [8, 12, 16, 20, 24, 32]
        searched = split_search("a100-80g", "llama-2-13b", 3000 if args.quick else 20000, splits)
        report["split_search"] = searched
        best = searched["load-aware"]["best"]
        rate = round(0.9 * best["request_throughput"], 1)
        report["timed_run"] = timed_run("a100-80g", "llama-2-13b", best, rate,
                                        10000 if args.quick else 100000)  # fmt: skip
        print(json.dumps({"split_search": searched, "timed_run": report["timed_run"]}, indent=2))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


def print_settings(settings: list[dict]) -> None:
    print(f"{'gpu':<10}{'model':<13}{'workload':<11}{'none tok/s':>11}{'l-a tok/s':>11}"
          f"{'ratio':>7}{'paper':>12}{'P-cap':>7}{'P-bw':>7}{'D-comp':>7}{'D-batch':>8}"
          f"{'offload':>8}")  # fmt: skip
    for s in settings:
        u = s["utilisation_ratio"]
        cells = [f"{u[k]:.2f}x" if u[k] else "-" for k in UTILISATION]
        print(f"{s['gpu']:<10}{s['model']:<13}{s['workload']:<11}"
              f"{s['throughput']['none']:>11.0f}{s['throughput']['load-aware']:>11.0f}"
              f"{s['throughput_ratio']:>6.2f}x{s['paper'] or '':>12}"
              + "".join(f"{c:>7}" for c in cells[:3]) + f"{cells[3]:>8}"
              + f"{s['offload_ratio']:>8.2f}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
