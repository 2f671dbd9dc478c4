"""KV data plane between real processes on loopback: shm and gloo, both directions, failures."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from transport.kv_transfer import KVSender, create_pool_host
from transport.kv_transfer_base import KVTransferError
from transport.messages import SendKV, decode, encode
from transport.shm_transfer import SHM_DIR, remove_stale_segments

ROOT = Path(__file__).resolve().parents[2]
SHAPE = (2, 2, 16, 4, 2, 8)  # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
BLOCK_NUMEL = SHAPE[0] * SHAPE[1] * SHAPE[3] * SHAPE[4] * SHAPE[5]
DTYPE = torch.float32
TIMEOUT = 20.0

# A peer process: "send" copies blocks of a seeded pool to an endpoint; "host" owns a pool and
# answers commands on stdin. One JSON object per line each way.
PEER = r"""
import json, sys, threading, torch
from transport.messages import SendKV, decode, encode
from transport.kv_transfer import KVSender, create_pool_host

def pool(seed, shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))

def say(**kw):
    print(json.dumps(kw), flush=True)

mode, args = sys.argv[1], json.loads(sys.argv[2])
shape = tuple(args["shape"])
if mode == "send":
    sender = KVSender(pool(args["seed"], shape), args["instance"])
    errors = []
    def send(tid, src, dst):
        try:
            sender.send(tid, args["endpoint"], src, dst, timeout_s=args["timeout"])
        except Exception as e:
            errors.append(repr(e))
    first, *rest = args["transfers"]
    send(*first)
    threads = [threading.Thread(target=send, args=t) for t in rest]
    [t.start() for t in threads]
    [t.join() for t in threads]
    say(ok=not errors, errors=errors)
    sender.close()
else:
    host = create_pool_host(args["kind"], shape, torch.float32, torch.device("cpu"), "decode-0")
    before = pool(args["seed"], shape)
    host.pool.copy_(before)
    say(endpoint=host.endpoint)
    futures = {}
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "expect":
            futures[cmd["tid"]] = host.expect(cmd["tid"], cmd["src"], cmd["dst"])
        elif cmd["op"] == "check":
            src_pool, src, dst = pool(cmd["src_seed"], shape), cmd["src"], cmd["dst"]
            host.mark_sent(cmd["tid"])
            futures.pop(cmd["tid"]).result(timeout=10)
            expected = before.clone()
            expected[:, :, dst] = src_pool[:, :, src]
            say(ok=torch.equal(host.pool, expected))
        elif cmd["op"] == "close":
            host.close()
            say(closed=True)
            break
