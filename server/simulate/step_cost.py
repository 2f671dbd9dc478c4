"""How long one engine step takes, in place of the model runner: on a GPU, the fitted roofline
of each operator over the model's shapes; on a CPU, the linear model `adrenaline profile` fits.

A step's layer is: pre-attention ops over every row, then local attention while the offloaded
rows go to their executors and back, then the rest of the layer over every row (the paper's
decoding with attention disaggregation). A step with offloaded rows waits at each layer for
the slowest executor beyond its own local attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache

from scheduler.cost_model import CostModel
from server.simulate.hardware import GPU, ModelShape
from server.simulate.roofline import ELEMENTWISE_OPS, DeviceFit, elementwise_bytes

PRE_ATTENTION = ("input_layernorm", "attn_rope")
LAYER_ELEMENTWISE = tuple(op for op in ELEMENTWISE_OPS if op != "emb")


@dataclass
class StepWork:
    """What a scheduled batch asks of the device."""

    tokens: int = 0  # new tokens: every linear layer runs over all of them, offloaded too
    sampled: int = 0  # rows that sample a token (the LM head)
    prefill: list[tuple[int, int]] = field(default_factory=list)  # (chunk, tokens before it)
    local_rows: int = 0  # decode rows whose attention runs here
    local_kv: int = 0  # KV tokens they read
    local_longest: int = 0  # KV tokens of the longest of them
    # executor -> [rows, KV tokens, the longest row's]
    remote: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class StepTime:
    ms: float  # the whole step, as the worker's clock sees it
    layer_wait_ms: float = 0.0  # per layer, waiting on executors past local attention
    executor_ms: dict[str, float] = field(default_factory=dict)  # per layer, on each executor
    flops: float = 0.0  # useful arithmetic, for compute utilisation
    prefill_flops: float = 0.0  # of `flops`, the prompt chunks' (on a decode worker: recompute)
    bytes: float = 0.0  # HBM traffic of this device, for bandwidth utilisation
    executor_bytes: dict[str, float] = field(default_factory=dict)  # on each executor's GPU


@dataclass(frozen=True)
class Colocation:
    """The executor beside a prefill worker shares its GPU (paper: resource-efficient prefill
    colocation). Defaults from the paper's A100 observations, stated in the README."""

    executor_bandwidth: float = 0.6  # of peak HBM bandwidth, reached at `sm_share` of the SMs
    sm_share: float = 0.2  # SMs the executor is limited to (MPS)
    prefill_slowdown: float = 1.25  # prefill time multiplier while its executor holds requests
    sync_ms: float = 0.01  # per layer: GPU-signalled hand-over of q/k/v and output, both ways


