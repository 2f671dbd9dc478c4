"""The router's control plane in-process, against hand-driven fake workers on real ZeroMQ
sockets: who it believes, what it survives, and how it moves a request whose worker is lost."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time

import msgspec
import pytest
import zmq
import zmq.asyncio

from engine.sequence import InvalidRequestError
from server.router import core
from server.router.core import Router
from transport.messages import (
    DecodeReserved,
    KVSent,
    Prefill,
    Register,
    RequestError,
    ReserveDecode,
    SamplingSpec,
    SendKV,
    StartDecode,
    TokenOutput,
    WorkerStats,
    decode,
    encode,
)

GREEDY = SamplingSpec(max_tokens=8, temperature=0.0, top_p=1.0, top_k=-1, min_p=0.0, seed=None,
                      stop=[], stop_token_ids=[], ignore_eos=True, logprobs=False)  # fmt: skip
STATS = WorkerStats(num_running=0, num_waiting=0, num_free_blocks=100, num_blocks=100,
                    queued_tokens=0, num_preemptions=0, requests_total=0)  # fmt: skip


class FakeWorker:
    def __init__(self, ctx: zmq.asyncio.Context, address: str, role: str, instance: str,
                 identity: bytes | None = None) -> None:  # fmt: skip
        self.role, self.instance = role, instance
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, identity or instance.encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)

    async def register(self, instance: str | None = None, free_blocks: int = 100) -> None:
        stats = msgspec.structs.replace(STATS, num_free_blocks=free_blocks)
        await self.send(Register(role=self.role, instance=instance or self.instance,
                                 pid=os.getpid(), model="tiny", max_model_len=256,
                                 kv_endpoint={"kind": "shm"}, stats=stats))  # fmt: skip

    async def send(self, message) -> None:
        await self.sock.send(encode(message))

    async def recv(self, timeout: float = 2.0):
        return decode(await asyncio.wait_for(self.sock.recv(), timeout))


@pytest.fixture
def cluster():
    """A router and a factory of fake workers, all on one event loop."""
    loop = asyncio.new_event_loop()
    tmp = tempfile.mkdtemp()
    address = f"ipc://{tmp}/control"
    router = Router("tiny", tokenizer=None, control_address=address, heartbeat_timeout_s=1.0,
                    expect_prefill=1, expect_decode=1)  # fmt: skip
    loop.run_until_complete(router.start())
    ctx = zmq.asyncio.Context()

    def worker(role: str, instance: str, identity: bytes | None = None) -> FakeWorker:
        return FakeWorker(ctx, address, role, instance, identity)

    yield loop, router, worker
    loop.run_until_complete(router.stop())
    ctx.destroy(0)
    loop.close()


async def settle(router: Router, until, timeout: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not until():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.01)


async def prefill_and_decode(router: Router, worker) -> tuple[FakeWorker, FakeWorker]:
    """prefill-0 and decode-0, registered with the router."""
    p, d = worker("prefill", "prefill-0"), worker("decode", "decode-0")
    await p.register()
    await d.register()
    await settle(router, lambda: len(router.workers) == 2)
    return p, d


async def drive_to_decoding(router, prefill: FakeWorker, decode: FakeWorker, request_id: str,
                            first: int = 7) -> None:  # fmt: skip
    """Plays a prefill and a decode worker through the hand-off of `request_id`."""
    msg = await prefill.recv()
    assert isinstance(msg, Prefill)
    await prefill.send(TokenOutput(msg.request_id, [first], "a", False, handoff=True,
                                   block_table=[0]))  # fmt: skip
    reserve = await decode.recv()
    assert isinstance(reserve, ReserveDecode) and reserve.output_token_ids[-1] == first
    await decode.send(DecodeReserved(reserve.request_id, [3]))
    assert isinstance(await prefill.recv(), SendKV)
    await prefill.send(KVSent(reserve.request_id))
    assert isinstance(await decode.recv(), StartDecode)


def test_forged_registration_and_outputs_are_dropped(cluster):
    loop, router, worker = cluster

    async def main():
        p, d = await prefill_and_decode(router, worker)
        # Another process claims decode-0 from its own identity, advertising room galore.
        forger = worker("decode", "forger")
        await forger.register(instance="decode-0", free_blocks=10**9)
        await settle(router, lambda: len(router.workers) == 2 and router.dropped_messages >= 1)
        assert router.workers["decode-0"].identity == b"decode-0"
        assert router.workers["decode-0"].registration.stats.num_free_blocks == 100

        stream = router.generate("gen-0", [1, 2, 3], GREEDY)
        first = asyncio.ensure_future(anext(stream))
        await drive_to_decoding(router, p, d, "gen-0")
        # Forged output and error for the request, from a registered worker that does not
        # hold it (the prefill worker, after its hand-off) and from an unregistered one.
        await p.send(TokenOutput("gen-0", [666], "evil", True, finish_reason="stop"))
        await forger.send(RequestError("gen-0", "forged", 503))
        await d.send(TokenOutput("gen-0", [8], "b", False))
        assert (await first).token_ids == [7]
        assert (await anext(stream)).token_ids == [8]
        assert router.dropped_messages >= 3
        await d.send(TokenOutput("gen-0", [9], "c", True, finish_reason="length"))
        last = await anext(stream)
        assert last.token_ids == [9] and last.finished
        await stream.aclose()
        assert not router.requests

    loop.run_until_complete(main())


def test_receive_loop_survives_any_frame(cluster):
    loop, router, worker = cluster

    async def main():
        p, d = await prefill_and_decode(router, worker)
        junk = [[b"a", b"b"], [b"", b"", b""], [b"\x00" * 100], [b"\xc1"],
                [encode(STATS)],  # valid msgpack, not a message
                [msgspec.msgpack.encode({"type": "TokenOutput", "request_id": 5})]]  # fmt: skip
        for frames in junk:
            await p.sock.send_multipart(frames)
        await settle(router, lambda: router.dropped_messages >= len(junk))
        stream = router.generate("gen-1", [1, 2], GREEDY)
        first = asyncio.ensure_future(anext(stream))
        msg = await p.recv()
        await p.send(TokenOutput(msg.request_id, [4], "x", True, finish_reason="stop"))
        assert (await first).token_ids == [4]
        await stream.aclose()

    loop.run_until_complete(main())


def test_out_of_range_integers_are_refused_and_leak_nothing(cluster):
    loop, router, worker = cluster

    async def main():
        p, d = await prefill_and_decode(router, worker)
        bad = msgspec.structs.replace(GREEDY, seed=2**64)
        with pytest.raises(InvalidRequestError):
            await anext(router.generate("gen-2", [1, 2], bad))
        assert not router.requests

    loop.run_until_complete(main())


def test_a_dead_decode_worker_s_request_continues_on_another(cluster):
    loop, router, worker = cluster

    async def main():
        p = worker("prefill", "prefill-0")
        d0, d1 = worker("decode", "decode-0"), worker("decode", "decode-1")
        for w in (p, d0, d1):
            await w.register()
        await settle(router, lambda: len(router.workers) == 3)
        stream = router.generate("gen-3", [1, 2, 3], GREEDY)
        first = asyncio.ensure_future(anext(stream))
        # The request lands on decode-0 or decode-1; play whichever it picked.
        msg = await p.recv()
        await p.send(TokenOutput(msg.request_id, [7], "a", False, handoff=True, block_table=[0]))
        req = router.requests["gen-3"]
        await settle(router, lambda: req.decode is not None)
        victim, survivor = (d0, d1) if req.decode == "decode-0" else (d1, d0)
        reserve = await victim.recv()
        await victim.send(DecodeReserved(reserve.request_id, [3]))
        assert isinstance(await p.recv(), SendKV)
        await p.send(KVSent(reserve.request_id))
        assert isinstance(await victim.recv(), StartDecode)
        await victim.send(TokenOutput("gen-3", [8], "b", False))
        assert (await first).token_ids == [7]
        assert (await anext(stream)).token_ids == [8]
        # The victim falls silent; the survivor and the prefill worker keep beating.
        for _ in range(15):
            await p.register()
            await survivor.register()
            await asyncio.sleep(0.1)
        migrated = await p.recv()
        while not isinstance(migrated, Prefill):
            migrated = await p.recv()
        assert migrated.request_id != "gen-3"  # a fresh wire id
        assert migrated.output_token_ids == [7, 8] and migrated.text_sent == 2
        await p.send(TokenOutput(migrated.request_id, [9], "c", False, handoff=True,
                                 block_table=[0]))  # fmt: skip
        reserve = await survivor.recv()
        assert reserve.output_token_ids == [7, 8, 9]
        await survivor.send(DecodeReserved(reserve.request_id, [5]))
        assert isinstance(await p.recv(), SendKV)
        await p.send(KVSent(reserve.request_id))
        assert isinstance(await survivor.recv(), StartDecode)
        await survivor.send(
            TokenOutput(reserve.request_id, [10], "d", True, finish_reason="length")
        )
        rest = [await anext(stream), await anext(stream)]
        assert [o.token_ids for o in rest] == [[9], [10]]
        assert all(o.request_id == "gen-3" for o in rest)
        await stream.aclose()
        assert router.counters["migrated"] == 1 and not router.requests

    loop.run_until_complete(main())


def test_a_stalled_router_blames_no_worker_and_no_hand_off(cluster, monkeypatch):
    """The router's own loop stops for longer than the heartbeat timeout (1 s) and the hand-off
    deadline (1 s here) while a request waits on its decode reservation; its workers were
    silent only while the router could not listen, so nothing dies and nothing moves."""
    monkeypatch.setattr(core, "HANDOFF_TIMEOUT_S", 1.0)
    loop, router, worker = cluster

    async def main():
        p, d = await prefill_and_decode(router, worker)
        stream = router.generate("gen-4", [1, 2, 3], GREEDY)
        first = asyncio.ensure_future(anext(stream))
        msg = await p.recv()
        await p.send(TokenOutput(msg.request_id, [7], "a", False, handoff=True, block_table=[0]))
        reserve = await d.recv()
        assert isinstance(reserve, ReserveDecode)
        time.sleep(1.5)  # the whole event loop, router included, stops
        await asyncio.sleep(0.1)  # housekeeping runs before the late replies arrive
        assert all(w.alive for w in router.workers.values())
        await d.send(DecodeReserved(reserve.request_id, [3]))
        assert isinstance(await p.recv(), SendKV)
        await p.send(KVSent(reserve.request_id))
        assert isinstance(await d.recv(), StartDecode)
        await d.send(TokenOutput("gen-4", [8], "b", True, finish_reason="length"))
        assert (await first).token_ids == [7]
        assert (await anext(stream)).token_ids == [8]
        await stream.aclose()
        assert router.counters["migrated"] == 0 and not router.requests
        # Silence the router hears still counts: decode-0 stops beating and dies within ~1 s.
        for _ in range(15):
            await p.register()
            await asyncio.sleep(0.1)
        assert router.workers["prefill-0"].alive and not router.workers["decode-0"].alive

    loop.run_until_complete(main())
