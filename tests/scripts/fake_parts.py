"""Made-up GPU check parts for tests/scripts/test_gpu_check.py: each child process of the runner
imports this by name, so it imports nothing heavy."""

from __future__ import annotations

import os
import time
from pathlib import Path

from scripts.gpu_check.report import NotAvailable


def fake_ceiling(context: dict, part_dir: Path) -> dict:
    return {"summary": "measured", "data": {"copy_gb_per_s": 4300.0}}


def fake_reads_context(context: dict, part_dir: Path) -> dict:
    return {"summary": f"ceiling {context['ceiling']['copy_gb_per_s']:.0f}"}


def fake_raises(context: dict, part_dir: Path) -> dict:
    raise ValueError("kernel wrote NaN")


def fake_crashes(context: dict, part_dir: Path) -> dict:
    os._exit(3)  # as a CUDA fault would take the process down


def fake_hangs(context: dict, part_dir: Path) -> dict:
    time.sleep(60)
    return {}


def fake_not_available(context: dict, part_dir: Path) -> dict:
    raise NotAvailable("the engine captures no CUDA graphs yet")