"""


def seeded_pool(seed: int, shape: tuple[int, ...] = SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def random_transfer(seed: int, n: int) -> tuple[list[int], list[int]]:
    g = torch.Generator().manual_seed(seed)
    src = torch.randperm(SHAPE[2], generator=g)[:n].tolist()
    dst = torch.randperm(SHAPE[2], generator=g)[:n].tolist()
    return src, dst


class Peer:
    """A child process speaking JSON lines; killed on close."""

    def __init__(self, mode: str, args: dict) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PEER, mode, json.dumps(args)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)

    def read(self, timeout: float = TIMEOUT) -> dict:
        try:
            return json.loads(self._lines.get(timeout=timeout))
        except queue.Empty:
            raise AssertionError(f"peer said nothing in {timeout}s") from None

    def write(self, **cmd: object) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=TIMEOUT)


@pytest.fixture
def peers() -> Iterator[list[Peer]]:
    started: list[Peer] = []
    yield started
    for peer in started:
        peer.kill()


def assert_only_blocks_changed(
    after: torch.Tensor, before: torch.Tensor, src_pool: torch.Tensor, src: list, dst: list
) -> None:
    assert torch.equal(after[:, :, dst], src_pool[:, :, src])
    untouched = [b for b in range(SHAPE[2]) if b not in dst]
    assert torch.equal(after[:, :, untouched], before[:, :, untouched])
    assert after[:, :, dst].numel() * after.element_size() == len(dst) * BLOCK_NUMEL * 4


def assert_endpoint_travels(endpoint: dict) -> None:
    message = SendKV("r", "decode-0", endpoint, [1], 1)
    assert decode(encode(message)).kv_endpoint == endpoint


def send_args(endpoint: dict, seed: int, transfers: list, timeout: float = 10.0) -> dict:
    return {
        "shape": SHAPE,
        "seed": seed,
        "instance": "prefill-0",
        "endpoint": endpoint,
        "transfers": transfers,
        "timeout": timeout,
    }


def test_shm_host_here_sender_child(peers: list[Peer]) -> None:
    host = create_pool_host("shm", SHAPE, DTYPE, torch.device("cpu"), "decode-0")
    try:
        before = seeded_pool(1)
        host.pool.copy_(before)
        src, dst = random_transfer(2, 6)
        future = host.expect(7, "prefill-0", dst)
        peers.append(Peer("send", send_args(host.endpoint, 3, [[7, src, dst]])))
        assert peers[0].read() == {"ok": True, "errors": []}
        assert not future.done()  # shm completes on KVSent, not on the data
        host.mark_sent(7)
        future.result(timeout=1)
        assert_only_blocks_changed(host.pool, before, seeded_pool(3), src, dst)
    finally:
        host.close()
    assert not os.path.exists(os.path.join(SHM_DIR, str(host.endpoint["name"])))


def test_shm_sender_here_host_child(peers: list[Peer]) -> None:
    peers.append(Peer("host", {"kind": "shm", "shape": SHAPE, "seed": 11}))
    endpoint = peers[0].read()["endpoint"]
    segment = os.path.join(SHM_DIR, endpoint["name"])
    assert os.path.exists(segment)
    src, dst = random_transfer(12, 9)
    peers[0].write(op="expect", tid=1, src="prefill-0", dst=dst)
    sender = KVSender(seeded_pool(13), "prefill-0")
    try:
        sender.send(1, endpoint, src, dst)
    finally:
        sender.close()
    peers[0].write(op="check", tid=1, src_seed=13, src=src, dst=dst)
    assert peers[0].read() == {"ok": True}
    peers[0].write(op="close")
    assert peers[0].read() == {"closed": True}
    assert peers[0].proc.wait(timeout=TIMEOUT) == 0
    # The sender only mapped it (untracked): the segment went with its host, not before.
    assert not os.path.exists(segment)


def test_shm_killed_host_segment_is_reclaimed(peers: list[Peer]) -> None:
    peers.append(Peer("host", {"kind": "shm", "shape": SHAPE, "seed": 0}))
    segment = os.path.join(SHM_DIR, peers[0].read()["endpoint"]["name"])
    peers[0].kill()
    remove_stale_segments()  # the resource tracker may have been first; either way it is gone
    assert not os.path.exists(segment)


def test_shm_cancel_and_close_fail_futures() -> None:
    host = create_pool_host("auto", SHAPE, DTYPE, torch.device("cpu"), "decode-0")
    cancelled = host.expect(1, "prefill-0", [0, 1])
    pending = host.expect(2, "prefill-0", [2])
    host.cancel(1)
    with pytest.raises(KVTransferError):
        cancelled.result(timeout=1)
    host.close()
    with pytest.raises(KVTransferError):
        pending.result(timeout=1)
    assert_endpoint_travels(host.endpoint)
    sender = KVSender(seeded_pool(0), "prefill-0")
    with pytest.raises(KVTransferError, match="gone"):
        sender.send(3, host.endpoint, [0], [0])


def test_gloo_host_here_sender_child(peers: list[Peer]) -> None:
    host = create_pool_host("gloo", SHAPE, DTYPE, torch.device("cpu"), "decode-0")
    try:
        before = seeded_pool(21)
        host.pool.copy_(before)
        # Three disjoint destinations: one alone, then two concurrently on the same link.
        src, dst = random_transfer(22, 12)
        parts = [(src[:4], dst[:4]), (src[4:9], dst[4:9]), (src[9:], dst[9:])]
        futures = [host.expect(100 + i, "prefill-0", d) for i, (_, d) in enumerate(parts)]
        transfers = [[100 + i, s, d] for i, (s, d) in enumerate(parts)]
        peers.append(Peer("send", send_args(host.endpoint, 23, transfers)))
        assert peers[0].read() == {"ok": True, "errors": []}
        for future in futures:
            future.result(timeout=TIMEOUT)
        host.mark_sent(100)  # a no-op for gloo
        assert_only_blocks_changed(host.pool, before, seeded_pool(23), src, dst)
    finally:
        host.close()


def test_gloo_sender_here_then_host_dies(peers: list[Peer]) -> None:
    peers.append(Peer("host", {"kind": "gloo", "shape": SHAPE, "seed": 31}))
    endpoint = peers[0].read()["endpoint"]
    src, dst = random_transfer(32, 5)
    peers[0].write(op="expect", tid=5, src="prefill-0", dst=dst)
    sender = KVSender(seeded_pool(33), "prefill-0")
    try:
        sender.send(5, endpoint, src, dst)
        peers[0].write(op="check", tid=5, src_seed=33, src=src, dst=dst)
        assert peers[0].read() == {"ok": True}
        peers[0].kill()
        # First on the cached link, then on a fresh connection: both fail, neither hangs.
        for tid in (6, 7):
            start = time.monotonic()
            with pytest.raises(KVTransferError):
                sender.send(tid, endpoint, src, dst, timeout_s=2.0)
            assert time.monotonic() - start < 10.0
    finally:
        sender.close()


def test_gloo_cancel_fails_future() -> None:
    host = create_pool_host("gloo", SHAPE, DTYPE, torch.device("cpu"), "decode-0")
    try:
        future = host.expect(1, "prefill-9", [3, 4])
        host.cancel(1)
        with pytest.raises(KVTransferError, match="cancelled"):
            future.result(timeout=1)
        assert host.expect(2, "prefill-9", []).result(timeout=1) is None
        assert_endpoint_travels(host.endpoint)
    finally:
        host.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA IPC needs a CUDA device")
def test_cuda_ipc_roundtrip_in_process() -> None:
    device = torch.device("cuda")
    host = create_pool_host("cuda_ipc", SHAPE, DTYPE, device, "decode-0")
    try:
        # Opening an export in its own process is refused by CUDA; check the endpoint's shape.
        assert host.endpoint["kind"] == "cuda_ipc"
        assert_endpoint_travels(host.endpoint)
        future = host.expect(1, "prefill-0", [0])
        host.mark_sent(1)
        future.result(timeout=1)
    finally:
        host.close()


class RecordingStream:
    """Stands in for the transfer's own CUDA stream on CPU: records what is ordered on it."""

    def __init__(self, log: list[str]) -> None:
        self.log = log

    def synchronize(self) -> None:
        self.log.append("stream.synchronize")

    def wait_stream(self, other: object) -> None:
        self.log.append(f"stream.wait_stream({other})")


