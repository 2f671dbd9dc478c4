"""The executor's SM share: which mechanism enforces it, with the environment faked, and the
share's validation. Nothing here touches a GPU."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attention import colocation
from attention.colocation import SmShareError, limit_sm_share

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_mps(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv(colocation.MPS_PIPE_ENV, raising=False)
    monkeypatch.delenv(colocation.MPS_SHARE_ENV, raising=False)
    monkeypatch.setattr(colocation, "MPS_DEFAULT_PIPE_DIR", tmp_path / "absent")
    for state in ("_applied", "_green_context", "_green_stream"):
        monkeypatch.setattr(colocation, state, None)


def daemon_dir(path: Path, pid: int) -> Path:
    """A pipe directory as a live (or dead) MPS control daemon leaves it."""
    path.mkdir(exist_ok=True)
    (path / colocation.MPS_PID_FILE).write_text(f"{pid}\n")
    return path


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("share", [0.0, -0.5, 1.01, float("nan")])
def test_share_outside_the_unit_interval_is_rejected(share) -> None:
    with pytest.raises(SmShareError, match="in \\(0, 1\\]"):
        limit_sm_share(share)


def test_full_share_needs_no_mechanism(no_mps) -> None:
    assert limit_sm_share(1.0) == "none"


def test_mps_daemon_by_pipe_directory_env(no_mps, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(colocation.MPS_PIPE_ENV, str(daemon_dir(tmp_path, os.getpid())))
    assert limit_sm_share(0.3) == "mps"
    assert colocation.os.environ[colocation.MPS_SHARE_ENV] == "30"
    assert colocation.applied_share() == 0.3


def test_mps_daemon_by_default_pipe_directory(no_mps, monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(colocation, "MPS_DEFAULT_PIPE_DIR", daemon_dir(tmp_path, os.getpid()))
    assert limit_sm_share(0.456) == "mps"
    assert colocation.os.environ[colocation.MPS_SHARE_ENV] == "46"


def test_a_pipe_directory_without_a_live_daemon_is_no_mps(no_mps, monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(colocation, "green_contexts_supported", lambda: False)
    monkeypatch.setenv(colocation.MPS_PIPE_ENV, str(tmp_path))  # no pid file at all
    assert not colocation.mps_running()
    monkeypatch.setenv(colocation.MPS_PIPE_ENV, str(daemon_dir(tmp_path, dead_pid())))
    assert not colocation.mps_running()
    assert limit_sm_share(0.3) == "none"
    assert colocation.MPS_SHARE_ENV not in os.environ
    assert colocation.applied_share() == 1.0


def test_mps_share_reaches_the_environment_before_cuda_starts(no_mps, monkeypatch,
                                                              tmp_path) -> None:  # fmt: skip
    """`adrenaline attention` starts itself again with the share set when its environment
    lacks it: flag checks may have initialised CUDA, and MPS reads it only then."""
    from server.roles import entry_points as roles

    monkeypatch.setenv(colocation.MPS_PIPE_ENV, str(daemon_dir(tmp_path, os.getpid())))
    assert colocation.mps_environment(1.0) == {}
    assert colocation.mps_environment(0.25) == {colocation.MPS_SHARE_ENV: "25"}
    execs = []

    def fake_execve(path, argv, env):
        execs.append((path, argv, env))
        raise SystemExit(0)

    monkeypatch.setattr(os, "execve", fake_execve)
    with pytest.raises(SystemExit):
        roles.run_attention(argparse.Namespace(sm_share=0.25), None)
    ((path, argv, env),) = execs
    assert path == sys.executable and argv == sys.orig_argv
    assert env[colocation.MPS_SHARE_ENV] == "25"
    # Started again with it, nothing is missing: no second restart.
    monkeypatch.setenv(colocation.MPS_SHARE_ENV, "25")
    assert colocation.mps_environment(0.25) == {}


def test_green_context_when_no_mps(no_mps, monkeypatch) -> None:
    made = {}

    class FakeGreenContext:
        @staticmethod
        def create(num_sms, device_id):
            made.update(num_sms=num_sms, device_id=device_id)
            return FakeGreenContext()

        def set_context(self) -> None:
            made["current"] = True

        def Stream(self):  # noqa: N802 (torch's name)
            return "green-stream"

    class Props:
        multi_processor_count = 132

    monkeypatch.setattr(colocation, "green_contexts_supported", lambda: True)
    monkeypatch.setattr(torch.cuda.green_contexts, "GreenContext", FakeGreenContext)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: Props())
    monkeypatch.setattr(torch.cuda, "set_stream", lambda stream: made.update(stream=stream))
    assert limit_sm_share(0.25, "cuda:0") == "green_context"
    # 33 SMs, in whole granules; every later kernel of this thread on the context's stream.
    assert made == {"num_sms": 40, "device_id": 0, "current": True, "stream": "green-stream"}
    assert colocation.applied_share() == pytest.approx(40 / 132)
    assert colocation.executor_sm_count() == 40


def test_no_mechanism_is_logged(no_mps, monkeypatch, caplog) -> None:
    monkeypatch.setattr(colocation, "green_contexts_supported", lambda: False)
    with caplog.at_level(logging.WARNING):
        assert limit_sm_share(0.5) == "none"
    assert "cannot be enforced" in caplog.text


def test_green_context_sm_count_rounds_up_to_granules() -> None:
    assert colocation.green_context_sms(0.01, 132) == 8
    assert colocation.green_context_sms(1.0, 132) == 132


def test_profile_script_explains_itself_on_cpu() -> None:
    script = ROOT / "scripts" / "profile_attention_bandwidth.py"
    helped = subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                            text=True, cwd=ROOT)  # fmt: skip
    assert helped.returncode == 0 and "--shares" in helped.stdout
    if torch.cuda.is_available():
        return
    ran = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT)
    assert ran.returncode == 2 and "needs a CUDA GPU" in ran.stderr
