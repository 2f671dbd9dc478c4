"""The per-layer path between a decode worker and an attention executor on the CPU: one shared
memory region per pair holding q, k, v in, the attention output back, and two counters.

No message crosses a socket per layer. The decode side writes the offloaded rows, then bumps
`request` to the layer's sequence number; the executor waits for it, computes, writes the
output, then bumps `response`. Sequence numbers only grow (step * num_layers + layer + 1), so
a stale value is never mistaken for a fresh one. x86 stores are not reordered with other
stores, so data written before a counter is visible once the counter is.
"""

from __future__ import annotations

import math
import os
import secrets
import time
from collections.abc import Callable

import numpy as np
import torch

from transport.kv_transfer import KVTransferError, dtype_from_str, dtype_to_str
from transport.shm_transfer import SharedMemory, _open_untracked, remove_stale_segments

SEGMENT_PREFIX = "adrenaline-attn-"
_HEADER_BYTES = 64  # counters: request, response, rows, refused step + 1
MAX_LINK_ROWS = 8192  # a decode batch's offloaded rows: at most its max_num_seqs
_MAX_DIM = 1 << 16


class ChannelTimeout(TimeoutError):
    """The peer did not answer in time: it is dead or stuck."""


class StepRefused(RuntimeError):
    """The executor could not serve this step (an unknown request, no KV blocks left)."""


class BadLinkEndpoint(ValueError):
    """A link endpoint (from a peer's AttachLink) that this side cannot or will not map."""


def link_dims(endpoint: dict) -> tuple[int, int, int, int, torch.dtype]:
    """(max_rows, num_heads, num_kv_heads, head_dim, dtype) of any kind of link endpoint,
    each checked for its type and range before anything is sized from it."""
    dims = []
    for field in ("max_rows", "num_heads", "num_kv_heads", "head_dim"):
        value = endpoint.get(field)
        limit = MAX_LINK_ROWS if field == "max_rows" else _MAX_DIM
        if type(value) is not int or not 0 < value <= limit:
            raise BadLinkEndpoint(f"link field {field!r} must be an int in [1, {limit}], "
                                  f"got {value!r}")  # fmt: skip
        dims.append(value)
    try:
        dtype = dtype_from_str(endpoint.get("dtype"))  # type: ignore[arg-type]
    except KVTransferError as exc:
        raise BadLinkEndpoint(str(exc)) from exc
    return dims[0], dims[1], dims[2], dims[3], dtype


def _layout(max_rows: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype) -> dict:
    itemsize = torch.empty((), dtype=dtype).element_size()
    shapes = {
        "q": (max_rows, num_heads, head_dim),
        "k": (max_rows, num_kv_heads, head_dim),
        "v": (max_rows, num_kv_heads, head_dim),
        "out": (max_rows, num_heads, head_dim),
    }
    offsets, offset = {}, _HEADER_BYTES
    for name, shape in shapes.items():
        offsets[name] = (offset, shape)
        offset += math.prod(shape) * itemsize
    return {"offsets": offsets, "nbytes": offset}


def wait_for(
    counters: np.ndarray,
    index: int,
    value: int,
    timeout_s: float,
    on_idle: Callable[[], None] | None = None,
) -> None:
    """Spins briefly, then yields the core, until counters[index] >= value. A long wait calls
    `on_idle` every 0.1 s (the decode worker keeps heartbeating while an executor is silent)."""
    if counters[index] >= value:
        return
    start = time.monotonic()
    next_idle = start + 0.1
    spins = 0
    while counters[index] < value:
        spins += 1
        if spins > 200:
            time.sleep(0 if spins < 2000 else 5e-5)  # two cores are shared by several roles
            now = time.monotonic()
            if now - start > timeout_s:
                raise ChannelTimeout(f"no answer within {timeout_s}s (waiting for {value})")
            if on_idle is not None and now > next_idle:
                on_idle()
                next_idle = now + 0.1


class _Region:
    def __init__(self, shm: SharedMemory, layout: dict, dtype: torch.dtype) -> None:
        self.shm = shm
        self.counters = np.frombuffer(shm.buf, dtype=np.int64, count=4)
        self.tensors = {
            name: torch.frombuffer(shm.buf, dtype=dtype, count=math.prod(shape), offset=off).view(
                shape
            )
            for name, (off, shape) in layout["offsets"].items()
        }

    def close(self) -> None:
        self.tensors.clear()
        del self.counters
        try:
            self.shm.close()
        except BufferError:
            pass  # a view outlives us; the mapping goes with the process


