"""GPU-side signals between two processes: write a counter, wait on a counter, both enqueued on
the current CUDA stream, so a per-layer handshake costs no host round trip (paper, technique 1).

The counters live in host memory, page-locked and mapped for the GPU (`MappedCounters`). So a
waiting GPU polls over its own link to the host, never a peer GPU's memory across a PCIe peer
link that may lack system-scope atomics; every write is a plain release store (no atomic
read-modify-write crosses the bus); and a host releases a wait whose peer died with a plain
store, which no GPU work has to precede (a write enqueued on a side stream of the same context
is not ordered by CUDA against a blocked cuStreamWaitValue64, and may deadlock).

Two implementations, chosen once per device: CUDA stream memory operations (cuStreamWriteValue64
/ cuStreamWaitValue64 through cuda-python) where the device reports
CU_DEVICE_ATTRIBUTE_CAN_USE_64_BIT_STREAM_MEM_OPS, else three tiny Triton kernels. Stream memory
ops occupy no SM while waiting, but their wait has neither a timeout nor a failure flag: the host
releases it (transport.attention_protocol's drain). The Triton wait is bounded by a timer and
marks the failure itself; its timer and memory operations are constexpr arguments, so under
TRITON_INTERPRET=1 the same kernels run on the host, on CPU tensors, with a host clock.

Counters are int64 and only grow. The Triton kernels take each value as an offset from a
`SequenceBase` in memory they read when they run, so a captured CUDA graph of a step replays for
the next step once the base moved (`SequenceBase.advance`, itself capturable): their launches
carry only per-layer constants. Stream memory ops take their values at enqueue time: a graph of
them would replay the captured step's numbers, so that path is not graph-safe (`graph_safe`).
Nothing here reads GPU memory from the host, so callers stay free of host syncs. Importable without a GPU, triton or
cuda-python; calls then raise GpuSignalUnavailable.
"""

from __future__ import annotations

import functools
import mmap
import os
import time

import torch

try:
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except ImportError:
    TRITON_AVAILABLE = False

# Override the run-time choice: "stream_memops" or "triton".
BACKEND_ENV = "ADRENALINE_GPU_SIGNAL"
# Whether the Triton kernels run in the interpreter: fixed for the process when triton loads.
INTERPRETED = TRITON_AVAILABLE and os.environ.get("TRITON_INTERPRET", "").lower() in (
    "1", "true", "on",
)  # fmt: skip
_HOST_REGISTER_FLAGS = 0x01 | 0x02  # cudaHostRegisterPortable | cudaHostRegisterMapped


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
def _memops_supported(device_index: int) -> bool:
    """Whether this device runs 64-bit stream memory operations (a driver or platform may not)."""
    drv = _driver()
    if drv is None or not torch.cuda.is_available():
        return False
    attribute = drv.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_CAN_USE_64_BIT_STREAM_MEM_OPS
    err, device = drv.cuDeviceGet(device_index)
    if int(err) != 0:
        return False
    err, value = drv.cuDeviceGetAttribute(attribute, device)
    return int(err) == 0 and bool(value)


@functools.cache
def backend(device_index: int | None = None) -> str:
    """ "stream_memops" (where the device supports them), "triton", or "none"."""
    forced = os.environ.get(BACKEND_ENV, "")
    if forced in ("stream_memops", "triton"):
        return forced
    if not INTERPRETED and torch.cuda.is_available():
        index = torch.cuda.current_device() if device_index is None else device_index
        if _memops_supported(index):
            return "stream_memops"
    return "triton" if TRITON_AVAILABLE else "none"


def _check(result) -> None:
    err = result[0] if isinstance(result, tuple) else result
    if int(err) != 0:
        raise RuntimeError(f"CUDA stream memory operation failed: {err}")


class _DevicePointer:
    """What a Triton launch needs of a pointer argument: the address and the element type."""

    dtype = torch.int64

    def __init__(self, address: int) -> None:
        self.address = address

    def data_ptr(self) -> int:
        return self.address


