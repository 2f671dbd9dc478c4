#!/usr/bin/env bash
# Validates a GPU machine in one command, in under 8 minutes: every gpu-marked test, the Triton
# decode kernel's bandwidth against the measured copy ceiling, decode step time and MBU (eager
# and CUDA graphs), the offload link's round trip, decode steps with 0/50/100% offloaded, and
# executor bandwidth and prefill slowdown against SM share. Writes gpu_report.json and
# gpu_report.md into the folder given, else $OUT, else results/gpu_check.
#
#   bash scripts/gpu_check.sh [OUT_DIR]
#
# Needs a python3 with CUDA torch and triton (PYTHON= to pick another). Packages it lacks come
# from .gpu-wheelhouse/ (`make gpu-wheelhouse` on a machine with PyPI; carry it along),
# installed offline into a virtual environment layered over that python's own packages, so
# nothing is installed into it. Exit status: 0 all parts passed (or are not available yet),
# 1 some part failed, 2 no GPU (a report that says so is still written).
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT_DIR=${1:-${OUT:-$ROOT/results/gpu_check}}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd) || exit 2
PYTHON=${PYTHON:-python3}
WHEELHOUSE=${GPU_WHEELHOUSE:-$ROOT/.gpu-wheelhouse}
VENV=${GPU_CHECK_VENV:-${TMPDIR:-/tmp}/adrenaline-gpu-venv}

cd "$ROOT" || exit 2
# First a GPU: without one there is nothing to set up or measure.
"$PYTHON" scripts/gpu_check/run.py --preflight --out "$OUT_DIR" || exit 2

RUN_PYTHON=$VENV/bin/python
if ! bash scripts/gpu_check/setup_venv.sh "$PYTHON" "$VENV" "$WHEELHOUSE" >"$OUT_DIR/setup.log" 2>&1
then
    echo "gpu_check: package set-up failed (see $OUT_DIR/setup.log); parts that need the" \
        "missing packages will fail:" >&2
    tail -n 15 "$OUT_DIR/setup.log" >&2
    [ -x "$RUN_PYTHON" ] || RUN_PYTHON=$PYTHON
fi

"$RUN_PYTHON" scripts/gpu_check/run.py --out "$OUT_DIR"
