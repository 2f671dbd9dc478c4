"""An attention executor under hostile input: a real ExecutorWorker (in a thread, with a fake
router in the test) is sent odd frame counts, random bytes, valid messages of the wrong type,
bogus AttachLinks, forged and replayed steps. It stays alive, keeps its decode worker's link,
answers the next legitimate step exactly as local attention would, and counts every drop. With
a cluster key, a process without it never reaches the step socket at all."""

from __future__ import annotations

import os
import signal
import threading
import time
from multiprocessing.shared_memory import SharedMemory
from types import SimpleNamespace

import msgspec
import pytest
import torch
import zmq

from attention.executor import AttentionExecutor
from attention.executor_worker import ExecutorWorker
from attention.torch_backend import TorchAttention
from server.roles.offload_client import OffloadClient
from transport import shm_transfer
from transport.attention_channel import SEGMENT_PREFIX
from transport.kv_transfer import create_pool_host
from transport.messages import (
    AttachLink,
    AttachPool,
    AttentionStep,
    DecodeReserved,
    Register,
    ReleaseOffloaded,
    ReserveDecode,
    SamplingSpec,
    Shutdown,
    TokenOutput,
    decode,
    encode,
)
from transport.security import (
    ClusterKey,
    generate_cluster_key,
    secure_client,
    secure_server,
    start_authenticator,
)

LAYERS, HEADS, KV_HEADS, HEAD_DIM, BLOCK = 2, 2, 1, 8, 4
PREFILL_BLOCKS, OFFLOAD_BLOCKS = 8, 8
PROMPT_TOKENS = 5  # their KV sits in lent blocks [1, 2]; the first decode step writes position 5
SAMPLING = SamplingSpec(max_tokens=4, temperature=0.0, top_p=1.0, top_k=-1, min_p=0.0, seed=None,
                        stop=[], stop_token_ids=[], ignore_eos=True, logprobs=False)  # fmt: skip


class FakeRouter:
    def __init__(self, key: ClusterKey | None) -> None:
        self.ctx = zmq.Context()
        self.auth = start_authenticator(self.ctx, key)
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        secure_server(self.sock, key, "tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{self.sock.bind_to_random_port('tcp://127.0.0.1')}"
        self.last_stats = None

    def expect(self, kind: type, timeout_s: float = 10.0, where=lambda m: True):
        deadline = time.monotonic() + timeout_s
        while self.sock.poll(max(1, int((deadline - time.monotonic()) * 1000))):
            _, raw = self.sock.recv_multipart()
            msg = decode(raw)
            if isinstance(msg, Register):
                self.last_stats = msg.stats
            if isinstance(msg, kind) and where(msg):
                return msg
        raise AssertionError(f"no {kind.__name__} within {timeout_s}s")

    def send(self, msg) -> None:
        self.sock.send_multipart([b"attention-0", encode(msg)])

    def close(self) -> None:
        self.sock.close(0)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()


@pytest.fixture(params=[None, "key"], ids=["keyless", "cluster key"])
def deployment(request, monkeypatch):
    key = ClusterKey.parse(generate_cluster_key(), "test") if request.param else None
    host = create_pool_host("shm", (LAYERS, 2, PREFILL_BLOCKS + OFFLOAD_BLOCKS, BLOCK, KV_HEADS,
                                    HEAD_DIM), torch.float32, torch.device("cpu"), "prefill-0")  # fmt: skip
    host.pool.copy_(torch.randn(host.pool.shape, generator=torch.Generator().manual_seed(0)))
    host.endpoint.update(offload_base=PREFILL_BLOCKS, offload_blocks=OFFLOAD_BLOCKS)
    router = FakeRouter(key)
    backend = TorchAttention(HEADS, KV_HEADS, HEAD_DIM, HEAD_DIM**-0.5)
    worker = ExecutorWorker(
        "attention-0", "prefill-0", lambda pool, base, n: AttentionExecutor(pool, backend, base, n),
        router.address, "127.0.0.1", "tiny", 64, "cpu", key,
    )  # fmt: skip
    monkeypatch.setattr(signal, "signal", lambda *_: None)  # run() outside the main thread
    # Creator and peer share this process: the peer's opening must not untrack the creator's
    # segments (on Python < 3.13 it unregisters them from the resource tracker).
    monkeypatch.setattr(
        shm_transfer, "resource_tracker", SimpleNamespace(unregister=lambda *_: None)
    )
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    client = OffloadClient("decode-0", LAYERS, 4, HEADS, KV_HEADS, HEAD_DIM, torch.float32,
                           cluster_key=key)  # fmt: skip
    try:
        router.expect(Register)
        router.send(AttachPool(host.endpoint))
        router.expect(Register, where=lambda m: bool(m.kv_endpoint))
        router.send(ReserveDecode("r", [3] * PROMPT_TOKENS, [7], None, 0, SAMPLING, "prefill-0", 1,
                                  lent_blocks=[1, 2]))  # fmt: skip
        assert router.expect(DecodeReserved).error is None
        client.connect("attention-0", worker.address)
        yield worker, router, client, host.pool, key
    finally:
        worker.stopping = True
        thread.join(timeout=10)
        client.close()
        router.close()
        host.close()
    assert not thread.is_alive()


def run_step(client: OffloadClient, pool: torch.Tensor, position: int, seed: int) -> None:
    """One offloaded decode step, checked against local attention on a private copy of the
    pool: every layer's output must be exactly the same."""
    expected_pool = pool.clone()
    backend = TorchAttention(HEADS, KV_HEADS, HEAD_DIM, HEAD_DIM**-0.5)
    gen = torch.Generator().manual_seed(seed)
    slot = torch.tensor([2 * BLOCK + position % BLOCK])  # block table [1, 2]
    step = client.begin_step(0, [("attention-0", [("r", position)])])
    for layer in range(LAYERS):
        q = torch.randn(1, HEADS, HEAD_DIM, generator=gen)
        k, v = torch.randn(2, 1, KV_HEADS, HEAD_DIM, generator=gen)
        step.send(layer, q, k, v)
        got = step.receive(layer)
        k_cache, v_cache = expected_pool[layer, 0], expected_pool[layer, 1]
        backend.write_kv(k, v, k_cache, v_cache, slot)
        want = backend.decode(q, k_cache, v_cache, torch.tensor([position + 1], dtype=torch.int32),
                              torch.tensor([[1, 2]], dtype=torch.int32), position + 1)  # fmt: skip
        assert torch.equal(got, want)


def dealer(ctx: zmq.Context, address: str, identity: bytes, key: ClusterKey | None) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, identity)
    secure_client(sock, key)
    sock.connect(address)
    return sock


