"""Starts a real `adrenaline serve` deployment on loopback for end-to-end tests, and always
stops it: the serve process and its children share one process group, killed at teardown."""

from __future__ import annotations

import os
import time

import httpx

from server.launch.serve_process import ServeProcess


class Deployment(ServeProcess):
    def __init__(self, *flags: str, model: str = "tiny", startup_timeout: float = 120.0) -> None:
        level = os.environ.get("ADRENALINE_TEST_LOG_LEVEL", "WARNING")
        super().__init__(["--model", model, "--log-level", level, *flags], startup_timeout)

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
