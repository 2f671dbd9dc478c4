"""Runs the GPU check's parts, each in its own process group under a time box, and writes
gpu_report.json and gpu_report.md: a part that raises, crashes or hangs is recorded as such and
the rest still run. scripts/gpu_check.sh sets up the packages and calls this.

    python scripts/gpu_check/run.py --out DIR [--parts device,gpu_tests]
    python scripts/gpu_check/run.py --preflight --out DIR   # exit 2, with a report, without a GPU
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts.gpu_check.report import NotAvailable, PartResult, write_report  # noqa: E402


@dataclass(frozen=True)
class Part:
    name: str
    target: str  # "module:function", called as function(context, part_dir) -> dict
    box_s: float


# In order of importance: a check short of time drops the last ones. The boxes add up to 430 s.
PARTS = [
    Part("device", "scripts.gpu_check.kernels:device", 20),
    Part("gpu_tests", "scripts.gpu_check.gpu_tests:gpu_tests", 110),
    Part("triton_decode_bandwidth", "scripts.gpu_check.kernels:triton_decode_bandwidth", 35),
    Part("decode_step", "scripts.gpu_check.engine_steps:decode_step", 80),
    Part("offload_roundtrip", "scripts.gpu_check.offload:roundtrip", 35),
    Part("offload_decode_step", "scripts.gpu_check.offload:offloaded_decode_step", 90),
    Part("colocation", "scripts.gpu_check.offload:colocation", 60),
]
BUDGET_S = 440.0  # with the set-up in gpu_check.sh, the whole check stays under 8 minutes
MIN_START_S = 5.0
LOG_TAIL_CHARS = 4000


def run_parts(parts: list[Part], out_dir: Path, budget_s: float) -> list[PartResult]:
    """Each part sees the data of the parts that passed before it (the copy ceiling, say)."""
    deadline = time.monotonic() + budget_s
    context: dict = {"root": str(ROOT)}
    results = []
    for part in parts:
        left = deadline - time.monotonic()
        if left < MIN_START_S:
            results.append(PartResult(part.name, "timed_out", summary="not started: the "
                                      f"check's {budget_s:.0f} s budget was spent"))  # fmt: skip
            continue
        result = run_part(part, out_dir / part.name, min(part.box_s, left), context)
        results.append(result)
        if result.status == "passed":
            context[part.name] = result.data
    return results


def run_part(part: Part, part_dir: Path, box_s: float, context: dict) -> PartResult:
    part_dir.mkdir(parents=True, exist_ok=True)
    (part_dir / "context.json").write_text(json.dumps(context))
    result_path = part_dir / "result.json"
    result_path.unlink(missing_ok=True)
    log_path = part_dir / "log.txt"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", part.target,
           "--part-dir", str(part_dir)]  # fmt: skip
    start = time.monotonic()
    with log_path.open("w") as log:
        # Its own session: a timeout or a leftover child (a deployment) dies with the group.
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        try:
            rc = proc.wait(timeout=box_s)
        except subprocess.TimeoutExpired:
            rc = None
        _kill_group(proc)
    seconds = round(time.monotonic() - start, 1)
    tail = log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
    if rc is None:
        return PartResult(part.name, "timed_out", seconds,
                          summary=f"killed at its {box_s:.0f} s time box", error=tail)  # fmt: skip
    if rc != 0 or not result_path.is_file():
        return PartResult(part.name, "failed", seconds,
                          summary=f"its process exited with status {rc}", error=tail)  # fmt: skip
    fields = json.loads(result_path.read_text())
    return PartResult(**{**fields, "name": part.name, "seconds": seconds})


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_child(target: str, part_dir: Path) -> int:
    """In the part's own process: calls the part and writes result.json, whatever it raised."""
    module, function = target.split(":")
    context = json.loads((part_dir / "context.json").read_text())
    try:
        fields = getattr(importlib.import_module(module), function)(context, part_dir)
    except NotAvailable as exc:
        fields = {"status": "not_available", "summary": str(exc)}
    except Exception as exc:  # the part failed; the report says how
        traceback.print_exc()
        fields = {"status": "failed", "summary": f"{type(exc).__name__}: {exc}"[:400],
                  "error": traceback.format_exc()}  # fmt: skip
    fields.setdefault("status", "passed")
    result = PartResult(name=target, **fields)
    (part_dir / "result.json").write_text(json.dumps(asdict(result), default=str))
    return 0


def machine_info() -> dict:
    """What the host says without touching CUDA: versions, and the GPU as nvidia-smi names it."""
    from importlib.metadata import PackageNotFoundError, version

    info: dict = {"python": sys.version.split()[0]}
    for package in ("torch", "triton"):
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            info[package] = "missing"
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        name, driver = smi.stdout.splitlines()[0].split(", ")
        info.update(gpu=name, driver=driver)
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        pass
    return info


def preflight() -> str | None:
    """None when torch sees a CUDA GPU, else why not, in words a person can act on."""
    try:
        import torch
    except ImportError as exc:
        return f"torch does not import ({exc}); run with a python3 that has CUDA torch (PYTHON=)"
    if not torch.cuda.is_available():
        build = torch.version.cuda or "none (a CPU-only build)"
        return (f"no CUDA GPU is visible to torch {torch.__version__} (its CUDA build: {build}); "
                "run this on a machine with an NVIDIA GPU and its driver")  # fmt: skip
    return None


def selected(names: str | None) -> list[Part]:
    if not names:
        return PARTS
    wanted = names.split(",")
    unknown = sorted(set(wanted) - {part.name for part in PARTS})
    if unknown:
        raise SystemExit(f"--parts: unknown {unknown}; choose from {[p.name for p in PARTS]}")
    return [part for part in PARTS if part.name in wanted]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "results" / "gpu_check")
    p.add_argument("--parts", default=None, help="comma-separated part names (default: all)")
    p.add_argument("--budget-s", type=float, default=BUDGET_S)
    p.add_argument("--preflight", action="store_true", help="only check that a GPU is visible")
    p.add_argument("--part", default=None, help=argparse.SUPPRESS)
    p.add_argument("--part-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.part:
        return run_child(args.part, args.part_dir)
    if args.preflight:
        problem = preflight()
        if problem is None:
            return 0
        failed = PartResult("device", "failed", summary=problem)
        json_path, _ = write_report([failed], machine_info(), args.out)
        print(f"gpu_check: {problem}. Nothing was measured; wrote {json_path}", file=sys.stderr)
        return 2
    results = run_parts(selected(args.parts), args.out, args.budget_s)
    machine = machine_info()
    device = next((r for r in results if r.name == "device" and r.status == "passed"), None)
    if device is not None:
        machine["gpu"] = device.data.get("name", machine.get("gpu"))
    json_path, md_path = write_report(results, machine, args.out)
    for r in results:
        print(f"{r.name:<26} {r.status:<14} {r.seconds:>6.1f} s  {r.summary}")
    print(f"wrote {json_path} and {md_path}")
    return 0 if all(r.status in ("passed", "not_available") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
