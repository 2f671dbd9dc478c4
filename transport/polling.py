"""One host-side wait for the per-layer links: polls a completion test until it holds or a
timeout passes, sleeping briefly between polls (the cores are shared by several roles) and
calling `on_idle` every 0.1 s meanwhile, so that a decode worker keeps heartbeating."""

from __future__ import annotations

import time
from collections.abc import Callable

IDLE_EVERY_S = 0.1
POLL_SLEEP_S = 5e-5


def poll_until(
    done: Callable[[], bool],
    timeout_s: float,
    on_idle: Callable[[], None] | None = None,
    start: float | None = None,
) -> bool:
    """True once done() holds; False once timeout_s passed since `start` (default: now)."""
    start = time.monotonic() if start is None else start
    next_idle = start + IDLE_EVERY_S
    while not done():
        now = time.monotonic()
        if now - start > timeout_s:
            return False
        if on_idle is not None and now > next_idle:
            on_idle()
            next_idle = now + IDLE_EVERY_S
        time.sleep(POLL_SLEEP_S)
    return True
