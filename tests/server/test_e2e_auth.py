"""The control plane admits only processes `adrenaline serve` started: serve makes a key for the
deployment and hands it to every role through the environment (never a command line). While
real requests run, outsiders without the key, or with another one, connect to the router's
control port, register a fake decode worker with 10^9 free blocks and forge outputs and errors
for the real requests' ids: the real outputs still equal an undisturbed greedy run, and /stats
never lists the fake worker."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest
import zmq

from engine.llm import LLM
from server.launch.serve_process import free_port
from tests.server.deployment import Deployment
from tests.server.test_e2e_offload import concurrent_generate, expected
from transport.messages import Register, RequestError, TokenOutput, WorkerStats, encode
from transport.security import KEY_ENV, ClusterKey, generate_cluster_key, secure_client

PROMPTS = [f"tell me about number {i} " * (1 + i % 3) for i in range(10)]
MAX_TOKENS = [8 + (i * 5) % 11 for i in range(10)]
FAKE = "decode-evil"


@pytest.fixture(scope="module")
def deployment():
    control = f"tcp://127.0.0.1:{free_port()}"
    d = Deployment("--control", control, "--offload-policy", "ratio:0.5",
                   "--num-kv-blocks", "128", "--offload-blocks", "128")  # fmt: skip
    d.control = control
    yield d
    d.stop()


def forge(sock: zmq.Socket) -> None:
    huge = WorkerStats(num_running=0, num_waiting=0, num_free_blocks=10**9, num_blocks=10**9,
                       queued_tokens=0, num_preemptions=0, requests_total=0)  # fmt: skip
    sock.send(encode(Register(role="decode", instance=FAKE, pid=os.getpid(), model="tiny",
                              max_model_len=2048, kv_endpoint={"kind": "shm"}, stats=huge)))  # fmt: skip
    for i in range(10):
        sock.send(encode(TokenOutput(f"gen-{i}", [0, 0, 0], "PWNED", True, "stop")))
        sock.send(encode(RequestError(f"gen-{i}", "forged failure", 500)))


def attack(address: str, stop: threading.Event) -> None:
    ctx = zmq.Context()
    outsiders = []
    for identity, key in [(FAKE, None), ("decode-0", None),
                          (FAKE, ClusterKey.parse(generate_cluster_key(), "another key"))]:  # fmt: skip
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, identity.encode())
        sock.setsockopt(zmq.SNDHWM, 100)
        secure_client(sock, key)
        sock.connect(address)
        outsiders.append(sock)
    try:
        while not stop.wait(0.05):
            for sock in outsiders:
                try:
                    forge(sock)
                except zmq.Again:
                    pass
    finally:
        for sock in outsiders:
            sock.close(0)
        ctx.term()


def test_outsiders_cannot_join_or_forge_while_requests_run(deployment):
    offline = LLM("tiny", num_blocks=256)
    want = expected(offline, PROMPTS, MAX_TOKENS)
    stop = threading.Event()
    attacker = threading.Thread(target=attack, args=(deployment.control, stop), daemon=True)
    attacker.start()
    try:
        got = asyncio.run(concurrent_generate(deployment.url, PROMPTS, MAX_TOKENS))
        assert FAKE not in deployment.stats()["workers"]
    finally:
        stop.set()
        attacker.join(timeout=10)
    assert got == want
    stats = deployment.wait_idle()
    assert FAKE not in stats["workers"]
    assert stats["requests"]["offloaded"] > 0  # the executor's links were authenticated too


def descendants(pid: int) -> list[int]:
    parents = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            continue
        parents[int(proc.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        children = [c for c, p in parents.items() if p in frontier]
        found += children
        frontier = children
    return found


def test_the_deployment_key_reaches_every_role_but_never_a_command_line(deployment):
    roles = descendants(deployment.proc.pid)
    workers = {w["pid"] for w in deployment.stats()["workers"].values()}
    assert len(workers) == 3 and workers < set(roles)  # prefill, its executor, decode; router
    keys = []
    for pid in roles:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        keys += [e.split(b"=", 1)[1] for e in environ if e.startswith(f"{KEY_ENV}=".encode())]
        assert len(keys) == roles.index(pid) + 1, f"pid {pid} has no {KEY_ENV}"
    assert len(set(keys)) == 1
    ClusterKey.parse(keys[0].decode(), "the deployment's key")
    for pid in [deployment.proc.pid, *roles]:
        assert keys[0] not in Path(f"/proc/{pid}/cmdline").read_bytes()
