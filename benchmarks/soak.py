"""Soak: the default deployment (SmolLM2) under the bench client at saturation for a while, then
checks that nothing failed and every KV pool is full again. Prints a table and writes JSON.

    python benchmarks/soak.py --duration 300 --max-concurrency 16

Saturation here is closed-loop: `--max-concurrency` requests always in flight (each finished
one is replaced at once), rounds of `adrenaline bench --request-rate inf` until the duration
has passed, so the machine is busy the whole time without an unbounded queue.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from server.launch.serve_process import ServeProcess


def bench_round(url: str, args: argparse.Namespace, seed: int, out: Path) -> dict:
    adrenaline = Path(sys.executable).parent / "adrenaline"
    cmd = [str(adrenaline), "bench", "--url", url, "--dataset", "synthetic",
           "--num-prompts", str(args.prompts_per_round), "--request-rate", "inf",
           "--max-concurrency", str(args.max_concurrency), "--max-output-len",
           str(args.max_output_len), "--seed", str(seed), "--disable-tqdm",
           "--save-result", str(out)]  # fmt: skip
    subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def pools_full(stats: dict) -> bool:
    return stats["requests"]["active"] == 0 and all(
        w["num_free_blocks"] == w["num_blocks"] and w["num_running"] == 0
        for w in stats["workers"].values()
        if w["alive"]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of load")
    parser.add_argument("--max-concurrency", type=int, default=16)
    parser.add_argument("--prompts-per-round", type=int, default=48)
    parser.add_argument("--max-output-len", type=int, default=128)
    parser.add_argument("--serve-args", default="", help="extra `adrenaline serve` flags")
    parser.add_argument("--output", default="results/soak.json")
    args = parser.parse_args()

    server = ServeProcess(["--model", args.model, *args.serve_args.split()], 900.0)
    rounds: list[dict] = []
    try:
        started = time.monotonic()
        with tempfile.TemporaryDirectory() as tmp:
            while time.monotonic() - started < args.duration:
                rounds.append(bench_round(server.url, args, len(rounds), Path(tmp) / "r.json"))
        load_s = time.monotonic() - started
        deadline = time.monotonic() + 60
        stats = httpx.get(f"{server.url}/stats", timeout=10).json()
        while not pools_full(stats) and time.monotonic() < deadline:
            time.sleep(0.5)
            stats = httpx.get(f"{server.url}/stats", timeout=10).json()
    finally:
        server.stop()

    completed = sum(r["completed"] for r in rounds)
    failed = sum(r["failed"] for r in rounds)
    output_tokens = sum(r["total_output_tokens"] for r in rounds)
    summary = {
        "model": args.model,
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "duration_s": round(load_s, 1),
        "max_concurrency": args.max_concurrency,
        "rounds": len(rounds),
        "completed": completed,
        "failed": failed,
        "output_tokens_per_s": round(output_tokens / load_s, 1),
        "median_ttft_ms": sorted(r["median_ttft_ms"] for r in rounds)[len(rounds) // 2],
        "median_tpot_ms": sorted(r["median_tpot_ms"] for r in rounds)[len(rounds) // 2],
        "migrated": stats["requests"]["migrated"],
        "router_failed": stats["requests"]["failed"],
        "pools_full_after": pools_full(stats),
        "workers_alive_after": all(w["alive"] for w in stats["workers"].values()),
    }
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        print(f"{key:<{width}}  {value}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"summary": summary, "rounds": rounds}, indent=2))
    ok = failed == 0 and summary["pools_full_after"] and summary["workers_alive_after"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
