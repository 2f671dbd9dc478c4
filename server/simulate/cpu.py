"""Processor sharing for a deployment whose roles share a CPU (`serve` on one machine). Other
jobs are described one of two ways: `competitors`, the runnable processes they keep on the
machine (as measured meanwhile), which share every core equally with the deployment's runnable
processes (the kernel's fair scheduler); or `background`, the cores they use, and the deployment's
runnable processes split the rest equally. A step that takes `work`
seconds alone takes longer while others run; an executor spinning on a decode worker's
per-layer signal is runnable without work of its own; the router and the benchmark client work
through queues.

The spinner's poll calls sched_yield, and a CPU-bound prefill step beside it takes the core it
yields: a prefill worker shares the cores only with processes that have work. (On sim_vs_real's
three stored sets, load-aware TTFT at 10 req/s: 34/41/16% too long when the prefill shared with
spinners too, 20/29/8% now; TPOT unchanged.) Everyone else still shares with the spinners,
which is what decode steps at saturation show.
"""

from __future__ import annotations

from collections import deque

from server.simulate.events import EventLoop

MIN_CORES = 0.1  # however busy the machine, the deployment gets some time


class CpuPool:
    def __init__(
        self, loop: EventLoop, cores: float, background: float = 0.0, competitors: float = 0.0
    ) -> None:
        self.loop, self.cores, self.background = loop, cores, background
        self.competitors = competitors
        self.active: dict[object, list] = {}  # owner -> [remaining work s, callback, args, token]
        self.holders: dict[object, int] = {}  # owners runnable without work (spinning)
        self.queues: dict[object, deque] = {}  # owners whose work comes in order (router, client)
        self._updated = 0.0
        self._tokens = 0

    @property
    def speed(self) -> float:
        return self._speed(len(self.active) + len(self.holders))

    def _speed(self, runnable: int) -> float:
        if not runnable:
            return 1.0
        if self.competitors:
            return min(1.0, self.cores / (runnable + self.competitors))
        return min(1.0, max(self.cores - self.background, MIN_CORES) / runnable)

    def speed_of(self, owner) -> float:
        if getattr(owner, "role", None) == "prefill":
            return self._speed(len(self.active))
        return self.speed

    def run(self, owner, work_s: float, callback, *args) -> None:
        """`callback(*args)` once `owner` has had `work_s` seconds of a core."""
        self._advance()
        self.active[owner] = [work_s, callback, args, 0]
        self._reschedule()

    def enqueue(self, owner, work_s: float, callback, *args) -> None:
        """As `run`, after the owner's earlier work (one thread handling messages in order)."""
        queue = self.queues.setdefault(owner, deque())
        queue.append((work_s, callback, args))
        if owner not in self.active:
            self._next(owner)

    def hold(self, owner) -> None:
        self._advance()
        self.holders[owner] = self.holders.get(owner, 0) + 1
        self._reschedule()

    def drop(self, owner) -> None:
        self._advance()
        if self.holders.get(owner, 0) > 1:
            self.holders[owner] -= 1
        else:
            self.holders.pop(owner, None)
        self._reschedule()

    def _next(self, owner) -> None:
        queue = self.queues.get(owner)
        if queue:
            work_s, callback, args = queue.popleft()
            self.run(owner, work_s, self._queued_done, owner, callback, args)

    def _queued_done(self, owner, callback, args) -> None:
        callback(*args)
        if owner not in self.active:
            self._next(owner)

    def _advance(self) -> None:
        now = self.loop.now
        elapsed = now - self._updated
        if elapsed > 0:
            for owner, entry in self.active.items():
                entry[0] -= elapsed * self.speed_of(owner)
        self._updated = now

    def _reschedule(self) -> None:
        for owner, entry in self.active.items():
            self._tokens += 1
            entry[3] = self._tokens
            done_at = self.loop.now + max(entry[0], 0.0) / self.speed_of(owner)
            self.loop.at(done_at, self._complete, owner, self._tokens)

    def _complete(self, owner, token: int) -> None:
        entry = self.active.get(owner)
        if entry is None or entry[3] != token:
            return  # superseded by a later rescheduling
        self._advance()
        del self.active[owner]
        self._reschedule()
        entry[1](*entry[2])
