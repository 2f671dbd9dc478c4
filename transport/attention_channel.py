"""The per-layer path between a decode worker and an attention executor on the CPU: one shared
memory region per pair holding the protocol's counters, q, k, v in and the attention output back.

No message crosses a socket per layer. The protocol (transport.attention_protocol) is the one the
GPU link runs; here its counters are host words waited on by spinning
(transport.host_signal_channel).
"""

from __future__ import annotations

import math
import os
import secrets

import numpy as np
import torch

from transport.attention_protocol import NUM_COUNTERS, DecodeSide, ExecutorSide
from transport.attention_protocol import ChannelTimeout as ChannelTimeout
from transport.attention_protocol import StepRefused as StepRefused
from transport.host_signal_channel import HostSignals
from transport.kv_transfer_base import KVTransferError, dtype_from_str, dtype_to_str
from transport.shm_transfer import SharedMemory, _open_untracked, remove_stale_segments

SEGMENT_PREFIX = "adrenaline-attn-"  # the host link's region, and the GPU link's counters
_HEADER_BYTES = NUM_COUNTERS * 8
MAX_LINK_ROWS = 8192  # a decode batch's offloaded rows: at most its max_num_seqs
_MAX_DIM = 1 << 16


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


class _Region:
    def __init__(self, shm: SharedMemory, layout: dict, dtype: torch.dtype) -> None:
        self.shm = shm
        self.counters = np.frombuffer(shm.buf, dtype=np.int64, count=NUM_COUNTERS)
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


class DecodeSideLink(DecodeSide):
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
        super().__init__(HostSignals(self.region.counters), self.region.tensors, max_rows)
        self.endpoint = {
            "kind": "shm",
            "name": name,
            "max_rows": max_rows,
            "num_heads": num_heads,
            "num_kv_heads": num_kv_heads,
            "head_dim": head_dim,
            "dtype": dtype_to_str(dtype),
        }

    def close(self) -> None:
        self.signals.close()
        self.region.close()
        try:
            self._shm.unlink()
        except FileNotFoundError:
            pass


class ExecutorSideLink(ExecutorSide):
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
        super().__init__(HostSignals(self.region.counters), self.region.tensors, max_rows)

    def close(self) -> None:
        self.signals.close()
        self.region.close()
