"""Resource-efficient prefill colocation (paper, technique 2): the attention executor takes a
limited share of its GPU's SMs, since bandwidth-bound decode attention reaches near-peak memory
bandwidth on few SMs, and the colocated prefill worker keeps the rest.

Applied once at the executor's start-up: through CUDA MPS when its control daemon runs, else a
torch green context, else not at all (logged). An MPS client reads its share from the
environment when CUDA first initialises in the process, which may be before this runs (a flag
check that asks torch for devices does it): `mps_environment` says what the process must be
started again with (server.roles.entry_points does so). The share in force is `applied_share()`, which the
executor reports in its stats.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

MPS_PIPE_ENV = "CUDA_MPS_PIPE_DIRECTORY"
MPS_DEFAULT_PIPE_DIR = Path("/tmp/nvidia-mps")
MPS_PID_FILE = "nvidia-cuda-mps-control.pid"  # the control daemon writes it in the pipe dir
MPS_SHARE_ENV = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"
# Green contexts partition SMs in groups (8 on Hopper); round up to whole groups.
GREEN_CONTEXT_SM_GRANULE = 8


@dataclass(frozen=True)
class SmLimit:
    mechanism: str  # "mps" | "green_context"
    share: float
    num_sms: int | None  # the SMs the executor's kernels get, where known


# Set once at start-up. The green context and its stream must outlive it: the executor's
# kernels run on that stream.
_applied: SmLimit | None = None
_green_context = None
_green_stream = None


class SmShareError(ValueError):
    """An SM share outside (0, 1]."""


def check_share(share: float) -> float:
    share = float(share)
    if not 0.0 < share <= 1.0:  # NaN fails too
        raise SmShareError(f"SM share must be in (0, 1], got {share}")
    return share


def mps_running() -> bool:
    """Whether an MPS control daemon is alive for this process's pipe directory (a directory
    left behind by a daemon that exited enforces nothing)."""
    pipe_dir = Path(os.environ.get(MPS_PIPE_ENV) or MPS_DEFAULT_PIPE_DIR)
    try:
        pid = int((pipe_dir / MPS_PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True  # alive, another user's (a system-wide daemon)
    except OSError:
        return False
    return True


def mps_percentage(share: float) -> str:
    return str(max(1, round(share * 100)))


def mps_environment(share: float) -> dict[str, str]:
    """What the environment lacks for MPS to apply `share` when CUDA starts: empty when there
    is no live daemon, the share is whole, or it is set already."""
    share = check_share(share)
    if share == 1.0 or not mps_running():
        return {}
    wanted = mps_percentage(share)
    return {} if os.environ.get(MPS_SHARE_ENV) == wanted else {MPS_SHARE_ENV: wanted}


def applied_share() -> float:
    """The share of its GPU's SMs this process is limited to (1.0: none)."""
    return 1.0 if _applied is None else _applied.share


def executor_sm_count() -> int | None:
    """SMs the executor's kernels get, for a split planner sizing its grid (None: the GPU's)."""
    return None if _applied is None else _applied.num_sms


def green_contexts_supported() -> bool:
    green = getattr(torch.cuda, "green_contexts", None)
    return bool(getattr(green, "SUPPORTED", False)) and torch.cuda.is_available()


def green_context_sms(share: float, total_sms: int) -> int:
    wanted = max(1, round(share * total_sms))
    granules = -(-wanted // GREEN_CONTEXT_SM_GRANULE)
    return min(total_sms, granules * GREEN_CONTEXT_SM_GRANULE)


def limit_sm_share(share: float, device: torch.device | str | None = None) -> str:
    """Limits this process to `share` of the device's SMs; returns the mechanism used:
    "mps", "green_context", or "none" (share 1.0, or nothing can enforce it). Call before
    CUDA initialises for MPS (see mps_environment)."""
    global _applied
    share = check_share(share)
    if share == 1.0:
        return "none"
    if mps_running():
        # Read by the MPS client when this process initialises CUDA.
        os.environ[MPS_SHARE_ENV] = mps_percentage(share)
        _applied = SmLimit("mps", share, _total_sms(device, share))
        log.info("SM share %.2f through CUDA MPS (%s=%s)", share, MPS_SHARE_ENV,
                 os.environ[MPS_SHARE_ENV])  # fmt: skip
        return "mps"
    if green_contexts_supported():
        return _green_context_limit(share, device)
    log.warning("SM share %.2f cannot be enforced: no live MPS control daemon and no green "
                "contexts; the executor uses the whole GPU", share)  # fmt: skip
    return "none"


def _device_index(device: torch.device | str | None) -> int:
    index = torch.device(device or "cuda").index
    return torch.cuda.current_device() if index is None else index


def _total_sms(device: torch.device | str | None, share: float) -> int | None:
    # Under MPS the active thread percentage bounds the SMs a client's kernels occupy.
    if not torch.cuda.is_available():
        return None
    total = torch.cuda.get_device_properties(_device_index(device)).multi_processor_count
    return max(1, round(share * total))


def _green_context_limit(share: float, device: torch.device | str | None) -> str:
    global _applied, _green_context, _green_stream
    index = _device_index(device)
    total = torch.cuda.get_device_properties(index).multi_processor_count
    num_sms = green_context_sms(share, total)
    try:
        ctx = torch.cuda.green_contexts.GreenContext.create(num_sms=num_sms, device_id=index)
        ctx.set_context()
        # All of the executor's work on the context's own stream: a stream made elsewhere (and
        # the legacy default stream's implicit syncs) would run outside the partition.
        stream = ctx.Stream()
        torch.cuda.set_stream(stream)
    except RuntimeError as exc:
        log.warning("SM share %.2f cannot be enforced: green context failed: %s", share, exc)
        return "none"
    _green_context, _green_stream = ctx, stream
    _applied = SmLimit("green_context", num_sms / total, num_sms)
    log.info("SM share %.2f through a green context of %d/%d SMs", share, num_sms, total)
    return "green_context"
