"""GPU-side signals between two processes: write a counter, wait on a counter, both enqueued on
the current CUDA stream, so a per-layer handshake costs no host round trip (paper, technique 1).

Two implementations, chosen once at run time: CUDA stream memory operations
(cuStreamWriteValue64 / cuStreamWaitValue64 through cuda-python) when `cuda.bindings` imports,
else two tiny Triton kernels. Stream memory ops occupy no SM while waiting (the GPU's front end
polls), which matters when two processes without MPS time-slice one device; but their wait has
no timeout, so the host must release a wait whose peer died (see `release`). The Triton wait is
bounded by the global timer and sets an error flag instead of hanging.

Counters are int64 and only grow; a wait passes once the counter is >= the value. Nothing here
reads GPU memory from the host, so callers stay free of host syncs and capturable in CUDA graphs.
Importable without a GPU, triton or cuda-python; calls then raise GpuSignalUnavailable.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except ImportError:
    TRITON_AVAILABLE = False

# Override the run-time choice: "stream_memops" or "triton".
BACKEND_ENV = "ADRENALINE_GPU_SIGNAL"


class GpuSignalUnavailable(RuntimeError):
    """Neither cuda-python's stream memory operations nor Triton can be used here."""


@functools.cache
def _driver():
    """cuda-python's driver module, or None. Newer releases name it cuda.bindings.driver."""
    try:
        from cuda.bindings import driver
    except ImportError:
        try:
            from cuda import cuda as driver  # cuda-python < 12.6
        except ImportError:
            return None
    return driver


@functools.cache
def backend() -> str:
    """ "stream_memops" (preferred), "triton", or "none"."""
    forced = os.environ.get(BACKEND_ENV, "")
    if forced in ("stream_memops", "triton"):
        return forced
    if _driver() is not None:
        return "stream_memops"
    return "triton" if TRITON_AVAILABLE else "none"


def _address(counters: torch.Tensor, index: int) -> int:
    if counters.dtype != torch.int64 or not counters.is_cuda:
        raise ValueError(f"signal counters must be a CUDA int64 tensor, not {counters.dtype} "
                         f"on {counters.device}")  # fmt: skip
    if not 0 <= index < counters.numel():
        raise IndexError(f"counter index {index} out of range for {counters.numel()} counters")
    return counters.data_ptr() + index * counters.element_size()


def _check(result) -> None:
    err = result[0] if isinstance(result, tuple) else result
    if int(err) != 0:
        raise RuntimeError(f"CUDA stream memory operation failed: {err}")


def _stream_handle() -> int:
    # The caller's current stream on its current device: with peer (P2P) counters, the
    # counters' device is not the one whose work the signal orders.
    return torch.cuda.current_stream().cuda_stream


def write_value(counters: torch.Tensor, index: int, value: int) -> None:
    """Enqueues counters[index] = value on the current stream, after all work before it: the
    store is system-scope and fenced, so a peer that sees the value also sees that work's data."""
    address = _address(counters, index)
    kind = backend()
    if kind == "stream_memops":
        drv = _driver()
        # Flag 0 keeps the default memory barrier before the write.
        _check(drv.cuStreamWriteValue64(
            drv.CUstream(_stream_handle()), drv.CUdeviceptr(address),
            drv.cuuint64_t(int(value)), 0,
        ))  # fmt: skip
    elif kind == "triton":
        del address
        _write_value_kernel[(1,)](counters, index, value)
    else:
        raise GpuSignalUnavailable("GPU signals need cuda-python or triton (pip install .[gpu])")


def wait_value(
    counters: torch.Tensor,
    index: int,
    value: int,
    timeout_ns: int,
    error_flag: torch.Tensor,  # [1] int32 on the waiting device; set to 1 on timeout
) -> None:
    """Enqueues a wait until counters[index] >= value on the current stream; work enqueued after
    it starts only then. The Triton wait gives up after timeout_ns and sets error_flag[0]; the
    stream memory op waits without limit (the host releases it, see `release`)."""
    address = _address(counters, index)
    kind = backend()
    if kind == "stream_memops":
        drv = _driver()
        geq = int(drv.CUstreamWaitValue_flags.CU_STREAM_WAIT_VALUE_GEQ)
        _check(drv.cuStreamWaitValue64(
            drv.CUstream(_stream_handle()), drv.CUdeviceptr(address),
            drv.cuuint64_t(int(value)), geq,
        ))  # fmt: skip
    elif kind == "triton":
        del address
        _wait_value_kernel[(1,)](counters, index, value, int(timeout_ns), error_flag)
    else:
        raise GpuSignalUnavailable("GPU signals need cuda-python or triton (pip install .[gpu])")


def release(counters: torch.Tensor, index: int, value: int, error_flag: torch.Tensor) -> None:
    """Host-side escape from a wait whose peer is gone: on a side stream, marks the error and
    writes the awaited value, so the blocked stream runs on (its results are discarded)."""
    side = torch.cuda.Stream(device=error_flag.device)
    with torch.cuda.stream(side):
        error_flag.fill_(1)
        write_value(counters, index, value)
    side.synchronize()


if TRITON_AVAILABLE:

    @triton.jit
    def _globaltimer():
        return tl.inline_asm_elementwise(
            "mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1
        )

    @triton.jit(do_not_specialize=["index", "value"])
    def _write_value_kernel(counters, index, value):
        # A release store at system scope: the stream's earlier writes (the copies this signal
        # announces) are visible to any observer of the new value, across processes and GPUs.
        tl.atomic_xchg(counters + index, value.to(tl.int64), sem="release", scope="sys")

    @triton.jit(do_not_specialize=["index", "value", "timeout_ns"])
    def _wait_value_kernel(counters, index, value, timeout_ns, error_flag):
        ptr = counters + index
        target = value.to(tl.int64)
        now = _globaltimer()
        deadline = now + timeout_ns
        seen = tl.load(ptr, volatile=True)
        while (seen < target) & (now < deadline):
            seen = tl.load(ptr, volatile=True)
            now = _globaltimer()
        if seen < target:
            tl.store(error_flag, 1)
        # Acquire: pairs with the writer's release, so reads after this wait see its data.
        tl.atomic_add(ptr, 0, sem="acquire", scope="sys")
