"""Hostile input never costs a request or a process: every bad body gets its exact 4xx (never a
5xx) from a real deployment, which afterwards holds no request and answers correctly; over fakes,
tokenization runs off the event loop and a client gone during prefill aborts its request.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from fastapi import FastAPI
from pydantic import TypeAdapter, ValidationError

from engine.model_source import resolve_model
from engine.tokenizer import Tokenizer
from server.api.generate import generate_routes
from server.api.openai_routes import openai_routes
from server.api.request_fields import (
    INT32_MAX,
    INT64_MAX,
    MinP,
    Seed,
    Temperature,
    TokenCount,
    TokenId,
    TopK,
    TopP,
    request_config,
)
from tests.server.deployment import Deployment
from tests.server.local_app import served
from transport.messages import SamplingSpec, TokenOutput

KEY = "hostile-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_REQUEST_BYTES = 12_000_000  # not the default, so the flag is seen to reach the router
ENDPOINTS = ("/generate", "/v1/completions", "/v1/chat/completions")

# --------------------------------------------------------------- the shared field limits


@pytest.mark.parametrize(
    ("field", "good", "bad"),
    [
        (TokenCount, [1, INT32_MAX], [0, INT32_MAX + 1, 2**63, 2**64, True, "16", 4.0]),
        (TokenId, [0, INT32_MAX], [-1, INT32_MAX + 1, 2**64, -(2**64), "5"]),
        (TopK, [-1, 0, INT32_MAX], [-2, INT32_MAX + 1, 2**64]),
        (Seed, [0, INT64_MAX], [-1, INT64_MAX + 1, 2**64, -(2**64), 1.0]),
        (Temperature, [0, 0.7, 2, 1e308], [-0.1, math.nan, math.inf, -math.inf, "0.5", 10**400]),
        (TopP, [1e-9, 1], [0, 1.01, math.nan, math.inf]),
        (MinP, [0, 1], [-1e-9, 1.01, math.nan]),
    ],
)
def test_field_limits(field, good: list, bad: list) -> None:
    adapter = TypeAdapter(field, config=request_config(extra="forbid"))
    for value in good:
        assert adapter.validate_python(value) == value
    for value in bad:
        with pytest.raises(ValidationError):
            adapter.validate_python(value)


# --------------------------------------------------------------- over a fake backend


class GatedTokenizer:
    """The tiny tokenizer, whose encode blocks until released: shows where it runs."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.inner = tokenizer
        self.vocab_size = tokenizer.vocab_size
        self.decode = tokenizer.decode
        self.apply_chat_template = tokenizer.apply_chat_template
        self.entered = threading.Event()
        self.release = threading.Event()
        self.inside = False

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.inside = True
        self.entered.set()
        self.release.wait(timeout=5)  # bounded, so a tokenizer on the event loop fails, not hangs
        self.inside = False
        return self.inner.encode(text, add_special_tokens=add_special_tokens)


class FakeBackend:
    """Answers one token at once, or with `stall` never reaches its first one."""

    model_name = "fake"
    max_model_len = 256

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.stall = False
        self.started: list[str] = []
        self.closed: list[str] = []

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], sampling: SamplingSpec
    ) -> AsyncIterator[TokenOutput]:
        self.started.append(request_id)
        try:
            if self.stall:
                await asyncio.Event().wait()  # a prefill that never ends
            yield TokenOutput(request_id, [prompt_token_ids[0]], "x", True, "length")
        finally:
            self.closed.append(request_id)


def fake_app(backend: FakeBackend) -> FastAPI:
    app = FastAPI()
    app.include_router(generate_routes(backend))
    app.include_router(openai_routes(backend))

    @app.get("/ping")
    async def ping() -> dict:
        return {"ok": True}

    return app


def body_for(path: str, **fields) -> dict:
    if path.endswith("chat/completions"):
        return {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 1, **fields}
    return {"prompt": "Hello", "max_tokens": 1, **fields}


@pytest.fixture(scope="module")
def tiny_tokenizer(adrenaline_cache) -> Tokenizer:
    return Tokenizer(resolve_model("tiny", adrenaline_cache))


@pytest.mark.parametrize("path", ENDPOINTS)
def test_tokenizing_leaves_the_event_loop_free(path: str, tiny_tokenizer: Tokenizer) -> None:
    tokenizer = GatedTokenizer(tiny_tokenizer)
    app = fake_app(FakeBackend(tokenizer))

    async def run() -> tuple[httpx.Response, bool]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://fake") as client:
            big = asyncio.create_task(client.post(path, json=body_for(path)))
            assert await asyncio.to_thread(tokenizer.entered.wait, 5), "never tokenized"
            ping = await client.get("/ping")  # the loop answers while encode is still blocked
            answered_first = ping.status_code == 200 and tokenizer.inside
            tokenizer.release.set()
            return await big, answered_first

    response, answered_first = asyncio.run(run())
    assert answered_first, "the event loop was blocked while the prompt was tokenized"
    assert response.status_code == 200, response.text


