"""The per-layer path between a decode worker and an attention executor on one host's GPUs: q, k,
v and the output live in one GPU allocation of the decode worker, mapped by the executor through
CUDA IPC; the protocol's counters live in a one-page host shared-memory segment that both
processes page-lock and map for their GPUs (transport.gpu_signal.MappedCounters), and every
signal is enqueued on a stream.

The protocol is transport.attention_protocol's, the host link's too; only the Signals differ.
post/collect/receive/respond only enqueue work, so both sides may run a whole step, or a captured
CUDA graph of it (with the Triton signals only: `graph_safe`), without a host round trip; check(), at the step's end, is the one host wait,
and before it a collected output may be garbage. Between a step's first wait and its check()
nothing may synchronize the host with the stream: a stream memory op wait whose peer died is
released only by the host, in check().

A stream memory op wait is >= only: an executor behind a decode worker that gave up on a step
computes the rest of it on the next step's rows, unnoticed. That only writes KV of requests
the decode worker reclaims on that failure, and the next step's answer still waits for the
next step's rows (the Triton wait, exact, fails such a step instead).
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import torch

from transport import gpu_signal
from transport.attention_channel import SEGMENT_PREFIX, BadLinkEndpoint, link_dims
from transport.attention_protocol import NUM_COUNTERS, DecodeSide, ExecutorSide, Release, Wait
from transport.cuda_ipc_transfer import export_pool, import_pool
from transport.kv_transfer_base import Endpoint, dtype_to_str
from transport.polling import poll_until
from transport.shm_transfer import SharedMemory, _open_untracked

_ALIGN = 256
_SIGNAL_BYTES = 4096  # one page: registered whole with cudaHostRegister


def _layout(
    max_rows: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> tuple[dict[str, tuple[int, tuple[int, ...]]], int]:
    """Byte offset and shape of each tensor in the shared GPU allocation, and its size."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    shapes = {
        "q": (max_rows, num_heads, head_dim),
        "k": (max_rows, num_kv_heads, head_dim),
        "v": (max_rows, num_kv_heads, head_dim),
        "out": (max_rows, num_heads, head_dim),
    }
    offsets, offset = {}, 0
    for name, shape in shapes.items():
        offsets[name] = (offset, shape)
        offset += -(-math.prod(shape) * itemsize // _ALIGN) * _ALIGN
    return offsets, offset


def _views(raw: torch.Tensor, offsets: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return {
        name: raw[off : off + math.prod(shape) * itemsize].view(dtype).view(shape)
        for name, (off, shape) in offsets.items()
    }


class _SignalSegment:
    """The counters' page of host shared memory, mapped for this process's GPU."""

    def __init__(self, name: str | None = None) -> None:
        if name is None:
            self.name = f"{SEGMENT_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
            self.shm = SharedMemory(name=self.name, create=True, size=_SIGNAL_BYTES)
            self.creator = True
        else:
            if not name.startswith(SEGMENT_PREFIX) or "/" in name:
                raise BadLinkEndpoint(f"{name!r} is not a per-layer signal segment")
            try:
                self.shm = _open_untracked(name)
            except OSError as exc:
                raise BadLinkEndpoint(f"cannot open signal segment {name}: {exc}") from exc
            if self.shm.size != _SIGNAL_BYTES:
                self.shm.close()
                raise BadLinkEndpoint(f"signal segment {name} holds {self.shm.size} bytes, "
                                      f"not {_SIGNAL_BYTES}")  # fmt: skip
            self.name, self.creator = name, False
        page = torch.frombuffer(self.shm.buf, dtype=torch.int64, count=_SIGNAL_BYTES // 8)
        if self.creator:
            page.zero_()
        self.counters = gpu_signal.MappedCounters(page)

    def close(self) -> None:
        self.counters.close()
        del self.counters
        try:
            self.shm.close()
        except BufferError:
            pass  # a view outlives us; the mapping goes with the process
        if self.creator:
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass


@dataclass
class _Pending:
    wait: Wait
    done: torch.cuda.Event  # recorded right after the wait on the stream


class GpuSignals:
    """The protocol's Signals on a stream: gpu_signal's writes and waits on mapped counters."""

    def __init__(self, counters: gpu_signal.MappedCounters, device: torch.device) -> None:
        self.counters = counters
        self.host = counters.host.numpy()[:NUM_COUNTERS]  # plain aligned 8-byte loads and stores
        self.pending: list[_Pending] = []
        self._events: list[torch.cuda.Event] = []  # reused step after step
        # Triton kernels read the step's numbers from here; stream memory ops bake them in.
        self.graph_safe = gpu_signal.backend(device.index) == "triton"
        self.base = gpu_signal.SequenceBase(device) if self.graph_safe else None

    def begin_step(self, seq_base: int, step_tag: int) -> None:
        if self.base is not None:
            self.base.set(seq_base, step_tag)

    def write(self, index: int, value: int) -> None:
        gpu_signal.write_value(self.counters, index, value, self.base)

    def wait(self, wait: Wait, exact: bool, on_idle: Callable[[], None] | None) -> None:
        gpu_signal.wait_value(self.counters, wait.index, wait.value, int(wait.timeout_s * 1e9),
                              wait.fail_index, wait.fail_value, exact, self.base)  # fmt: skip
        if len(self._events) <= len(self.pending):
            # External: captured in a graph, the record is a node that each replay runs again.
            self._events.append(torch.cuda.Event(external=True))
        done = self._events[len(self.pending)]
        done.record()
        self.pending.append(_Pending(wait, done))

    def answer(
        self, index: int, value: int, fail_index: int, fail_value: int, mark_index: int
    ) -> None:
        gpu_signal.answer(self.counters, index, value, fail_index, fail_value, mark_index,
                          self.base)  # fmt: skip

    def drain(self, on_idle: Callable[[], None] | None, release: Release) -> None:
        """Polls each wait's event in order (no stream is synchronized while a peer may still
        answer); one idle past its timeout is released, and with it the step's later ones."""
        pending, self.pending = self.pending, []
        for i, p in enumerate(pending):
            while not poll_until(p.done.query, p.wait.timeout_s, on_idle):
                same = [q.wait.value for q in pending[i:] if q.wait.index == p.wait.index]
                release(p.wait, max(same))

    def read(self, index: int) -> int:
        return int(self.host[index])

    def store(self, index: int, value: int) -> None:
        self.host[index] = value

    def replayed(self, waits: list[Wait]) -> None:
        """The graph's k-th wait recorded _events[k]: a step starts with nothing pending (its
        check() drained the last one), so a capture's waits took the events in order."""
        if len(waits) > len(self._events):
            raise RuntimeError(f"a replay of {len(waits)} waits, but only {len(self._events)} "
                               "were ever captured")  # fmt: skip
        self.pending = [_Pending(wait, done) for wait, done in zip(waits, self._events)]

    def close(self) -> None:
        self.pending.clear()
        self.host = self.counters = None  # views of the segment, which may be unmapped now


class CudaDecodeSideLink(DecodeSide):
    """Created by the decode worker on its GPU, one per executor it offloads to."""

    def __init__(
        self,
        max_rows: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"a cuda_ipc attention link needs a CUDA device, not {device}")
        offsets, nbytes = _layout(max_rows, num_heads, num_kv_heads, head_dim, dtype)
        self.raw = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        torch.cuda.synchronize(device)  # the zeros land before the executor maps them
        self.segment = _SignalSegment()
        gpu_signal.warm_up(self.raw.device.index)
        signals = GpuSignals(self.segment.counters, self.raw.device)
        super().__init__(signals, _views(self.raw, offsets, dtype), max_rows)
        self.endpoint: Endpoint = {
            "kind": "cuda_ipc",
            "nbytes": nbytes,
            "signals": self.segment.name,
            "max_rows": max_rows,
            "num_heads": num_heads,
            "num_kv_heads": num_kv_heads,
            "head_dim": head_dim,
            "dtype": dtype_to_str(dtype),
            **export_pool(self.raw),
        }

    def close(self) -> None:
        self.signals.close()
        self.tensors.clear()
        self.segment.close()


class CudaExecutorSideLink(ExecutorSide):
    """The executor's end, mapped from the endpoint; works on the current CUDA device, copying
    rows across when the decode worker's GPU is another one (peer access)."""

    def __init__(self, endpoint: Endpoint) -> None:
        max_rows, num_heads, num_kv_heads, head_dim, dtype = link_dims(endpoint)
        offsets, nbytes = _layout(max_rows, num_heads, num_kv_heads, head_dim, dtype)
        if nbytes != endpoint.get("nbytes"):
            raise BadLinkEndpoint(f"attention link layout mismatch: {nbytes} != "
                                  f"{endpoint.get('nbytes')}")  # fmt: skip
        name = endpoint.get("signals")
        if not isinstance(name, str):
            raise BadLinkEndpoint("a cuda_ipc link names its signal segment")
        self.raw = import_pool(endpoint, (nbytes,), torch.uint8)
        self.device = torch.device("cuda", torch.cuda.current_device())
        tensors = _views(self.raw, offsets, dtype)
        self.local = None
        if self.raw.device != self.device:
            self.local = {n: torch.empty_like(tensors[n], device=self.device) for n in "qkv"}
        self.segment = _SignalSegment(name)
        gpu_signal.warm_up(self.device.index)
        super().__init__(GpuSignals(self.segment.counters, self.device), tensors, max_rows)

    def inputs(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.local is None:
            return super().inputs(n)
        for name in "qkv":
            self.local[name][:n].copy_(self.tensors[name][:n])
        return self.local["q"][:n], self.local["k"][:n], self.local["v"][:n]

    def close(self) -> None:
        self.signals.close()
        self.tensors.clear()
        self.local = None
        self.segment.close()
