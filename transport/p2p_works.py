"""What one side of a point-to-point pair link has in flight within a step: the transfers it
started (gloo completes each at once; an NCCL one only orders the current stream, and `drain`
enforces its deadline without a host sync before the step's end) and the step's small headers,
sent from pinned host memory without a sync and read on the host only at the step's end.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

from transport.attention_protocol import ChannelTimeout
from transport.polling import poll_until

_TAG = 0  # gloo keeps one tag's messages in order; NCCL ignores tags


class Headers:
    """One step's [a, b] headers in slots: sent ones written on the host into pinned memory and
    copied to the device without a sync, received ones read on the host only in check(). A slot
    is reused only after reset(), once the step's transfers completed."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.used = 0
        self._host = self._dev = torch.empty(0, 2, dtype=torch.int64)
        self._retired: list[torch.Tensor] = []  # outgrown buffers a copy may still read

    def _slot(self) -> int:
        if self.used == self._host.shape[0]:
            self._grow(max(8, 2 * self.used))
        self.used += 1
        return self.used - 1

    def _grow(self, size: int) -> None:
        used, on_gpu = self.used, self.device.type == "cuda"
        host = torch.zeros(size, 2, dtype=torch.int64, pin_memory=on_gpu)
        host[:used] = self._host[:used]
        dev = host
        if on_gpu:
            dev = torch.zeros(size, 2, dtype=torch.int64, device=self.device)
            # Stream-ordered after the transfers into the old slots (their waits ordered it).
            dev[:used].copy_(self._dev[:used])
        self._retired += [self._host, self._dev]
        self._host, self._dev = host, dev

    def outgoing(self, a: int, b: int) -> torch.Tensor:
        slot = self._slot()
        self._host[slot, 0], self._host[slot, 1] = a, b
        if self._dev is self._host:
            return self._host[slot]
        self._dev[slot].copy_(self._host[slot], non_blocking=True)
        return self._dev[slot]

    def incoming(self) -> torch.Tensor:
        slot = self._slot()
        return self._dev[slot]

    def read(self) -> list[list[int]]:
        """Every slot used since reset(), as the host sees it (a sync on a GPU)."""
        return self._dev[: self.used].tolist()

    def reset(self) -> None:
        self.used = 0
        self._retired.clear()


class Works:
    """The transfers a side started since its last check(), with their deadlines."""

    def __init__(self) -> None:
        self.pending: list[dist.Work] = []
        self.spent = False  # a transfer failed: the group is aborted or poisoned

    def start(self, op, tensor: torch.Tensor, peer: int, timeout_s: float) -> None:
        """Starts one transfer; gloo's (CPU tensors) completes here within timeout_s."""
        if self.spent:
            raise ChannelTimeout("the link's group failed earlier; attach a new link")
        try:
            work = op([tensor], peer, _TAG)
            if tensor.device.type == "cpu":
                work.wait(timedelta(seconds=timeout_s))  # gloo completes it here
            else:
                work.wait()  # no timeout: only orders the current stream after the transfer
        except Exception as exc:  # gloo raises on a timeout or a dead peer
            self.spent = True
            raise ChannelTimeout(f"point-to-point transfer failed: {exc}") from exc
        if tensor.device.type != "cpu":
            self.pending.append(work)

    def drain(
        self,
        group: dist.ProcessGroup | None,
        timeout_s: float,
        on_idle: Callable[[], None] | None,
    ) -> None:
        """Until every pending transfer completed, none silent past timeout_s after the one
        before it (else the group is aborted, so the kernels blocking the stream return)."""
        pending, self.pending = self.pending, []
        for work in pending:
            if not poll_until(work.is_completed, timeout_s, on_idle):
                self._abort(group)
                raise ChannelTimeout(f"a point-to-point transfer made no progress in {timeout_s}s")
            try:
                work.wait()  # raises the error of a work that failed
            except Exception as exc:
                self._abort(group)
                raise ChannelTimeout(f"point-to-point transfer failed: {exc}") from exc

    def _abort(self, group: dist.ProcessGroup | None) -> None:
        self.spent = True
        if group is not None:
            try:
                group.abort()
            except Exception:  # spent either way: the abort only frees a blocked stream sooner
                pass
