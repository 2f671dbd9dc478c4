"""scripts/gpu_check.sh without a GPU: it stops cleanly with a report saying so; its runner keeps
one failing, crashing or hanging part from stopping the others; its report writer and junit
reader on made-up results; the dummy model shapes it measures load and decode in the engine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from scripts.gpu_check import engine_steps
from scripts.gpu_check.gpu_tests import parse_junit
from scripts.gpu_check.report import PartResult, Table, overall_ok, write_report
from scripts.gpu_check.run import Part, run_parts

ROOT = Path(__file__).resolve().parents[2]
# Parts for the runner, light to import in its child processes.
FAKES = "tests.scripts.fake_parts"


def test_runner_isolates_failing_crashing_and_hanging_parts(tmp_path) -> None:
    parts = [
        Part("ceiling", f"{FAKES}:fake_ceiling", 30),
        Part("raises", f"{FAKES}:fake_raises", 30),
        Part("crashes", f"{FAKES}:fake_crashes", 30),
        Part("hangs", f"{FAKES}:fake_hangs", 3),
        Part("graphs", f"{FAKES}:fake_not_available", 30),
        Part("reads", f"{FAKES}:fake_reads_context", 30),
    ]
    start = time.monotonic()
    results = {r.name: r for r in run_parts(parts, tmp_path, budget_s=120)}
    assert time.monotonic() - start < 40  # the hanging part was killed at its 3 s box
    assert {name: r.status for name, r in results.items()} == {
        "ceiling": "passed", "raises": "failed", "crashes": "failed", "hangs": "timed_out",
        "graphs": "not_available", "reads": "passed",
    }  # fmt: skip
    assert "ValueError: kernel wrote NaN" in results["raises"].summary
    assert "Traceback" in results["raises"].error
    assert "status 3" in results["crashes"].summary
    assert results["reads"].summary == "ceiling 4300"  # data of earlier parts reaches later ones
    assert results["ceiling"].data == {"copy_gb_per_s": 4300.0}


def test_runner_does_not_start_parts_past_its_budget(tmp_path) -> None:
    parts = [Part("hangs", f"{FAKES}:fake_hangs", 30), Part("ceiling", f"{FAKES}:fake_ceiling", 30)]
    results = run_parts(parts, tmp_path, budget_s=6)
    assert [r.status for r in results] == ["timed_out", "timed_out"]
    assert "not started" in results[1].summary


def fake_results() -> list[PartResult]:
    table = Table("bandwidth", ["batch", "GB/s", "note"], [[1, 812.5, "a|b"], [256, 4012.0, None]])
    return [
        PartResult("device", "passed", 2.5, "H200, 132 SMs", data={"copy_gb_per_s": 4300.0}),
        PartResult(
            "triton", "passed", 9.0, "78% of ceiling", tables=[table], data={"error": float("nan")}
        ),  # fmt: skip
        PartResult("graphs", "not_available", 0.1, "the engine captures no CUDA graphs yet"),
        PartResult(
            "colocation",
            "failed",
            4.0,
            "RuntimeError: boom",
            error="Traceback (most recent call last):\n  ...\nRuntimeError: boom",
        ),  # fmt: skip
    ]


def test_report_writer_writes_json_and_markdown(tmp_path) -> None:
    json_path, md_path = write_report(fake_results(), {"gpu": "NVIDIA H200", "torch": "2.11"},
                                      tmp_path)  # fmt: skip
    report = json.loads(json_path.read_text())  # strict JSON: NaN became null
    assert report["ok"] is False and report["seconds"] == 15.6
    assert [p["status"] for p in report["parts"]] == ["passed", "passed", "not_available",
                                                      "failed"]  # fmt: skip
    assert report["parts"][1]["data"]["error"] is None
    assert report["parts"][1]["tables"][0]["rows"][1] == [256, 4012.0, None]
    md = md_path.read_text()
    assert md.startswith("# GPU check: NVIDIA H200\n")
    assert "NOT all parts passed" in md
    assert "| triton | passed | 9.0 | 78% of ceiling |" in md
    assert "| 1 | 812 | a\\|b |" in md and "| 256 | 4,012 | - |" in md
    assert "RuntimeError: boom\n```" in md


def test_report_verdict() -> None:
    device, triton, graphs, colocation = fake_results()
    assert overall_ok([device, triton, graphs])
    assert not overall_ok([device, colocation])
    assert not overall_ok([graphs])  # nothing measured is no pass
    assert not overall_ok([device, PartResult("tests", "timed_out")])
    with pytest.raises(ValueError, match="unknown status"):
        PartResult("x", "ok")


def test_parse_junit(tmp_path) -> None:
    junit = tmp_path / "junit.xml"
    junit.write_text("""<testsuites><testsuite>
      <testcase classname="tests.a" name="test_ok"/>
      <testcase classname="tests.a" name="test_bad"><failure message="assert 1 == 2">x</failure></testcase>
      <testcase classname="tests.b" name="test_skip"><skipped message="needs flash-attn"/></testcase>
      <testcase classname="tests.c" name="collect"><error message="ImportError: openai"/></testcase>
    </testsuite></testsuites>""")
    counts, rows = parse_junit(junit)
    assert counts == {"passed": 1, "failed": 1, "errors": 1, "skipped": 1}
    assert rows == [["tests.a::test_bad", "failed", "assert 1 == 2"],
                    ["tests.b::test_skip", "skipped", "needs flash-attn"],
                    ["tests.c::collect", "errors", "ImportError: openai"]]  # fmt: skip


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_gpu_check_without_gpu_stops_with_a_clear_message(tmp_path) -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert "no CUDA GPU is visible to torch" in proc.stderr
    report = json.loads((tmp_path / "gpu_report.json").read_text())
    assert report["ok"] is False
    assert [(p["name"], p["status"]) for p in report["parts"]] == [("device", "failed")]
    assert not (tmp_path / "setup.log").exists()  # nothing was installed


def test_dummy_shape_decodes_in_the_engine(tmp_path, monkeypatch) -> None:
    """The model directories the decode-step part writes load with dummy weights, and its step
    accounting returns exactly the timed decode steps (here on CPU, at a small shape)."""
    from engine.llm import LLM

    monkeypatch.setattr(engine_steps, "PROMPT_LEN", 40)
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=500,
                 rope_theta=10000.0, tie_word_embeddings=True)  # fmt: skip
    model_dir = engine_steps.write_shape_dir(tmp_path / "shape", shape)
    llm = LLM(str(model_dir), load_format="dummy", num_blocks=64, max_model_len=128)
    times = engine_steps.timed_decode_steps(llm.engine, batch=3, vocab=500, seed=0)
    assert len(times) == engine_steps.TIMED_STEPS and all(t > 0 for t in times)
    assert not llm.engine.has_unfinished()
    assert engine_steps.weight_bytes(llm.engine.runner.model) > 500 * 64 * 4
