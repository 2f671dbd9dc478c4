"""The host-memory signal backend of the per-layer protocol (transport.attention_protocol): the
counters are int64 words in shared memory, written with plain stores and waited on by the calling
thread, so every call has taken effect when it returns. The CPU link runs on it, which is how the
protocol the GPU link shares is exercised between real processes without a GPU.

x86 stores are not reordered with other stores, nor loads with other loads, so rows written
before a counter are visible to whoever sees the counter.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from transport.attention_protocol import Release, Wait


def wait_for(
    counters: np.ndarray,
    index: int,
    value: int,
    timeout_s: float,
    on_idle: Callable[[], None] | None = None,
) -> bool:
    """Spins briefly, then yields the core, until counters[index] >= value; False once timeout_s
    passed. A long wait calls `on_idle` every 0.1 s (a decode worker keeps heartbeating)."""
    if counters[index] >= value:
        return True
    start = time.monotonic()
    next_idle = start + 0.1
    spins = 0
    while counters[index] < value:
        spins += 1
        if spins > 200:
            time.sleep(0 if spins < 2000 else 5e-5)  # the cores are shared by several roles
            now = time.monotonic()
            if now - start > timeout_s:
                return False
            if on_idle is not None and now > next_idle:
                on_idle()
                next_idle = now + 0.1
    return True


class HostSignals:
    """One side's view of the counters in shared memory."""

    graph_safe = False  # the host waits itself: nothing to capture

    def __init__(self, counters: np.ndarray) -> None:
        self.counters = counters  # int64, shared with the peer

    def begin_step(self, seq_base: int, step_tag: int) -> None:
        pass  # values are used as given, when given

    def write(self, index: int, value: int) -> None:
        self.counters[index] = value

    def wait(self, wait: Wait, exact: bool, on_idle: Callable[[], None] | None) -> None:
        c = self.counters
        if c[wait.fail_index] == wait.fail_value:
            return
        reached = wait_for(c, wait.index, wait.value, wait.timeout_s, on_idle)
        if not reached or (exact and c[wait.index] != wait.value):
            c[wait.fail_index] = wait.fail_value

    def answer(
        self, index: int, value: int, fail_index: int, fail_value: int, mark_index: int
    ) -> None:
        if self.counters[fail_index] == fail_value:
            self.counters[mark_index] = fail_value
        self.counters[index] = value

    def drain(self, on_idle: Callable[[], None] | None, release: Release) -> None:
        pass  # every wait had passed or failed by the time it returned

    def read(self, index: int) -> int:
        return int(self.counters[index])

    def store(self, index: int, value: int) -> None:
        self.counters[index] = value

    def close(self) -> None:
        self.counters = None  # the last view of the mapping: it may be unmapped now
