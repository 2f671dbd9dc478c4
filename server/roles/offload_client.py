"""The decode worker's side of offloaded attention: one link per attention executor, a step plan
sent ahead of each step over ZeroMQ, and per layer only tensors and counters (shared memory).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import zmq

from attention.remote import RemoteAttentionError
from attention.step_timer import SpanTimer
from engine.step_timing import ewma
from transport.attention_channel import ChannelTimeout, DecodeSideLink, StepRefused
from transport.messages import AttachLink, AttentionStep, ReleaseOffloaded, encode
from transport.security import ClusterKey, secure_client, set_frame_limit

log = logging.getLogger(__name__)

# An executor silent this long on one layer is taken for dead (a layer takes milliseconds).
LAYER_TIMEOUT_S = 2.0


class ExecutorConnection:
    def __init__(
        self,
        ctx: zmq.Context,
        address: str,
        link: DecodeSideLink,
        instance: str,
        cluster_key: ClusterKey | None = None,
    ) -> None:
        self.address = address
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        # The executor takes steps for this worker's link only from this identity.
        self.sock.setsockopt(zmq.IDENTITY, instance.encode())
        secure_client(self.sock, cluster_key)
        set_frame_limit(self.sock)
        self.sock.connect(address)
        self.link = link

    def close(self) -> None:
        self.sock.close(0)
        self.link.close()


class OffloadStep:
    """One decode step's offloaded rows, [num_local_tokens, end), grouped by executor.

    A graphed step is one a CUDA graph captures or replays: its receive() enqueues only, and
    the runner calls replayed() after the graph ran, which checks the step as the last layer's
    receive() checks an eager one."""

    def __init__(
        self,
        num_local_tokens: int,
        step_id: int,
        num_layers: int,
        groups: list[tuple[str, ExecutorConnection, int]],
        client: OffloadClient,
        graphed: bool = False,
    ) -> None:
        self.client = client
        self.on_idle = client.on_idle
        self.num_local_tokens = num_local_tokens
        self.step_id = step_id
        self.num_layers = num_layers
        self.groups = groups  # (executor, connection, rows)
        self.graphed = graphed

    def _seq_no(self, layer: int) -> int:
        return self.step_id * self.num_layers + layer + 1

    def send(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        start = 0
        for _, conn, rows in self.groups:
            end = start + rows
            conn.link.post(self._seq_no(layer), q[start:end], k[start:end], v[start:end])
            start = end

    def receive(self, layer: int) -> torch.Tensor:
        # The span covers only waiting on the executors: local attention was enqueued before.
        self.client.wait_timer.start()
        outs = []
        for executor, conn, rows in self.groups:
            collect = conn.link.enqueue_collect if self.graphed else conn.link.collect
            try:
                outs.append(
                    collect(self._seq_no(layer), self.step_id, rows, LAYER_TIMEOUT_S, self.on_idle)
                )
            except (ChannelTimeout, StepRefused) as exc:
                self.client.wait_timer.discard()
                raise RemoteAttentionError(executor, str(exc)) from exc
        self.client.wait_timer.stop()
        if layer == self.num_layers - 1 and not self.graphed:
            self.finish()
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def replayed(self) -> None:
        """After a graph of this step ran (captured for it, or for an earlier step of the same
        shape): restores the host state its collects would have left, then checks the step."""
        first = self._seq_no(0)
        for _, conn, _ in self.groups:
            conn.link.replayed(self.step_id, range(first, first + self.num_layers),
                               LAYER_TIMEOUT_S)  # fmt: skip
        self.client.wait_timer.replayed(self.num_layers)
        self.finish()

    def finish(self) -> None:
        """Raises a link's deferred failure (timeout, refusal) for this step: collect() only
        enqueues work, and its output is valid only once this passed. Runs after the last
        layer's collect, a host sync; a runner that syncs at the step's end anyway may call it
        there instead. The step's wait times are read only then (GPU time, not launch time)."""
        for executor, conn, _ in self.groups:
            try:
                conn.link.check(self.on_idle)
            except (ChannelTimeout, StepRefused) as exc:
                self.client.wait_timer.discard()
                raise RemoteAttentionError(executor, str(exc)) from exc
        for ms in self.client.wait_timer.spans_ms():
            self.client.record_wait(ms / 1000)


