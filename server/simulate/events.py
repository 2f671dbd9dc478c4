"""The simulated clock: a heap of (time, order, callback, args). Callbacks due at the same
instant run in the order they were scheduled."""

from __future__ import annotations

import heapq
import itertools
import math


class EventLoop:
    def __init__(self) -> None:
        self.now = 0.0  # seconds
        self._queue: list = []
        self._order = itertools.count()
        self._stopped = False
        self.events = 0
        self.order: float = -1  # the running callback's place in the order (-1: none yet)

    def at(self, when: float, callback, *args) -> None:
        if when < self.now:
            raise ValueError(f"cannot schedule at {when} s, before now ({self.now} s)")
        heapq.heappush(self._queue, (when, next(self._order), callback, args))

    def reserve_order(self) -> int:
        """The place an event scheduled now would take, taken without the event: a caller
        that applies it later itself (`runs_before`) keeps every tie as the heap would."""
        return next(self._order)

    def runs_before(self, when: float, order: int) -> bool:
        """Whether an event at `when` with `order` would have run before the running one."""
        return when < self.now or (when == self.now and order < self.order)

    def after(self, delay: float, callback, *args) -> None:
        self.at(self.now + delay, callback, *args)

    def stop(self) -> None:
        """Ends `run` after the current callback; what is scheduled stays for a later run."""
        self._stopped = True

    def run(self, until: float = math.inf) -> None:
        self._stopped = False
        queue, pop = self._queue, heapq.heappop
        while queue and not self._stopped:
            if queue[0][0] > until:
                self.now, self.order = until, math.inf  # all that is due by `until` has run
                return
            when, self.order, callback, args = pop(queue)
            self.now = when
            self.events += 1
            callback(*args)
