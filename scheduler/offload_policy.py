"""Whether a request's decode attention is offloaded to the executor beside its prefill worker.

`none` is the PD-disaggregation baseline; `always` offloads every request an executor can take;
`ratio:R` offloads a share R, spread evenly over arrivals. The load-aware policy plugs in behind
the same `decide` call.
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


class OffloadPolicy:
    name = "abstract"

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


def parse_policy(text: str) -> OffloadPolicy:
    if text == "none":
        return NeverOffload()
    if text == "always":
        return RatioOffload(1.0)
    if text.startswith("ratio:"):
        try:
            return RatioOffload(float(text.removeprefix("ratio:")))
        except ValueError as exc:
            raise PolicyError(f"bad offload policy {text!r}: {exc}") from exc
    raise PolicyError(f"unknown offload policy {text!r}; use none, always or ratio:R")
