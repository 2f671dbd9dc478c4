"""The per-layer protocol the GPU link shares (transport.attention_protocol), run between real
processes on its host-memory signals: steps, a refused step, a decode side that is late (it must
never take output computed from stale rows), one that gives up and moves on while the executor
is late, and an executor that is gone.

The executor runs in a child that answers each layer with out = 2 q + seq_no, so the decode side
checks exact equality of every layer it accepts.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from transport.attention_channel import ChannelTimeout, DecodeSideLink, StepRefused

ROOT = Path(__file__).resolve().parents[2]
LAYERS, ROWS, HEADS, KV_HEADS, HEAD_DIM = 3, 2, 4, 2, 8

# plan: one entry per step: {"step", "refuse"?, "stall_before"? (a layer), "stall_s"?,
# "timeout_s"?}. Prints [step, "ok" | "refused" | "timeout"] per step, then ["done"].
EXECUTOR = r"""
import json, sys, time
from transport.attention_channel import ChannelTimeout, ExecutorSideLink
endpoint, layers, rows, plan = json.loads(sys.argv[1])
link = ExecutorSideLink(endpoint)
for entry in plan:
    step = entry["step"]
    first = step * layers + 1
    link.begin_step(step, rows, first)
    if entry.get("refuse"):
        link.refuse(step, first + layers - 1)
        print(json.dumps([step, "refused"]), flush=True)
        continue
    try:
        for layer in range(layers):
            if layer == entry.get("stall_before"):
                time.sleep(entry["stall_s"])
            q, k, v = link.receive(first + layer, entry.get("timeout_s", 10.0))
            link.respond(first + layer, q * 2 + (first + layer))
        link.check()
        outcome = "ok"
    except ChannelTimeout:
        outcome = "timeout"
    print(json.dumps([step, outcome]), flush=True)
