"""`adrenaline bench`: the pure parts (schedule, datasets, aggregation) and end-to-end runs
against a fake streaming server on loopback."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.bench.cli import add_bench_parser, run_bench
from server.bench.client import (
    arrival_times,
    build_lengths,
    build_requests,
    decode_line,
    request_body,
)
from server.bench.datasets import (
    BenchRequest,
    DatasetError,
    parse_vocab_range,
    random_requests,
    sharegpt_requests,
    synthetic_requests,
)
from server.bench.metrics import RequestRecord, aggregate, format_table

# ---------------------------------------------------------------- pure parts


def test_poisson_schedule_mean_gap_is_one_over_rate() -> None:
    offsets = arrival_times(20_000, rate=5.0, seed=0)
    gaps = np.diff(offsets)
    assert offsets[0] == 0.0
    assert (gaps >= 0).all()
    assert abs(gaps.mean() - 0.2) < 0.2 * 0.03
    assert offsets == arrival_times(20_000, rate=5.0, seed=0)
    assert offsets != arrival_times(20_000, rate=5.0, seed=1)


def test_infinite_rate_sends_everything_at_zero() -> None:
    assert arrival_times(7, math.inf, seed=3) == [0.0] * 7
    assert arrival_times(1, 2.0, seed=0) == [0.0]


def test_synthetic_is_deterministic_and_clipped() -> None:
    vocab = (100, 300)
    a = synthetic_requests(5000, 1024, 512, vocab, seed=7)
    assert a == synthetic_requests(5000, 1024, 512, vocab, seed=7)
    assert a != synthetic_requests(5000, 1024, 512, vocab, seed=8)
    ins = np.array([r.prompt_len for r in a])
    outs = np.array([r.output_len for r in a])
    assert 4 <= ins.min() and ins.max() <= 1024
    assert 1 <= outs.min() and outs.max() <= 512
    assert 180 <= np.median(ins) <= 220
    assert 135 <= np.median(outs) <= 165
    assert all(len(r.prompt) == r.prompt_len for r in a)
    assert all(100 <= t < 300 for r in a[:100] for t in r.prompt)
    tight = synthetic_requests(200, 8, 3, vocab, seed=0)
    assert {r.prompt_len for r in tight} <= set(range(4, 9))
    assert {r.output_len for r in tight} <= {1, 2, 3}


@pytest.mark.parametrize("dataset", ["synthetic", "reasoning", "random"])
def test_lengths_alone_are_the_requests_lengths(dataset: str) -> None:
    """`simulate` draws only the lengths: the same ones, so the two commands run one workload."""
    args = bench_args("http://unused", "--dataset", dataset, "--num-prompts", "300",
                      "--max-input-len", "900", "--max-output-len", "700", "--seed", "3")  # fmt: skip
    requests = build_requests(args)
    assert build_lengths(args) == (
        [r.prompt_len for r in requests],
        [r.output_len for r in requests],
    )
    args.max_input_len = args.random_input_len = 0
    with pytest.raises(DatasetError):
        build_lengths(args)


def test_random_dataset_has_fixed_lengths_in_vocab_range() -> None:
    reqs = random_requests(4, 16, 5, parse_vocab_range("10:20"), seed=0)
    assert all(r.prompt_len == 16 and r.output_len == 5 and len(r.prompt) == 16 for r in reqs)
    assert all(10 <= t < 20 for r in reqs for t in r.prompt)
    for bad in ("300:100", "abc", "1:2:3"):
        with pytest.raises(DatasetError):
            parse_vocab_range(bad)


def test_sharegpt_loader(tmp_path) -> None:
    convs = [
        {
            "conversations": [
                {"from": "human", "value": "Tell me a story about a cat."},  # 28 chars -> 7
                {"from": "gpt", "value": "x" * 40},  # -> 10
                {"from": "human", "value": "later turn, ignored"},
            ]
        },
        {"conversations": [{"from": "human", "value": "no reply here"}]},
        {
            "conversations": [
                {"from": "human", "value": "y" * 400},
                {"from": "gpt", "value": "ok ok"},
            ]
        },
        {
            "conversations": [
                {"from": "human", "value": "short prompt"},
                {"from": "gpt", "value": "z" * 400},
            ]
        },
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(convs))
    reqs = sharegpt_requests(str(path), 5, max_input_len=64, max_output_len=32, seed=0)
    assert len(reqs) == 5  # two usable conversations, cycled
    by_prompt = {r.prompt: r for r in reqs}
    assert set(by_prompt) == {"Tell me a story about a cat.", "short prompt"}
    assert by_prompt["Tell me a story about a cat."] == BenchRequest(
        "Tell me a story about a cat.", 7, 10
    )
    assert by_prompt["short prompt"].output_len == 32  # 100 estimated, clipped
    assert reqs == sharegpt_requests(str(path), 5, 64, 32, seed=0)
    # Counting words instead, the 400-char prompt is one token and fits.
    words = sharegpt_requests(str(path), 3, 64, 32, 0, count_tokens=lambda s: len(s.split()))
    assert sorted(r.prompt_len for r in words) == [1, 2, 7]
    with pytest.raises(DatasetError):
        sharegpt_requests(str(tmp_path / "missing.json"), 1, 64, 32, 0)


def hand_made_records() -> list[RequestRecord]:
    return [
        RequestRecord(10, True, "", 5, ttft=0.1, itl=[0.1] * 4, e2el=0.5),  # tpot 100 ms
        RequestRecord(20, True, "", 3, ttft=0.2, itl=[0.2] * 2, e2el=0.6),  # tpot 200 ms
        RequestRecord(30, True, "", 1, ttft=0.3, itl=[], e2el=0.3),  # one token: tpot 0
        RequestRecord(40, True, "", 9, ttft=0.4, itl=[0.1] * 8, e2el=1.2),  # tpot 100 ms
        RequestRecord(50, False, "HTTP 500: boom"),
    ]


def test_aggregate_exact_numbers() -> None:
    r = aggregate(hand_made_records(), duration=2.0)
    assert (r["completed"], r["failed"]) == (4, 1)
    assert (r["total_input_tokens"], r["total_output_tokens"]) == (100, 18)
    assert r["request_throughput"] == 2.0
    assert r["output_throughput"] == 9.0
    assert r["total_token_throughput"] == 59.0
    assert r["request_goodput"] is None
    expected = {
        "ttft": (250.0, 250.0, 370.0, 397.0),
        "tpot": (400.0 / 3, 100.0, 180.0, 198.0),  # the one-token request is left out
        "itl": (1600.0 / 14, 100.0, 170.0, 200.0),
        "e2el": (650.0, 550.0, 1020.0, 1182.0),
    }
    for key, values in expected.items():
        got = tuple(r[f"{s}_{key}_ms"] for s in ("mean", "median", "p90", "p99"))
        assert got == pytest.approx(values), key


def test_goodput_counts_requests_meeting_every_given_slo() -> None:
    records = hand_made_records()
    assert aggregate(records, 2.0, slo_ttft_ms=250, slo_tpot_ms=150)["request_goodput"] == 0.5
    # TPOT alone: the one-token request counts as TPOT 0, as in vLLM.
    assert aggregate(records, 2.0, slo_tpot_ms=150)["request_goodput"] == 1.5
    assert aggregate(records, 2.0, slo_ttft_ms=1000)["request_goodput"] == 2.0


def test_aggregate_with_no_successes_and_table() -> None:
    r = aggregate([RequestRecord(5, error="x")], duration=1.0, slo_ttft_ms=10)
    assert r["completed"] == 0 and r["mean_ttft_ms"] == 0.0 and r["request_goodput"] == 0.0
    table = format_table(aggregate(hand_made_records(), 2.0, 250, 150), math.inf, None)
    assert table.splitlines()[0] == "============ Serving Benchmark Result ============"
    assert "Request goodput (req/s):                 0.50" in table
    assert "P99 TTFT (ms):                           397.00" in table
    assert "Successful requests:                     4" in table


def test_stream_lines_and_bodies() -> None:
    assert decode_line("data: [DONE]", sse=True) is None
    assert decode_line(": keep-alive", sse=True) is None
    assert decode_line("", sse=False) is None
    assert decode_line('data: {"a": 1}', sse=True) == {"a": 1}
    assert decode_line('{"a": 1}', sse=False) == {"a": 1}
    req = BenchRequest([1, 2, 3], 3, 4)
    body = request_body("/v1/completions", "m", req, ignore_eos=True)
    assert body["prompt"] == [1, 2, 3] and body["model"] == "m" and body["max_tokens"] == 4
    assert body["stream"] and body["stream_options"] == {"include_usage": True}
    gen = request_body("/generate", "m", req, ignore_eos=False)
    assert gen["prompt_token_ids"] == [1, 2, 3] and "model" not in gen and not gen["ignore_eos"]
    assert request_body("/generate", None, BenchRequest("hi", 1, 2), True)["prompt"] == "hi"


# ---------------------------------------------------------------- end to end

CHUNK_SLEEP_S = 0.002


def fake_app() -> FastAPI:
    """Streams `max_tokens` one-token chunks; `fail_every` k makes every k-th request a 500."""
    app = FastAPI()

    def admit(body: dict) -> JSONResponse | None:
        app.state.bodies.append(body)
        n = next(app.state.counter)
        if app.state.fail_every and n % app.state.fail_every == 0:
            return JSONResponse(status_code=500, content={"error": {"message": "boom"}})
        return None

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        if (refused := admit(body)) is not None:
            return refused
        usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": body["max_tokens"]}

        async def events():
            for i in range(body["max_tokens"]):
                await asyncio.sleep(CHUNK_SLEEP_S)
                chunk = {"choices": [{"index": 0, "text": f" t{i}", "finish_reason": None}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            if app.state.send_usage:
                yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/generate")
    async def generate(request: Request):
        body = await request.json()
        if (refused := admit(body)) is not None:
            return refused
        prompt_len = len(body["prompt_token_ids"])

        async def lines():
            for i in range(body["max_tokens"]):
                await asyncio.sleep(CHUNK_SLEEP_S)
                usage = {"prompt_tokens": prompt_len, "completion_tokens": i + 1}
                line = {"text": f" t{i}", "token_ids": [100 + i], "usage": usage}
                yield json.dumps(line) + "\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live_server() -> Iterator[tuple[FastAPI, str]]:
    app = fake_app()
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            raise RuntimeError("fake server did not start")
        time.sleep(0.01)
    yield app, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def fake(live_server) -> tuple[FastAPI, str]:
    app, url = live_server
    app.state.fail_every, app.state.send_usage = 0, True
    app.state.counter, app.state.bodies = itertools.count(1), []
    return app, url


def bench_args(url: str, *flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", "--url", url, "--disable-tqdm", *flags])


def run_random(url: str, tmp_path, *flags: str) -> tuple[int, dict]:
    out = tmp_path / "result.json"
    args = bench_args(
        url, "--dataset", "random", "--random-input-len", "16", "--random-output-len", "6",
        "--num-prompts", "8", "--save-result", str(out), *flags,
    )  # fmt: skip
    rc = run_bench(args)
    return rc, json.loads(out.read_text())


def test_e2e_all_at_once(fake, tmp_path, capsys) -> None:
    app, url = fake
    rc, saved = run_random(url, tmp_path, "--request-rate", "inf", "--slo-ttft-ms", "10000")
    assert rc == 0
    assert (saved["completed"], saved["failed"]) == (8, 0)
    assert saved["total_output_tokens"] == 8 * 6 and saved["total_input_tokens"] == 8 * 16
    assert saved["output_lens"] == [6] * 8
    assert all(t <= e for t, e in zip(saved["ttfts"], saved["e2els"]))
    assert all(len(itl) == 5 for itl in saved["itls"])
    assert saved["request_goodput"] == pytest.approx(saved["request_throughput"])
    for key in (
        "duration", "request_throughput", "output_throughput", "total_token_throughput",
        "mean_ttft_ms", "median_tpot_ms", "p90_itl_ms", "p99_e2el_ms", "input_lens",
        "tpots", "errors", "args", "model", "request_rate",
    ):  # fmt: skip
        assert key in saved, key
    assert saved["model"] == "fake-model" and saved["request_rate"] == "inf"
    body = app.state.bodies[0]
    assert body["model"] == "fake-model" and body["ignore_eos"] is True
    assert body["stream"] and body["stream_options"] == {"include_usage": True}
    assert all(100 <= t < 300 for t in body["prompt"])
    assert "Serving Benchmark Result" in capsys.readouterr().out


def test_e2e_poisson_rate_with_concurrency_cap(fake, tmp_path) -> None:
    _, url = fake
    out = tmp_path / "r.json"
    flags = ["--request-rate", "20", "--max-concurrency", "3", "--num-prompts", "8"]
    flags += ["--max-input-len", "64", "--max-output-len", "8", "--seed", "5"]
    assert run_bench(bench_args(url, *flags, "--save-result", str(out))) == 0
    saved = json.loads(out.read_text())
    expected = synthetic_requests(8, 64, 8, (100, 300), seed=5)
    assert saved["completed"] == 8
    assert saved["output_lens"] == [r.output_len for r in expected]
    assert saved["total_output_tokens"] == sum(r.output_len for r in expected)
    assert all(t <= e for t, e in zip(saved["ttfts"], saved["e2els"]))
    assert saved["duration"] >= arrival_times(8, 20.0, seed=5)[-1]


def test_e2e_server_errors_count_as_failed(fake, tmp_path) -> None:
    app, url = fake
    app.state.fail_every = 4
    rc, saved = run_random(url, tmp_path, "--model", "given")
    assert rc == 0
    assert (saved["completed"], saved["failed"]) == (6, 2)
    assert saved["total_output_tokens"] == 6 * 6
    assert sum("HTTP 500" in e for e in saved["errors"]) == 2
    assert app.state.bodies[0]["model"] == "given"
    app.state.fail_every = 1
    rc, saved = run_random(url, tmp_path)
    assert rc == 1 and saved["completed"] == 0


def test_e2e_generate_ndjson_and_usage_fallback(fake, tmp_path) -> None:
    app, url = fake
    rc, saved = run_random(url, tmp_path, "--endpoint", "/generate")
    assert rc == 0 and saved["completed"] == 8 and saved["total_output_tokens"] == 48
    assert "prompt_token_ids" in app.state.bodies[0] and "model" not in app.state.bodies[0]
    app.state.send_usage = False  # output tokens are then the count of content chunks
    rc, saved = run_random(url, tmp_path, "--model", "m")
    assert rc == 0 and saved["output_lens"] == [6] * 8


def test_bad_flags_return_2(fake, capsys) -> None:
    _, url = fake
    assert run_bench(bench_args(url, "--dataset", "sharegpt")) == 2
    assert run_bench(bench_args(url, "--request-rate", "0")) == 2
    assert run_bench(bench_args("http://127.0.0.1:1", "--num-prompts", "1")) == 2
    assert "--dataset-path" in capsys.readouterr().err