class MappedCounters:
    """int64 counters in host memory, page-locked and mapped for the GPU (cudaHostRegister with
    cudaHostRegisterMapped): the host reads and stores them plainly; a kernel or a stream memory
    op reaches them at `device_ptr`. `host` may view shared memory that a peer maps too."""

    def __init__(self, host: torch.Tensor) -> None:
        if host.dtype != torch.int64 or host.device.type != "cpu" or not host.is_contiguous():
            raise ValueError(f"signal counters must be contiguous CPU int64, not {host.dtype} "
                             f"on {host.device}")  # fmt: skip
        self.host = host
        self._registered = False
        if INTERPRETED or not torch.cuda.is_available():
            self.device_ptr = host.data_ptr()  # the interpreter works on host memory itself
            return
        nbytes = host.numel() * host.element_size()
        err = torch.cuda.cudart().cudaHostRegister(host.data_ptr(), nbytes, _HOST_REGISTER_FLAGS)
        if int(err) != 0:
            raise GpuSignalUnavailable(f"cudaHostRegister of the link's counters failed: {err}")
        self._registered = True
        self.device_ptr = _device_pointer(host.data_ptr())

    def kernel_arg(self):
        return self.host if INTERPRETED else _DevicePointer(self.device_ptr)

    def address(self, index: int) -> int:
        if not 0 <= index < self.host.numel():
            raise IndexError(f"counter index {index} out of range for {self.host.numel()}")
        return self.device_ptr + index * self.host.element_size()

    def close(self) -> None:
        if self._registered:
            torch.cuda.cudart().cudaHostUnregister(self.host.data_ptr())
            self._registered = False


class SequenceBase:
    """A link side's step numbers, [seq_base, step_tag] int64, where the Triton signal kernels
    read them when they run: a layer's sequence number is seq_base + layer + 1 and its failure
    tag step_tag (= step + 1), so launches carry only offsets from them. `seq_base`, `step_tag`
    mirror on the host what the stream holds once the work enqueued so far has run."""

    def __init__(self, device: torch.device | str) -> None:
        self.values = torch.zeros(2, dtype=torch.int64, device=device)
        self.seq_base = self.step_tag = 0
        self._deltas: dict[int, torch.Tensor] = {}

    def set(self, seq_base: int, step_tag: int) -> None:
        """Enqueues the new values on the current stream, after every signal enqueued before."""
        self.values[0].fill_(seq_base)
        self.values[1].fill_(step_tag)
        self.seq_base, self.step_tag = seq_base, step_tag

    def advance(self, seq_delta: int) -> None:
        """Enqueues values += (seq_delta, 1), the next step's: an add of a device tensor, with no
        step's number in it, so a CUDA graph may capture it (call it once before capturing, to
        allocate the delta)."""
        delta = self._deltas.get(seq_delta)
        if delta is None:
            delta = torch.tensor([seq_delta, 1], dtype=torch.int64, device=self.values.device)
            self._deltas[seq_delta] = delta
        self.values.add_(delta)
        self.seq_base, self.step_tag = self.seq_base + seq_delta, self.step_tag + 1


@functools.cache
def _zero_base(device: str) -> SequenceBase:
    return SequenceBase(device)  # never moved: offsets are then the values themselves


def _base_for(counters: MappedCounters, base: SequenceBase | None) -> SequenceBase:
    if base is not None:
        return base
    on_gpu = not INTERPRETED and torch.cuda.is_available()
    return _zero_base(f"cuda:{torch.cuda.current_device()}" if on_gpu else "cpu")


def _device_pointer(host_ptr: int) -> int:
    """The mapped counters' device address. With unified addressing (every 64-bit Linux GPU
    since Fermi, cudaDevAttrCanUseHostPointerForRegisteredMem) it is the host address."""
    drv = _driver()
    if drv is None:
        return host_ptr
    err, device_ptr = drv.cuMemHostGetDevicePointer(host_ptr, 0)
    _check(err)
    return int(device_ptr)


