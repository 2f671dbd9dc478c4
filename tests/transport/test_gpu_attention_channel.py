"""The per-layer links beyond shared memory, between two real processes: the P2P link on gloo
(CPU), and the CUDA IPC link with GPU-side signals (gpu, skipped without CUDA).

The executor side runs in a child that answers each layer with out = 2 q + seq_no, so the
decode side checks exact equality of every layer of every step. Nothing reads a GPU output
before the step's check(): the no-sync pipeline is what runs, and a dead peer ends in a bounded
ChannelTimeout, never a hang.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from transport.attention_channel import StepRefused

ROOT = Path(__file__).resolve().parents[2]
LAYERS, STEPS, ROWS = 3, 2, 4
SHAPE = dict(max_rows=8, num_heads=4, num_kv_heads=2, head_dim=8)

EXECUTOR = """
import json, sys, torch
from attention.executor_worker import open_executor_link
endpoint, layers, steps, rows, refuse_step = json.loads(sys.argv[1])
if endpoint["kind"] == "cuda_ipc":
    torch.cuda.set_device(0)
link = open_executor_link(endpoint)
for step in range(steps):
    first = step * layers + 1
    link.begin_step(step, rows, first)
    if step == refuse_step:
        link.refuse(step, first + layers - 1)
        continue
    for layer in range(layers):
        q, k, v = link.receive(first + layer, 10.0)
        link.respond(first + layer, q * 2 + (first + layer))
    link.check()
if endpoint["kind"] == "cuda_ipc":
    torch.cuda.synchronize()
