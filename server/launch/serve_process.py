"""A whole `adrenaline serve` deployment started as a child process on loopback, for the
benchmark's policy comparison and the end-to-end tests: a free HTTP port (serve picks its
internal addresses itself), wait for /health, and a stop that leaves nothing behind (serve
drains and stops its roles; killed, it takes them with it)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from server.launch.serve import own_group_dying_with


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    def __init__(
        self, flags: list[str], startup_timeout: float = 120.0, adrenaline: Path | None = None
    ) -> None:
        """`adrenaline`: the console script to run (default: this interpreter's)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        adrenaline = adrenaline or Path(sys.executable).parent / "adrenaline"
        argv = [str(adrenaline), "serve", "--port", str(self.port), *flags]
        # SIGTERM when this process dies (a test run or benchmark killed mid-way): serve then
        # drains and stops its roles instead of serving on, orphaned, for ever. Linux sends it
        # when the starting *thread* ends, so only the main thread, which lives as long as the
        # process, may ask for it; a deployment started from another thread gets its own
        # session alone (stop() still ends it).
        if threading.current_thread() is threading.main_thread():
            setup = own_group_dying_with(os.getpid(), signal.SIGTERM)
            self.proc = subprocess.Popen(argv, preexec_fn=setup)
        else:
            self.proc = subprocess.Popen(argv, start_new_session=True)
        self._wait_healthy(startup_timeout)

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited with {self.proc.returncode} during start-up")
            # urllib, not httpx: a plain install (no bench extra) starts deployments too.
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:  # URLError, HTTPError (503 until every role joins), timeouts
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"serve did not become healthy within {timeout:.0f}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # serve drains, then stops its roles in order
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its roles die with it (PR_SET_PDEATHSIG)
        except ProcessLookupError:
            pass
        self.proc.wait()