@pytest.fixture
def copy_stream_log(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """gloo standing in for NCCL's stream ordering (defect 4): each side's copies run on a
    stream of its own, which it alone synchronises; the device is never synchronised, so the
    model's stream is never waited for."""
    from transport import gloo_transfer

    log: list[str] = []

    @contextlib.contextmanager
    def on(stream):
        log.append("enter" if stream is not None else "enter(no stream)")
        yield
        log.append("exit")

    def device_sync(*_: object) -> None:
        raise AssertionError("a KV transfer synchronised the whole device")

    monkeypatch.setattr(gloo_transfer, "_copy_stream", lambda device: RecordingStream(log))
    monkeypatch.setattr(gloo_transfer, "_on", on)
    monkeypatch.setattr(torch.cuda, "synchronize", device_sync)
    monkeypatch.setattr(torch.cuda, "default_stream", lambda device=None: "default")
    return log


def test_gloo_receive_orders_the_scatter_on_its_own_stream(
    peers: list[Peer], copy_stream_log: list[str]
) -> None:
    host = create_pool_host("gloo", SHAPE, DTYPE, torch.device("cpu"), "decode-0")
    try:
        before = seeded_pool(41)
        host.pool.copy_(before)
        src, dst = random_transfer(42, 6)
        future = host.expect(300, "prefill-0", dst)
        peers.append(Peer("send", send_args(host.endpoint, 43, [[300, src, dst]])))
        assert peers[0].read() == {"ok": True, "errors": []}
        future.result(timeout=TIMEOUT)
        assert_only_blocks_changed(host.pool, before, seeded_pool(43), src, dst)
        # The receive, then the scatter, each on the stream; only that stream is synchronised,
        # after the scatter and before the transfer is reported complete.
        assert copy_stream_log == ["enter", "exit", "enter", "exit", "stream.synchronize"]
    finally:
        host.close()


def test_gloo_send_waits_for_the_prefill_then_copies_on_its_own_stream(
    peers: list[Peer], copy_stream_log: list[str]
) -> None:
    peers.append(Peer("host", {"kind": "gloo", "shape": SHAPE, "seed": 51}))
    endpoint = peers[0].read()["endpoint"]
    src, dst = random_transfer(52, 4)
    peers[0].write(op="expect", tid=9, src="prefill-0", dst=dst)
    sender = KVSender(seeded_pool(53), "prefill-0")
    try:
        sender.send(9, endpoint, src, dst)
        peers[0].write(op="check", tid=9, src_seed=53, src=src, dst=dst)
        assert peers[0].read() == {"ok": True}
        # Ordered after the work already on the default stream (the prefill that wrote the
        # blocks), and nothing more: no device-wide synchronize (it would raise).
        assert copy_stream_log == ["enter", "stream.wait_stream(default)", "exit"]
    finally:
        sender.close()
