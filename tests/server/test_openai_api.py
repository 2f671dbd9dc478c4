"""The OpenAI routes over a fake backend: through TestClient, and through the official `openai`
client against a real uvicorn server on loopback (streaming, errors, aborts on disconnect).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import openai
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from engine.model_source import resolve_model
from engine.tokenizer import Tokenizer
from server.api.openai_routes import openai_routes
from server.router.generation import Overloaded, Unavailable
from tests.server.local_app import served
from transport.messages import SamplingSpec, TokenOutput

MODEL = "tiny-test"
PROMPT = "Hello world, how are you?"  # tiny tokens: He|llo| w|or|ld|,| |h|ow| a|re| you|?


class FakeBackend:
    """Echoes the prompt's tokens back one per output, honouring max_tokens and stop strings."""

    model_name = MODEL
    max_model_len = 64

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.reset()

    def reset(self) -> None:
        self.calls: list[tuple[str, list[int], SamplingSpec]] = []
        self.nears: list[str | None] = []
        self.aborted: list[str] = []
        self.finished: list[str] = []
        self.refuse: Exception | None = None
        self.fail_after: int | None = None  # raise Unavailable after this many outputs
        self.delay = 0.0

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingSpec,
        near: str | None = None,
    ) -> AsyncIterator[TokenOutput]:
        self.calls.append((request_id, prompt_token_ids, sampling))
        self.nears.append(near)
        if self.refuse is not None:
            raise self.refuse
        done = False
        try:
            for i in range(sampling.max_tokens):
                await asyncio.sleep(self.delay)
                if self.fail_after is not None and i == self.fail_after:
                    raise Unavailable("decode worker died")
                token = prompt_token_ids[i % len(prompt_token_ids)]
                text = self.tokenizer.decode([token])
                stopped = text in sampling.stop
                done = stopped or i + 1 == sampling.max_tokens
                yield TokenOutput(
                    request_id=request_id,
                    token_ids=[token],
                    text="" if stopped else text,
                    finished=done,
                    finish_reason=("stop" if stopped else "length") if done else None,
                    logprobs=[-0.25 * (i + 1)] if sampling.logprobs else None,
                )
                if done:
                    self.finished.append(request_id)
                    return
        finally:
            if not done:
                self.aborted.append(request_id)


@pytest.fixture(scope="module")
def backend(adrenaline_cache) -> FakeBackend:
    return FakeBackend(Tokenizer(resolve_model("tiny", adrenaline_cache)))


@pytest.fixture
def fake(backend: FakeBackend) -> Iterator[FakeBackend]:
    backend.reset()
    yield backend
    backend.reset()


@pytest.fixture(scope="module")
def app(backend: FakeBackend) -> FastAPI:
    app = FastAPI()
    app.include_router(openai_routes(backend))
    return app


@pytest.fixture
def client(app: FastAPI, fake: FakeBackend) -> Iterator[TestClient]:
    with TestClient(app) as client:
        yield client


@pytest.fixture(scope="module")
def server_url(app: FastAPI) -> Iterator[str]:
    with served(app) as url:
        yield url


@pytest.fixture
def oai(server_url: str, fake: FakeBackend) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0) as client:
        yield client


def sse_events(text: str) -> list[dict | str]:
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


