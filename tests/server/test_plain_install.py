"""A plain install serves: the wheel built from this tree, installed into a fresh virtual
environment with only its declared dependencies (and the CPU build of torch), runs
`adrenaline serve --model tiny` and answers a request with the offline engine's tokens. No test
extra is there, so an import of one at start-up (httpx, matplotlib) fails this test.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

from engine.llm import LLM
from engine.sequence import SamplingParams
from server.launch.serve_process import ServeProcess

ROOT = Path(__file__).resolve().parents[2]
CPU_TORCH = "torch==2.13.0"  # as the Makefile installs it: a bare `torch` is the CUDA build
PROMPT = "Hello world, how are you?"
MAX_TOKENS = 8


def source_copy(dest: Path) -> Path:
    """The tree's files (tracked, and new ones git does not ignore), so that building the wheel
    writes no build/ or egg-info into the checkout."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout.splitlines()  # fmt: skip
    for name in listed:
        if (ROOT / name).is_file() and not name.startswith("tests/"):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def run(*argv: str | Path) -> None:
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{argv}: exit {done.returncode}\n{done.stderr[-3000:]}"


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as resp:
        assert resp.status == 200
        return json.load(resp)


def test_wheel_in_a_fresh_venv_serves_tiny(tmp_path: Path, adrenaline_cache: Path) -> None:
    try:
        check_plain_install(tmp_path)
    finally:  # a venv with torch is over 1 GB: not left in pytest's kept temporary dirs
        for made in ("src", "wheels", "venv"):
            shutil.rmtree(tmp_path / made, ignore_errors=True)


def check_plain_install(tmp_path: Path) -> None:
    src = source_copy(tmp_path / "src")
    wheels = tmp_path / "wheels"
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
        "-w", wheels, src)  # fmt: skip
    (wheel,) = wheels.glob("adrenaline-*.whl")
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    # --no-compile: byte-compiling torch's files would double the install time.
    run(venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-compile", CPU_TORCH, wheel)
    probe = subprocess.run([venv / "bin" / "python", "-c", "import httpx"], capture_output=True)
    assert probe.returncode != 0, "httpx is in the plain install: the test proves nothing"
    bench = subprocess.run(
        [venv / "bin" / "adrenaline", "bench", "--url", "http://127.0.0.1:9", "--num-prompts", "1"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bench.returncode == 2 and "pip install 'adrenaline[bench]'" in bench.stderr, bench.stderr

    # A fresh venv's first start imports torch in every role at once: allow a loaded machine time.
    server = ServeProcess(
        ["--model", "tiny", "--log-level", "WARNING"],
        startup_timeout=300.0,
        adrenaline=venv / "bin" / "adrenaline",
    )
    try:
        body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
        answer = post(f"{server.url}/generate", body)
    finally:
        server.stop()
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    (offline,) = LLM("tiny", num_blocks=256).generate(PROMPT, params)
    assert answer["token_ids"] == offline.token_ids
    assert answer["finish_reason"] == "length"