class GpuStepCost:
    """Roofline step times for one model on one GPU model, tensor-parallel 1."""

    def __init__(
        self,
        shape: ModelShape,
        device: GPU,
        fit: DeviceFit,
        colocation: Colocation = Colocation(),
        overhead_ms: float = 0.3,
        overhead_per_row_ms: float = 0.006,
    ) -> None:
        self.shape, self.device, self.fit, self.colocation = shape, device, fit, colocation
        self.num_layers = shape.num_layers
        # Host time per step that the GPU does not hide: scheduling, input preparation, launch.
        self.overhead_ms, self.overhead_per_row_ms = overhead_ms, overhead_per_row_ms
        attention_bw = fit.decode_attention.efficiency
        self.executor_speed = min(1.0, colocation.executor_bandwidth / attention_bw)
        self._linear = lru_cache(maxsize=None)(self._linear_uncached)
        self._head = lru_cache(maxsize=None)(self.head_ms)

    def _gemm(self, m: int, k: int, n: int) -> float:
        d = self.device
        return self.fit.gemm.ms(m, k, n, d.peak_flops, d.hbm_bandwidth, d.num_sms,
                                self.shape.dtype_bytes)  # fmt: skip

    def _linear_uncached(self, tokens: int) -> tuple[float, float, float]:
        """(ms, FLOPs, bytes) of one layer's non-attention operators over `tokens` rows."""
        s, bw = self.shape, self.device.hbm_bandwidth
        ms = flops = moved = 0.0
        for k, n in s.gemms().values():
            ms += self._gemm(tokens, k, n)
            flops += 2.0 * tokens * k * n
            moved += s.dtype_bytes * (k * n + tokens * (k + n))
        for op in LAYER_ELEMENTWISE:
            nbytes = elementwise_bytes(s, op, tokens)
            ms += self.fit.elementwise[op].ms(nbytes, bw)
            moved += nbytes
        return ms, flops, moved

    def head_ms(self, tokens: int, sampled: int) -> tuple[float, float, float]:
        """Embedding lookup for the step's tokens and the LM head for the sampled rows."""
        s = self.shape
        nbytes = elementwise_bytes(s, "emb", tokens)
        ms = self.fit.elementwise["emb"].ms(nbytes, self.device.hbm_bandwidth)
        if sampled:
            ms += self._gemm(sampled, s.hidden, s.vocab)
        return ms, 2.0 * sampled * s.hidden * s.vocab, nbytes + s.vocab * s.hidden * s.dtype_bytes

    def attention_ms(self, rows: int, kv_tokens: int) -> float:
        if rows == 0:
            return 0.0
        return self.fit.decode_attention.ms(
            rows, kv_tokens, self.shape.kv_width, self.device.hbm_bandwidth, self.shape.dtype_bytes
        )

    def executor_attention_ms(self, rows: int, kv_tokens: int) -> float:
        return self.attention_ms(rows, kv_tokens) / self.executor_speed

    def step(self, work: StepWork) -> StepTime:
        s = self.shape
        linear_ms, linear_flops, moved = self._linear(work.tokens)
        prefill_ms = sum(
            self.fit.prefill_attention.ms(c, ctx, s.q_width, self.device.peak_flops)
            for c, ctx in work.prefill
        )
        chunk_attention = sum(4.0 * c * (ctx + c / 2) * s.q_width for c, ctx in work.prefill)
        flops = linear_flops + chunk_attention
        # Linear-layer FLOPs are proportional to rows, so the prompt chunks' share is exact.
        chunk_tokens = sum(c for c, _ in work.prefill)
        prefill_flops = chunk_attention + linear_flops * chunk_tokens / max(1, work.tokens)
        local_ms = self.attention_ms(work.local_rows, work.local_kv) + prefill_ms
        kv_bytes = 2 * s.kv_width * s.dtype_bytes  # per token per layer
        moved += (work.local_kv + sum(c + ctx for c, ctx in work.prefill)) * kv_bytes
        flops += 4.0 * work.local_kv * s.q_width
        remote_ms, executor_ms, executor_bytes = 0.0, {}, {}
        for executor, (rows, kv, _) in work.remote.items():
            attend = self.executor_attention_ms(rows, kv)
            link = self.fit.link.ms(s.exchange_bytes(rows) / 2)  # there, and back
            remote_ms = max(remote_ms, attend + 2 * link + self.colocation.sync_ms)
            executor_ms[executor] = attend
            executor_bytes[executor] = kv * kv_bytes * self.num_layers
        wait = max(0.0, remote_ms - local_ms)
        head_ms, head_flops, head_bytes = self._head(work.tokens, work.sampled)
        rows = work.local_rows + sum(r for r, *_ in work.remote.values()) + len(work.prefill)
        total = (
            self.num_layers * (linear_ms + local_ms + wait)
            + head_ms
            + self.overhead_ms
            + self.overhead_per_row_ms * rows
        )
        return StepTime(
            ms=total, layer_wait_ms=wait, executor_ms=executor_ms,
            flops=self.num_layers * flops + head_flops,
            prefill_flops=self.num_layers * prefill_flops,
            bytes=self.num_layers * moved + head_bytes, executor_bytes=executor_bytes,
        )  # fmt: skip

    def decode_steps(self, work: StepWork, steps: int) -> list[float]:
        """The ms of `step` for `steps` decode steps from `work` on, each reading one more KV
        token per row than the last: the same floats, term by term, at once."""
        assert not work.prefill and not work.remote, "local decode rows only"
        rows, kv, s = work.local_rows, work.local_kv, self.shape
        kv_tokens = range(kv, kv + rows * steps, rows)
        attention = self.fit.decode_attention.ms_each(
            rows, kv_tokens, s.kv_width, self.device.hbm_bandwidth, s.dtype_bytes
        )
        layers, linear = self.num_layers, self._linear(work.tokens)[0]
        head, tail = self._head(work.tokens, work.sampled)[0], self.overhead_per_row_ms * rows
        # step()'s terms in its order; its + 0.0 (no wait on executors) changes no bit
        return [layers * (linear + a) + head + self.overhead_ms + tail for a in attention]

    def decode_totals(self, work: StepWork, start: int, stop: int) -> tuple[float, float]:
        """FLOPs and bytes of steps [start, stop) of such a run, summed: both are linear in
        the KV tokens read, so the sum of each step's (to rounding) in closed form."""
        s, rows, n = self.shape, work.local_rows, stop - start
        kv = n * work.local_kv + rows * (start + stop - 1) * n // 2  # their KV tokens, summed
        _, flops, moved = self._linear(work.tokens)
        _, head_flops, head_bytes = self._head(work.tokens, work.sampled)
        layers = self.num_layers
        kv_bytes = 2 * s.kv_width * s.dtype_bytes
        return (
            n * (layers * flops + head_flops) + layers * 4.0 * s.q_width * kv,
            n * (layers * moved + head_bytes) + layers * kv_bytes * kv,
        )

    def kv_copy_ms(self, nbytes: int) -> float:
        """A prefilled request's KV from the prefill GPU to the decode GPU (NVLink)."""
        return self.fit.link.ms(nbytes)


