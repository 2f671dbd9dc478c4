"""The router's decisions as pure functions: books kept one request at a time equal a fresh
tally, placement reads them, and the hand-off offloads, places or waits as the policy and the
decode workers' room say."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from scheduler.offload_policy import NeverOffload, RatioOffload
from scheduler.routing import (
    Books,
    cluster_view,
    place_decode,
    tally,
    worker_loads,
)


@dataclass
class Req:
    index: int
    phase: str = "prefill"
    prefill: str = "prefill-0"
    decode: str | None = None
    executor: str | None = None
    prompt_tokens: int = 100
    reserve_blocks: int = 7


@dataclass
class Stats:
    num_running: int = 0
    num_free_blocks: int = 100
    num_blocks: int = 100
    queued_tokens: int = 0
    num_offloaded: int = 0
    context_tokens: int = 0
    last_batch_size: int = 0
    step_time_ms: float = 0.0
    attention_time_ms: float = 0.0
    offload_roundtrip_ms: float = 0.0


@dataclass
class Worker:
    instance: str
    role: str
    stats: Stats = field(default_factory=Stats)
    colocated_with: str = ""
    heartbeat_at: float = 1.0
    alive: bool = True
    stuck: bool = False
    available: bool = True


def cluster(**decode_stats) -> dict[str, Worker]:
    workers = [
        Worker("prefill-0", "prefill"),
        Worker("attention-0", "attention", colocated_with="prefill-0"),
        Worker("decode-0", "decode", Stats(**decode_stats)),
        Worker("decode-1", "decode", Stats(**decode_stats)),
    ]
    return {w.instance: w for w in workers}


def test_books_kept_incrementally_equal_a_fresh_tally():
    rng = random.Random(0)
    requests = [Req(i, prompt_tokens=rng.randint(1, 500)) for i in range(40)]
    books = tally(requests)
    for _ in range(400):
        r = rng.choice(requests)
        books.add(r, -1)
        r.phase = rng.choice(["prefill", "reserving", "transferring", "decoding", "done"])
        r.decode = rng.choice([None, "decode-0", "decode-1"])
        r.executor = rng.choice([None, None, "attention-0"])
        r.reserve_blocks = rng.randint(1, 40)
        books.add(r, 1)
        assert books == tally(requests)
    for r in requests:
        books.add(r, -1)
    assert books == Books()


def test_loads_count_queued_prompts_and_placed_requests():
    workers = cluster()
    requests = [Req(0, prompt_tokens=300), Req(1, phase="reserving", decode="decode-1")]
    books = tally(requests)
    prefill = worker_loads("prefill", workers.values(), books, {"prefill-0": 2})
    assert (prefill[0].queued_tokens, prefill[0].assigned_total) == (300, 2)
    decode = {w.instance: w for w in worker_loads("decode", workers.values(), books, {})}
    assert decode["decode-1"].num_running == 1 and decode["decode-1"].pending_blocks == 7
    assert decode["decode-0"].num_running == 0


def test_hand_off_places_on_the_least_loaded_decode_worker_without_offloading():
    workers = cluster()
    books = tally([Req(1, phase="decoding", decode="decode-0")])
    placement = place_decode(NeverOffload(), Req(2, phase="reserving"), workers, books, {})
    assert (placement.decode, placement.executor) == ("decode-1", None)


def test_offloaded_request_needs_no_decode_kv_room():
    workers = cluster(num_free_blocks=3)  # less than the 7 blocks the request needs
    req = Req(0, phase="reserving")
    assert place_decode(NeverOffload(), req, workers, Books(), {}).decode is None
    placement = place_decode(RatioOffload(1.0), req, workers, Books(), {})
    assert (placement.decode, placement.executor) == ("decode-0", "attention-0")


def test_no_live_decode_worker_is_reported_apart_from_no_room():
    workers = cluster(num_free_blocks=0)
    waiting = place_decode(NeverOffload(), Req(0, phase="reserving"), workers, Books(), {})
    assert waiting.decode is None and waiting.decode_alive
    for name in ("decode-0", "decode-1"):
        workers[name].alive = workers[name].available = False
    gone = place_decode(NeverOffload(), Req(0, phase="reserving"), workers, Books(), {})
    assert gone.decode is None and not gone.decode_alive


def test_cluster_view_adds_what_was_placed_since_the_heartbeats():
    workers = cluster(context_tokens=1000, num_running=2)
    workers["attention-0"].stats = Stats(num_free_blocks=50, num_offloaded=1, context_tokens=80)
    requests = [
        Req(0, phase="transferring", decode="decode-0", prompt_tokens=200, reserve_blocks=13),
        Req(1, phase="reserving", decode="decode-0", executor="attention-0", prompt_tokens=40,
            reserve_blocks=3),
    ]  # fmt: skip
    view = cluster_view(workers["attention-0"], workers, tally(requests), {})
    assert view.decode.instance == "decode-1"  # decode-0 has two requests placed on it
    requests[0].decode = requests[1].decode = "decode-1"
    view = cluster_view(workers["attention-0"], workers, tally(requests), {})
    assert view.decode.instance == "decode-0"
    assert (view.executor.free_blocks, view.executor.offloaded_tokens) == (47, 120)
    assert view.executor.offloaded == 1
