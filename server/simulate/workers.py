"""The worker processes of a simulated deployment, each as server/roles/worker.py runs it: messages
are read between steps (one that arrives during a step waits for its end), an engine step runs
whenever there is work, and its time comes from the step cost model instead of a device.

Prefill: chunked prompts, the first token, then the KV held until a decode worker has its copy
(one copy at a time, on a side thread) or, offloaded, until its executor lets go. Decode:
reserves, waits for the KV, decodes local and offloaded rows (server/simulate/executor.py).
"""

from __future__ import annotations

import math
from collections import deque
from typing import TYPE_CHECKING

from engine.batcher import ScheduledBatch
from engine.kv_cache import OutOfBlocksError
from engine.step_timing import EWMA
from server.simulate.decode_run import MAX_STEPS, DecodeRun, DecodeRuns
from server.simulate.engine import SimEngine, SimSequence
from server.simulate.step_cost import StepWork
from transport.messages import WorkerStats

if TYPE_CHECKING:
    from server.simulate.cluster import Simulation
    from server.simulate.executor import Executor
    from server.simulate.router import SimRequest

IDLE_POLL_S = 0.05  # an idle worker's socket poll: completions off the socket wait for it


def ewma_repeated(previous: float, sample: float, times: int) -> float:
    """engine.step_timing.ewma applied `times` times with the same sample."""
    if times <= 0:
        return previous
    if previous == 0.0:
        previous, times = sample, times - 1
    return sample + (previous - sample) * (1 - EWMA) ** times


class SimProcess:
    """One process's loop: handle what arrived, then step if there is work."""

    role = "abstract"

    def __init__(self, sim: Simulation, instance: str) -> None:
        self.sim, self.loop, self.instance = sim, sim.loop, instance
        self.busy = False
        self.inbox: deque = deque()
        self._wake_pending = False
        self.poll_started = 0.0  # when its idle loop last began waiting for input
        self.busy_s = 0.0
        self.spinning = False

    def deliver(self, handler, *args) -> None:
        """A message arrives now; handled at once if idle, else after the current step."""
        if self.busy:
            self.inbox.append((handler, args))
            return
        handler(*args)
        self.wake()

    def wake(self) -> None:
        """Runs the loop after everything else due at this instant (what one poll returns)."""
        if not self._wake_pending:
            self._wake_pending = True
            self.loop.at(self.loop.now, self._iterate)

    def _iterate(self) -> None:
        self._wake_pending = False
        if self.busy:
            return
        self.between_steps()
        self.poll_started = self.loop.now
        if self.has_work():
            self.begin_step()
        # Work it cannot schedule (no KV room) keeps the real loop polling without a wait:
        # on a shared CPU it spins, runnable, until a message changes something.
        spinning = not self.busy and self.has_work()
        if spinning != self.spinning:
            self.spinning = spinning
            (self.sim.hold if spinning else self.sim.drop)(self)

    def end_step(self) -> None:
        self.busy = False
        while self.inbox:
            handler, args = self.inbox.popleft()
            handler(*args)
        self._iterate()

    def between_steps(self) -> None:
        pass

    def has_work(self) -> bool:
        return False

    def begin_step(self) -> None:
        raise NotImplementedError

    def heartbeat(self) -> WorkerStats:
        raise NotImplementedError


class EngineWorker(SimProcess):
    def __init__(self, sim: Simulation, instance: str, num_blocks: int) -> None:
        super().__init__(sim, instance)
        self.engine = SimEngine(sim.config.batch, num_blocks, sim.config.block_size)
        self.steps = 0

    def has_work(self) -> bool:
        return self.engine.has_unfinished()

    def step_work(self, batch: ScheduledBatch) -> tuple[StepWork, dict[str, list]]:
        """The step's work, and its offloaded rows by executor."""
        work = StepWork()
        local_rows = local_kv = local_longest = tokens = sampled = 0
        remote, offloaded = work.remote, {}
        for seq, n in batch.entries:
            tokens += n
            done = seq.num_computed_tokens
            end = len(seq.token_ids)
            if done + n == end:
                sampled += 1
            if n > 1 or done + n < end or done < seq.num_prompt_tokens:
                work.prefill.append((n, done))
            elif seq.executor:
                group = remote.get(seq.executor)
                if group is None:
                    remote[seq.executor] = [1, end, end]
                    offloaded[seq.executor] = [seq]
                else:
                    group[0] += 1
                    group[1] += end
                    if end > group[2]:
                        group[2] = end
                    offloaded[seq.executor].append(seq)
            else:
                local_rows += 1
                local_kv += end
                if end > local_longest:
                    local_longest = end
        work.tokens, work.sampled = tokens, sampled
        work.local_rows, work.local_kv, work.local_longest = local_rows, local_kv, local_longest
        return work, offloaded

    def heartbeat(self) -> WorkerStats:
        return WorkerStats(**self.engine_stats(), **self.extra_stats())

    def engine_stats(self) -> dict:
        return self.engine.stats()

    def extra_stats(self) -> dict:
        return {}


