"""The per-layer path between a decode worker and an attention executor on different hosts:
point-to-point send/recv in one fixed order on a 2-rank group of the pair (NCCL for GPU
tensors, gloo for CPU ones), built on the decode worker's TCPStore without a global group.

Per layer, decode -> executor: header [seq_no, rows], q, k, v; executor -> decode: header
[seq_no, refused step + 1 or 0], out. Both sides know the row count from the step plan, so no
host reads a header to size a receive. With NCCL nothing syncs the host before check() at the
step's end: a work's `wait()` without a timeout only orders the current stream after it (with
one, ProcessGroupNCCL blocks the host until it completes), headers go out from pinned host
memory without a sync, and check() enforces the per-layer deadline by polling the works. gloo
blocks per call and the decode side checks each header at once. A refused step is still
answered layer by layer (its inputs drained), since every send needs its matching receive. A
failed transfer spends the group (NCCL aborts its communicator, gloo's is poisoned): the link
then refuses at once, and the decode worker attaches a new one. With a cluster key the pair
group forms only with a peer that proves the key (transport.p2p_group).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

from transport.attention_protocol import ChannelTimeout, StepRefused
from transport.kv_transfer_base import Endpoint, dtype_from_str, dtype_to_str
from transport.p2p_group import join_pair
from transport.p2p_works import Headers, Works
from transport.security import ClusterKey

DECODE_RANK, EXECUTOR_RANK = 0, 1
_SEND_TIMEOUT_S = 30.0  # an answer's send: gloo completes it once the bytes are out


def _label(endpoint: Endpoint) -> str:
    return f"attention-link/{endpoint['host']}:{endpoint['port']}"


class _Buffers:
    def __init__(
        self, max_rows: int, num_heads: int, num_kv_heads: int, head_dim: int,
        dtype: torch.dtype, device: torch.device,
    ) -> None:  # fmt: skip
        self.max_rows = max_rows
        self.device = device
        self.q = torch.empty(max_rows, num_heads, head_dim, dtype=dtype, device=device)
        self.k = torch.empty(max_rows, num_kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.out = torch.empty_like(self.q)


class P2PDecodeSideLink:
    """Created by the decode worker; the executor joins the pair group when it attaches."""

    graph_safe = False  # headers carry each layer's sequence number, written by the host

    def __init__(
        self,
        backend: str,
        max_rows: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        host: str = "127.0.0.1",
        connect_timeout_s: float = 30.0,
        cluster_key: ClusterKey | None = None,
    ) -> None:
        self.cluster_key = cluster_key
        self.buffers = _Buffers(max_rows, num_heads, num_kv_heads, head_dim, dtype,
                                torch.device(device))  # fmt: skip
        self.backend = backend
        self.store = dist.TCPStore(
            host, 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30)
        )
        self.endpoint: Endpoint = {
            "kind": backend,
            "host": host,
            "port": int(self.store.port),
            "max_rows": max_rows,
            "num_heads": num_heads,
            "num_kv_heads": num_kv_heads,
            "head_dim": head_dim,
            "dtype": dtype_to_str(dtype),
            "connect_timeout_s": int(connect_timeout_s),
        }
        self.connect_timeout_s = connect_timeout_s
        self.group: dist.ProcessGroup | None = None
        self._join_error: Exception | None = None
        # Joining blocks until the executor joins, after it receives the endpoint.
        self._joiner = threading.Thread(target=self._join, name="attn-link-join", daemon=True)
        self._joiner.start()
        self.works = Works()
        self.sent = Headers(self.buffers.device)
        self.received = Headers(self.buffers.device)
        self._expected: list[tuple[int, int]] = []  # (seq_no, step_id) of each answer
        self._timeout_s = 0.0

    def _join(self) -> None:
        try:
            self.group = join_pair(
                self.backend, self.store, DECODE_RANK, self.connect_timeout_s,
                _label(self.endpoint), self.cluster_key, self.buffers.device,
            )  # fmt: skip
        except Exception as exc:
            self._join_error = exc

    def _group(self) -> dist.ProcessGroup:
        self._joiner.join(self.connect_timeout_s)
        if self.group is None:
            raise ChannelTimeout(f"the executor never joined the link: {self._join_error}")
        return self.group

    @property
    def spent(self) -> bool:
        """A transfer failed: this link is down for good; attach a new one."""
        return self.works.spent

    def begin_step(self, step_id: int, first_seq_no: int) -> None:
        pass  # each post's header carries its sequence number

    def post(self, seq_no: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        group, n, b = self._group(), q.shape[0], self.buffers
        header = self.sent.outgoing(seq_no, n)
        self.works.start(group.send, header, EXECUTOR_RANK, self.connect_timeout_s)
        for src, buf in ((q, b.q), (k, b.k), (v, b.v)):
            # Ordered after the previous layer's send of `buf`: its wait() ordered this stream.
            buf[:n].copy_(src)
            self.works.start(group.send, buf[:n], EXECUTOR_RANK, self.connect_timeout_s)

    def collect(
        self,
        seq_no: int,
        step_id: int,
        n: int,
        timeout_s: float,
        on_idle: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        group, b = self._group(), self.buffers
        self.works.start(group.recv, self.received.incoming(), EXECUTOR_RANK, timeout_s)
        out = torch.empty_like(b.out[:n])
        self.works.start(group.recv, out, EXECUTOR_RANK, timeout_s)
        self._expected.append((seq_no, step_id))
        self._timeout_s = max(self._timeout_s, timeout_s)
        if b.device.type == "cpu":
            self.check()  # free on the CPU: fail at the layer, as the shared-memory link does
        return out

    def check(self, on_idle: Callable[[], None] | None = None) -> None:
        """Run at the step's end (one host sync): raises for an out-of-step or refused layer,
        or a transfer silent past the layer timeout."""
        expected, self._expected = self._expected, []
        timeout_s, self._timeout_s = self._timeout_s, 0.0
        try:
            self.works.drain(self.group, timeout_s or self.connect_timeout_s, on_idle)
            got = self.received.read() if expected else []
        finally:
            self.sent.reset()
            self.received.reset()
        for (seq_no, step_id), (answered, refused) in zip(expected, got):
            if refused == step_id + 1:
                raise StepRefused(f"the executor refused step {step_id}")
            if answered != seq_no:
                self.works.spent = True  # sends and receives no longer pair up
                raise ChannelTimeout(f"out of step: expected {seq_no}, the executor answered "
                                     f"{answered}")  # fmt: skip

    def close(self) -> None:
        self.group = None
        self._expected.clear()


class P2PExecutorSideLink:
    """The executor's end; joins the pair group on the decode worker's store."""

    graph_safe = False

    def __init__(
        self,
        endpoint: Endpoint,
        device: torch.device | str | None = None,
        cluster_key: ClusterKey | None = None,
    ) -> None:
        self.backend = str(endpoint["kind"])
        if device is None:
            device = "cuda" if self.backend == "nccl" else "cpu"
        dtype = dtype_from_str(str(endpoint["dtype"]))
        self.buffers = _Buffers(
            int(endpoint["max_rows"]), int(endpoint["num_heads"]), int(endpoint["num_kv_heads"]),
            int(endpoint["head_dim"]), dtype, torch.device(device),
        )  # fmt: skip
        timeout_s = float(endpoint.get("connect_timeout_s", 30))
        store = dist.TCPStore(
            str(endpoint["host"]), int(endpoint["port"]), is_master=False,
            wait_for_workers=False, timeout=timedelta(seconds=timeout_s),
        )  # fmt: skip
        self.group = join_pair(self.backend, store, EXECUTOR_RANK, timeout_s, _label(endpoint),
                               cluster_key, self.buffers.device)  # fmt: skip
        self.store = store
        self.rows = 0
        self.step_id = 0
        self.next_seq_no = 0
        self.works = Works()
        self.sent = Headers(self.buffers.device)
        self.received = Headers(self.buffers.device)
        self._expected: list[int] = []  # the seq_no each received header should carry
        self._timeout_s = 0.0

    def begin_step(self, step_id: int, rows: int, first_seq_no: int) -> None:
        if rows > self.buffers.max_rows:
            raise ValueError(f"{rows} rows exceed the link's {self.buffers.max_rows}")
        self.step_id, self.rows, self.next_seq_no = step_id, rows, first_seq_no

    def receive(self, seq_no: int, timeout_s: float):
        b, n = self.buffers, self.rows
        self.works.start(self.group.recv, self.received.incoming(), DECODE_RANK, timeout_s)
        for buf in (b.q, b.k, b.v):
            self.works.start(self.group.recv, buf[:n], DECODE_RANK, timeout_s)
        self._expected.append(seq_no)
        self._timeout_s = max(self._timeout_s, timeout_s)
        self.next_seq_no = seq_no + 1
        if b.device.type == "cpu":
            self._check_headers()
        return b.q[:n], b.k[:n], b.v[:n]

    def respond(self, seq_no: int, out: torch.Tensor, refused_step: int = -1) -> None:
        b, timeout_s = self.buffers, max(self._timeout_s, _SEND_TIMEOUT_S)
        header = self.sent.outgoing(seq_no, refused_step + 1)
        self.works.start(self.group.send, header, DECODE_RANK, timeout_s)
        b.out[: out.shape[0]].copy_(out)
        self.works.start(self.group.send, b.out[: out.shape[0]], DECODE_RANK, timeout_s)

    def refuse(self, step_id: int, last_seq_no: int, timeout_s: float = 30.0) -> None:
        """Answers the step's remaining layers, marked refused, draining their inputs."""
        blank = torch.zeros_like(self.buffers.out[: self.rows])
        for seq_no in range(self.next_seq_no, last_seq_no + 1):
            self.receive(seq_no, timeout_s)
            self.respond(seq_no, blank, refused_step=step_id)

    def check(self, on_idle: Callable[[], None] | None = None) -> None:
        """Run at the step's end: with NCCL, waits for the step's transfers (ChannelTimeout for
        one silent past the layer timeout, or rows of a later step: the decode worker moved on)."""
        timeout_s, self._timeout_s = self._timeout_s, 0.0
        self.works.drain(self.group, timeout_s or _SEND_TIMEOUT_S, on_idle)
        self._check_headers()

    def _check_headers(self) -> None:
        expected, self._expected = self._expected, []
        try:
            got = self.received.read() if expected else []
        finally:
            self.sent.reset()
            self.received.reset()
        for seq_no, (posted, _) in zip(expected, got):
            if posted != seq_no:
                self.works.spent = True
                raise ChannelTimeout(f"step superseded (expected {seq_no}, got {posted})")

    def close(self) -> None:
        self.group = None
