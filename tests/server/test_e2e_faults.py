"""Faults over real processes: a worker killed, drained or stalled under load. Every request
must complete whole, its greedy tokens equal to an undisturbed run (the offline engine), and
every surviving pool must be full again afterwards. Each test kills what it needs, so each
starts its own deployment."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from engine.llm import LLM
from engine.sequence import SamplingParams
from server.roles.worker import STALL_ENV
from tests.server.deployment import Deployment

PROMPTS = [f"request {i}: the quick brown fox jumps over the lazy dog" for i in range(8)]
MAX_TOKENS = 160
TWO_BY_TWO = ("--num-prefill", "2", "--num-decode", "2", "--num-kv-blocks", "512",
              "--heartbeat-timeout", "2")  # fmt: skip


@pytest.fixture(scope="module")
def expected() -> list[list[int]]:
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    return [o.token_ids for o in LLM("tiny", num_blocks=512).generate(PROMPTS, params)]


# Greedy: every request's tokens must equal an undisturbed run's.
BODIES = [{"prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
          for p in PROMPTS]  # fmt: skip


def all_decoding(progress: dict[str, int]) -> bool:
    """Every request is streaming and none is near its end: each decode worker has some."""
    return len(progress) == len(PROMPTS) and min(progress.values()) >= 10


def assert_whole_and_equal(results: list[dict], expected: list[list[int]]) -> None:
    errors = [r["error"] for r in results if "error" in r]
    assert not errors, errors
    for result, want in zip(results, expected):
        assert result["finish"] == "length"
        assert result["tokens"] == want


def worker_pid(deployment: Deployment, instance: str) -> int:
    return deployment.stats()["workers"][instance]["pid"]


def wait_gone(pid: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(f"pid {pid} still runs after {timeout} s")


def test_sigkill_of_a_decode_worker_migrates_its_requests(expected):
    # Half the requests offloaded: a decode worker's death must also free executor KV.
    deployment = Deployment(*TWO_BY_TWO, "--offload-policy", "ratio:0.5")
    try:
        victim = worker_pid(deployment, "decode-0")
        results = deployment.run_under_fault(
            BODIES,
            lambda: os.kill(victim, signal.SIGKILL),
            all_decoding,
        )
        assert_whole_and_equal(results, expected)
        stats = deployment.wait_idle()
        assert not stats["workers"]["decode-0"]["alive"]
        assert stats["requests"]["migrated"] >= 1
        assert stats["requests"]["failed"] == 0
    finally:
        deployment.stop()


def test_sigkill_of_a_prefill_worker_mid_prompt_moves_its_prompts(expected, monkeypatch):
    # prefill-0's first step stalls long enough to be killed inside it.
    monkeypatch.setenv(STALL_ENV, "prefill-0:1:60")
    deployment = Deployment(*TWO_BY_TWO, "--offload-policy", "none", "--no-attention-executor")
    try:
        victim = worker_pid(deployment, "prefill-0")

        def stalled_with_work(_progress) -> bool:
            return deployment.stats()["workers"]["prefill-0"]["step_running_s"] > 0.5

        results = deployment.run_under_fault(BODIES, lambda: os.kill(victim, signal.SIGKILL),
                                  stalled_with_work)  # fmt: skip
        assert_whole_and_equal(results, expected)
        stats = deployment.wait_idle()
        assert stats["requests"]["migrated"] >= 1
    finally:
        deployment.stop()


def test_sigterm_drains_a_decode_worker_under_load(expected):
    deployment = Deployment(*TWO_BY_TWO, "--offload-policy", "none", "--no-attention-executor")
    try:
        victim = worker_pid(deployment, "decode-0")
        results = deployment.run_under_fault(
            BODIES,
            lambda: os.kill(victim, signal.SIGTERM),
            all_decoding,
        )
        assert_whole_and_equal(results, expected)
        wait_gone(victim)
        stats = deployment.wait_idle()
        # It finished its own requests: nothing had to move.
        assert stats["requests"]["migrated"] == 0
        assert stats["requests"]["failed"] == 0
        assert stats["workers"]["decode-0"]["draining"]
    finally:
        deployment.stop()


def test_a_worker_stalled_inside_a_step_is_not_declared_dead(expected, monkeypatch):
    monkeypatch.setenv(STALL_ENV, "decode-0:5:10")
    deployment = Deployment(
        "--num-kv-blocks", "512", "--heartbeat-timeout", "2", "--offload-policy", "none",
        "--no-attention-executor",
    )  # fmt: skip
    try:
        started = time.monotonic()
        results = deployment.run_under_fault(BODIES, lambda: None, lambda _progress: True)
        assert time.monotonic() - started >= 10  # the stall happened
        assert_whole_and_equal(results, expected)
        stats = deployment.wait_idle()
        decode = stats["workers"]["decode-0"]
        assert decode["alive"] and not decode["stuck"]
        assert stats["requests"]["migrated"] == 0
        assert httpx.get(f"{deployment.url}/health", timeout=5).status_code == 200
    finally:
        deployment.stop()


def role_pid(deployment: Deployment, role: str) -> int:
    """The pid of the deployment's `adrenaline <role>` process, a child of serve."""
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as stat, open(f"/proc/{entry}/cmdline", "rb") as cmd:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
                argv = cmd.read().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        if parent == deployment.proc.pid and role.encode() in argv[1:3]:
            return int(entry)
    raise AssertionError(f"no {role} process under serve (pid {deployment.proc.pid})")


def test_a_router_paused_past_the_heartbeat_timeout_loses_nothing(expected):
    # SIGSTOP: the router's loop and its ZeroMQ threads stop together, as in a paused VM; the
    # workers' heartbeats pile up unread past the timeout (2 s).
    deployment = Deployment(*TWO_BY_TWO, "--offload-policy", "ratio:0.5")
    try:
        router = role_pid(deployment, "router")

        def pause() -> None:
            os.kill(router, signal.SIGSTOP)
            time.sleep(4)
            os.kill(router, signal.SIGCONT)

        results = deployment.run_under_fault(BODIES, pause, all_decoding)
        assert_whole_and_equal(results, expected)
        stats = deployment.wait_idle()
        assert all(w["alive"] for w in stats["workers"].values())
        assert stats["requests"]["migrated"] == 0 and stats["requests"]["failed"] == 0
    finally:
        deployment.stop()
