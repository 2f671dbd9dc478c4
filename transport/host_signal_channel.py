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
from transport.polling import poll_until


def wait_for(
    counters: np.ndarray,
    index: int,
    value: int,
    timeout_s: float,
    on_idle: Callable[[], None] | None = None,
) -> bool:
    """Spins briefly, then yields the core, until counters[index] >= value; False once timeout_s
    passed. A long wait calls `on_idle` every 0.1 s (a decode worker keeps heartbeating)."""
    start = time.monotonic()
    # A layer's answer often comes within microseconds: spin, then yield, and only then sleep
    # between polls (a few milliseconds in all, far below any timeout or heartbeat period).
    for spin in range(2000):
        if counters[index] >= value:
            return True
        if spin >= 200:
            time.sleep(0)
    return poll_until(lambda: counters[index] >= value, timeout_s, on_idle, start)


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

    def replayed(self, waits: list[Wait]) -> None:
        pass  # no graph holds host waits: a stand-in replay on the CPU ran each as it came

    def close(self) -> None:
        self.counters = None  # the last view of the mapping: it may be unmapped now
