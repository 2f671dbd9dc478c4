"""GPU check parts on bare kernels: the device and its measured copy ceiling, and our Triton
decode kernel's bandwidth against that ceiling.
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

import torch

from scripts.gpu_check.report import Table

COPY_BYTES = 1 << 30  # far past the L2 (60 MB on H100/H200)
# Decode attention shape: Llama-3-8B (GQA group 4), bf16, 16-token blocks.
HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16
BATCHES = (1, 8, 32, 64, 128, 256)
CONTEXTS = (512, 2048, 8192)
# A cell reads at least this much KV before its time means bandwidth and not launch latency.
LAUNCH_BOUND_BYTES = 64 << 20


def event_ms(fn, warmup: int = 3, iters: int = 20) -> float:
    """Median milliseconds of fn() by CUDA events, after warm-up (compilation stays out)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def copy_ceiling_gb_per_s() -> float:
    """Device-to-device copy, bytes read plus bytes written: the bandwidth a kernel can reach."""
    src = torch.randint(0, 255, (COPY_BYTES,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = event_ms(lambda: dst.copy_(src))
    return 2 * COPY_BYTES / (ms / 1000) / 1e9


def stream_memops_supported() -> bool | None:
    """CU_DEVICE_ATTRIBUTE_CAN_USE_64_BIT_STREAM_MEM_OPS, None when cuda-python is missing."""
    from transport import gpu_signal

    drv = gpu_signal._driver()
    if drv is None:
        return None
    attr = drv.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_CAN_USE_64_BIT_STREAM_MEM_OPS
    err, value = drv.cuDeviceGetAttribute(attr, torch.cuda.current_device())
    return bool(value) if int(err) == 0 else None


def device(context: dict, part_dir: Path) -> dict:
    from attention import colocation
    from transport import gpu_signal

    props = torch.cuda.get_device_properties(0)
    smi = subprocess.run(
        ["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.mem", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    data = {
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "sm_count": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nvidia_smi": smi.stdout.strip(),
        "mps_running": colocation.mps_running(),
        "green_contexts": colocation.green_contexts_supported(),
        "gpu_signal_backend": gpu_signal.backend(),
        "stream_memops_64": stream_memops_supported(),
        "copy_gb_per_s": round(copy_ceiling_gb_per_s(), 1),
    }
    rows = [[key, value] for key, value in data.items()]
    return {
        "summary": f"{props.name}, {props.multi_processor_count} SMs, copy ceiling "
        f"{data['copy_gb_per_s']:.0f} GB/s (read + write, 1 GiB device-to-device)",
        "tables": [Table("device", ["property", "value"], rows)],
        "data": data,
    }


def _decode_inputs(batch: int, context_len: int, num_blocks: int, dtype: torch.dtype):
    blocks = context_len // BLOCK
    # Random block order, as a long-running pool hands them out.
    tables = torch.randperm(num_blocks, device="cuda")[: batch * blocks].view(batch, blocks)
    q = torch.randn(batch, HEADS, HEAD_DIM, dtype=dtype, device="cuda")
    seq_lens = torch.full((batch,), context_len, dtype=torch.int32, device="cuda")
    return q, seq_lens, tables.to(torch.int32)


def _decode_error(batch: int = 8, context_len: int = 2048) -> float:
    """‖triton − torch float32‖ / ‖torch float32‖ on a fresh cell; an output element the kernel
    never wrote stays NaN and fails the check."""
    from attention.torch_backend import TorchAttention
    from attention.triton_decode import paged_decode_attention

    num_blocks = batch * context_len // BLOCK + 16
    shape = (num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    v_cache = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    q, seq_lens, tables = _decode_inputs(batch, context_len, num_blocks, torch.bfloat16)
    scale = HEAD_DIM**-0.5
    out = torch.full_like(q, float("nan"))
    paged_decode_attention(q, k_cache, v_cache, seq_lens, tables, context_len, scale, out)
    ref = TorchAttention(HEADS, KV_HEADS, HEAD_DIM, scale).decode(
        q.float(), k_cache.float(), v_cache.float(), seq_lens, tables, context_len
    )
    return float((out.float() - ref).norm() / ref.norm())


def _time_cell(batch: int, context_len: int, k_cache, v_cache) -> tuple[float, int]:
    """(median ms, bytes of K and V read) of one decode call."""
    from attention.triton_decode import paged_decode_attention

    q, seq_lens, tables = _decode_inputs(batch, context_len, k_cache.shape[0], k_cache.dtype)
    out = torch.empty_like(q)
    call = functools.partial(paged_decode_attention, q, k_cache, v_cache, seq_lens, tables,
                             context_len, HEAD_DIM**-0.5, out)  # fmt: skip
    kv_bytes = 2 * batch * context_len * KV_HEADS * HEAD_DIM * k_cache.element_size()
    return event_ms(call), kv_bytes


def triton_decode_bandwidth(context: dict, part_dir: Path) -> dict:
    ceiling = context.get("device", {}).get("copy_gb_per_s") or copy_ceiling_gb_per_s()
    error = _decode_error()
    shape = (max(BATCHES) * max(CONTEXTS) // BLOCK, BLOCK, KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    v_cache = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    rows, cells = [], []
    for context_len in CONTEXTS:
        for batch in BATCHES:
            ms, kv_bytes = _time_cell(batch, context_len, k_cache, v_cache)
            gb_per_s = kv_bytes / (ms / 1000) / 1e9
            launch_bound = kv_bytes < LAUNCH_BOUND_BYTES
            cells.append({"batch": batch, "context": context_len, "ms": ms, "gb_per_s": gb_per_s,
                          "of_ceiling": gb_per_s / ceiling, "launch_bound": launch_bound})  # fmt: skip
            rows.append([batch, context_len, f"{ms * 1000:.1f}", f"{gb_per_s:.0f}",
                         f"{gb_per_s / ceiling:.0%}" + (" (launch-bound)" if launch_bound else "")])  # fmt: skip
    best = max(c["of_ceiling"] for c in cells if not c["launch_bound"])
    passed = error < 2e-2  # NaN (an unwritten output) fails too
    title = (f"paged_decode_attention, {HEADS} heads / {KV_HEADS} KV heads x {HEAD_DIM}, bf16, "
             f"block {BLOCK}: GB/s of K and V read")  # fmt: skip
    note = ("Median of 20 CUDA-event timings after 3 warm-ups; random block tables; launch-bound: "
            f"under {LAUNCH_BOUND_BYTES >> 20} MiB of KV.")  # fmt: skip
    columns = ["batch", "context", "us", "GB/s", "of copy ceiling"]
    return {
        "status": "passed" if passed else "failed",
        "summary": f"up to {best:.0%} of the {ceiling:.0f} GB/s copy ceiling; relative error "
        f"against torch float32 {error:.1e} (must be < 2e-2)",
        "tables": [Table(title, columns, rows, note)],
        "data": {"copy_gb_per_s": ceiling, "relative_error": error, "cells": cells},
    }
