"""The attention executor of a simulated deployment, as attention/executor_worker.py runs it:
adopts a prefilled request's KV where prefill wrote it (lent blocks), grows it in its own share
of the prefill worker's pool, and serves one decode step at a time, all its layers back to back;
router messages wait for the step's end.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from engine.kv_cache import BlockManager
from engine.sequence import SamplingParams, Sequence
from server.simulate.workers import PrefillWorker, SimProcess, ewma_repeated
from transport.messages import WorkerStats

if TYPE_CHECKING:
    from server.simulate.cluster import Simulation
    from server.simulate.engine import SimSequence
    from server.simulate.router import SimRequest


class Executor(SimProcess):
    """An attention executor beside a prefill worker: owns the tail of its pool."""

    role = "attention"

    def __init__(self, sim: Simulation, instance: str, prefill: PrefillWorker, blocks: int):
        super().__init__(sim, instance)
        self.prefill = prefill
        self.blocks = BlockManager(blocks, sim.config.block_size, enable_prefix_caching=False,
                                   first_block_id=prefill.engine.blocks.num_blocks)  # fmt: skip
        self.requests: dict[str, Sequence] = {}
        self.requests_total = 0
        self.attention_time_ms = 0.0
        self.serving = False  # serving a decode step: router messages wait for its end
        self.polling = False  # between its layers, past its attention work (on a CPU)
        self.poll_key = (instance, "polling")  # its share of the cores meanwhile
        self.waiting: deque = deque()  # decode steps queued behind it, in arrival order

    def deliver(self, handler, *args) -> None:
        if self.serving:
            self.inbox.append((handler, args))
            return
        handler(*args)

    def acquire(self, ready, step) -> None:
        """A decode step asks for this executor: it serves one step at a time, all its layers
        back to back (attention/executor_worker.py)."""
        if self.serving:
            self.waiting.append((ready, step))
            return
        self.serving = True
        ready(step)

    def serving_step(self, layer_ms: float, kv_bytes: float) -> None:
        if self.sim.cpu is not None:
            # On a CPU its attention is work of its own beside the decode step; between
            # layers it polls for the next layer's rows (host_signal_channel.wait_for spins,
            # then yields, runnable all the while), so it holds a share of the cores until
            # the step ends, as the decode worker does while it waits on the executor.
            self.sim.cpu.run(self, self.sim.num_layers * layer_ms / 1000, self._attended,
                             self.loop.now)  # fmt: skip
        else:
            self._measured(layer_ms)
        self.sim.meter.executor_step(self, kv_bytes)

    def _measured(self, layer_ms: float) -> None:
        self.attention_time_ms = ewma_repeated(self.attention_time_ms, layer_ms,
                                               self.sim.num_layers)  # fmt: skip

    def _attended(self, started: float) -> None:
        # What it measures on a shared CPU: its layers' wall time, however the cores were
        # shared meanwhile (the real executor times each layer's attention with the host clock).
        self._measured((self.loop.now - started) * 1000 / self.sim.num_layers)
        if self.serving and not self.polling:
            self.polling = True
            self.sim.hold(self.poll_key)

    def release_step(self) -> None:
        if self.polling:
            self.polling = False
            self.sim.drop(self.poll_key)
        self.serving = False
        while self.inbox:  # router messages, read between steps
            handler, args = self.inbox.popleft()
            handler(*args)
        if self.waiting:
            self.serving = True
            ready, step = self.waiting.popleft()
            ready(step)

    # Messages -------------------------------------------------------------------------------

    def on_adopt(self, req: SimRequest, lent_blocks: list[int]) -> None:
        """AttentionExecutor.adopt: the prompt's KV is in `lent_blocks`."""
        computed = req.prompt_tokens  # prompt + first token, less the newest token's KV
        seq = Sequence(req.wire_id, [0] * (computed + 1), SamplingParams())
        seq.block_table = list(lent_blocks)
        router = self.sim.router
        if not self.blocks.can_append(seq):
            router.send(router.on_reserved, req, False)
            return
        self.blocks.append_slots(seq)
        seq.num_computed_tokens = computed
        self.requests[req.wire_id] = seq
        self.requests_total += 1
        router.send(router.on_reserved, req, True)

    def on_release(self, request_id: str) -> None:
        seq = self.requests.pop(request_id, None)
        if seq is not None:
            self.blocks.free(seq)
        self.sim.router.send(self.sim.router.on_offload_released, request_id)

    # Steps (AttentionExecutor.prepare / commit) ----------------------------------------------

    def prepare(self, rows: list[SimSequence]) -> bool:
        """Room for each row's new token; False refuses the step. Placeholder token ids grow
        only when a block fills (the block manager reads their count there, nowhere else),
        and the step counts as committed at once (its end is already decided)."""
        size = self.blocks.block_size
        for seq in rows:
            mine = seq.remote
            if mine is None or mine.request_id not in self.requests:
                return False
            position = seq.num_computed_tokens
            if position >= len(mine.block_table) * size:
                mine.token_ids.extend([0] * (position + 1 - len(mine.token_ids)))
                if not self.blocks.can_append(mine):
                    return False
                self.blocks.append_slots(mine)
            mine.num_computed_tokens = position + 1
        return True

    def heartbeat(self) -> WorkerStats:
        return WorkerStats(
            num_running=len(self.requests), num_waiting=0,
            num_free_blocks=self.blocks.num_free_blocks, num_blocks=self.blocks.num_blocks,
            queued_tokens=0, num_preemptions=0, requests_total=self.requests_total,
            num_offloaded=len(self.requests),
            context_tokens=sum(s.num_computed_tokens for s in self.requests.values()),
            attention_time_ms=round(self.attention_time_ms, 4),
        )  # fmt: skip
