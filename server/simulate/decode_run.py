"""Decode steps that cannot change a decision, run as one event. A decode worker whose batch
only decodes local rows, with nothing to admit, no row finishing and KV room for every row's
growth (Batcher.decode_steps_without_decision), takes the times of its next steps from the cost
model at once; each step keeps its own time, gaps and counts. What looks at the worker meanwhile
sees it as if it had stepped: a heartbeat reads the stats the steps done would leave; a
reservation is read at the end of the step it arrives in and the run goes on (shorter if the KV
left no longer covers it); any other message that may decide ends the run at that step's end,
where the worker reads it and schedules as between any two steps.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from typing import TYPE_CHECKING

from engine.batcher import ScheduledBatch
from server.simulate.engine import ewma_over
from server.simulate.step_cost import StepTime, StepWork

if TYPE_CHECKING:
    from server.simulate.workers import DecodeWorker

MAX_STEPS = 128  # steps costed ahead; a longer run continues as the next one


class DecodeRun:
    def __init__(self, worker: DecodeWorker, batch: ScheduledBatch, work: StepWork, steps: int):
        self.worker, self.engine, self.cost = worker, worker.engine, worker.sim.cost
        self.batch, self.work = batch, work  # the first step's: every step's rows
        self.rows = [seq for seq, _ in batch.entries]
        # Step i ends at ends[i], timed from the previous end as Simulation.execute times a
        # step: the same floats.
        end = worker.loop.now
        self.ends = ends = [end]
        for ms in self.cost.decode_steps(work, steps):
            end += ms / 1000
            ends.append(end)
        self.planned = steps  # no decision before this step's end
        self.last = steps  # the step whose end the end event is at
        self.committed = 0  # steps whose tokens are committed
        self.grown = 1  # steps whose KV blocks are allocated: the first by schedule()
        self.version = 0  # of the end event: once the run is shortened, earlier ones are stale
        self.flush_at = 0  # the step at whose end messages that stop nothing are read
        # The step-time moving average through step `ewma_step`, for heartbeats in between.
        self.ewma_step, self.ewma_ms = 0, worker.engine.timing.step_time_ms

    def step_at(self, now: float, arriving: bool) -> int:
        """The step in progress at `now`. A message arriving just as a step ends finds the next
        one begun (that end was scheduled before the message was sent); a heartbeat, due then
        too, was scheduled earlier still and sees the step before its end."""
        step = bisect_right(self.ends, now) if arriving else bisect_left(self.ends, now)
        return min(max(step, 1), self.last)

    def catch_up(self, step: int) -> None:
        """The worker as it is while `step` runs: the steps before committed, its KV grown."""
        if step - 1 > self.committed:
            self.commit(step - 1)
        self.grow(step)

    def grow(self, step: int) -> None:
        """The KV blocks of the steps up to `step`, as their schedule() calls allocate them."""
        if step > self.grown:
            ahead = step - 1 - self.committed  # tokens of done steps not yet appended
            self.engine.batcher.grow_for_decode_steps(step - self.grown, ahead)
            self.grown = step

    def steps_that_fit(self, step: int) -> int:
        """How many steps after `step` (of those planned) the free blocks still cover."""
        rows, ahead = self.rows, step - self.committed
        return self.engine.blocks.decode_rounds_that_fit(rows, self.planned - step, ahead)

    def stats_at(self, step: int, stats: dict) -> dict:
        """SimEngine.stats() as catch_up(step) would leave them, from those of the committed
        steps and the KV grown through `step`: a heartbeat reads each worker four times a
        second, and committing for each would cost more than the steps it commits."""
        done = step - 1 - self.committed
        if done > 0:
            n = len(self.rows)
            stats["context_tokens"] += n * done
            stats["generation_tokens_total"] += n * done
            stats["last_batch_size"], stats["last_prefill_tokens"] = n, 0
            stats["step_time_ms"] = round(self._ewma_through(step - 1), 3)
        return stats

    def _ewma_through(self, step: int) -> float:
        """What the step-time average is once `step` is committed (each step's sample once,
        heartbeats being in time order; from the run's start: the same floats)."""
        ends = self.ends[self.ewma_step : step + 1]
        seconds = [b - a for a, b in zip(ends, ends[1:])]
        self.ewma_ms, self.ewma_step = ewma_over(self.ewma_ms, seconds), step
        return self.ewma_ms

    def commit(self, last: int) -> None:
        """What each step's end does, for the steps after the committed ones up to `last`."""
        first, worker = self.committed + 1, self.worker
        seconds = self.engine.finish_decode_steps(
            self.rows, self.ends, first, last, worker.sim.token_gaps
        )
        for s in seconds:
            worker.busy_s += s
        flops, nbytes = self.cost.decode_totals(self.work, first - 1, last)
        worker.sim.meter.decode_run_steps(flops, nbytes, len(self.rows), seconds)
        worker.steps += last - self.committed
        self.committed = last

    def step_time(self, step: int) -> StepTime:
        w = self.work  # local decode rows alone (no prefill, no remote): the fields that count
        kv = w.local_kv + (step - 1) * w.local_rows
        return self.cost.step(StepWork(w.tokens, w.sampled, local_rows=w.local_rows, local_kv=kv))


class DecodeRuns:
    """DecodeWorker's side of runs: it starts one from begin_step (`_begin_run`) and steps as
    before when none fits."""

    run: DecodeRun | None

    def deliver(self: DecodeWorker, handler, *args) -> None:
        run = self.run
        if run is not None and handler == self.on_kv_arrived:
            entry = self.incoming.get(args[0])
            if entry is None or not entry[1]:
                # Only a flag, read when StartDecode is in too: no need to stop for it.
                handler(*args)
                return
        if run is not None:  # what it brings is read after the step it arrives in
            step = run.step_at(self.loop.now, arriving=True)
            if step < run.last and handler == self.on_reserve:
                # It changes only the KV pool: read at that step's end, the run goes on.
                self.inbox.append((handler, args))
                if run.flush_at != step:
                    run.flush_at = step
                    self.loop.at(run.ends[step], self._read_between, run, step)
                return
            if step < run.last:
                run.last = step
                self._schedule_run_end(run)
        super().deliver(handler, *args)

    def _read_between(self: DecodeWorker, run: DecodeRun, step: int) -> None:
        """Messages read at the end of a run's `step` that decide nothing themselves; the run
        stops early only if what they reserved leaves its next steps short of KV blocks."""
        if self.run is not run or step >= run.last:
            return  # the run stops at this step anyway: end_step reads them there
        run.grow(step)  # this step's blocks came first, from its schedule()
        while self.inbox:
            handler, args = self.inbox.popleft()
            handler(*args)
        planned = step + run.steps_that_fit(step)
        if planned < run.planned:
            run.planned = planned
            if planned < run.last:
                run.last = planned
                self._schedule_run_end(run)

    def engine_stats(self: DecodeWorker) -> dict:
        run = self.run
        if run is None:
            return self.engine.stats()
        step = run.step_at(self.loop.now, arriving=False)
        # The steps begun have had their schedule(): their blocks are taken now, in the order
        # they would have been then (nothing else allocates before the step's end).
        run.grow(step)
        return run.stats_at(step, self.engine.stats())

    def _begin_run(self: DecodeWorker, batch: ScheduledBatch, work: StepWork, steps: int):
        self.run, self.busy = DecodeRun(self, batch, work, steps), True
        self._schedule_run_end(self.run)

    def _schedule_run_end(self: DecodeWorker, run: DecodeRun) -> None:
        run.version += 1
        self.loop.at(run.ends[run.last], self._run_end, run, run.version)

    def _run_end(self: DecodeWorker, run: DecodeRun, version: int) -> None:
        """The run's last step ends as any step does (router, finished rows, next step); one
        stopped early by a message that may decide commits and reads it, then schedules."""
        if version != run.version:
            return  # stopped earlier: a later event ends it
        run.catch_up(run.last)
        self.run = None
        if run.last < run.planned:
            run.commit(run.last)  # no row finishes before the planned end
            self.end_step()
            return
        self._end(run.batch, run.ends[run.last - 1], run.step_time(run.last), [])
