"""`adrenaline serve` start-up and stop: deployments side by side on one host told apart by
`--port` alone, every bad flag refused in one line (exit 2) before any child starts, a child
that dies during start-up leaving no process and no shared memory behind, and SIGTERM
draining the requests in flight before serve exits 0."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

import server.cli
import server.launch.serve
import server.roles.entry_points
from engine.model_source import resolve_model
from server.launch.serve_process import free_port
from tests.server.deployment import Deployment

ADRENALINE = str(Path(sys.executable).parent / "adrenaline")
SMALL = ("--num-kv-blocks", "128", "--offload-blocks", "64", "--torch-threads", "1")
SHM_DIR = Path("/dev/shm")
# Checked the same way for the standalone `adrenaline router`.
ROUTER_FLAGS = {
    "--port", "--model", "--num-prefill", "--num-decode", "--offload-policy", "--profile",
    "--max-pending", "--heartbeat-timeout", "--chat-template",
}  # fmt: skip


@pytest.fixture(scope="module")
def side_by_side():
    """Two deployments on one host, started at once, told apart by nothing but --port."""
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(Deployment, *SMALL) for _ in range(2)]
    started = [f.result() for f in futures if f.exception() is None]
    try:
        assert len(started) == 2, [str(f.exception()) for f in futures]
        yield started
    finally:
        for deployment in started:
            deployment.stop()


def greedy(url: str, max_tokens: int = 16) -> list[int]:
    body = {"prompt": "Two servers", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    resp = httpx.post(f"{url}/generate", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()["token_ids"]


def test_two_deployments_side_by_side_answer_alike(side_by_side):
    first, second = side_by_side
    assert all(httpx.get(f"{d.url}/health").status_code == 200 for d in side_by_side)
    assert greedy(first.url) == greedy(second.url)
    assert all(d.wait_idle()["requests"]["active"] == 0 for d in side_by_side)


def test_sigterm_drains_the_stream_in_flight_then_exits_0(side_by_side):
    """Serve POSTs the router's /admin/drain: new requests get 503, the stream finishes whole."""
    draining, other = side_by_side
    body = {"prompt": "Two servers", "max_tokens": 128, "temperature": 0, "ignore_eos": True}
    with httpx.stream(
        "POST", f"{draining.url}/generate", json={**body, "stream": True}, timeout=60
    ) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        chunks = [json.loads(next(lines))]
        draining.proc.send_signal(signal.SIGTERM)
        assert refused_while_draining(draining.url, body) == 503
        chunks += [json.loads(line) for line in lines if line]
    assert [t for c in chunks for t in c["token_ids"]] == greedy(other.url, 128)
    assert chunks[-1]["finish_reason"] == "length"
    assert draining.proc.wait(timeout=60) == 0
    assert len(greedy(other.url)) == 16  # the other deployment still serves


