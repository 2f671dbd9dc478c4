"""What offloading costs the decode worker itself, for `adrenaline profile`: a step whose rows
are all offloaded (no local attention), and the per-layer exchange (the step plan over ZeroMQ,
posting q/k/v, collecting the output, the model's row slicing). Both run the real OffloadClient
and shared-memory link against an executor end answered in the same thread, whose own time is
left out; waiting on a real executor in another process is the simulator's sync parameter.

Host links only: a GPU link's signals are device work that an in-thread answer cannot stand in
for, so a GPU profile leaves both at zero (costed as decode steps).
"""

from __future__ import annotations

import time

import torch
import zmq

from engine.config import ModelConfig, parse_dtype
from engine.engine import LLMEngine
from server.profile_timing import decode_step_ms
from server.roles.offload_client import LAYER_TIMEOUT_S, OffloadClient, OffloadStep
from transport.attention_protocol import ExecutorSide
from transport.host_signal_channel import HostSignals
from transport.security import set_frame_limit

EXECUTOR = "profile-executor"


class AnsweringStep:
    """An OffloadStep whose rows are answered (with their q) as soon as they are posted."""

    def __init__(self, inner: OffloadStep, link: ExecutorSide, rows: int, owner) -> None:
        self.inner, self.link, self.owner = inner, link, owner
        self.num_local_tokens = inner.num_local_tokens
        self.first_seq_no = inner.step_id * inner.num_layers + 1
        link.begin_step(inner.step_id, rows, self.first_seq_no)

    def send(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.inner.send(layer, q, k, v)
        started = time.perf_counter()
        seq_no = self.first_seq_no + layer
        q_in, _, _ = self.link.receive(seq_no, LAYER_TIMEOUT_S)
        self.link.respond(seq_no, q_in)
        if layer == self.inner.num_layers - 1:
            self.link.check()
        self.owner.executor_s += time.perf_counter() - started

    def receive(self, layer: int) -> torch.Tensor:
        return self.inner.receive(layer)

    def replayed(self) -> None:
        self.inner.replayed()


class AnsweringExecutor:
    """A RemoteAttention for the profile's engine: the real client, one link, answered here."""

    def __init__(self, cfg: ModelConfig, max_rows: int, dtype: str) -> None:
        self.client = OffloadClient("profile-decode", cfg.num_layers, max_rows, cfg.num_heads,
                                    cfg.num_kv_heads, cfg.head_dim, parse_dtype(dtype))  # fmt: skip
        # The plans go to a socket nobody reads but this process, drained after each step.
        self.sink = self.client.ctx.socket(zmq.ROUTER)
        self.sink.setsockopt(zmq.LINGER, 0)
        set_frame_limit(self.sink)  # whatever else connects to it is read and dropped
        port = self.sink.bind_to_random_port("tcp://127.0.0.1")
        self.client.connect(EXECUTOR, f"tcp://127.0.0.1:{port}")
        # The executor end over the decode end's own mapping: a second mapping of the segment
        # in this process would confuse its resource tracker (which unlinks what it created).
        region = self.client.executors[EXECUTOR].link.region
        self.link = ExecutorSide(HostSignals(region.counters), region.tensors, max_rows)
        self.executor = EXECUTOR
        self.executor_s = 0.0  # the executor end's time, which is not the decode worker's

    def begin_step(self, num_local_tokens, groups, graphed: bool = False) -> AnsweringStep:
        inner = self.client.begin_step(num_local_tokens, groups, graphed)
        return AnsweringStep(inner, self.link, sum(len(rows) for _, rows in groups), self)

    def release(self, executor: str, request_id: str) -> None:
        self.client.release(executor, request_id)

    def drain(self) -> None:
        while self.sink.poll(0):
            self.sink.recv_multipart()

    def close(self) -> None:
        self.link.signals.close()  # its view of the counters, before the mapping goes
        self.sink.close(0)
        self.client.close()


def measure_offloading(
    engine: LLMEngine, answering: AnsweringExecutor, batches, context: int, steps: int,
    local_attention_ms_per_token: float,
) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:  # fmt: skip
    """Two sample lists, (offloaded rows, ms) each, the executor end's time left out:
    - offloaded steps: a decode step whose rows are all offloaded. It skips local attention
      entirely, whose fixed cost per layer (the torch backend's gathers) the decode fit holds
      in its intercept;
    - exchange per layer: one local row beside the offloaded ones, against all of them local,
      plus the local attention the offloaded rows skip (the decode fit's per-token slope)."""
    gen = torch.Generator().manual_seed(2)
    layers = engine.model_config.num_layers
    kv_per_row = context + 1 + steps // 2  # at the middle of the timed steps
    offloaded, exchange = [], []
    for n, rows in enumerate([batches[0], *batches]):  # the first point warms up
        all_local, mixed, remote = (
            decode_step_ms(engine, f"{tag}{n}", local, remote, context, steps, gen, answering)
            for tag, local, remote in (("xl", 1 + rows, 0), ("xm", 1, rows), ("xo", 0, rows))
        )
        offloaded.append((rows, remote))
        skipped = local_attention_ms_per_token * rows * kv_per_row
        exchange.append((rows, max(0.0, (mixed - all_local + skipped) / layers)))
    return offloaded[1:], exchange[1:]
