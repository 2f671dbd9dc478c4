"""Time spans of work enqueued on the current stream: CUDA events on a GPU, where a call only
enqueues its kernels and a host clock would measure their launch, and the host clock on the CPU,
where the work has run by the time the call returns. A step's spans are read after the step's
own synchronization (its link's check()), so reading them adds no host sync of its own beyond
waiting for the last span's end.
"""

from __future__ import annotations

import time

import torch


class SpanTimer:
    def __init__(self, device: torch.device | str) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []  # reused
        self._host: list[list[float]] = []
        self._count = 0

    def start(self) -> None:
        if not self.cuda:
            self._host.append([time.perf_counter(), 0.0])
            return
        if self._count == len(self._events):
            # External: a CUDA graph captured over a span records its events on each replay.
            self._events.append(tuple(
                torch.cuda.Event(enable_timing=True, external=True) for _ in range(2)
            ))  # fmt: skip
        self._events[self._count][0].record()

    def stop(self) -> None:
        if not self.cuda:
            self._host[-1][1] = time.perf_counter()
            return
        self._events[self._count][1].record()
        self._count += 1

    def spans_ms(self) -> list[float]:
        """Each span since the last read, in milliseconds; forgets them."""
        if not self.cuda:
            spans, self._host = self._host, []
            return [(end - start) * 1000 for start, end in spans]
        count, self._count = self._count, 0
        if count:
            self._events[count - 1][1].synchronize()
        return [start.elapsed_time(end) for start, end in self._events[:count]]

    def replayed(self, count: int) -> None:
        """A CUDA graph captured over `count` spans (started with none unread) has run: its
        events hold this replay's spans. On the CPU each span was timed as its work ran."""
        if self.cuda:
            if count > len(self._events):
                raise RuntimeError(f"a replay of {count} spans, {len(self._events)} captured")
            self._count = count

    def discard(self) -> None:
        self._host.clear()
        self._count = 0
