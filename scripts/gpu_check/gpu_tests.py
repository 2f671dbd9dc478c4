"""GPU check part: every `gpu`-marked test, with each failure and skip (and its reason) listed.
A test module that cannot be collected here (a package the device lacks) is listed too, and the
others still run.
"""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from scripts.gpu_check.report import Table

PYTEST_TIMEOUT_S = 100  # inside the part's time box, so the junit file is still written


def gpu_tests(context: dict, part_dir: Path) -> dict:
    junit = part_dir / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider",
           "--continue-on-collection-errors", f"--junitxml={junit}", "tests"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=context["root"], capture_output=True, text=True,
                          timeout=PYTEST_TIMEOUT_S)  # fmt: skip
    (part_dir / "pytest.txt").write_text(proc.stdout + proc.stderr)
    if not junit.is_file():
        raise RuntimeError(f"pytest wrote no junit report (exit {proc.returncode}): "
                           f"{(proc.stdout + proc.stderr)[-2000:]}")  # fmt: skip
    counts, rows = parse_junit(junit)
    summary = ", ".join(f"{n} {kind}" for kind, n in counts.items() if n) or "no tests ran"
    passed = counts["passed"] > 0 and counts["failed"] == counts["errors"] == 0
    return {
        "status": "passed" if passed else "failed",
        "summary": summary,
        "error": "" if passed else proc.stdout[-3000:],
        "tables": [Table("tests that did not pass", ["test", "outcome", "message"], rows)],
        "data": counts,
    }


def parse_junit(path: Path) -> tuple[dict[str, int], list[list[str]]]:
    """Counts of passed, failed, errors, skipped; a row for each test that did not pass."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    rows = []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")),
                       None)  # fmt: skip
        if outcome is None:
            counts["passed"] += 1
            continue
        kind = {"failure": "failed", "error": "errors", "skipped": "skipped"}[outcome.tag]
        counts[kind] += 1
        message = (outcome.get("message") or outcome.text or "").strip().splitlines()
        rows.append([name, kind, message[0][:200] if message else ""])
    return counts, rows