class PrefillWorker(EngineWorker):
    role = "prefill"

    def __init__(self, sim: Simulation, instance: str, num_blocks: int) -> None:
        super().__init__(sim, instance, num_blocks)
        self.executor: Executor | None = None
        self.copies_done: list[str] = []
        self._poll_wake_at = -1.0

    # Messages from the router ---------------------------------------------------------------

    def on_prefill(self, req: SimRequest) -> None:
        seq = self.engine.new_sequence(req.wire_id, req.prompt_tokens, req.max_tokens, req)
        seq.itl = req.itl
        self.engine.add_request(seq, handoff=True)

    def on_send_kv(self, req: SimRequest, decode: DecodeWorker) -> None:
        seq = self.engine.requests.get(req.wire_id)
        if seq is None:
            return
        nbytes = len(seq.block_table) * self.sim.block_bytes
        seconds = self.sim.cost.kv_copy_ms(nbytes) / 1000
        self.sim.in_order((self, "kv-send"), seconds, self._copy_done, req, decode)

    def on_abort(self, request_id: str) -> None:
        self.engine.release(request_id)  # lent blocks back, once the executor let go

    # The loop -------------------------------------------------------------------------------

    def _copy_done(self, req: SimRequest, decode: DecodeWorker) -> None:
        decode.deliver(decode.on_kv_arrived, req.wire_id)  # the data plane lands at once
        self.copies_done.append(req.wire_id)
        if not self.busy:
            # Idle, the worker sits in a 50 ms socket poll that a finished copy does not end.
            polls = math.ceil((self.loop.now - self.poll_started) / IDLE_POLL_S)
            wake_at = self.poll_started + max(1, polls) * IDLE_POLL_S
            if wake_at != self._poll_wake_at:
                self._poll_wake_at = wake_at
                self.loop.at(wake_at, self._poll_timeout)

    def _poll_timeout(self) -> None:
        if not self.busy and self.copies_done:
            self._iterate()

    def between_steps(self) -> None:
        for request_id in self.copies_done:
            req = self.engine.requests[request_id].request
            self.engine.release(request_id)
            self.sim.router.send(self.sim.router.on_kv_sent, req)
        self.copies_done.clear()

    def begin_step(self) -> None:
        batch = self.engine.schedule()
        if not batch:
            return
        t = self.sim.cost.step(self.step_work(batch)[0])
        ms = t.ms
        if self.executor is not None and self.executor.requests:
            ms *= self.sim.cost.colocation.prefill_slowdown
        self.busy = True
        self.sim.meter.prefill_step(self, t, ms)
        self.sim.execute(self, ms / 1000, self._end, batch, self.loop.now)

    def _end(self, batch: ScheduledBatch, started: float) -> None:
        now = self.loop.now
        self.busy_s += now - started
        result = self.engine.finish_step(batch, now - started, now, self.sim.token_gaps)
        firsts = [(seq.request, list(seq.block_table)) for seq in result.held]
        # max_tokens 1: done at the first token
        firsts += [(seq.request, None) for seq in result.finished]
        finished = [(seq.request, seq.num_output_tokens) for seq in result.finished]
        self.sim.router.tokens(len(firsts), firsts, finished, now)
        self.steps += 1
        self.end_step()


