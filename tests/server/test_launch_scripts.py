"""The per-role launch scripts, as an operator runs them on separate nodes: a router, a prefill
worker with its attention executor, and a decode worker, started one by one. Half the requests
are offloaded; the others' KV moves over gloo (the across-hosts CPU path)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from engine.llm import LLM
from engine.sequence import SamplingParams
from server.launch.serve_process import free_port

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
WORKER_FLAGS = ["--num-kv-blocks", "128", "--torch-threads", "1"]


@pytest.fixture(scope="module")
def roles():
    port, control = free_port(), f"tcp://127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "ADRENALINE": str(Path(sys.executable).parent / "adrenaline"),
        "MODEL": "tiny", "PORT": str(port), "CONTROL": control, "ROUTER": control,
        "DEVICE": "cpu", "KV_TRANSFER": "gloo", "KV_HOST": "127.0.0.1",
        "COLOCATED_WITH": "prefill-a",
    }  # fmt: skip
    procs = [
        subprocess.Popen(
            ["bash", str(SCRIPTS / script), "--log-level", "WARNING", *extra],
            env=env,
            start_new_session=True,
        )  # fmt: skip
        for script, extra in [
            ("launch_router.sh", ["--offload-policy", "ratio:0.5", "--num-attention", "1"]),
            (
                "launch_prefill.sh",
                ["--instance", "prefill-a", "--offload-blocks", "128", *WORKER_FLAGS],
            ),  # fmt: skip
            ("launch_attention.sh", ["--instance", "attention-a"]),
            ("launch_decode.sh", WORKER_FLAGS),
        ]
    ]
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert all(p.poll() is None for p in procs), "a role exited during start-up"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "roles did not become healthy"
            time.sleep(0.2)
        yield url
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def test_roles_started_by_scripts_serve_offline_equal_tokens(roles):
    prompts = ["Hello there", "The quick brown fox jumps over the lazy dog, again and again."]
    offline = LLM("tiny", num_blocks=128)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    expected = [o.token_ids for o in offline.generate(prompts, params)]
    for prompt, want in zip(prompts, expected):
        resp = httpx.post(
            f"{roles}/generate", timeout=60,
            json={"prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True},
        )  # fmt: skip
        assert resp.status_code == 200, resp.text
        assert resp.json()["token_ids"] == want
    stats = httpx.get(f"{roles}/stats", timeout=5).json()
    roles_seen = sorted(w["role"] for w in stats["workers"].values())
    assert roles_seen == ["attention", "decode", "prefill"]
    assert stats["requests"]["offloaded"] == 1  # the other went to the decode worker by gloo
