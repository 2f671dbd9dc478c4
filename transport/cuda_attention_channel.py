"""The per-layer path between a decode worker and an attention executor on one host's GPUs: q, k,
v, the output and the counters live in one GPU allocation of the decode worker, mapped by the
executor through CUDA IPC, and every signal is enqueued on a stream (attention.gpu_signal).

Same protocol as transport.attention_channel (counters only grow; seq_no = step * num_layers +
layer + 1), but no call synchronizes the host: post/collect/receive/respond only enqueue work,
so both sides may run a whole step, or a captured CUDA graph of it, without a host round trip.
Failures (a wait that timed out, a refused step) surface in `check()`, which the caller runs at
the step's end, where it synchronizes anyway: before that, a collected output may be garbage.

A step a decode worker abandoned is not detected on the executor (waits are >=, and a later
step's counter satisfies them): it computes that step on whatever rows are there. Only requests
the decode worker has already released are affected.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from attention import gpu_signal
from transport.attention_channel import ChannelTimeout, StepRefused
from transport.cuda_ipc_transfer import export_pool, import_pool
from transport.kv_transfer import Endpoint, dtype_from_str, dtype_to_str

REQUEST, RESPONSE, REFUSED = 0, 1, 2  # int64 counters; REFUSED holds the refused step + 1
_NUM_COUNTERS = 8
_ALIGN = 256


def _layout(
    max_rows: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> tuple[dict[str, tuple[int, tuple[int, ...]]], int]:
    """Byte offset and shape of each tensor in the shared allocation, and its size."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    shapes = {
        "q": (max_rows, num_heads, head_dim),
        "k": (max_rows, num_kv_heads, head_dim),
        "v": (max_rows, num_kv_heads, head_dim),
        "out": (max_rows, num_heads, head_dim),
    }
    offsets, offset = {}, _ALIGN  # the counters first
    for name, shape in shapes.items():
        offsets[name] = (offset, shape)
        offset += -(-math.prod(shape) * itemsize // _ALIGN) * _ALIGN
    return offsets, offset


def _views(raw: torch.Tensor, offsets: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    itemsize = torch.empty((), dtype=dtype).element_size()
    views = {"counters": raw[: _NUM_COUNTERS * 8].view(torch.int64)}
    for name, (off, shape) in offsets.items():
        views[name] = raw[off : off + math.prod(shape) * itemsize].view(dtype).view(shape)
    return views


@dataclass
class _Wait:
    """One enqueued wait, remembered until check(): what it waited for, and an event after it."""

    index: int
    value: int
    step_id: int
    timeout_s: float
    done: torch.cuda.Event


class _Waits:
    """The waits a side enqueued since its last check(), and the check itself."""

    def __init__(self, counters: torch.Tensor, device: torch.device) -> None:
        self.counters = counters
        self.flag = torch.zeros(1, dtype=torch.int32, device=device)  # 1: a wait timed out
        self.pending: list[_Wait] = []

    def wait(self, index: int, value: int, step_id: int, timeout_s: float) -> None:
        gpu_signal.wait_value(self.counters, index, value, int(timeout_s * 1e9), self.flag)
        done = torch.cuda.Event()
        done.record()
        self.pending.append(_Wait(index, value, step_id, timeout_s, done))

    def drain(self, on_idle: Callable[[], None] | None) -> list[_Wait]:
        """Blocks until every pending wait passed; a wait idle past its timeout is released
        (its peer is gone) and reported by the flag. Polls events: no stream is synchronized
        while a peer may still answer, and `on_idle` runs every 0.1 s meanwhile."""
        waits, self.pending = self.pending, []
        for i, w in enumerate(waits):
            if not self._await(w, on_idle):
                # The peer is gone: every later wait of the step would block as long.
                last = max(x.value for x in waits[i:])
                gpu_signal.release(self.counters, w.index, last, self.flag)
                break
        torch.cuda.current_stream().synchronize()
        return waits

    @staticmethod
    def _await(w: _Wait, on_idle: Callable[[], None] | None) -> bool:
        start = time.monotonic()
        next_idle = start + 0.1
        while not w.done.query():
            now = time.monotonic()
            if now - start > w.timeout_s:
                return False
            if on_idle is not None and now > next_idle:
                on_idle()
                next_idle = now + 0.1
            time.sleep(5e-5)
        return True

    def timed_out(self) -> bool:
        if not self.flag.item():
            return False
        self.flag.zero_()
        return True


class CudaDecodeSideLink:
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
        torch.cuda.synchronize(device)  # zeroed counters land before the executor maps them
        self.tensors = _views(self.raw, offsets, dtype)
        self.max_rows = max_rows
        self.waits = _Waits(self.tensors["counters"], device)
        self.endpoint: Endpoint = {
            "kind": "cuda_ipc",
            "nbytes": nbytes,
            "max_rows": max_rows,
            "num_heads": num_heads,
            "num_kv_heads": num_kv_heads,
            "head_dim": head_dim,
            "dtype": dtype_to_str(dtype),
            **export_pool(self.raw),
        }

    def post(self, seq_no: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        # Safe to overwrite: this stream waited for the previous layer's response, which the
        # executor writes only after its attention consumed the previous q, k, v.
        n = q.shape[0]
        t = self.tensors
        t["q"][:n].copy_(q)
        t["k"][:n].copy_(k)
        t["v"][:n].copy_(v)
        gpu_signal.write_value(t["counters"], REQUEST, seq_no)

    def collect(
        self,
        seq_no: int,
        step_id: int,
        n: int,
        timeout_s: float,
        on_idle: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        """The output rows, enqueued after the wait for the executor; valid once check() passed.
        `on_idle` is unused here: check() runs it while the host waits."""
        self.waits.wait(RESPONSE, seq_no, step_id, timeout_s)
        return self.tensors["out"][:n].clone()  # the next layer overwrites `out`

    def check(self, on_idle: Callable[[], None] | None = None) -> None:
        """Run at the step's end: waits for the collected layers, then raises ChannelTimeout
        or StepRefused for any of them. The one host synchronization of a step."""
        waits = self.waits.drain(on_idle)
        if self.waits.timed_out():
            raise ChannelTimeout(f"no answer within {max(w.timeout_s for w in waits)}s")
        refused = int(self.tensors["counters"][REFUSED].item()) - 1
        if any(w.step_id == refused for w in waits):
            raise StepRefused(f"the executor refused step {refused}")

    def close(self) -> None:
        self.waits.pending.clear()
        self.tensors.clear()


class CudaExecutorSideLink:
    """The executor's end, mapped from the endpoint; works on the current CUDA device, copying
    rows across when the decode worker's GPU is another one (peer access)."""

    def __init__(self, endpoint: Endpoint) -> None:
        dtype = dtype_from_str(str(endpoint["dtype"]))
        self.max_rows = int(endpoint["max_rows"])
        offsets, nbytes = _layout(
            self.max_rows, int(endpoint["num_heads"]), int(endpoint["num_kv_heads"]),
            int(endpoint["head_dim"]), dtype,
        )  # fmt: skip
        if nbytes != int(endpoint["nbytes"]):
            raise ValueError(f"attention link layout mismatch: {nbytes} != {endpoint['nbytes']}")
        self.raw = import_pool(endpoint, (nbytes,), torch.uint8)
        self.tensors = _views(self.raw, offsets, dtype)
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.local = None
        if self.raw.device != self.device:
            self.local = {n: torch.empty_like(self.tensors[n], device=self.device) for n in "qkv"}
        self.waits = _Waits(self.tensors["counters"], self.device)
        self.rows = 0
        self.step_id = 0

    def begin_step(self, step_id: int, rows: int, first_seq_no: int) -> None:
        """The step's row count, known from its AttentionStep: the host cannot read it from the
        GPU without a sync. (first_seq_no: the P2P link needs it; here the counters carry it.)"""
        if rows > self.max_rows:
            raise ValueError(f"{rows} rows exceed the link's {self.max_rows}")
        self.step_id, self.rows = step_id, rows

    def receive(self, seq_no: int, timeout_s: float):
        self.waits.wait(REQUEST, seq_no, self.step_id, timeout_s)
        n, t = self.rows, self.tensors
        if self.local is None:
            return t["q"][:n], t["k"][:n], t["v"][:n]
        for name in "qkv":
            self.local[name][:n].copy_(t[name][:n])
        return self.local["q"][:n], self.local["k"][:n], self.local["v"][:n]

    def respond(self, seq_no: int, out: torch.Tensor) -> None:
        self.tensors["out"][: out.shape[0]].copy_(out)
        gpu_signal.write_value(self.tensors["counters"], RESPONSE, seq_no)

    def refuse(self, step_id: int, last_seq_no: int) -> None:
        """Answers every layer of the step at once, marked refused."""
        counters = self.tensors["counters"]
        gpu_signal.write_value(counters, REFUSED, step_id + 1)
        gpu_signal.write_value(counters, RESPONSE, last_seq_no)

    def check(self, on_idle: Callable[[], None] | None = None) -> None:
        """Run at the step's end: waits for the step's layers; ChannelTimeout if the decode
        worker went silent (the step's KV is then incomplete)."""
        waits = self.waits.drain(on_idle)
        if self.waits.timed_out():
            raise ChannelTimeout(f"no request within {max(w.timeout_s for w in waits)}s")

    def close(self) -> None:
        self.waits.pending.clear()
        self.tensors.clear()
        self.local = None