print("executor done", flush=True)
link.close()
"""


def _start_executor(endpoint: dict, refuse_step: int = -1, steps: int = STEPS) -> subprocess.Popen:
    args = json.dumps([endpoint, LAYERS, steps, ROWS, refuse_step])
    return subprocess.Popen(
        [sys.executable, "-c", EXECUTOR, args], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


@pytest.fixture
def executors() -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def _run_decode_side(link, device: str) -> None:
    gen = torch.Generator().manual_seed(0)
    for step in range(STEPS):
        outs = []
        for layer in range(LAYERS):
            seq_no = step * LAYERS + layer + 1
            q = torch.randn(ROWS, SHAPE["num_heads"], SHAPE["head_dim"], generator=gen).to(device)
            k = torch.randn(ROWS, SHAPE["num_kv_heads"], SHAPE["head_dim"], generator=gen)
            link.post(seq_no, q, k.to(device), (k + 1).to(device))
            outs.append((link.collect(seq_no, step, ROWS, 10.0), q * 2 + seq_no))
        link.check()  # the step's one host sync: only now are the outputs valid
        for out, expected in outs:
            assert torch.equal(out.cpu(), expected.cpu())


def _finish(proc: subprocess.Popen) -> None:
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "executor done" in stdout


def test_gloo_link_between_processes(executors) -> None:
    from transport.nccl_attention_channel import P2PDecodeSideLink

    link = P2PDecodeSideLink("gloo", **SHAPE, dtype=torch.float32, device="cpu")
    assert json.loads(json.dumps(link.endpoint)) == link.endpoint  # msgpack-able plain data
    executors.append(_start_executor(link.endpoint))
    try:
        _run_decode_side(link, "cpu")
    finally:
        link.close()
    _finish(executors[0])


def test_gloo_link_reports_a_refused_step(executors) -> None:
    from transport.nccl_attention_channel import P2PDecodeSideLink

    link = P2PDecodeSideLink("gloo", **SHAPE, dtype=torch.float32, device="cpu")
    executors.append(_start_executor(link.endpoint, refuse_step=0))
    q = torch.zeros(ROWS, SHAPE["num_heads"], SHAPE["head_dim"])
    k = torch.zeros(ROWS, SHAPE["num_kv_heads"], SHAPE["head_dim"])
    link.post(1, q, k, k)
    with pytest.raises(StepRefused):
        link.collect(1, 0, ROWS, 10.0)
    for seq_no in range(2, LAYERS + 1):  # the rest of the refused step is still answered
        link.post(seq_no, q, k, k)
        with pytest.raises(StepRefused):
            link.collect(seq_no, 0, ROWS, 10.0)
    for layer in range(LAYERS):  # and the next step runs normally
        seq_no = LAYERS + layer + 1
        link.post(seq_no, q + 1, k, k)
        assert torch.equal(link.collect(seq_no, 1, ROWS, 10.0), (q + 1) * 2 + seq_no)
    link.close()
    _finish(executors[0])


def test_gpu_signal_is_importable_without_a_gpu() -> None:
    from transport import gpu_signal

    assert gpu_signal.backend() in ("stream_memops", "triton", "none")


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
def test_cuda_ipc_link_between_processes(executors) -> None:
    from transport import gpu_signal
    from transport.cuda_attention_channel import CudaDecodeSideLink

    if gpu_signal.backend() == "none":
        pytest.skip("needs cuda-python or triton for GPU signals")
    link = CudaDecodeSideLink(**SHAPE, dtype=torch.float32, device="cuda")
    executors.append(_start_executor(link.endpoint))
    try:
        _run_decode_side(link, "cuda")
    finally:
        link.close()
    _finish(executors[0])


@pytest.mark.gpu
@needs_cuda
def test_cuda_ipc_link_reports_a_refused_step(executors) -> None:
    from transport import gpu_signal
    from transport.cuda_attention_channel import CudaDecodeSideLink

    if gpu_signal.backend() == "none":
        pytest.skip("needs cuda-python or triton for GPU signals")
    link = CudaDecodeSideLink(**SHAPE, dtype=torch.float32, device="cuda")
    executors.append(_start_executor(link.endpoint, refuse_step=0))
    q = torch.zeros(ROWS, SHAPE["num_heads"], SHAPE["head_dim"], device="cuda")
    k = torch.zeros(ROWS, SHAPE["num_kv_heads"], SHAPE["head_dim"], device="cuda")
    for seq_no in range(1, LAYERS + 1):
        link.post(seq_no, q, k, k)
        link.collect(seq_no, 0, ROWS, 10.0)
    with pytest.raises(StepRefused):
        link.check()
    for layer in range(LAYERS):
        seq_no = LAYERS + layer + 1
        link.post(seq_no, q + 1, k, k)
        out = link.collect(seq_no, 1, ROWS, 10.0)
    link.check()
    assert torch.equal(out, (q + 1) * 2 + 2 * LAYERS)
    link.close()
    _finish(executors[0])


@pytest.mark.gpu
@needs_cuda
def test_cuda_ipc_link_times_out_on_a_dead_executor(executors) -> None:
    from transport import gpu_signal
    from transport.attention_channel import ChannelTimeout
    from transport.cuda_attention_channel import CudaDecodeSideLink

    if gpu_signal.backend() == "none":
        pytest.skip("needs cuda-python or triton for GPU signals")
    link = CudaDecodeSideLink(**SHAPE, dtype=torch.float32, device="cuda")
    executors.append(_start_executor(link.endpoint))
    executors[0].kill()
    executors[0].wait(timeout=10)
    q = torch.zeros(ROWS, SHAPE["num_heads"], SHAPE["head_dim"], device="cuda")
    k = torch.zeros(ROWS, SHAPE["num_kv_heads"], SHAPE["head_dim"], device="cuda")
    started = time.monotonic()
    for seq_no in range(1, LAYERS + 1):
        link.post(seq_no, q, k, k)
        link.collect(seq_no, 0, ROWS, 1.0)
    # A stream memory op wait has no timeout: check() releases it from the host.
    with pytest.raises(ChannelTimeout):
        link.check()
    torch.cuda.synchronize()  # the stream runs on: nothing is left blocked
    assert time.monotonic() - started < 30
    link.close()


@pytest.mark.gpu
@needs_cuda
def test_cuda_ipc_steps_replay_from_one_captured_graph(executors) -> None:
    # A decode step's per-layer exchange captured once in a CUDA graph and replayed for the
    # later steps: the Triton signals read each step's numbers from memory, and replayed()
    # gives check() the host state the graph skipped, so the refused step still raises.
    from transport import gpu_signal
    from transport.cuda_attention_channel import CudaDecodeSideLink

    if gpu_signal.backend() != "triton":
        pytest.skip("graph-safe signals are the Triton ones")
    steps, refused = 5, 3
    link = CudaDecodeSideLink(**SHAPE, dtype=torch.float32, device="cuda")
    executors.append(_start_executor(link.endpoint, refuse_step=refused, steps=steps))
    q = torch.zeros(ROWS, SHAPE["num_heads"], SHAPE["head_dim"], device="cuda")
    k = torch.zeros(ROWS, SHAPE["num_kv_heads"], SHAPE["head_dim"], device="cuda")

    def layers(step: int, collect) -> torch.Tensor:
        outs = []
        for layer in range(LAYERS):
            seq_no = step * LAYERS + layer + 1
            link.post(seq_no, q, k, k)
            outs.append(collect(seq_no, step, ROWS, 10.0))
        return torch.stack(outs)

    def expected(step: int) -> torch.Tensor:
        return torch.stack([q * 2 + step * LAYERS + layer + 1 for layer in range(LAYERS)])

    link.begin_step(0, 1)  # eagerly first: compiles the Triton signals outside the graph
    out = layers(0, link.collect)
    link.check()
    assert torch.equal(out, expected(0))
    graph = torch.cuda.CUDAGraph()
    for step in range(1, steps):
        link.begin_step(step, step * LAYERS + 1)
        q.fill_(step)
        if step == 1:
            torch.cuda.synchronize()
            with torch.cuda.graph(graph):
                out = layers(1, link.enqueue_collect)
        graph.replay()
        link.replayed(step, range(step * LAYERS + 1, (step + 1) * LAYERS + 1), 10.0)
        if step == refused:
            with pytest.raises(StepRefused, match=f"refused step {refused}"):
                link.check()
            continue
        link.check()
        assert torch.equal(out, expected(step)), f"step {step}"
    link.close()
    _finish(executors[0])