link.close()
print(json.dumps(["done"]), flush=True)
"""


class Executor:
    def __init__(self, endpoint: dict, plan: list[dict]) -> None:
        args = json.dumps([endpoint, LAYERS, ROWS, plan])
        self.proc = subprocess.Popen(
            [sys.executable, "-c", EXECUTOR, args], cwd=ROOT, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.lines: queue.Queue[list] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))

    def outcomes(self, count: int, timeout_s: float = 30.0) -> list:
        got = []
        for _ in range(count):
            try:
                got.append(self.lines.get(timeout=timeout_s))
            except queue.Empty:
                stderr = self.proc.stderr.read() if self.proc.poll() is not None else ""
                raise AssertionError(f"executor said {got}, then nothing: {stderr}") from None
        return got


@pytest.fixture
def link() -> Iterator[DecodeSideLink]:
    link = DecodeSideLink(4, HEADS, KV_HEADS, HEAD_DIM, torch.float32)
    yield link
    link.close()


@pytest.fixture
def executors() -> Iterator[list[Executor]]:
    started: list[Executor] = []
    yield started
    for executor in started:
        if executor.proc.poll() is None:
            executor.proc.kill()
        executor.proc.wait(timeout=10)


def rows(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(ROWS, HEADS, HEAD_DIM, generator=gen)
    k = torch.randn(ROWS, KV_HEADS, HEAD_DIM, generator=gen)
    return q, k, k + 1


def seq_no(step: int, layer: int) -> int:
    return step * LAYERS + layer + 1


def run_step(link: DecodeSideLink, step: int, timeout_s: float = 10.0) -> list[torch.Tensor]:
    """Posts and collects every layer, checks the step; the outputs, each checked exactly."""
    outs = []
    for layer in range(LAYERS):
        q, k, v = rows(seq_no(step, layer))
        link.post(seq_no(step, layer), q, k, v)
        outs.append((link.collect(seq_no(step, layer), step, ROWS, timeout_s), q))
    link.check()
    for layer, (out, q) in enumerate(outs):
        assert torch.equal(out, q * 2 + seq_no(step, layer)), f"step {step} layer {layer}"
    return [out for out, _ in outs]


def test_refused_and_late_steps_never_yield_stale_output(link, executors) -> None:
    plan = [
        {"step": 1},
        {"step": 2, "refuse": True},
        {"step": 3, "timeout_s": 0.5},  # the decode side will be late for layer 1
        {"step": 4},
    ]
    executors.append(Executor(link.endpoint, plan))
    run_step(link, 1)

    for layer in range(LAYERS):  # a refused step: every layer answered at once, then refused
        link.post(seq_no(2, layer), *rows(0))
        link.collect(seq_no(2, layer), 2, ROWS, 10.0)
    with pytest.raises(StepRefused, match="refused step 2"):
        link.check()

    # Late for layer 1: the executor's wait times out, it goes on with the rows still in the
    # buffer (layer 0's) and answers every layer marked refused.
    q0, k0, v0 = rows(1)
    link.post(seq_no(3, 0), q0, k0, v0)
    link.collect(seq_no(3, 0), 3, ROWS, 10.0)
    assert executors[0].outcomes(3)[-1] == [3, "timeout"]
    stale = []
    for layer in (1, 2):
        link.post(seq_no(3, layer), *rows(layer))
        stale.append(link.collect(seq_no(3, layer), 3, ROWS, 10.0))
    # What the late decode side now holds was computed from layer 0's rows (the executor's
    # last answer of the step) ...
    assert all(torch.equal(out, q0 * 2 + seq_no(3, 2)) for out in stale)
    # ... and the step is refused, so it is never used.
    with pytest.raises(StepRefused, match="refused step 3"):
        link.check()

    run_step(link, 4)  # the link carries on
    assert executors[0].outcomes(2) == [[4, "ok"], ["done"]]
    # The executor is gone now: a timeout, bounded, at the step's end.
    started = time.monotonic()
    link.post(seq_no(5, 0), *rows(5))
    link.collect(seq_no(5, 0), 5, ROWS, 0.3)
    with pytest.raises(ChannelTimeout, match="step 5"):
        link.check()
    assert time.monotonic() - started < 5


def test_a_step_the_decode_side_gave_up_on_is_not_committed(link, executors) -> None:
    # The executor stalls before layer 1 of step 1, past the decode side's timeout.
    plan = [{"step": 1, "stall_before": 1, "stall_s": 1.0}, {"step": 2}]
    executors.append(Executor(link.endpoint, plan))
    for layer in range(LAYERS):
        link.post(seq_no(1, layer), *rows(layer))
        link.collect(seq_no(1, layer), 1, ROWS, 0.3)  # layer 1 times out; layer 2 then at once
    with pytest.raises(ChannelTimeout, match="step 1"):
        link.check()
    # The decode side moves on while the executor still sleeps: once awake, the executor finds
    # a later step's request where it expected layer 1, fails step 1 (so it commits nothing of
    # it) and serves step 2 exactly.
    run_step(link, 2)
    assert executors[0].outcomes(3) == [[1, "timeout"], [2, "ok"], ["done"]]


def graphed_step(link: DecodeSideLink, step: int, timeout_s: float = 10.0) -> list:
    """A step as a CUDA graph runs it: posts and enqueue_collect only, no host bookkeeping.
    (out, q) per layer."""
    outs = []
    for layer in range(LAYERS):
        q, k, v = rows(seq_no(step, layer))
        link.post(seq_no(step, layer), q, k, v)
        outs.append((link.enqueue_collect(seq_no(step, layer), step, ROWS, timeout_s), q))
    return outs


def test_a_replayed_step_is_checked_as_an_eager_one(link, executors) -> None:
    executors.append(Executor(link.endpoint, [{"step": 1}, {"step": 2, "refuse": True}]))
    outs = graphed_step(link, 1)
    link.replayed(1, range(seq_no(1, 0), seq_no(1, LAYERS)), 10.0)
    link.check()
    assert all(torch.equal(out, q * 2 + seq_no(1, i)) for i, (out, q) in enumerate(outs))

    graphed_step(link, 2)
    link.check()  # what a replay leaves on the host says nothing of the refused step ...
    link.replayed(2, range(seq_no(2, 0), seq_no(2, LAYERS)), 10.0)
    with pytest.raises(StepRefused, match="refused step 2"):
        link.check()  # ... until replayed() restores it
    assert executors[0].outcomes(3) == [[1, "ok"], [2, "refused"], ["done"]]

    graphed_step(link, 3, timeout_s=0.3)  # the executor is gone
    link.replayed(3, range(seq_no(3, 0), seq_no(3, LAYERS)), 0.3)
    with pytest.raises(ChannelTimeout, match="within 0.3s in step 3"):
        link.check()


def test_a_graphed_offload_step_raises_from_replayed(link, executors) -> None:
    from types import SimpleNamespace

    from attention.remote import RemoteAttentionError
    from server.roles.offload_client import OffloadClient, OffloadStep

    executors.append(Executor(link.endpoint, [{"step": 1, "refuse": True}, {"step": 2}]))
    client = OffloadClient("decode-0", LAYERS, 4, HEADS, KV_HEADS, HEAD_DIM, torch.float32)
    groups = [("attention-0", SimpleNamespace(link=link), ROWS)]
    # The executor refuses step 1 without waiting for it: past that, it is up (a layer's
    # timeout here is the client's, 2 s, shorter than a loaded machine's interpreter start).
    assert executors[0].outcomes(1) == [[1, "refused"]]
    try:
        for step_id, refused in ((1, True), (2, False)):
            step = OffloadStep(0, step_id, LAYERS, groups, client, graphed=True)
            outs = []
            for layer in range(LAYERS):  # a graphed step's last receive checks nothing
                q, k, v = rows(seq_no(step_id, layer))
                step.send(layer, q, k, v)
                outs.append((step.receive(layer), q))
            if refused:
                with pytest.raises(RemoteAttentionError, match="attention-0.*refused step 1"):
                    step.replayed()
                continue
            step.replayed()
            assert all(torch.equal(out, q * 2 + seq_no(2, i)) for i, (out, q) in enumerate(outs))
            assert client.roundtrip_ms > 0  # the replayed step's waits were timed
    finally:
        client.close()