class ProfileStepCost:
    """Step times from `adrenaline profile`'s fitted model of this machine (milliseconds):
    decode step a + b * rows + c * local KV tokens; prefill p0 + p1 * tokens; executor attention
    per layer e0 + e1 * KV tokens + e2 * rows; with offloaded rows, the decode worker's exchange
    per layer and executor, or with no local row the offloaded step's own line (CostModel).

    With `padded_attention` (a CPU profile: the torch backend), decode attention reads every
    row's keys padded to the longest row's (attention/torch_backend.py), so the KV tokens it
    costs are rows x the longest. The profile times rows of one length, where the two agree."""

    def __init__(
        self,
        model: CostModel,
        shape: ModelShape,
        sync_ms: float = 0.15,
        copy_bandwidth: float = 2e9,
        prefill_slowdown: float = 1.0,
        padded_attention: bool = False,
    ) -> None:
        self.model, self.shape = model, shape
        self.padded_attention = padded_attention
        self.num_layers = model.num_layers
        self.sync_ms = sync_ms  # per layer: the shared-memory channel's round trip
        self.copy_bandwidth = copy_bandwidth  # bytes/s of a KV copy between processes
        self.colocation = Colocation(prefill_slowdown=prefill_slowdown, sync_ms=sync_ms)

    def executor_attention_ms(self, rows: int, kv_tokens: int) -> float:
        return self.model.attention_layer_ms(kv_tokens, rows)

    def step(self, work: StepWork) -> StepTime:
        m, layers = self.model, self.num_layers
        rows = work.local_rows + sum(r for r, *_ in work.remote.values())
        total = 0.0
        if work.prefill:
            total += m.prefill_chunks_ms(work.prefill)
        wait, executor_ms = 0.0, {}
        if rows:
            a, b, c = m.decode
            padded = self.padded_attention
            local_kv = work.local_rows * work.local_longest if padded else work.local_kv
            local_attention = c * local_kv / layers
            remote = 0.0
            for executor, (n, kv, longest) in work.remote.items():
                executor_ms[executor] = self.executor_attention_ms(n, n * longest if padded else kv)
                remote = max(remote, executor_ms[executor] + self.sync_ms)
            wait = max(0.0, remote - local_attention)
            exchange = [m.exchange_layer_ms(n) for n, *_ in work.remote.values()]
            if work.local_rows:
                total += m.decode_step_ms(rows, local_kv) + layers * (wait + sum(exchange))
            else:  # no local attention at all; the profile timed one executor's exchange
                total += m.offloaded_step_ms(rows) + layers * (wait + sum(exchange[1:]))
        return StepTime(ms=total, layer_wait_ms=wait, executor_ms=executor_ms)

    def decode_steps(self, work: StepWork, steps: int) -> list[float]:
        """As GpuStepCost.decode_steps, one `step` at a time."""
        rows = work.local_rows
        return [
            self.step(replace(work, local_kv=work.local_kv + i * rows)).ms for i in range(steps)
        ]

    def decode_totals(self, work: StepWork, start: int, stop: int) -> tuple[float, float]:
        """A profile times steps; it counts no FLOPs or bytes (StepTime's zeros)."""
        return 0.0, 0.0

    def kv_copy_ms(self, nbytes: int) -> float:
        return 0.05 + nbytes / self.copy_bandwidth * 1e3
