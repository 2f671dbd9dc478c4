"""Starts a real `adrenaline serve` deployment on loopback for end-to-end tests, and always
stops it: the serve process and its children share one process group, killed at teardown."""

from __future__ import annotations

import asyncio
import json
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

    def run_under_fault(self, bodies: list[dict], fault, when) -> list[dict]:
        """Streams every /generate body at once and calls `fault()` as soon as
        `when(progress)` holds (progress: tokens so far by body index, once streaming), or
        after 60 s; returns each request's `stream_generate` result."""

        async def main() -> list[dict]:
            progress: dict[int, int] = {}
            async with httpx.AsyncClient(timeout=120) as client:
                tasks = [asyncio.create_task(stream_generate(client, self.url, body, progress, i))
                         for i, body in enumerate(bodies)]  # fmt: skip
                deadline = time.monotonic() + 60
                while not when(progress) and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                fault()
                return await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)

        return asyncio.run(main())

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


async def stream_generate(
    client: httpx.AsyncClient, url: str, body: dict, progress: dict, key
) -> dict:
    """One streamed /generate request; returns its joined tokens and text, or its error."""
    tokens, text = [], ""
    async with client.stream("POST", f"{url}/generate", json={**body, "stream": True}) as resp:
        if resp.status_code != 200:
            return {"error": f"status {resp.status_code}: {await resp.aread()}"}
        async for line in resp.aiter_lines():
            chunk = json.loads(line)
            if "error" in chunk:
                return {"error": chunk["error"]["message"]}
            tokens += chunk["token_ids"]
            text += chunk["text"]
            progress[key] = len(tokens)
            if chunk.get("finish_reason"):
                return {"tokens": tokens, "text": text, "finish": chunk["finish_reason"]}
    return {"error": "stream cut"}
