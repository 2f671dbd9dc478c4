"""Placement picks live workers by load, spreading ties round-robin."""

from __future__ import annotations

from scheduler.placement import WorkerLoad, pick_decode, pick_prefill


def load(name: str, **kw) -> WorkerLoad:
    base = dict(alive=True, queued_tokens=0, num_running=0, num_free_blocks=100)
    return WorkerLoad(instance=name, **{**base, **kw})


def test_prefill_goes_to_fewest_queued_tokens_among_live_workers():
    workers = [load("p0", queued_tokens=50), load("p1", queued_tokens=10),
               load("p2", queued_tokens=0, alive=False)]  # fmt: skip
    assert pick_prefill(workers) == "p1"


def test_prefill_ties_rotate_by_requests_assigned():
    workers = [load("p0", assigned_total=3), load("p1", assigned_total=2)]
    assert pick_prefill(workers) == "p1"


def test_no_live_worker_gives_none():
    assert pick_prefill([load("p0", alive=False)]) is None
    assert pick_decode([load("d0", alive=False)], 1) is None


def test_decode_needs_room_after_pending_reservations():
    workers = [load("d0", num_free_blocks=10, pending_blocks=8), load("d1", num_free_blocks=3)]
    assert pick_decode(workers, 3) == "d1"
    assert pick_decode(workers, 4) is None


def test_decode_prefers_fewer_running_then_more_free_blocks():
    workers = [load("d0", num_running=4, num_free_blocks=90), load("d1", num_running=2,
               num_free_blocks=20), load("d2", num_running=2, num_free_blocks=50)]  # fmt: skip
    assert pick_decode(workers, 1) == "d2"


def test_pick_prefill_prefers_the_sibling_while_alive() -> None:
    busy, idle = load("p0", queued_tokens=500), load("p1")
    assert pick_prefill([busy, idle]) == "p1"
    assert pick_prefill([busy, idle], prefer="p0") == "p0"
    assert pick_prefill([load("p0", alive=False), idle], prefer="p0") == "p1"
    assert pick_prefill([busy, idle], prefer="p9") == "p1"  # gone: load decides
