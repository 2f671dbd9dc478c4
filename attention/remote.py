"""What the model needs from offloaded attention, as seen from the decode worker: a step's
rows for each executor go out layer by layer, and their outputs come back.

The implementation (server/roles/offload_client.py) moves the tensors; the model only slices rows:
a step's tokens are laid out [prefill chunks | local decodes | offloaded decodes by executor].
"""

from __future__ import annotations

from typing import Protocol

import torch


class RemoteAttentionError(RuntimeError):
    """An executor failed a step (dead, stuck, or refusing); its requests cannot go on."""

    def __init__(self, executor: str, message: str) -> None:
        super().__init__(f"attention executor {executor}: {message}")
        self.executor = executor


class RemoteStep(Protocol):
    num_local_tokens: int  # rows [0, n) are computed here; the rest are offloaded

    def send(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Ships the offloaded rows' q and new k, v; returns before the executor answers."""
        ...

    def receive(self, layer: int) -> torch.Tensor:
        """The offloaded rows' attention output [rows, num_heads, head_dim]. The last layer's
        raises RemoteAttentionError for a failed step, unless the step is graphed."""
        ...

    def replayed(self) -> None:
        """A graphed step only, once the CUDA graph holding its sends and receives ran: checks
        the step as an eager step's last receive() does."""
        ...


class RemoteAttention(Protocol):
    """A client may set `graph_safe = True` when its steps' per-layer send/receive only enqueue
    device work that reads per-step state (sequence numbers) from device memory: decode steps
    with offloaded rows are then captured in CUDA graphs too. Without it they run eagerly.
    Such a client counts its links in `links_generation`: a graph captured over a link's
    buffers is stale once the link is replaced."""

    def begin_step(
        self,
        num_local_tokens: int,
        groups: list[tuple[str, list[tuple[str, int]]]],
        graphed: bool = False,
    ) -> RemoteStep:
        """Announces a step: per executor, (request id, position of its new token) in row order.
        graphed: a CUDA graph captures or replays the step (see RemoteStep.replayed)."""
        ...

    def release(self, executor: str, request_id: str) -> None:
        """The request is finished or dropped here; the executor may free its KV."""
        ...
