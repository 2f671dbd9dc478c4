"""Which worker takes a request: the live prefill worker with the fewest queued prompt tokens,
and the live decode worker with room for the KV that decodes the fewest requests, then has the
most free blocks left after what it has been promised.

Pure functions over plain data; the router fills `WorkerLoad` from heartbeats and its own books.
"""

from __future__ import annotations

from typing import NamedTuple


class WorkerLoad(NamedTuple):
    """Built for every worker at every placement (64 of them in the simulator's largest
    runs), so a tuple: building frozen dataclasses took 8% of a 64-GPU simulation."""

    instance: str
    alive: bool
    queued_tokens: int  # prompt tokens sent to it and not yet prefilled (router's books)
    num_running: int  # requests it is decoding (router's books)
    num_free_blocks: int  # from its last heartbeat
    pending_blocks: int = 0  # blocks promised to requests since that heartbeat
    assigned_total: int = 0  # requests ever sent to it: spreads ties round-robin


def pick_prefill(workers: list[WorkerLoad], prefer: str | None = None) -> str | None:
    """`prefer`: a worker whose prefix cache holds the prompt (prefix affinity), taken while it
    is alive whatever its load: recomputing the prompt elsewhere costs more than queueing."""
    live = [w for w in workers if w.alive]
    if not live:
        return None
    if prefer is not None and any(w.instance == prefer for w in live):
        return prefer
    return min(live, key=lambda w: (w.queued_tokens, w.assigned_total, w.instance)).instance


def pick_decode(workers: list[WorkerLoad], blocks_needed: int) -> str | None:
    """None when no live decode worker has room for the request's KV right now."""
    fits = [w for w in workers if w.alive and w.num_free_blocks - w.pending_blocks >= blocks_needed]
    if not fits:
        return None
    return min(
        fits,
        # Requests it decodes first: the router's own books are current, heartbeats lag.
        key=lambda w: (
            w.num_running,
            w.pending_blocks - w.num_free_blocks,
            w.assigned_total,
            w.instance,
        ),
    ).instance