def wait_dropped(worker: ExecutorWorker, count: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while worker.dropped.total < count and time.monotonic() < deadline:
        time.sleep(0.02)
    assert worker.dropped.total == count


def bogus_links(legit: dict, wrong_size: str) -> list[dict]:
    return [
        {**legit, "name": 5},  # wrong type
        {**legit, "max_rows": "4"},
        {**legit, "max_rows": 1 << 30},  # would size buffers from it
        {**legit, "num_heads": HEADS + 1},  # not this executor's model
        {**legit, "dtype": "no_such_dtype"},
        {**legit, "name": f"{SEGMENT_PREFIX}{os.getpid()}-gone"},  # no such segment
        {**legit, "name": wrong_size},  # exists, wrong size
        {**legit, "name": "adrenaline-kv-prefill-pool"},  # not a channel segment
        {**legit, "kind": "carrier-pigeon"},
    ]


def test_the_executor_survives_hostile_messages_and_serves_the_next_step(deployment):
    worker, router, client, pool, key = deployment
    run_step(client, pool, PROMPT_TOKENS, seed=1)
    conn = client.executors["attention-0"]
    counters_before = conn.link.region.counters.copy()
    ctx = zmq.Context()
    evil = dealer(ctx, worker.address, b"evil", key)
    impostor = dealer(ctx, worker.address, b"decode-1", key)
    wrong_size = SharedMemory(name=f"{SEGMENT_PREFIX}{os.getpid()}-small", create=True, size=64)
    try:
        hostile = [
            (evil, [b"one", b"two"]),
            (evil, [b"one", b"two", b"three"]),
            (evil, [os.urandom(200)]),
            (evil, [msgspec.msgpack.encode({"type": "AttentionStep", "step_id": "x"})]),
            (evil, [encode(Shutdown())]),  # a router's message, on the step socket
            (evil, [encode(TokenOutput("r", [1], "x", False))]),
            # A forged step for decode-0's link, and one for a link never attached.
            (evil, [encode(AttentionStep("decode-0", 99, ["r"], [PROMPT_TOKENS + 1]))]),
            (impostor, [encode(AttentionStep("decode-1", 1, ["r"], [PROMPT_TOKENS + 1]))]),
            # decode-0's requests released or its link replaced by someone else.
            (evil, [encode(ReleaseOffloaded("decode-0", ["r"]))]),
            (evil, [encode(AttachLink("decode-0", conn.link.endpoint))]),
            # From decode-0 itself: a replayed step id, and links that must not replace its own.
            (conn.sock, [encode(AttentionStep("decode-0", 1, ["r"], [PROMPT_TOKENS + 1]))]),
            *[(conn.sock, [encode(AttachLink("decode-0", link))])
              for link in bogus_links(conn.link.endpoint, wrong_size.name)],
            *[(impostor, [encode(AttachLink("decode-1", link))])
              for link in bogus_links(conn.link.endpoint, wrong_size.name)[:3]],
        ]  # fmt: skip
        for sock, frames in hostile:
            sock.send_multipart(frames)
        wait_dropped(worker, len(hostile))
        # Nothing forged reached the per-layer channel.
        assert (conn.link.region.counters == counters_before).all()
        # The original link still serves decode-0, at the next position, exactly.
        run_step(client, pool, PROMPT_TOKENS + 1, seed=2)
        stats = router.expect(Register, where=lambda m: m.stats.dropped_messages == len(hostile))
        assert stats.stats.num_running == 1  # "r" was not released by the forged message
        if key is not None:  # without the key nothing arrives at all, so nothing is dropped
            outsider = dealer(ctx, worker.address, b"outsider", None)
            outsider.send(encode(AttentionStep("decode-0", 50, ["r"], [PROMPT_TOKENS + 2])))
            outsider.send(os.urandom(64))
            time.sleep(0.5)
            assert worker.dropped.total == len(hostile)
            outsider.close(0)
        run_step(client, pool, PROMPT_TOKENS + 2, seed=3)
    finally:
        evil.close(0)
        impostor.close(0)
        ctx.term()
        wrong_size.close()
        wrong_size.unlink()