def _stream(drv):
    # The caller's current stream on its current device: the one whose work the signal orders.
    return drv.CUstream(torch.cuda.current_stream().cuda_stream)


def write_value(
    counters: MappedCounters, index: int, value: int, base: SequenceBase | None = None
) -> None:
    """Enqueues counters[index] = value on the current stream, after all work before it: the
    store is system-scope and fenced, so a peer that sees the value also sees that work's data.
    The Triton kernel computes value from `base` as it runs (see SequenceBase)."""
    address = counters.address(index)
    kind = backend()
    if kind == "stream_memops":
        drv = _driver()
        # Flag 0 (CU_STREAM_WRITE_VALUE_DEFAULT) keeps the memory barrier before the write.
        _check(drv.cuStreamWriteValue64(_stream(drv), drv.CUdeviceptr(address),
                                        drv.cuuint64_t(int(value)), 0))  # fmt: skip
    elif kind == "triton":
        base = _base_for(counters, base)
        _write_value_kernel[(1,)](counters.kernel_arg(), index, base.values, value - base.seq_base,
                                  ON_GPU=not INTERPRETED, num_warps=1)  # fmt: skip
    else:
        raise GpuSignalUnavailable("GPU signals need cuda-python or triton (pip install .[gpu])")


def wait_value(
    counters: MappedCounters,
    index: int,
    value: int,
    timeout_ns: int,
    fail_index: int,
    fail_value: int,
    exact: bool = False,
    base: SequenceBase | None = None,
) -> None:
    """Enqueues a wait until counters[index] >= value on the current stream; work enqueued after
    it starts only then. The Triton wait passes at once if counters[fail_index] == fail_value
    (this side's step failed already), and stores fail_value there itself after timeout_ns or,
    with `exact`, on a larger value; it reads value and fail_value relative to `base`. The
    stream memory op waits without limit or flag: the host releases it (see the module's
    docstring)."""
    address = counters.address(index)
    counters.address(fail_index)
    kind = backend()
    if kind == "stream_memops":
        drv = _driver()
        geq = int(drv.CUstreamWaitValue_flags.CU_STREAM_WAIT_VALUE_GEQ)
        _check(drv.cuStreamWaitValue64(_stream(drv), drv.CUdeviceptr(address),
                                       drv.cuuint64_t(int(value)), geq))  # fmt: skip
    elif kind == "triton":
        base = _base_for(counters, base)
        _wait_value_kernel[(1,)](
            counters.kernel_arg(), index, base.values, value - base.seq_base, int(timeout_ns),
            fail_index, fail_value - base.step_tag, EXACT=exact, ON_GPU=not INTERPRETED, CLOCK=_host_clock if INTERPRETED else _globaltimer,
            num_warps=1,
        )  # fmt: skip
    else:
        raise GpuSignalUnavailable("GPU signals need cuda-python or triton (pip install .[gpu])")


def answer(
    counters: MappedCounters,
    index: int,
    value: int,
    fail_index: int,
    fail_value: int,
    mark_index: int,
    base: SequenceBase | None = None,
) -> None:
    """Enqueues counters[index] = value, first storing fail_value at mark_index if
    counters[fail_index] == fail_value: an answer that carries its side's failure. With stream
    memory ops only a host release can fail a wait, and the release stores the mark itself."""
    if backend() != "triton":
        write_value(counters, index, value)
        return
    counters.address(mark_index)
    base = _base_for(counters, base)
    _answer_kernel[(1,)](counters.kernel_arg(), index, base.values, value - base.seq_base,
                         fail_index, fail_value - base.step_tag, mark_index,
                         ON_GPU=not INTERPRETED, num_warps=1)  # fmt: skip