class DecodeWorker(DecodeRuns, EngineWorker):
    role = "decode"

    def __init__(self, sim: Simulation, instance: str, num_blocks: int) -> None:
        super().__init__(sim, instance, num_blocks)
        self.incoming: dict[str, list[bool]] = {}  # request id -> [KV arrived, StartDecode]
        self.roundtrip_ms = 0.0  # a layer's wait on executors, moving average
        self.run: DecodeRun | None = None  # decision-free steps in flight as one event

    def _sequence(self, req: SimRequest) -> SimSequence:
        seq = self.engine.new_sequence(req.wire_id, req.prompt_tokens, req.max_tokens, req)
        seq.token_ids.append(0)  # the first token, sampled by prefill
        seq.itl, seq.last_token_at = req.itl, req.first_token_at
        return seq

    def on_reserve(self, req: SimRequest) -> None:
        try:
            self.engine.reserve_prefilled(self._sequence(req))
        except OutOfBlocksError:
            self.sim.router.send(self.sim.router.on_reserved, req, False)
            return
        self.incoming[req.wire_id] = [False, False]
        self.sim.router.send(self.sim.router.on_reserved, req, True)

    def on_offloaded(self, req: SimRequest, executor: str) -> None:
        seq = self._sequence(req)
        seq.remote = self.sim.executors[executor].requests.get(req.wire_id)
        self.engine.start_offloaded(seq, executor)

    def on_start(self, request_id: str) -> None:
        entry = self.incoming.get(request_id)
        if entry is not None:
            entry[1] = True

    def on_kv_arrived(self, request_id: str) -> None:
        entry = self.incoming.get(request_id)
        if entry is not None:
            entry[0] = True

    def has_work(self) -> bool:
        return self.engine.has_unfinished()

    def between_steps(self) -> None:
        for request_id, (arrived, started) in list(self.incoming.items()):
            if arrived and started:
                del self.incoming[request_id]
                self.engine.start_prefilled(request_id)

    def begin_step(self) -> None:
        batch = self.engine.schedule()
        if not batch:
            return
        work, offloaded = self.step_work(batch)
        # On a shared CPU a step's time depends on every other process: no runs there.
        if self.sim.cpu is None and not offloaded:
            after = self.engine.decision_free_steps(MAX_STEPS - 1, after=batch)
            if after:
                self._begin_run(batch, work, 1 + after)
                return
        # In name order: every decode worker takes its executors in the same order, so two
        # steps never wait on each other's executor.
        executors = [self.sim.executors[name] for name in sorted(work.remote)]
        for executor in executors:
            if not executor.prepare(offloaded[executor.instance]):
                self._refused(executor)
                return
        self.busy = True
        step = [batch, work, executors, self.loop.now, len(executors)]
        if not executors:
            self._run(step)
        for executor in executors:
            executor.acquire(self._executor_ready, step)

    def _executor_ready(self, step: list) -> None:
        step[4] -= 1
        if step[4] == 0:
            self._run(step)

    def _run(self, step: list) -> None:
        """Every executor of the step is serving it: the layers run."""
        batch, work, executors, requested, _ = step
        t = self.sim.cost.step(work)
        for executor in executors:
            name = executor.instance
            executor.serving_step(t.executor_ms[name], t.executor_bytes.get(name, 0.0))
        self.sim.execute(self, t.ms / 1000, self._end, batch, requested, t, executors)

    def _refused(self, executor: Executor) -> None:
        """The executor's pool cannot grow: its requests are recomputed here; nothing of the
        step is committed (LLMEngine.step on RemoteAttentionError)."""
        for seq in self.engine.reclaim(executor.instance):
            self.sim.send(executor, executor.on_release, seq.request.wire_id)
        self.busy = True
        self.loop.at(self.loop.now + self.sim.config.hop_s, self.end_step)

    def _end(self, batch, requested: float, t, executors: list[Executor]) -> None:
        now = self.loop.now
        seconds = now - requested
        self.busy_s += seconds
        self.sim.meter.decode_step(self, t, len(batch.entries), seconds)
        result = self.engine.finish_step(batch, seconds, now, self.sim.token_gaps)
        for executor in executors:
            executor.release_step()
        if executors:
            wait = t.layer_wait_ms
            if self.sim.cpu is not None and t.ms > 0:  # its wall time, stretched as the step's
                wait *= seconds * 1000 / t.ms
            self.roundtrip_ms = ewma_repeated(self.roundtrip_ms, wait, self.sim.num_layers)
        finished = []
        for seq in result.finished:
            if seq.executor:
                executor = self.sim.executors[seq.executor]
                self.sim.send(executor, executor.on_release, seq.request_id)
            finished.append((seq.request, seq.num_output_tokens))
        self.sim.router.tokens(len(batch.entries), [], finished, now)
        self.steps += 1
        self.end_step()

    def extra_stats(self) -> dict:
        return {"offload_roundtrip_ms": round(self.roundtrip_ms, 4)}
