"""The GPU check's report: one result per part, written as gpu_report.json (everything) and
gpu_report.md (the tables a person reads, ready to paste into benchmarks/README.md).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

# passed: ran and met its checks; failed: raised, crashed or missed a check; timed_out: killed at
# its time box; not_available: what it measures does not exist here yet (it says why).
STATUSES = ("passed", "failed", "timed_out", "not_available")
ERROR_TAIL_CHARS = 4000


class NotAvailable(Exception):
    """Raised by a part whose subject does not exist here yet; the message says what is missing."""


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list]
    note: str = ""


@dataclass
class PartResult:
    name: str
    status: str
    seconds: float = 0.0
    summary: str = ""
    error: str = ""  # the end of the traceback or of stderr, for failed and timed_out parts
    tables: list[Table] = field(default_factory=list)
    data: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"part {self.name!r}: unknown status {self.status!r}")
        self.error = self.error[-ERROR_TAIL_CHARS:]
        self.tables = [t if isinstance(t, Table) else Table(**t) for t in self.tables]


def overall_ok(parts: list[PartResult]) -> bool:
    """Every part passed or is honestly not available yet, and at least one passed."""
    return any(p.status == "passed" for p in parts) and all(
        p.status in ("passed", "not_available") for p in parts
    )


def write_report(parts: list[PartResult], machine: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "ok": overall_ok(parts),
        "machine": machine,
        "seconds": round(sum(p.seconds for p in parts), 1),
        "parts": [asdict(p) for p in parts],
    }
    json_path, md_path = out_dir / "gpu_report.json", out_dir / "gpu_report.md"
    json_path.write_text(json.dumps(_finite(report), indent=2, default=str) + "\n")
    md_path.write_text(render_markdown(parts, machine))
    return json_path, md_path


def render_markdown(parts: list[PartResult], machine: dict) -> str:
    verdict = "all parts passed" if overall_ok(parts) else "NOT all parts passed"
    lines = [
        f"# GPU check: {machine.get('gpu', 'no GPU')}",
        "",
        ", ".join(f"{k} {v}" for k, v in machine.items() if k != "gpu"),
        "",
        f"{verdict}; {sum(p.seconds for p in parts):.0f} s in all.",
        "",
    ]
    lines += _table(["part", "status", "seconds", "summary"],
                    [[p.name, p.status, f"{p.seconds:.1f}", p.summary] for p in parts])  # fmt: skip
    for part in parts:
        lines += ["", f"## {part.name}: {part.status}", ""]
        if part.summary:
            lines += [part.summary, ""]
        if part.error:
            lines += ["```", part.error.strip()[-1500:], "```", ""]
        for table in part.tables:
            lines += [f"**{table.title}**", ""]
            lines += _table(table.columns, table.rows)
            if table.note:
                lines += ["", table.note]
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _finite(value):
    """NaN and infinities as null: the JSON stays strict."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _table(columns: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(_cell(c) for c in columns) + " |"]
    out.append("|" + "|".join("---" for _ in columns) + "|")
    out += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return out


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value).replace("|", "\\|").replace("\n", " ")
