"""Load-aware offloading (paper: "Load-aware offloading scheduling"): a request's decode
attention goes to the executor beside its prefill worker only while, in the cost model, the
executor's attention still hides behind the decode worker's own per-layer work, its pool keeps a
reserve, and TPOT stays within the SLO; requests the decode worker has no KV room for get the
executor's whole window, others only a share of it.

Pure and deterministic: the router hands in a `ClusterView`; the only state is the online
correction of the model, one per worker, advanced once per heartbeat.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scheduler.cost_model import Correction, CostModel
from scheduler.offload_policy import (
    ClusterView,
    DecodeLoad,
    ExecutorLoad,
    OffloadCandidate,
    OffloadPolicy,
    PolicyError,
)


@dataclass(frozen=True)
class Assessment:
    """One decision and the predictions behind it (milliseconds)."""

    offload: bool
    reason: str
    tpot_ms: float = 0.0  # decode step with the batch grown by this request, offloaded
    window_ms: float = 0.0  # that step's per-layer local work: what executor attention hides in
    attention_ms: float = 0.0  # executor attention per layer with this request added
    budget_ms: float = 0.0  # the part of the window this request may use
    kv_short: bool = False


class LoadAwarePolicy(OffloadPolicy):
    name = "load-aware"
    needs_view = True

    def __init__(
        self,
        cost_model: CostModel,
        slo_tpot_ms: float | None = None,
        pool_reserve: float = 0.1,  # share of the offload pool kept free for requests to grow
        prefill_reserve_blocks: int = 0,  # offload-pool blocks left to the prefill worker
        kv_margin_blocks: int = 2,  # decode KV counts as short below a request's need plus this
        ample_kv_window_share: float = 0.8,  # of the window, for requests that fit locally
    ) -> None:
        if slo_tpot_ms is not None and slo_tpot_ms <= 0:
            raise PolicyError(f"the TPOT SLO must be positive, got {slo_tpot_ms} ms")
        if not 0.0 <= pool_reserve < 1.0 or not 0.0 < ample_kv_window_share <= 1.0:
            raise PolicyError("pool_reserve must be in [0, 1), ample_kv_window_share in (0, 1]")
        self.model = cost_model
        self.slo_tpot_ms = slo_tpot_ms
        self.pool_reserve = pool_reserve
        self.prefill_reserve_blocks = prefill_reserve_blocks
        self.kv_margin_blocks = kv_margin_blocks
        self.ample_kv_window_share = ample_kv_window_share
        self.corrections: dict[str, Correction] = {}
        self._observed_at: dict[str, float] = {}

    def decide(self, candidate: OffloadCandidate) -> bool:
        return self.assess(candidate).offload

    def assess(self, candidate: OffloadCandidate) -> Assessment:
        view = candidate.view
        if view is None or not candidate.executor_alive or not view.executor.alive:
            return Assessment(False, "no live executor")
        if view.decode is None:
            return Assessment(False, "no live decode worker")
        self.observe(view)
        return self._assess(candidate, view.decode, view.executor)

    def _assess(self, c: OffloadCandidate, decode: DecodeLoad, ex: ExecutorLoad) -> Assessment:
        step = self.correction(decode.instance).step
        tpot = self.model.decode_step_ms(decode.batch + 1, decode.context_tokens) * step
        window = tpot / self.model.num_layers
        attention = (
            self.model.attention_layer_ms(
                ex.offloaded_tokens + c.prompt_tokens + 1, ex.offloaded + 1
            )
            * self.correction(ex.instance).attention
        )
        kv_short = decode.free_blocks < c.blocks_needed + self.kv_margin_blocks
        # A request that fits locally leaves part of the executor's window to those that do not:
        # offloading is what lets the decode batch grow past the decode worker's KV capacity.
        budget = window * (1.0 if kv_short else self.ample_kv_window_share)
        predicted = dict(
            tpot_ms=tpot, window_ms=window, attention_ms=attention, budget_ms=budget,
            kv_short=kv_short,
        )  # fmt: skip
        reserve = math.ceil(self.pool_reserve * ex.num_blocks) + self.prefill_reserve_blocks
        if ex.free_blocks - reserve < c.blocks_needed:
            return Assessment(False, "offload pool at its reserve", **predicted)
        if self.slo_tpot_ms is not None and tpot > self.slo_tpot_ms:
            return Assessment(False, "TPOT SLO", **predicted)
        if attention > budget:
            return Assessment(False, "executor beyond the overlap window", **predicted)
        return Assessment(True, "fits", **predicted)

    # Online correction ----------------------------------------------------------------------

    def correction(self, instance: str) -> Correction:
        return self.corrections.get(instance, Correction())

    def observe(self, view: ClusterView) -> None:
        """Folds each new heartbeat's measured times into its worker's correction, once."""
        d, ex = view.decode, view.executor
        if d is not None and self._is_new(d.instance, d.heartbeat_at) and d.last_batch_size:
            predicted = self.model.decode_step_ms(d.last_batch_size, d.last_context_tokens)
            # The window is the local work alone: time spent waiting on executors is not in it.
            # Both are moving averages over different samples, so the wait is capped at the step:
            # a local time of zero is then no sample at all, never a negative one.
            waited = min(self.model.num_layers * d.offload_wait_ms, d.step_time_ms)
            self.corrections[d.instance] = self.correction(d.instance).observe_step(
                predicted, d.step_time_ms - waited
            )
        if self._is_new(ex.instance, ex.heartbeat_at) and ex.last_offloaded:
            predicted = self.model.attention_layer_ms(ex.last_offloaded_tokens, ex.last_offloaded)
            self.corrections[ex.instance] = self.correction(ex.instance).observe_attention(
                predicted, ex.attention_time_ms
            )

    def _is_new(self, instance: str, heartbeat_at: float) -> bool:
        if self._observed_at.get(instance) == heartbeat_at:
            return False
        self._observed_at[instance] = heartbeat_at
        return True