class OffloadClient:
    def __init__(
        self, instance: str, num_layers: int, max_rows: int, num_heads: int, num_kv_heads: int,
        head_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu",
        link_kind: str = "auto", cluster_key: ClusterKey | None = None,
    ) -> None:  # fmt: skip
        self.instance = instance
        self.cluster_key = cluster_key
        self.device = torch.device(device)
        self.link_kind = link_kind  # auto: shared memory on CPU, CUDA IPC on GPU; gloo/nccl
        self.num_layers = num_layers
        self.shape = (max_rows, num_heads, num_kv_heads, head_dim, dtype)
        self.ctx = zmq.Context()
        self.executors: dict[str, ExecutorConnection] = {}
        self.step_id = 0
        # Called while waiting on an executor: the worker's heartbeat keeps it alive meanwhile.
        self.on_idle: Callable[[], None] | None = None
        # Moving average of how long a layer waits for its executors after local attention:
        # near zero when the executors' work hides behind the local work, as intended.
        self.roundtrip_ms = 0.0
        self.wait_timer = SpanTimer(self.device)
        self.links_generation = 0

    @property
    def graph_safe(self) -> bool:
        """Whether a CUDA graph captured over a step's send/receive may replay for later steps:
        every link's signals read the step's numbers from memory (Triton GPU signals). A replay
        skips collect()'s host bookkeeping; OffloadStep.replayed() restores it."""
        links = [conn.link for conn in self.executors.values()]
        return bool(links) and all(getattr(link, "graph_safe", False) for link in links)

    def record_wait(self, seconds: float) -> None:
        self.roundtrip_ms = ewma(self.roundtrip_ms, seconds * 1000)

    def connect(self, executor: str, address: str, executor_gpu_uuid: str = "") -> None:
        """executor_gpu_uuid: the executor's Register.gpu_uuid, which picks the link's kind."""
        conn = self.executors.get(executor)
        # A link whose transfer failed (a P2P group is then spent) is replaced on the next use.
        if conn is not None and conn.address == address and not getattr(conn.link, "spent", False):
            return
        if conn is not None:
            conn.close()
        link = self._make_link(executor, executor_gpu_uuid)
        conn = ExecutorConnection(self.ctx, address, link, self.instance, self.cluster_key)
        conn.sock.send(encode(AttachLink(self.instance, conn.link.endpoint)))
        self.executors[executor] = conn
        self.links_generation += 1  # graphs captured over the old link's buffers are stale
        log.info("offloading attention to %s at %s", executor, address)

    def _make_link(self, executor: str, executor_gpu_uuid: str):
        kind = self.link_kind
        if kind == "auto" and self.device.type == "cuda":
            from transport.cuda_ipc_transfer import gpu_link_kind

            choice = gpu_link_kind(kind, self.device, [executor_gpu_uuid])
            log.info("[decode %s] %s link to %s: %s", self.instance, choice.kind, executor,
                     choice.reason)  # fmt: skip
            kind = choice.kind
        elif kind == "auto":
            kind = "shm"
        if kind == "cuda_ipc":
            from transport.cuda_attention_channel import CudaDecodeSideLink

            return CudaDecodeSideLink(*self.shape, self.device)
        if kind in ("gloo", "nccl"):
            from transport.nccl_attention_channel import P2PDecodeSideLink

            return P2PDecodeSideLink(kind, *self.shape, self.device, cluster_key=self.cluster_key)
        return DecodeSideLink(*self.shape)

    def begin_step(
        self,
        num_local_tokens: int,
        groups: list[tuple[str, list[tuple[str, int]]]],
        graphed: bool = False,
    ) -> OffloadStep:
        self.step_id += 1
        planned = []
        for executor, entries in groups:
            conn = self.executors.get(executor)
            if conn is None:
                raise RemoteAttentionError(executor, "not connected")
            conn.sock.send(
                encode(
                    AttentionStep(
                        decode_instance=self.instance,
                        step_id=self.step_id,
                        request_ids=[r for r, _ in entries],
                        positions=[p for _, p in entries],
                    )
                )
            )
            # The link's signals take the step's numbers from here (graph-safe ones, from memory).
            conn.link.begin_step(self.step_id, self.step_id * self.num_layers + 1)
            planned.append((executor, conn, len(entries)))
        return OffloadStep(num_local_tokens, self.step_id, self.num_layers, planned, self, graphed)

    def release(self, executor: str, request_id: str) -> None:
        conn = self.executors.get(executor)
        if conn is not None:
            conn.sock.send(encode(ReleaseOffloaded(self.instance, [request_id])))

    def close(self) -> None:
        for conn in self.executors.values():
            conn.close()
        self.ctx.term()
