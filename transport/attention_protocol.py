"""The per-layer protocol between a decode worker and an attention executor, whatever carries
it: five int64 counters and a buffer of rows each way. The host link (transport.attention_channel)
and the GPU link (transport.cuda_attention_channel) run this one implementation; they differ only
in where the counters live and how a side waits on and writes them (its `Signals`).

Per layer the decode side writes q, k, v, then REQUEST = seq_no; the executor waits for exactly
that value, computes, writes out, then RESPONSE = seq_no. seq_no = step * num_layers + layer + 1
only grows, so a stale value is never taken for a fresh one. A side whose wait timed out (or, on
the executor, found a later request: the decode worker gave up on the step and moved on) marks
its FAILED counter with step + 1. From then on its waits of that step pass at once, and every
answer the executor still writes for the step is preceded by REFUSED = step + 1: a decode worker
that was merely late then gets StepRefused, never output computed from stale rows. Nothing
raises before check(), run at the step's end, which is also the only call that blocks the host
on a GPU link.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

# Counter indices. REFUSED and the FAILED flags hold step + 1, so they never need resetting.
REQUEST, RESPONSE, REFUSED, EXECUTOR_FAILED, DECODE_FAILED = range(5)
NUM_COUNTERS = 8  # 64 bytes: room to grow without changing the layout


class ChannelTimeout(TimeoutError):
    """The peer did not answer in time: it is dead, stuck, or gave up on the step."""


class StepRefused(RuntimeError):
    """The executor could not serve this step (an unknown request, no KV blocks left, or its
    own wait for the step's rows failed)."""


@dataclass(frozen=True)
class Wait:
    """One wait a side enqueued: until counters[index] >= value, failing as fail_value."""

    index: int
    value: int
    fail_index: int
    fail_value: int
    timeout_s: float


# Called by Signals.drain for a wait idle past its timeout, with the largest value any pending
# wait on that counter needs: it must store what lets the wait, and the step's later ones, pass.
Release = Callable[[Wait, int], None]


class Signals(Protocol):
    """Where one side's counters live and how it waits on and writes them. Every call but read,
    store and drain may only enqueue its effect, in order; drain makes all of it happen."""

    # Whether the enqueued signals take a step's numbers from memory (begin_step's base), not
    # from launch arguments, so that a captured CUDA graph of a step replays for a later one.
    graph_safe: bool

    def begin_step(self, seq_base: int, step_tag: int) -> None:
        """The step's sequence numbers are seq_base + layer + 1, its failure tag step_tag (step
        + 1); a backend that reads them from memory enqueues them there."""
        ...

    def write(self, index: int, value: int) -> None:
        """counters[index] = value, after every write to the link's buffers before it."""
        ...

    def wait(self, wait: Wait, exact: bool, on_idle: Callable[[], None] | None) -> None:
        """Work after this waits until counters[index] >= value, unless counters[fail_index]
        already holds fail_value. On a timeout (or, if exact, a larger value) it stores
        fail_value at fail_index and lets the work after it run on (it is then discarded)."""
        ...

    def answer(
        self, index: int, value: int, fail_index: int, fail_value: int, mark_index: int
    ) -> None:
        """counters[index] = value, first storing fail_value at mark_index if this side's step
        failed (counters[fail_index] == fail_value)."""
        ...

    def drain(self, on_idle: Callable[[], None] | None, release: Release) -> None:
        """Blocks until every wait enqueued since the last drain passed; hands one idle past its
        timeout (its peer is gone) to `release`. Calls `on_idle` every 0.1 s meanwhile."""
        ...

    def read(self, index: int) -> int:
        """The counter as the host sees it; after drain, it reflects all enqueued work."""
        ...

    def store(self, index: int, value: int) -> None:
        """A plain host store, seen by the peer and by this side's pending waits."""
        ...

    def replayed(self, waits: list[Wait]) -> None:
        """A CUDA graph captured over wait() calls for a step has run for another step: its
        waits, in order, are these (the graph's waits read their numbers from begin_step's
        memory). drain() must then poll them as if wait() had just enqueued them."""
        ...


class DecodeSide:
    """The decode worker's end: posts a layer's rows, collects its output, checks the step."""

    def __init__(self, signals: Signals, tensors: dict[str, torch.Tensor], max_rows: int) -> None:
        self.signals = signals
        self.tensors = tensors  # q, k, v, out: [max_rows, heads, head_dim] each
        self.max_rows = max_rows
        self._step: int | None = None  # the step collected since the last check
        self._timeout_s = 0.0

    @property
    def graph_safe(self) -> bool:
        return self.signals.graph_safe

    def begin_step(self, step_id: int, first_seq_no: int) -> None:
        """Before the step's first post (first_seq_no: its layer 0's sequence number)."""
        self.signals.begin_step(first_seq_no - 1, step_id + 1)

    def post(self, seq_no: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        # Safe to overwrite: this side waited for the previous layer's answer, which the
        # executor writes only after its attention consumed the previous rows.
        n = q.shape[0]
        for name, rows in (("q", q), ("k", k), ("v", v)):
            self.tensors[name][:n].copy_(rows)
        self.signals.write(REQUEST, seq_no)

    def collect(
        self,
        seq_no: int,
        step_id: int,
        n: int,
        timeout_s: float,
        on_idle: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        """The layer's output rows; valid only once check() passed for the step."""
        out = self.enqueue_collect(seq_no, step_id, n, timeout_s, on_idle)
        self._step, self._timeout_s = step_id, max(self._timeout_s, timeout_s)
        return out

    def enqueue_collect(
        self,
        seq_no: int,
        step_id: int,
        n: int,
        timeout_s: float,
        on_idle: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        """collect()'s work on the link alone, which is what a CUDA graph of the step holds:
        without the host state check() reads, which replayed() restores after a replay."""
        wait = Wait(RESPONSE, seq_no, DECODE_FAILED, step_id + 1, timeout_s)
        self.signals.wait(wait, False, on_idle)
        return self.tensors["out"][:n].clone()  # the next layer overwrites `out`

    def replayed(self, step_id: int, seq_nos: range, timeout_s: float) -> None:
        """A CUDA graph posted and collected (enqueue_collect) these layers of the step without
        running any host code: leaves what collect() would have left, so that check() still
        raises for a refused or timed-out step instead of passing stale output on."""
        self.signals.replayed(
            [Wait(RESPONSE, seq_no, DECODE_FAILED, step_id + 1, timeout_s) for seq_no in seq_nos]
        )
        self._step, self._timeout_s = step_id, timeout_s

    def check(self, on_idle: Callable[[], None] | None = None) -> None:
        """Run at the step's end: raises StepRefused or ChannelTimeout for the step collected."""
        step, timeout_s, self._step, self._timeout_s = self._step, self._timeout_s, None, 0.0
        self.signals.drain(on_idle, self._release)
        if step is None:
            return
        if self.signals.read(REFUSED) == step + 1:
            raise StepRefused(f"the executor refused step {step}")
        if self.signals.read(DECODE_FAILED) == step + 1:
            raise ChannelTimeout(f"no answer from the executor within {timeout_s}s in step {step}")

    def _release(self, wait: Wait, last: int) -> None:
        self.signals.store(wait.fail_index, wait.fail_value)
        self.signals.store(RESPONSE, max(self.signals.read(RESPONSE), last))


class ExecutorSide:
    """The executor's end: receives a layer's rows, answers it, checks the step."""

    def __init__(self, signals: Signals, tensors: dict[str, torch.Tensor], max_rows: int) -> None:
        self.signals = signals
        self.tensors = tensors
        self.max_rows = max_rows
        self.on_idle: Callable[[], None] | None = None
        self.step_id = 0
        self.rows = max_rows
        self._timeout_s = 0.0

    def begin_step(self, step_id: int, rows: int, first_seq_no: int) -> None:
        """The step's row count, from its AttentionStep: a GPU link's host cannot read it from
        the peer without a sync; first_seq_no, its layer 0's sequence number."""
        if rows > self.max_rows:
            raise ValueError(f"{rows} rows exceed the link's {self.max_rows}")
        self.step_id, self.rows = step_id, rows
        self.signals.begin_step(first_seq_no - 1, step_id + 1)

    @property
    def graph_safe(self) -> bool:
        return self.signals.graph_safe

    def receive(self, seq_no: int, timeout_s: float):
        """The layer's q, k, v rows, once posted; stale if the step failed (see check())."""
        wait = Wait(REQUEST, seq_no, EXECUTOR_FAILED, self.step_id + 1, timeout_s)
        self.signals.wait(wait, True, self.on_idle)
        self._timeout_s = max(self._timeout_s, timeout_s)
        return self.inputs(self.rows)

    def inputs(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = self.tensors
        return t["q"][:n], t["k"][:n], t["v"][:n]

    def respond(self, seq_no: int, out: torch.Tensor) -> None:
        """Answers the layer, marked refused if the step's wait for its rows failed."""
        self.tensors["out"][: out.shape[0]].copy_(out)
        self.signals.answer(RESPONSE, seq_no, EXECUTOR_FAILED, self.step_id + 1, REFUSED)

    def refuse(self, step_id: int, last_seq_no: int) -> None:
        """Answers every layer of the step at once, marked refused."""
        self.signals.write(REFUSED, step_id + 1)
        self.signals.write(RESPONSE, last_seq_no)

    def check(self, on_idle: Callable[[], None] | None = None) -> None:
        """Run at the step's end: ChannelTimeout if the decode worker went silent or moved on
        (the step's KV is then incomplete: do not commit it)."""
        timeout_s, self._timeout_s = self._timeout_s, 0.0
        self.signals.drain(on_idle or self.on_idle, self._release)
        if self.signals.read(EXECUTOR_FAILED) == self.step_id + 1:
            raise ChannelTimeout(f"step {self.step_id}: the decode worker posted no rows within "
                                 f"{timeout_s}s, or moved on to a later step")  # fmt: skip

    def _release(self, wait: Wait, last: int) -> None:
        # REFUSED first: an answer enqueued behind this wait may not be able to mark itself.
        self.signals.store(wait.fail_index, wait.fail_value)
        self.signals.store(REFUSED, wait.fail_value)
        self.signals.store(REQUEST, max(self.signals.read(REQUEST), last))