class DecodeSideLink:
    """Created by the decode worker, one per executor it offloads to."""

    def __init__(
        self, max_rows: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> None:
        remove_stale_segments(SEGMENT_PREFIX)
        layout = _layout(max_rows, num_heads, num_kv_heads, head_dim, dtype)
        name = f"{SEGMENT_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        self._shm = SharedMemory(name=name, create=True, size=layout["nbytes"])
        self.region = _Region(self._shm, layout, dtype)
        self.region.counters[:] = 0
        self.max_rows = max_rows
        self.endpoint = {
            "kind": "shm",
            "name": name,
            "max_rows": max_rows,
            "num_heads": num_heads,
            "num_kv_heads": num_kv_heads,
            "head_dim": head_dim,
            "dtype": dtype_to_str(dtype),
        }

    def post(self, seq_no: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        n = q.shape[0]
        t = self.region.tensors
        t["q"][:n].copy_(q)
        t["k"][:n].copy_(k)
        t["v"][:n].copy_(v)
        self.region.counters[2] = n
        self.region.counters[0] = seq_no

    def collect(
        self,
        seq_no: int,
        step_id: int,
        n: int,
        timeout_s: float,
        on_idle: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        wait_for(self.region.counters, 1, seq_no, timeout_s, on_idle)
        if self.region.counters[3] == step_id + 1:
            raise StepRefused(f"the executor refused step {step_id}")
        return self.region.tensors["out"][:n].clone()

    def refuse(self, step_id: int, last_seq_no: int) -> None:
        """Answers every layer of the step at once, marked refused."""
        self.region.counters[3] = step_id + 1
        self.region.counters[1] = last_seq_no

    def close(self) -> None:
        self.region.close()
        try:
            self._shm.unlink()
        except FileNotFoundError:
            pass


class ExecutorSideLink:
    """The executor's end of a decode worker's link, mapped from the endpoint it was sent."""

    def __init__(self, endpoint: dict) -> None:
        max_rows, num_heads, num_kv_heads, head_dim, dtype = link_dims(endpoint)
        layout = _layout(max_rows, num_heads, num_kv_heads, head_dim, dtype)
        name = endpoint.get("name")
        if not isinstance(name, str) or not name.startswith(SEGMENT_PREFIX) or "/" in name:
            raise BadLinkEndpoint(f"{name!r} is not a per-layer channel segment")
        try:
            shm = _open_untracked(name)
        except OSError as exc:
            raise BadLinkEndpoint(f"cannot open channel segment {name}: {exc}") from exc
        if shm.size != layout["nbytes"]:
            shm.close()
            raise BadLinkEndpoint(f"channel segment {name} holds {shm.size} bytes; the link "
                                  f"needs exactly {layout['nbytes']}")  # fmt: skip
        self.region = _Region(shm, layout, dtype)
        self.max_rows = max_rows
        self.on_idle: Callable[[], None] | None = None

    def receive(self, seq_no: int, timeout_s: float):
        wait_for(self.region.counters, 0, seq_no, timeout_s, self.on_idle)
        if self.region.counters[0] != seq_no:
            # The decode worker abandoned this step and began a later one.
            raise ChannelTimeout(f"step superseded (expected {seq_no})")
        n = int(self.region.counters[2])
        if not 0 <= n <= self.max_rows:
            raise ChannelTimeout(f"the decode worker posted {n} rows (at most {self.max_rows})")
        t = self.region.tensors
        return t["q"][:n], t["k"][:n], t["v"][:n]

    def respond(self, seq_no: int, out: torch.Tensor) -> None:
        self.region.tensors["out"][: out.shape[0]].copy_(out)
        self.region.counters[1] = seq_no

    def refuse(self, step_id: int, last_seq_no: int) -> None:
        """Answers every layer of the step at once, marked refused."""
        self.region.counters[3] = step_id + 1
        self.region.counters[1] = last_seq_no

    def close(self) -> None:
        self.region.close()