def test_a_client_gone_during_prefill_aborts(tiny_tokenizer: Tokenizer) -> None:
    backend = FakeBackend(tiny_tokenizer)
    backend.stall = True
    with served(fake_app(backend)) as url:
        for path in ENDPOINTS:
            for stream in (False, True):
                with pytest.raises(httpx.ReadTimeout):
                    httpx.post(f"{url}{path}", json=body_for(path, stream=stream), timeout=0.3)
                deadline = time.monotonic() + 5
                while len(backend.closed) < len(backend.started) and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert backend.closed == backend.started, f"{path} stream={stream} not aborted"
    assert len(backend.started) == 2 * len(ENDPOINTS)


# --------------------------------------------------------------- against a real deployment


class KeyedDeployment(Deployment):
    def stats(self) -> dict:
        return httpx.get(f"{self.url}/stats", headers=AUTH, timeout=5).json()


def greedy(url: str) -> httpx.Response:
    body = {"prompt": "Hello there", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    return httpx.post(f"{url}/generate", json=body, headers=AUTH, timeout=60)


@pytest.fixture(scope="module")
def deployment() -> Iterator[tuple[KeyedDeployment, list[int]]]:
    served = KeyedDeployment(
        "--api-key", KEY, "--max-request-bytes", str(MAX_REQUEST_BYTES),
        "--offload-policy", "none", "--no-attention-executor", "--num-kv-blocks", "256",
    )  # fmt: skip
    try:
        first = greedy(served.url)
        assert first.status_code == 200, first.text
        yield served, first.json()["token_ids"]
    finally:
        served.stop()


def raw(base: dict, **fields: str) -> str:
    """`base` as JSON with each of `fields` spliced in as raw JSON text (NaN, 1e999, 9…9)."""
    text = json.dumps(base)[:-1]
    return text + "".join(f', "{k}": {v}' for k, v in fields.items()) + "}"


def hostile_cases() -> list[tuple[str, str, str, str]]:
    """(endpoint, label, body, text its 400's message must contain)."""
    cases: list[tuple[str, str, str, str]] = []
    for path in ENDPOINTS:
        base = body_for(path)
        del base["max_tokens"]

        def add(label: str, needle: str, **fields: str) -> None:
            cases.append((path, label, raw(base, **fields), needle))  # noqa: B023

        for value in (2**64, 2**63, -(2**64), 2**31, 0):
            add(f"max_tokens={value}", "max_tokens", max_tokens=str(value))
        add("max_tokens=9x5000", "malformed JSON", max_tokens="9" * 5000)  # over int's 4300 digits
        for value in (2**64, 2**63, -(2**64), 2**31, -2):
            add(f"top_k={value}", "top_k", top_k=str(value))
        for value in (2**64, 2**63, -(2**64), -1):
            add(f"seed={value}", "seed", seed=str(value))
        for value in (2**64, 2**63, -(2**64), 2**31):
            add(f"stop_token_ids=[{value}]", "stop_token_ids", stop_token_ids=f"[{value}]")
        for name in ("temperature", "top_p", "min_p"):
            for value in ("NaN", "Infinity", "-Infinity", "1e999"):
                add(f"{name}={value}", name, **{name: value})
        for name, value in [
            ("max_tokens", '"16"'),
            ("max_tokens", "true"),
            ("temperature", '"0.5"'),
            ("seed", "1.0"),
            ("ignore_eos", '"yes"'),
        ]:
            add(f"{name}={value}", name, **{name: value})
        add("stop=lone surrogate", "stop", stop='["ok", "\\udfff"]')
        add("stop nested 100000 deep", "nested too deeply", stop="[" * 100_000 + "]" * 100_000)
        for label, body, needle in [
            ("nested 100000 deep", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
            ("not an object", "[]", "body"),
            ("not UTF-8", '{"prompt": "\udcff"}', "malformed JSON"),  # the byte 0xff
            ("encoded surrogate", '{"prompt": "\udced\udca0\udc80"}', "malformed JSON"),
        ]:
            cases.append((path, label, body, needle))
    for path, ids_field in (("/generate", "prompt_token_ids"), ("/v1/completions", "prompt")):
        # 2**31 and up do not fit the engine's token ids; 1000 and INT32_MAX fit the wire but
        # not the tiny model's 384-token vocabulary, which the worker refuses.
        for value, needle in [
            (2**64, ids_field),
            (2**63, ids_field),
            (-(2**64), ids_field),
            (2**31, ids_field),
            (1000, "token ids"),
            (INT32_MAX, "token ids"),
        ]:
            body = raw({"max_tokens": 2}, **{ids_field: f"[{value}]"})
            cases.append((path, f"{ids_field}=[{value}]", body, needle))
    chat_base = body_for("/v1/chat/completions")
    cases += [
        ("/generate", "prompt=lone surrogate", json.dumps({"prompt": "a\ud800"}), "prompt"),
        ("/v1/completions", "prompt=lone surrogate", json.dumps({"prompt": "\udc00"}), "prompt"),
        (
            "/v1/chat/completions",
            "content=lone surrogate",
            json.dumps({"messages": [{"role": "user", "content": "\ud800"}]}),
            "messages.0.content",
        ),
        ("/generate", "unknown field", raw({"prompt": "x"}, bogus=str(2**64)), "bogus"),
        (
            "/v1/chat/completions",
            "max_completion_tokens=2**64",
            raw(chat_base, max_completion_tokens=str(2**64)),
            "max_completion_tokens",
        ),
    ]
    return cases


HOSTILE = hostile_cases()


@pytest.mark.parametrize(
    ("path", "label", "body", "needle"), HOSTILE, ids=[f"{c[0]} {c[1]}" for c in HOSTILE]
)
def test_hostile_body_is_a_400(deployment, path: str, label: str, body: str, needle: str) -> None:
    served, _ = deployment
    content = body.encode("utf-8", errors="surrogateescape")  # "\udcff" is the bad byte 0xff
    r = httpx.post(f"{served.url}{path}", content=content, headers=AUTH, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert needle in error["message"] and error["type"] == "invalid_request_error", error


@pytest.mark.parametrize("path", ENDPOINTS[1:])
def test_openai_ignores_unknown_fields(deployment, path: str) -> None:
    served, _ = deployment  # as vLLM does: clients send fields of newer API versions
    r = httpx.post(f"{served.url}{path}", content=raw(body_for(path), bogus=str(2**64)),
                   headers=AUTH, timeout=30)  # fmt: skip
    assert r.status_code == 200, r.text


def test_a_body_over_the_limit_is_a_413(deployment) -> None:
    served, _ = deployment

    def chunks() -> Iterator[bytes]:  # no Content-Length: the router counts as it reads
        for _ in range(MAX_REQUEST_BYTES // 65536 + 2):
            yield b" " * 65536

    declared = b" " * (MAX_REQUEST_BYTES + 1)
    for path in ENDPOINTS:
        for content in (declared, chunks()):
            r = httpx.post(f"{served.url}{path}", content=content, headers=AUTH, timeout=30)
            assert r.status_code == 413, r.text
            assert r.json()["error"]["type"] == "request_too_large"
            assert str(MAX_REQUEST_BYTES) in r.json()["error"]["message"]


def test_stats_and_admin_need_the_key(deployment) -> None:
    served, _ = deployment
    for path in ("/stats", "/admin/drain"):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx.request("GET" if path == "/stats" else "POST", f"{served.url}{path}",
                              headers=headers, timeout=5)  # fmt: skip
            assert r.status_code == 401, (path, r.text)
    assert httpx.get(f"{served.url}/stats", headers=AUTH, timeout=5).status_code == 200
    for path in ("/health", "/metrics"):
        assert httpx.get(f"{served.url}{path}", timeout=5).status_code == 200
    r = httpx.post(f"{served.url}/generate", json={"prompt": "x"}, timeout=5)
    assert r.status_code == 401


def test_health_answers_while_a_huge_prompt_is_read(deployment) -> None:
    served, _ = deployment
    prompt = "many words " * (10_000_000 // 11)  # 10 MB: under the body limit, over the context
    results: dict[str, httpx.Response] = {}

    def send(path: str) -> None:
        body = body_for(path)
        if "messages" in body:
            body["messages"][0]["content"] = prompt
        else:
            body["prompt"] = prompt
        results[path] = httpx.post(f"{served.url}{path}", json=body, headers=AUTH, timeout=60)

    senders = [threading.Thread(target=send, args=(path,)) for path in ENDPOINTS]
    for sender in senders:
        sender.start()
    latencies = []
    while any(s.is_alive() for s in senders) or not latencies:
        start = time.monotonic()
        assert httpx.get(f"{served.url}/health", timeout=5).status_code == 200
        latencies.append(time.monotonic() - start)
    for sender in senders:
        sender.join()
    assert max(latencies) < 1.0, latencies
    for path in ENDPOINTS:
        assert results[path].status_code == 400, results[path].text
        assert "context length" in results[path].json()["error"]["message"]


def test_the_deployment_is_unharmed(deployment) -> None:
    served, first_tokens = deployment  # runs last: after every hostile request above
    assert served.stats()["requests"]["active"] == 0
    r = greedy(served.url)
    assert r.status_code == 200 and r.json()["token_ids"] == first_tokens, r.text
    served.wait_idle()
