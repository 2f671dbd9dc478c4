"""The simple offload policies: none, always, ratio:R spread evenly; bad names are refused."""

from __future__ import annotations

import pytest

from scheduler.offload_policy import OffloadCandidate, PolicyError
from scheduler.policies import parse_policy


def candidate(i: int, alive: bool = True, free: int = 100, need: int = 2) -> OffloadCandidate:
    return OffloadCandidate(
        request_index=i, prompt_tokens=20, executor_alive=alive, executor_free_blocks=free,
        blocks_needed=need,
    )  # fmt: skip


@pytest.mark.parametrize("ratio, every", [(0.5, 2), (0.25, 4), (1.0, 1)])
def test_ratio_offloads_exactly_that_share_evenly(ratio, every):
    policy = parse_policy(f"ratio:{ratio}")
    decisions = [policy.decide(candidate(i)) for i in range(40)]
    assert sum(decisions) == 40 * ratio
    offloaded = [i for i, d in enumerate(decisions) if d]
    assert all(b - a == every for a, b in zip(offloaded, offloaded[1:]))


def test_none_never_and_always_whenever_possible():
    assert not any(parse_policy("none").decide(candidate(i)) for i in range(10))
    always = parse_policy("always")
    assert all(always.decide(candidate(i)) for i in range(10))
    assert not always.decide(candidate(0, alive=False))
    assert not always.decide(candidate(0, free=1, need=2))


@pytest.mark.parametrize("text", ["sometimes", "ratio:", "ratio:1.5", "ratio:-0.1", "ratio:x"])
def test_bad_policies_are_refused_with_a_message(text):
    with pytest.raises(PolicyError):
        parse_policy(text)
