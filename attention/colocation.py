"""Resource-efficient prefill colocation (paper, technique 2): the attention executor takes a
limited share of its GPU's SMs, since bandwidth-bound decode attention reaches near-peak memory
bandwidth on few SMs, and the colocated prefill worker keeps the rest.

Applied once at the executor's start-up, before CUDA initialises: through CUDA MPS when its
control daemon runs, else a torch green context, else not at all (logged).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

MPS_PIPE_ENV = "CUDA_MPS_PIPE_DIRECTORY"
MPS_DEFAULT_PIPE_DIR = Path("/tmp/nvidia-mps")
MPS_SHARE_ENV = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"
# Green contexts partition SMs in groups (8 on Hopper); round up to whole groups.
GREEN_CONTEXT_SM_GRANULE = 8

# The green context must outlive start-up: the executor's kernels run on its stream.
_green_context = None


class SmShareError(ValueError):
    """An SM share outside (0, 1]."""


def check_share(share: float) -> float:
    share = float(share)
    if not 0.0 < share <= 1.0:  # NaN fails too
        raise SmShareError(f"SM share must be in (0, 1], got {share}")
    return share


def mps_running() -> bool:
    pipe = os.environ.get(MPS_PIPE_ENV)
    return bool(pipe) or MPS_DEFAULT_PIPE_DIR.exists()


def green_contexts_supported() -> bool:
    green = getattr(torch.cuda, "green_contexts", None)
    return bool(getattr(green, "SUPPORTED", False)) and torch.cuda.is_available()


def green_context_sms(share: float, total_sms: int) -> int:
    wanted = max(1, round(share * total_sms))
    granules = -(-wanted // GREEN_CONTEXT_SM_GRANULE)
    return min(total_sms, granules * GREEN_CONTEXT_SM_GRANULE)


def limit_sm_share(share: float, device: torch.device | str | None = None) -> str:
    """Limits this process to `share` of the device's SMs; returns the mechanism used:
    "mps", "green_context", or "none" (share 1.0, or nothing can enforce it)."""
    share = check_share(share)
    if share == 1.0:
        return "none"
    if mps_running():
        # Read by the MPS client when this process creates its CUDA context.
        os.environ[MPS_SHARE_ENV] = str(round(share * 100))
        log.info("SM share %.2f through CUDA MPS (%s=%s)", share, MPS_SHARE_ENV,
                 os.environ[MPS_SHARE_ENV])  # fmt: skip
        return "mps"
    if green_contexts_supported():
        index = torch.device(device or "cuda").index
        index = torch.cuda.current_device() if index is None else index
        total = torch.cuda.get_device_properties(index).multi_processor_count
        num_sms = green_context_sms(share, total)
        try:
            ctx = torch.cuda.green_contexts.GreenContext.create(num_sms=num_sms, device_id=index)
            ctx.set_context()
        except RuntimeError as exc:
            log.warning("SM share %.2f cannot be enforced: green context failed: %s", share, exc)
            return "none"
        global _green_context
        _green_context = ctx
        log.info("SM share %.2f through a green context of %d/%d SMs", share, num_sms, total)
        return "green_context"
    log.warning("SM share %.2f cannot be enforced: no MPS daemon and no green contexts; the "
                "executor uses the whole GPU", share)  # fmt: skip
    return "none"