def wait_for(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# --- TestClient: shapes, fields and validation ---


def test_models(client: TestClient) -> None:
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    (card,) = body["data"]
    assert card["id"] == MODEL and card["object"] == "model" and card["owned_by"] == "adrenaline"
    assert card["max_model_len"] == 64 and isinstance(card["created"], int)


def test_completion_json(client: TestClient, fake: FakeBackend) -> None:
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["model"] == MODEL and isinstance(body["created"], int)
    assert body["choices"] == [
        {
            "index": 0,
            "text": "Hello w",
            "finish_reason": "length",
            "logprobs": None,
            "prompt_logprobs": None,
        }
    ]
    prompt_ids = fake.tokenizer.encode(PROMPT)
    assert body["usage"] == {
        "prompt_tokens": len(prompt_ids),
        "completion_tokens": 3,
        "total_tokens": len(prompt_ids) + 3,
    }
    request_id, sent_ids, sampling = fake.calls[0]
    assert request_id == body["id"] and sent_ids == prompt_ids
    assert sampling.max_tokens == 3 and sampling.temperature == 1.0 and sampling.top_k == -1


def test_completion_sampling_fields_reach_backend(client: TestClient, fake: FakeBackend) -> None:
    payload = {
        "prompt": [PROMPT],
        "temperature": 0,
        "top_p": 0.9,
        "top_k": 0,
        "min_p": 0.1,
        "seed": 7,
        "stop": "or",
        "stop_token_ids": [2],
        "ignore_eos": True,
        "presence_penalty": 0,
        "frequency_penalty": None,
        "user": "someone",
        "some_future_field": 1,
    }
    body = client.post("/v1/completions", json=payload).json()
    assert body["choices"][0]["text"] == "Hello w"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 4
    spec = fake.calls[0][2]
    assert spec == SamplingSpec(
        max_tokens=16,
        temperature=0.0,
        top_p=0.9,
        top_k=-1,
        min_p=0.1,
        seed=7,
        stop=["or"],
        stop_token_ids=[2],
        ignore_eos=True,
        logprobs=False,
    )


def test_completion_token_id_prompt_and_logprobs(client: TestClient, fake: FakeBackend) -> None:
    ids = fake.tokenizer.encode(PROMPT)
    body = client.post(
        "/v1/completions", json={"prompt": ids, "max_tokens": 2, "logprobs": 0}
    ).json()
    assert fake.calls[0][1] == ids and fake.calls[0][2].logprobs
    assert body["choices"][0]["logprobs"] == {
        "text_offset": [0, 2],
        "token_logprobs": [-0.25, -0.5],
        "tokens": ["He", "llo"],
        "top_logprobs": None,
    }


def test_completion_stream(client: TestClient) -> None:
    payload = {"prompt": PROMPT, "max_tokens": 3, "stream": True}
    payload["stream_options"] = {"include_usage": True}
    r = client.post("/v1/completions", json=payload)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    *chunks, usage, done = sse_events(r.text)
    assert done == "[DONE]"
    assert [c["choices"][0]["text"] for c in chunks] == ["He", "llo", " w"]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "length"]
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert len({c["id"] for c in [*chunks, usage]}) == 1
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3


def test_chat_json(client: TestClient, fake: FakeBackend) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "x"}],
        },
    ]
    r = client.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 2}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    rendered = fake.tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\nx"}]
    )
    prompt_ids = fake.tokenizer.encode(rendered, add_special_tokens=False)
    assert fake.calls[0][1] == prompt_ids
    (choice,) = body["choices"]
    assert choice["message"] == {
        "role": "assistant",
        "content": fake.tokenizer.decode(prompt_ids[:2]),
        "tool_calls": [],  # as vLLM sends it
    }
    assert choice["finish_reason"] == "length"
    assert body["usage"]["prompt_tokens"] == len(prompt_ids)
    assert body["usage"]["completion_tokens"] == 2


def test_chat_max_completion_tokens_and_default(client: TestClient, fake: FakeBackend) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    client.post("/v1/chat/completions", json={"messages": messages, "max_completion_tokens": 3})
    client.post("/v1/chat/completions", json={"messages": messages})
    (_, prompt, first), (_, _, second) = fake.calls
    assert first.max_tokens == 3
    assert second.max_tokens == fake.max_model_len - len(prompt)  # the room left, as vLLM


def test_chat_stream(client: TestClient) -> None:
    payload = {
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
        "logprobs": True,
    }
    first, *chunks, usage, done = sse_events(client.post("/v1/chat/completions", json=payload).text)
    assert done == "[DONE]"
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant"}
    assert all("content" in c["choices"][0]["delta"] for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "length"]
    assert chunks[0]["choices"][0]["logprobs"]["content"][0]["logprob"] == -0.25
    assert usage["usage"]["completion_tokens"] == 3 and usage["choices"] == []


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        ({"prompt": PROMPT, "max_tokens": "16"}, "max_tokens"),
        ({"prompt": PROMPT, "temperature": "hot"}, "temperature"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": [PROMPT, PROMPT]}, "prompt"),
        ({"prompt": [1, -2]}, "prompt"),
        ({}, "prompt"),
        ({"prompt": ""}, "empty"),
        ({"prompt": []}, "empty"),
        ({"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
        ({"prompt": PROMPT, "n": 17}, "n=17"),
        ({"prompt": PROMPT, "n": 0}, "n: Input should be greater than or equal to 1"),
        ({"prompt": PROMPT, "n": 2, "best_of": 1}, "best_of=1 must be at least n=2"),
        ({"prompt": PROMPT, "presence_penalty": 2.5}, "presence_penalty"),
        ({"prompt": PROMPT, "frequency_penalty": -3}, "frequency_penalty"),
        ({"prompt": PROMPT, "repetition_penalty": 0}, "repetition_penalty"),
        ({"prompt": PROMPT, "logit_bias": {"hello": 1}}, "logit_bias"),
        ({"prompt": PROMPT, "logit_bias": {"5": 101}}, "logit_bias"),
        ({"prompt": PROMPT, "logprobs": 21}, "logprobs"),
        ({"prompt": PROMPT, "prompt_logprobs": 21}, "prompt_logprobs"),
        ({"prompt": PROMPT, "top_p": 0}, "top_p"),
        ({"prompt": PROMPT, "stop": ["or", ""]}, "stop"),
        ({"prompt": PROMPT, "stream_options": {"include_usage": True}}, "stream_options"),
        ({"prompt": [5] * 64}, "context length"),
        ({"prompt": PROMPT, "max_tokens": 60}, "context length"),
    ],
)
def test_completion_rejects(
    client: TestClient, fake: FakeBackend, payload: dict, needle: str
) -> None:
    r = client.post("/v1/completions", json=payload)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert needle in error["message"] and error["type"] == "invalid_request_error"
    assert fake.calls == []


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        ({"messages": "hi"}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"content": "hi"}]}, "role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "text"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 17}, "n=17"),
        (
            {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21},
            "top_logprobs",
        ),
        ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
        (
            {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
            "tools",
        ),
    ],
)
def test_chat_rejects(client: TestClient, payload: dict, needle: str) -> None:
    r = client.post("/v1/chat/completions", json=payload)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]


