#!/usr/bin/env bash
# Makes a virtual environment at VENV layered over PYTHON's own packages (torch, triton, ... stay
# visible behind it, nothing is installed into PYTHON), then installs offline from WHEELHOUSE
# what adrenaline needs beyond a CUDA image, and adrenaline itself (editable, with its
# `adrenaline` console script, which deployments start through).
#
#   bash scripts/gpu_check/setup_venv.sh PYTHON VENV WHEELHOUSE
set -euo pipefail

PYTHON=$1 VENV=$2 WHEELHOUSE=$3
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PACKAGES=(pyzmq msgspec fastapi uvicorn gguf pydantic openai "setuptools>=68")

if [ ! -x "$VENV/bin/python" ]; then
    # No pip of its own: the base's pip, seen through the .pth below, installs into the venv.
    "$PYTHON" -m venv --without-pip "$VENV"
    site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
    "$PYTHON" -c 'import site; print("\n".join(site.getsitepackages()))' >"$site/_gpu_check_base.pth"
fi
echo "venv $VENV over $("$PYTHON" -c 'import sys; print(sys.executable)')"
if [ -d "$WHEELHOUSE" ]; then
    "$VENV/bin/python" -m pip install -q --no-index --find-links "$WHEELHOUSE" "${PACKAGES[@]}"
else
    echo "no wheelhouse at $WHEELHOUSE (make gpu-wheelhouse): using the packages already there"
fi
"$VENV/bin/python" -m pip install -q --no-index --no-deps --no-build-isolation -e "$ROOT"
"$VENV/bin/python" -c 'import msgspec, zmq, fastapi, uvicorn, gguf, torch, server.cli'
