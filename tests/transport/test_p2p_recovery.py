"""gloo standing in for NCCL where a point-to-point op times out: the process survives, the KV
link is rebuilt under a new generation and carries the next transfers, and a per-layer
attention link whose peer stalled is reported spent (its decode worker attaches a new one)."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from transport.attention_channel import ChannelTimeout
from transport.kv_transfer import create_pool_host
from transport.kv_transfer_base import KVTransferError

ROOT = Path(__file__).resolve().parents[2]
SHAPE = (2, 2, 8, 4, 2, 8)  # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
DATA_TIMEOUT_S = 1.0

# A prefill side answering {"tid", "src", "dst", "stall_s"} lines: it announces the transfer,
# stalls that long, then sends. Replies {"ok", "error", "generation"}.
SENDER = r"""
import json, sys, time
import torch
from transport import gloo_transfer
from transport.kv_transfer import KVSender

endpoint = json.loads(sys.argv[1])
stalls = {}
post = gloo_transfer._post

def stalling_post(store, src, dst, key, *fields):
    post(store, src, dst, key, *fields)
    if fields[0] == "send":
        time.sleep(stalls.pop(int(fields[2]), 0.0))

gloo_transfer._post = stalling_post
from transport.kv_transfer_base import shape_from_str
shape = shape_from_str(endpoint["shape"])
sender = KVSender(torch.full(shape, 7.0), "prefill-0")
for line in sys.stdin:
    cmd = json.loads(line)
    stalls[cmd["tid"]] = cmd["stall_s"]
    try:
        sender.send(cmd["tid"], endpoint, cmd["src"], cmd["dst"], timeout_s=3.0)
        error = ""
    except Exception as exc:
        error = repr(exc)
    links = sender._sender("gloo")._links
    generation = max((link.generation for link in links.values()), default=0)
    print(json.dumps({"ok": not error, "error": error, "generation": generation}), flush=True)
"""


class Sender:
    def __init__(self, endpoint: dict) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SENDER, json.dumps(endpoint)], cwd=ROOT, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.replies: queue.Queue[dict] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.replies.put(json.loads(line))

    def send(self, tid: int, src: list[int], dst: list[int], stall_s: float = 0.0) -> dict:
        self.proc.stdin.write(json.dumps(dict(tid=tid, src=src, dst=dst, stall_s=stall_s)) + "\n")
        self.proc.stdin.flush()
        try:
            return self.replies.get(timeout=30)
        except queue.Empty:
            raise AssertionError(f"the sender died: {self.proc.stderr.read()}") from None


@pytest.fixture
def host() -> Iterator:
    host = create_pool_host("gloo", SHAPE, torch.float32, torch.device("cpu"), "decode-0")
    host.data_timeout_s = DATA_TIMEOUT_S
    yield host
    host.close()


@pytest.fixture
def sender(host) -> Iterator[Sender]:
    sender = Sender(host.endpoint)
    yield sender
    sender.proc.kill()
    sender.proc.wait(timeout=10)


def transfer(host, sender: Sender, tid: int, block: int, stall_s: float = 0.0) -> tuple:
    """(the decode side's outcome, the sender's reply); the sender stalls between announcing
    the transfer and sending its data."""
    future = host.expect(tid, "prefill-0", [block])
    reply = sender.send(tid, [block], [block], stall_s)
    try:
        future.result(timeout=10)
    except KVTransferError as exc:
        return str(exc), reply
    assert torch.equal(host.pool[:, :, block], torch.full_like(host.pool[:, :, block], 7.0))
    return "ok", reply


def test_a_stalled_sender_costs_its_transfer_and_the_link_is_rebuilt(host, sender) -> None:
    assert transfer(host, sender, 1, 0) == ("ok", {"ok": True, "error": "", "generation": 1})
    # The data comes past the decode side's timeout: that transfer fails there, and its wait,
    # which poisons a gloo group (an NCCL one is aborted), takes the group down with it.
    outcome, _ = transfer(host, sender, 2, 1, stall_s=DATA_TIMEOUT_S + 1.0)
    assert outcome != "ok" and "transfer 2" in outcome
    # At most one more transfer is lost (the sender may not know yet); then a new generation.
    outcomes = [transfer(host, sender, tid, tid - 1) for tid in (3, 4, 5)]
    assert outcomes[-1][0] == "ok" and outcomes[-2][0] == "ok"
    assert outcomes[-1][1]["generation"] >= 2
    assert sender.proc.poll() is None  # a timed-out op ended no process


def test_a_stalled_executor_spends_the_attention_link(tmp_path) -> None:
    from transport.nccl_attention_channel import P2PDecodeSideLink

    dims = dict(max_rows=4, num_heads=2, num_kv_heads=1, head_dim=8)
    link = P2PDecodeSideLink("gloo", **dims, dtype=torch.float32, device="cpu")
    script = (
        "import json, sys, time\n"
        "from transport.nccl_attention_channel import P2PExecutorSideLink\n"
        "link = P2PExecutorSideLink(json.loads(sys.argv[1]))\n"
        "link.begin_step(1, 2, 1)\n"
        "link.receive(1, 10.0)\n"
        "print('stalling', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, json.dumps(link.endpoint)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        q = torch.zeros(2, 2, 8)
        k = torch.zeros(2, 1, 8)
        link.post(1, q, k, k)
        assert proc.stdout.readline().strip() == "stalling"
        started = time.monotonic()
        with pytest.raises(ChannelTimeout, match="transfer failed"):
            link.collect(1, 1, 2, 0.5)
        assert time.monotonic() - started < 5
        assert link.spent
        with pytest.raises(ChannelTimeout, match="attach a new link"):
            link.post(2, q, k, k)  # at once, without touching the poisoned group
    finally:
        proc.kill()
        proc.wait(timeout=10)
        link.close()