def refused_while_draining(url: str, body: dict, timeout_s: float = 5.0) -> int:
    """The status a new request gets once serve has had its router drain (200 until then)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = httpx.post(f"{url}/generate", json={**body, "max_tokens": 1}, timeout=10)
        if status.status_code != 200 or time.monotonic() > deadline:
            return status.status_code
        time.sleep(0.05)


# Bad flags ---------------------------------------------------------------------------------


def bad_flag_cases(tmp_path: Path, taken: int) -> list[tuple[str, list[str]]]:
    malformed = tmp_path / "profile.json"
    malformed.write_text(json.dumps({"version": 1, "decode": [1]}))
    broken_template = tmp_path / "broken.jinja"
    broken_template.write_text("{% for m in messages %}{{ m.content }}")
    return [
        ("--port", ["--port", "99999"]),
        ("--port", ["--port", str(taken)]),
        ("--control", ["--control", "udp://somewhere"]),
        ("--control", ["--control", f"tcp://127.0.0.1:{taken}"]),
        ("--control", ["--control", f"ipc://{tmp_path}/no/such/dir/control"]),
        ("--model", ["--model", "/nonexistent"]),
        ("--model", ["--model", str(tmp_path)]),  # a directory without config.json
        ("--num-prefill", ["--num-prefill", "0"]),
        ("--num-decode", ["--num-decode", "0"]),
        ("--offload-policy", ["--offload-policy", "bogus"]),
        ("--offload-policy", ["--offload-policy", "ratio:2"]),
        ("--profile", ["--profile", str(tmp_path / "missing.json")]),
        ("--profile", ["--profile", str(malformed)]),
        ("--max-pending", ["--max-pending", "0"]),
        ("--heartbeat-timeout", ["--heartbeat-timeout", "0"]),
        ("--drain-timeout", ["--drain-timeout", "-1"]),
        ("--max-model-len", ["--max-model-len", "0"]),
        ("--kv-transfer", ["--kv-transfer", "nccl"]),
        ("--port", ["--port", "not-a-number"]),
        ("--chat-template", ["--chat-template", "no-such-template"]),
        ("--chat-template", ["--chat-template", str(broken_template)]),
    ]


@pytest.fixture
def taken_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_every_bad_serve_flag_exits_2_in_one_line_before_any_child(
    tmp_path, taken_port, monkeypatch, capsys
):
    def no_children(*_args):
        raise AssertionError("flags passed the checks: serve would start its children")

    # Where they are defined: server.cli imports them only once a command is dispatched.
    monkeypatch.setattr(server.launch.serve, "run_serve", no_children)
    monkeypatch.setattr(server.roles.entry_points, "run_router", no_children)
    port = ["--port", str(free_port())]
    for flag, argv in bad_flag_cases(tmp_path, taken_port):
        for command in ("serve", "router") if flag in ROUTER_FLAGS else ("serve",):
            with pytest.raises(SystemExit) as exc:
                server.cli.main([command, "--model", "tiny", *port, *argv])
            lines = capsys.readouterr().err.strip().splitlines()
            assert exc.value.code == 2, (command, argv)
            assert len(lines) == 1 and flag in lines[0], (argv, lines)
            assert lines[0].startswith(f"adrenaline {command}: error: "), lines


def shm_segments() -> set[str]:
    names = os.listdir(SHM_DIR) if SHM_DIR.is_dir() else []
    return {n for n in names if n.startswith("adrenaline-")}


def leaked(before: set[str]) -> set[str]:
    """New segments whose creator is gone: a live creator's (another test's) are not ours."""
    out = set()
    for name in shm_segments() - before:
        pid = name.split("-")[2]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            out.add(name)
    return out


def run_serve(*flags: str, timeout: float = 90) -> tuple[int, str, list[str]]:
    """Exit status, stderr, and whatever is left in serve's session once it exited."""
    proc = subprocess.Popen(
        [ADRENALINE, "serve", "--log-level", "WARNING", *flags],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, err, left_in_session(proc.pid)


def left_in_session(sid: int, settle_s: float = 3.0) -> list[str]:
    """Processes still in serve's session; a killed one may take a moment to be reaped."""
    deadline = time.monotonic() + settle_s
    while True:
        ps = subprocess.run(["pgrep", "-a", "-s", str(sid)], capture_output=True, text=True)
        if not ps.stdout or time.monotonic() > deadline:
            return ps.stdout.splitlines()
        time.sleep(0.1)


def test_bad_model_and_taken_port_leave_nothing_behind(taken_port):
    before = shm_segments()
    cases = {
        "--model": ["--model", "/nonexistent", "--port", str(free_port())],
        "--port": ["--model", "tiny", "--port", str(taken_port)],
    }
    with ThreadPoolExecutor(len(cases)) as pool:
        results = dict(zip(cases, pool.map(lambda argv: run_serve(*argv), cases.values())))
    for flag, (code, err, left) in results.items():
        assert code == 2 and "Traceback" not in err, (flag, err)
        assert [line for line in err.splitlines() if line.strip()] == [err.strip()], err
        assert err.startswith(f"adrenaline serve: error: {flag}: "), err
        assert left == [], left
    assert leaked(before) == set()


def test_a_child_dying_during_start_up_stops_the_rest(tmp_path):
    """Weights that do not load: the workers die, the router must be stopped."""
    model = tmp_path / "broken"
    shutil.copytree(resolve_model("tiny"), model)
    (model / "model.safetensors").write_bytes(b"not a safetensors file")
    before = shm_segments()
    flags = ("--no-attention-executor", "--offload-policy", "none", *SMALL)
    code, err, left = run_serve("--model", str(model), "--port", str(free_port()), *flags)
    last = err.strip().splitlines()[-1]
    assert code == 1, err
    assert last.startswith("adrenaline serve: error: ") and "during start-up" in last, err
    assert any(name in last for name in ("prefill-0", "decode-0")), last
    assert left == [], left
    assert leaked(before) == set()


def test_only_the_stopped_childrens_segments_are_removed():
    from transport.shm_transfer import SEGMENT_PREFIX, remove_segments_of

    gone = subprocess.Popen(["true"])
    gone.wait()
    names = [f"{SEGMENT_PREFIX}{pid}-test{os.getpid()}" for pid in (gone.pid, os.getpid())]
    for name in names:
        (SHM_DIR / name).write_bytes(b"")
    try:
        removed = remove_segments_of({gone.pid, os.getpid()}, (SEGMENT_PREFIX,))
        assert removed == [names[0]]  # a live pid's segment is another process's, kept
        assert not (SHM_DIR / names[0]).exists() and (SHM_DIR / names[1]).exists()
    finally:
        for name in names:
            (SHM_DIR / name).unlink(missing_ok=True)
