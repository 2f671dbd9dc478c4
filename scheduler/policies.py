"""The offload policies by the names `--offload-policy` takes. The one module that imports every
policy: each policy imports only the base (scheduler/offload_policy.py), never this registry.
"""

from __future__ import annotations

from scheduler.cost_model import CostModel, builtin_profile
from scheduler.load_aware import LoadAwarePolicy
from scheduler.offload_policy import NeverOffload, OffloadPolicy, PolicyError, RatioOffload


def parse_policy(
    text: str, cost_model: CostModel | None = None, slo_tpot_ms: float | None = None
) -> OffloadPolicy:
    """`cost_model` and `slo_tpot_ms` configure `load-aware` (default: the built-in profile)."""
    if text == "load-aware":
        return LoadAwarePolicy(cost_model or builtin_profile(), slo_tpot_ms=slo_tpot_ms)
    if text == "none":
        return NeverOffload()
    if text == "always":
        return RatioOffload(1.0)
    if text.startswith("ratio:"):
        try:
            return RatioOffload(float(text.removeprefix("ratio:")))
        except ValueError as exc:
            raise PolicyError(f"bad offload policy {text!r}: {exc}") from exc
    raise PolicyError(f"unknown offload policy {text!r}; use load-aware, none, always or ratio:R")