def test_malformed_json_and_non_json_content_type(client: TestClient) -> None:
    r = client.post("/v1/completions", content=b"{not json")
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    raw = json.dumps({"prompt": PROMPT, "max_tokens": 1}).encode()
    r = client.post("/v1/completions", content=raw, headers={"content-type": "text/plain"})
    assert r.status_code == 200


def test_unknown_model_is_404(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"model": "gpt-4", "prompt": PROMPT})
    assert r.status_code == 404 and "gpt-4" in r.json()["error"]["message"]


def test_backend_errors_map_to_status(client: TestClient, fake: FakeBackend) -> None:
    fake.refuse = Overloaded("queue full", retry_after=7)
    r = client.post("/v1/completions", json={"prompt": PROMPT, "stream": True})
    assert r.status_code == 429 and r.headers["retry-after"] == "7"
    fake.refuse = Unavailable("no decode worker")
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 503 and "no decode worker" in r.json()["error"]["message"]


def test_failure_mid_stream_is_an_error_event(client: TestClient, fake: FakeBackend) -> None:
    fake.fail_after = 2
    r = client.post("/v1/completions", json={"prompt": PROMPT, "stream": True})
    *chunks, error, done = sse_events(r.text)
    assert len(chunks) == 2 and done == "[DONE]"
    assert error["error"]["type"] == "service_unavailable"


# --- The official openai client against uvicorn on loopback ---


def test_openai_client_completion(oai: openai.OpenAI) -> None:
    out = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, stop=["ld"])
    assert out.choices[0].text == "Hello wor" and out.choices[0].finish_reason == "stop"
    assert out.usage is not None and out.usage.completion_tokens == 5
    assert [m.id for m in oai.models.list()] == [MODEL]


def test_openai_client_streams(oai: openai.OpenAI) -> None:
    stream = oai.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Hello w"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 13 + 3
    chat = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, stream=True
    )
    parts = list(chat)
    assert parts[0].choices[0].delta.role == "assistant"
    assert parts[-1].choices[0].finish_reason == "length"
    text = "".join(p.choices[0].delta.content or "" for p in parts)
    assert text == "us"  # the fake echoes the prompt: <|im_start|> (decodes to ""), u, s


def test_openai_client_chat(oai: openai.OpenAI) -> None:
    out = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_completion_tokens=2
    )
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content
    assert out.usage is not None and out.usage.completion_tokens == 2


def test_openai_client_errors(oai: openai.OpenAI, fake: FakeBackend) -> None:
    with pytest.raises(openai.BadRequestError, match="n=17"):
        oai.completions.create(model=MODEL, prompt=PROMPT, n=17)
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="nope", prompt=PROMPT)
    fake.refuse = Overloaded("busy", retry_after=3)
    with pytest.raises(openai.RateLimitError) as caught:
        oai.completions.create(model=MODEL, prompt=PROMPT)
    assert caught.value.response.headers["retry-after"] == "3"
    fake.refuse = Unavailable("down")
    with pytest.raises(openai.InternalServerError) as unavailable:
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert unavailable.value.status_code == 503


def test_closing_a_stream_aborts(oai: openai.OpenAI, fake: FakeBackend) -> None:
    fake.delay = 0.05
    stream = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, stream=True)
    next(iter(stream))
    stream.close()
    assert wait_for(lambda: len(fake.aborted) == 1), "closing the stream did not abort"
    assert fake.aborted == [fake.calls[0][0]] and fake.finished == []


def test_disconnect_aborts_a_non_streaming_request(server_url: str, fake: FakeBackend) -> None:
    fake.delay = 0.05
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{server_url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 40},
            timeout=0.3,
        )
    assert wait_for(lambda: len(fake.aborted) == 1), "a client that left did not abort"
    assert fake.finished == []
