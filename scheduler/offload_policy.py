"""Whether a request's decode attention is offloaded to the executor beside its prefill worker.

`none` is the PD-disaggregation baseline; `always` offloads every request an executor can take;
`ratio:R` offloads a share R, spread evenly over arrivals. `load-aware` (scheduler/load_aware.py)
plugs in behind the same `decide` call and reads the `ClusterView` the router attaches; each is
named on the command line through scheduler/policies.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


class PolicyError(ValueError):
    pass


@dataclass(frozen=True)
class OffloadCandidate:
    """What the router knows when a request's prefill has produced its first token."""

    request_index: int  # arrival order, from 0
    prompt_tokens: int
    executor_alive: bool
    executor_free_blocks: int
    blocks_needed: int
    view: ClusterView | None = None  # filled only for policies with `needs_view`


@dataclass(frozen=True)
class DecodeLoad:
    """The decode worker an offloaded request would join: heartbeat plus the router's books."""

    instance: str
    batch: int  # requests it decodes, local and offloaded
    context_tokens: int  # KV tokens in its own pool that its local attention reads per step
    free_blocks: int  # after what the router has promised since the heartbeat
    last_batch_size: int = 0  # the load its measured step time was taken under
    last_context_tokens: int = 0
    step_time_ms: float = 0.0  # measured moving average; 0 until it has decoded
    offload_wait_ms: float = 0.0  # per layer, waiting on executors past its local work
    heartbeat_at: float = 0.0  # when those measurements arrived: each is observed once


@dataclass(frozen=True)
class ExecutorLoad:
    """The attention executor beside the request's prefill worker, and that prefill worker."""

    instance: str
    alive: bool
    num_blocks: int
    free_blocks: int  # after what the router has promised since the heartbeat
    offloaded: int  # requests whose attention it runs
    offloaded_tokens: int  # KV tokens it attends over per step
    last_offloaded: int = 0  # the load its measured attention time was taken under
    last_offloaded_tokens: int = 0
    attention_time_ms: float = 0.0  # measured moving average of one layer; 0 until it ran
    heartbeat_at: float = 0.0
    prefill_queued_tokens: int = 0  # prompt tokens waiting on the prefill worker it shares with


@dataclass(frozen=True)
class ClusterView:
    decode: DecodeLoad | None  # None when no decode worker is alive
    executor: ExecutorLoad


class OffloadPolicy:
    name = "abstract"
    needs_view = False  # whether the router must build a ClusterView for `decide`

    def decide(self, candidate: OffloadCandidate) -> bool:
        raise NotImplementedError


class NeverOffload(OffloadPolicy):
    name = "none"

    def decide(self, candidate: OffloadCandidate) -> bool:
        return False


class RatioOffload(OffloadPolicy):
    def __init__(self, ratio: float) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise PolicyError(f"offload ratio must be in [0, 1], got {ratio}")
        self.ratio = ratio
        self.name = "always" if ratio == 1.0 else f"ratio:{ratio:g}"

    def decide(self, candidate: OffloadCandidate) -> bool:
        if not candidate.executor_alive:
            return False
        if candidate.executor_free_blocks < candidate.blocks_needed:
            return False
        # Request i is offloaded when floor((i + 1) R) steps past floor(i R): exactly R of
        # every run of arrivals, evenly spaced.
        i = candidate.request_index
        return math.floor((i + 1) * self.ratio) > math.floor(i * self.ratio)
