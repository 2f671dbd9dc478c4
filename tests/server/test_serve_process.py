"""A deployment started by a test or a benchmark does not outlive it: killed mid-run, its owner
takes `serve` (and so every role) with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

OWNER = """
import sys
from server.launch.serve_process import ServeProcess
server = ServeProcess(["--model", "tiny", "--log-level", "WARNING"], startup_timeout=300)
print("PID", server.proc.pid, flush=True)
sys.stdin.read()  # until killed
"""


def test_serve_stops_when_its_owner_is_killed() -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        # serve writes to the same stdout: skip its lines to the owner's.
        serve_pid = next(int(line.split()[1]) for line in owner.stdout if line.startswith("PID "))
        os.kill(owner.pid, signal.SIGKILL)  # no teardown runs
        owner.wait()
        deadline = time.monotonic() + 60  # serve drains (nothing in flight), then stops
        while time.monotonic() < deadline and _alive(serve_pid):
            time.sleep(0.2)
        assert not _alive(serve_pid), "serve outlived the process that started it"
    finally:
        owner.kill()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for good: only its (dead) parent could reap it.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ")[1][0] != "Z"
