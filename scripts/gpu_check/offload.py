"""GPU check parts on attention offloading: one layer's round trip over the GPU-signalled link
against the CPU-signalled one (benchmarks/offload_roundtrip.py), decode steps of a real
deployment with 0/50/100% of an equal batch offloaded, and the executor's bandwidth and
prefill's slowdown against the executor's SM share (scripts/profile_attention_bandwidth.py,
attention/colocation.py).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from scripts.gpu_check.engine_steps import SHAPES, write_shape_dir
from scripts.gpu_check.report import Table

ROUNDTRIP_BATCHES, ROUNDTRIP_WARMUP, ROUNDTRIP_ITERS = (1, 8, 32), 50, 300
POLICIES = {"0%": "none", "50%": "ratio:0.5", "100%": "always"}
STEP_BATCH, STEP_INPUT_LEN, STEP_OUTPUT_LEN = 32, 512, 64
STEP_DEVICE = "cuda"
SHARES = (0.2, 0.5, 1.0)
COLOCATION_WINDOW_S, CHILD_START_DELAY_S = 3.0, 6.0


def roundtrip(context: dict, part_dir: Path) -> dict:
    from benchmarks.offload_roundtrip import SHAPES as LINK_SHAPES
    from benchmarks.offload_roundtrip import measure_roundtrips

    paths = {"gpu-signalled": "cuda", "cpu-signalled": "shm"}
    rows = []
    for name, shape in LINK_SHAPES.items():
        by_path = {label: measure_roundtrips(path, shape, list(ROUNDTRIP_BATCHES),
                                             ROUNDTRIP_WARMUP, ROUNDTRIP_ITERS, "copy", "cuda")
                   for label, path in paths.items()}  # fmt: skip
        for batch in ROUNDTRIP_BATCHES:
            gpu, cpu = by_path["gpu-signalled"][batch], by_path["cpu-signalled"][batch]
            rows.append([name, batch, gpu["median_us"], gpu["p99_us"], cpu["median_us"],
                         cpu["p99_us"], f"{cpu['median_us'] / gpu['median_us']:.1f}x"])  # fmt: skip
    note = ("gpu-signalled: CUDA IPC buffers with GPU-side counters "
            "(transport/cuda_attention_channel.py); cpu-signalled: host shared memory with "
            "host counters (transport/attention_channel.py), q, k, v copied through the host. "
            f"Executor op: copy; {ROUNDTRIP_ITERS} timed after {ROUNDTRIP_WARMUP} warm-up.")  # fmt: skip
    columns = ["shape", "rows", "gpu med us", "gpu p99 us", "cpu med us", "cpu p99 us",
               "cpu/gpu"]  # fmt: skip
    largest = [r for r in rows if r[1] == max(ROUNDTRIP_BATCHES)]
    return {
        "summary": "; ".join(
            f"{r[0]} {r[1]} rows: {r[2]} us GPU-signalled, {r[4]} us CPU" for r in largest
        ),  # fmt: skip
        "tables": [
            Table("one layer's round trip, decode side to executor and back", columns, rows, note)
        ],  # fmt: skip
        "data": {"rows": rows},
    }


def _bench(url: str, out: Path) -> dict:
    cmd = [sys.executable, "-m", "server.cli", "bench", "--url", url, "--dataset", "random",
           "--random-input-len", str(STEP_INPUT_LEN), "--random-output-len", str(STEP_OUTPUT_LEN),
           "--num-prompts", str(STEP_BATCH), "--max-concurrency", str(STEP_BATCH),
           "--save-result", str(out), "--disable-tqdm"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60)
    return json.loads(out.read_text())


def _offloaded_total(url: str) -> float | None:
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=5).text
    match = re.search(r"^adrenaline:offloaded_requests_total(?:\{[^}]*\})? (\S+)$", text, re.M)
    return float(match.group(1)) if match else None


def offloaded_decode_step(context: dict, part_dir: Path) -> dict:
    from server.launch.serve_process import ServeProcess

    model_dir = write_shape_dir(part_dir / "smollm2-135m", SHAPES["smollm2-135m"])
    rows = []
    for label, policy in POLICIES.items():
        serve = ServeProcess(["--model", str(model_dir), "--load-format", "dummy", "--device",
                              STEP_DEVICE, "--offload-policy", policy, "--num-kv-blocks", "4096",
                              "--offload-blocks", "4096", "--max-num-seqs", str(STEP_BATCH),
                              "--log-level", "WARNING"], startup_timeout=60)  # fmt: skip
        try:
            result = _bench(serve.url, part_dir / f"bench-{policy.replace(':', '-')}.json")
            offloaded = _offloaded_total(serve.url)
        finally:
            serve.stop()
        rows.append([label, policy, STEP_BATCH, result["completed"], result["failed"],
                     offloaded, result["median_tpot_ms"], result["p99_tpot_ms"],
                     result["output_throughput"]])  # fmt: skip
    local = rows[0][6]
    for row in rows:
        row.append(f"{row[6] / local:.2f}x" if local else "-")
    failed = sum(r[4] for r in rows)
    columns = ["offloaded", "policy", "batch", "completed", "failed", "offloaded requests",
               "median TPOT ms", "p99 TPOT ms", "output tok/s", "TPOT vs 0%"]  # fmt: skip
    note = (f"adrenaline serve --device cuda (prefill, decode and executor on this GPU), "
            f"SmolLM2-135M shape, dummy bf16 weights; adrenaline bench --dataset random, "
            f"{STEP_BATCH} requests at once ({STEP_INPUT_LEN} in, {STEP_OUTPUT_LEN} out), so "
            "each decode step carries the same batch.")  # fmt: skip
    return {
        "status": "passed" if failed == 0 else "failed",
        "summary": "; ".join(f"{r[0]} offloaded: TPOT {r[6]:.2f} ms ({r[9]})" for r in rows),
        "tables": [Table("decode step with offloaded rows, equal batch", columns, rows, note)],
        "data": {"rows": rows},
    }


def _run_children(children: list[list[str]], root: str) -> list[dict]:
    """Starts each `python -c CHILD args` at once; their timed windows begin together."""
    start_at = time.time() + CHILD_START_DELAY_S
    code = "import sys; from scripts.gpu_check.offload import child; child(sys.argv[1:])"
    procs = [subprocess.Popen([sys.executable, "-c", code, *args, str(start_at)], cwd=root,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for args in children]  # fmt: skip
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=CHILD_START_DELAY_S + COLOCATION_WINDOW_S + 30)
        if proc.returncode != 0:
            raise RuntimeError(f"colocation child failed: {err[-2000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def child(argv: list[str]) -> None:
    """`prefill START` or `executor SHARE START`: the work of one side of a colocated GPU, timed
    over the shared window; prints one JSON line."""
    role, start_at = argv[0], float(argv[-1])
    mechanism = "none"
    if role == "executor":
        from attention.colocation import limit_sm_share

        mechanism = limit_sm_share(float(argv[1]))  # before CUDA initialises
    import torch

    work, units = _prefill_work() if role == "prefill" else _executor_work()
    work()
    torch.cuda.synchronize()
    time.sleep(max(0.0, start_at - time.time()))
    count, begin = 0, time.perf_counter()
    while time.perf_counter() - begin < COLOCATION_WINDOW_S:
        for _ in range(10):
            work()
        torch.cuda.synchronize()
        count += 10
    rate = count * units / (time.perf_counter() - begin)
    print(json.dumps({"role": role, "mechanism": mechanism, "rate": rate}))


def _prefill_work():
    """Prefill's bulk: bf16 GEMMs of an 8192-token chunk through a 4096-wide layer (TFLOP/s)."""
    import torch

    x = torch.randn(8192, 4096, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(4096, 4096, dtype=torch.bfloat16, device="cuda")
    return (lambda: x @ w), 2 * 8192 * 4096 * 4096 / 1e12


def _executor_work():
    """Decode attention, 64 sequences of 4096 tokens, Llama-3-8B's shape (GB/s of KV)."""
    import torch

    from attention.triton_decode import paged_decode_attention

    batch, seq, kvh, dim = 64, 4096, 8, 128
    blocks = batch * seq // 16
    k = torch.randn(blocks, 16, kvh, dim, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    tables = torch.randperm(blocks, device="cuda").view(batch, -1).int()
    lens = torch.full((batch,), seq, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, 32, dim, dtype=torch.bfloat16, device="cuda")
    return (lambda: paged_decode_attention(q, k, v, lens, tables, seq, dim**-0.5)), (
        2 * batch * seq * kvh * dim * 2 / 1e9
    )


def colocation(context: dict, part_dir: Path) -> dict:
    root = context["root"]
    profile = part_dir / "attention_bandwidth.json"
    subprocess.run([sys.executable, "scripts/profile_attention_bandwidth.py", "--shares",
                    ",".join(map(str, SHARES)), "--iters", "20", "--out", str(profile)],
                   cwd=root, check=True, capture_output=True, text=True, timeout=60)  # fmt: skip
    bandwidth = json.loads(profile.read_text())
    (alone,) = _run_children([["prefill"]], root)
    rows = []
    for r in bandwidth["rows"]:
        share = r["share"]
        prefill, executor = _run_children([["prefill"], ["executor", str(share)]], root)
        rows.append([share, r["mechanism"], f"{r['gb_per_s']:.0f}",
                     f"{r['gb_per_s'] / bandwidth['peak_gb_per_s']:.0%}",
                     f"{executor['rate']:.0f}", f"{alone['rate'] / prefill['rate']:.2f}x"])  # fmt: skip
    columns = ["SM share", "mechanism", "executor GB/s alone", "of peak",
               "executor GB/s colocated", "prefill slowdown"]  # fmt: skip
    note = (f"Executor: paged decode attention (Triton), 64 x 4096 tokens, bf16, alone through "
            f"scripts/profile_attention_bandwidth.py. Colocated: a prefill process (bf16 GEMMs, "
            f"{alone['rate']:.0f} TFLOP/s alone) and the executor run together for "
            f"{COLOCATION_WINDOW_S:.0f} s; mechanism none means the share was not enforced "
            "(no MPS daemon, no green contexts) and the two processes time-slice.")  # fmt: skip
    return {
        "summary": f"smallest share within 90% of peak bandwidth: "
        f"{bandwidth['smallest_share_at_90pct']}; prefill slowdown at shares "
        + ", ".join(f"{r[0]}: {r[5]}" for r in rows),
        "tables": [
            Table("executor bandwidth and prefill slowdown against SM share", columns, rows, note)
        ],  # fmt: skip
        "data": {"bandwidth": bandwidth, "prefill_alone_tflops": alone["rate"], "rows": rows},
    }
