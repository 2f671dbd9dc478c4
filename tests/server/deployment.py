"""Starts a real `adrenaline serve` deployment on loopback for end-to-end tests, and always
stops it: the serve process and its children share one process group, killed at teardown."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Deployment:
    def __init__(self, *flags: str, model: str = "tiny", startup_timeout: float = 120.0) -> None:
        self.port = free_port()
        self.control = f"tcp://127.0.0.1:{free_port()}"
        self.url = f"http://127.0.0.1:{self.port}"
        adrenaline = Path(sys.executable).parent / "adrenaline"
        argv = [
            str(adrenaline), "serve", "--model", model, "--port", str(self.port),
            "--control", self.control,
            "--log-level", os.environ.get("ADRENALINE_TEST_LOG_LEVEL", "WARNING"), *flags,
        ]  # fmt: skip
        self.proc = subprocess.Popen(argv, start_new_session=True)
        self._wait_healthy(startup_timeout)

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited with {self.proc.returncode} during start-up")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("deployment did not become healthy")

    def stats(self) -> dict:
        return httpx.get(f"{self.url}/stats", timeout=5).json()

    def wait_idle(self, timeout: float = 15.0) -> dict:
        """Waits until no request is active and every worker's KV blocks are all free again."""
        start = time.monotonic()
        deadline = start + timeout
        stats = self.stats()
        while time.monotonic() < deadline:
            stats = self.stats()
            waited = time.monotonic() - start
            workers = [w for w in stats["workers"].values() if w["alive"]]
            # Only heartbeats sent after this call began count: older ones predate the load.
            fresh = all(w["seconds_since_heartbeat"] < waited for w in workers)
            if (
                fresh
                and stats["requests"]["active"] == 0
                and all(
                    w["num_free_blocks"] == w["num_blocks"] and w["num_running"] == 0
                    for w in workers
                )
            ):
                return stats
            time.sleep(0.2)
        raise AssertionError(f"deployment not idle after {timeout}s: {stats}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything left in the group
        except ProcessLookupError:
            pass
        self.proc.wait()