@functools.cache
def warm_up(device_index: int) -> None:
    """Compiles and runs each Triton signal kernel once (a first launch JIT-compiles for
    seconds, beyond a per-layer timeout). Stream memory ops need nothing."""
    if backend(device_index) != "triton" or INTERPRETED:
        return
    page = mmap.mmap(-1, mmap.PAGESIZE)  # page-aligned, pageable: registered like a link's
    scratch = MappedCounters(torch.frombuffer(page, dtype=torch.int64, count=8))
    try:
        with torch.cuda.device(device_index):
            write_value(scratch, 0, 1)
            for exact in (False, True):
                wait_value(scratch, 0, 1, 10**9, 1, 1, exact)
            answer(scratch, 2, 1, 1, 1, 3)
            torch.cuda.current_stream().synchronize()
    finally:
        scratch.close()


def _host_ns() -> int:
    return time.monotonic_ns()


if TRITON_AVAILABLE:

    @triton.jit
    def _globaltimer():
        return tl.inline_asm_elementwise(
            "mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1
        )

    @triton.jit
    def _host_clock():
        # Passed as CLOCK only under TRITON_INTERPRET=1, which runs this body as host Python.
        return tl.full((), _host_ns(), tl.int64)

    @triton.jit
    def _load_acquire(ptr, ON_GPU: tl.constexpr):
        # System scope: pairs with the peer's release store, across processes and devices.
        if ON_GPU:
            seen = tl.inline_asm_elementwise(
                "ld.acquire.sys.global.b64 $0, [$1];", "=l,l", [ptr], dtype=tl.int64,
                is_pure=False, pack=1,
            )  # fmt: skip
        else:
            seen = tl.load(ptr, volatile=True)
        return seen

    @triton.jit
    def _store_release(ptr, value, ON_GPU: tl.constexpr):
        # A plain store with release semantics: the stream's earlier writes (the rows this value
        # announces) are visible to any observer of it. No atomic read-modify-write crosses PCIe.
        if ON_GPU:
            tl.inline_asm_elementwise(
                "st.release.sys.global.b64 [$1], $2; mov.u32 $0, 0;", "=r,l,l", [ptr, value],
                dtype=tl.int32, is_pure=False, pack=1,
            )  # fmt: skip
        else:
            tl.store(ptr, value)

    @triton.jit
    def _step_values(base, offset, fail_offset):
        # A layer's sequence number and its step's failure tag, from the base in memory.
        return tl.load(base) + offset.to(tl.int64), tl.load(base + 1) + fail_offset.to(tl.int64)

    @triton.jit(do_not_specialize=["index", "offset"])
    def _write_value_kernel(counters, index, base, offset, ON_GPU: tl.constexpr):
        _store_release(counters + index, tl.load(base) + offset.to(tl.int64), ON_GPU)

    @triton.jit(do_not_specialize=["index", "offset", "timeout_ns", "fail_index", "fail_offset"])
    def _wait_value_kernel(
        counters, index, base, offset, timeout_ns, fail_index, fail_offset,
        EXACT: tl.constexpr, ON_GPU: tl.constexpr, CLOCK: tl.constexpr,
    ):  # fmt: skip
        ptr = counters + index
        target, failed = _step_values(base, offset, fail_offset)
        # This side's step failed already: its later waits pass at once, not each after a timeout.
        skip = (_load_acquire(counters + fail_index, ON_GPU) == failed).to(tl.int32)
        now = CLOCK()
        deadline = now + timeout_ns
        seen = _load_acquire(ptr, ON_GPU)
        while (seen < target) & (skip == 0) & (now < deadline):
            seen = _load_acquire(ptr, ON_GPU)
            now = CLOCK()
        if EXACT:
            bad = seen != target  # a later request: the peer gave up on this step
        else:
            bad = seen < target
        if bad & (skip == 0):
            _store_release(counters + fail_index, failed, ON_GPU)

    @triton.jit(do_not_specialize=["index", "offset", "fail_index", "fail_offset", "mark_index"])
    def _answer_kernel(counters, index, base, offset, fail_index, fail_offset, mark_index,
                       ON_GPU: tl.constexpr):  # fmt: skip
        value, failed = _step_values(base, offset, fail_offset)
        if _load_acquire(counters + fail_index, ON_GPU) == failed:
            _store_release(counters + mark_index, failed, ON_GPU)
        _store_release(counters + index, value, ON_GPU)
