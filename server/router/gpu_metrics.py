"""Per-GPU utilization and memory for the router's `GET /metrics`, read through NVML
(`pynvml`, from nvidia-ml-py) at scrape time. Where NVML is missing or cannot start (a CPU-only
host, no driver), the collector yields no series at all rather than an error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from types import ModuleType

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)


def load_nvml() -> ModuleType | None:
    """`pynvml`, initialized; None where it is not installed or finds no driver."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except (pynvml.NVMLError, OSError) as exc:
        log.info("no GPU metrics: NVML unavailable (%s)", exc)
        return None
    return pynvml


class GPUCollector(Collector):
    """Reads every GPU NVML sees on this host; NVML starts at the first scrape, once."""

    def __init__(self, load: Callable[[], ModuleType | None] = load_nvml) -> None:
        self._load = load
        self._loaded = False
        self._nvml: ModuleType | None = None

    @property
    def nvml(self) -> ModuleType | None:
        if not self._loaded:
            self._nvml, self._loaded = self._load(), True
        return self._nvml

    def collect(self) -> Iterator[Metric]:
        nvml = self.nvml
        if nvml is None:
            return
        try:
            count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError as exc:
            log.warning("NVML cannot count GPUs: %s", exc)
            return
        # The NVML percentages are 0-100; like vLLM's kv_cache_usage_perc, ours are fractions.
        utilization = GaugeMetricFamily(
            "adrenaline:gpu_utilization_perc",
            "Fraction of the last sample period in which a kernel ran on the GPU (0-1).",
            labels=["gpu"],
        )
        memory_used = GaugeMetricFamily(
            "adrenaline:gpu_memory_used_bytes", "GPU memory in use, in bytes.", labels=["gpu"]
        )
        bandwidth = GaugeMetricFamily(
            "adrenaline:gpu_memory_bandwidth_utilization_perc",
            "Fraction of the last sample period in which GPU memory was read or written (0-1).",
            labels=["gpu"],
        )
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                rates = nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            except nvml.NVMLError as exc:
                log.debug("NVML cannot read GPU %d: %s", index, exc)
                continue
            gpu = [str(index)]
            utilization.add_metric(gpu, rates.gpu / 100)
            memory_used.add_metric(gpu, float(memory.used))
            bandwidth.add_metric(gpu, rates.memory / 100)
        yield from (utilization, memory_used, bandwidth)
