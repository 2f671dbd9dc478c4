"""`n > 1` and `best_of` (server/api/choices.py): over a fake backend, how children are started,
merged and aborted; over real tiny deployments (offloaded and not), through the official
`openai` client, that choice i is the single request with seed + i, that best_of returns the
most likely choice, that the prompt is prefilled once, and that nothing leaks.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from engine.model_source import resolve_model
from engine.tokenizer import Tokenizer
from server.api.openai_routes import openai_routes
from tests.server.deployment import Deployment
from tests.server.local_app import served
from tests.server.test_openai_api import PROMPT, FakeBackend, sse_events

# ---------------------------------------------------------------- over a fake backend


@pytest.fixture(scope="module")
def fake(adrenaline_cache) -> FakeBackend:
    return FakeBackend(Tokenizer(resolve_model("tiny", adrenaline_cache)))


@pytest.fixture(scope="module")
def app(fake: FakeBackend) -> FastAPI:
    app = FastAPI()
    app.include_router(openai_routes(fake, max_n=4))
    return app


@pytest.fixture
def client(app: FastAPI, fake: FakeBackend) -> Iterator[TestClient]:
    fake.reset()
    with TestClient(app) as client:
        yield client


def test_children_seeds_and_merged_answer(client: TestClient, fake: FakeBackend) -> None:
    r = client.post("/v1/completions", json={"prompt": PROMPT, "n": 3, "seed": 7, "max_tokens": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [call[2].seed for call in fake.calls] == [7, 8, 9]
    assert len({call[0] for call in fake.calls}) == 3  # one request id per child
    first = fake.calls[0][0]  # the later children ask to be placed beside the first
    assert fake.nears == [None, first, first]
    prompt_tokens = len(fake.calls[0][1])
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 6,
        "total_tokens": prompt_tokens + 6,
    }
    assert sorted(fake.finished) == sorted(call[0] for call in fake.calls) and not fake.aborted


def test_streamed_choices_by_index(client: TestClient, fake: FakeBackend) -> None:
    payload = {"prompt": PROMPT, "n": 2, "max_tokens": 3, "stream": True,
               "stream_options": {"include_usage": True}}  # fmt: skip
    events = sse_events(client.post("/v1/completions", json=payload).text)
    assert events[-1] == "[DONE]"
    *chunks, usage = events[:-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 6
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert len(mine) == 3 and mine[-1]["finish_reason"] == "length"
    assert all(c["usage"] is None for c in chunks)


def test_a_failing_child_fails_the_request_and_aborts_the_rest(
    client: TestClient, fake: FakeBackend
) -> None:
    fake.fail_after = 1  # every child dies after its first token: the first failure wins
    r = client.post("/v1/completions", json={"prompt": PROMPT, "n": 3, "max_tokens": 5})
    assert r.status_code == 503 and "decode worker died" in r.json()["error"]["message"]
    assert len(fake.calls) == 3
    assert sorted(fake.aborted) == sorted(call[0] for call in fake.calls)


def test_disconnect_aborts_every_child(app: FastAPI, fake: FakeBackend) -> None:
    fake.reset()
    fake.delay = 0.05
    with served(app) as url:
        payload = {"prompt": PROMPT, "n": 3, "max_tokens": 40, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=payload, timeout=10) as r:
            next(r.iter_lines())  # the first chunk is out: every child has started
        deadline = time.monotonic() + 5
        while len(fake.aborted) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
    assert len(fake.calls) == 3
    assert sorted(fake.aborted) == sorted(call[0] for call in fake.calls)


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        ({"n": 5}, "n=5 is above this server's limit of 4"),
        ({"n": 1, "best_of": 5}, "best_of=5 is above"),
        ({"n": 0}, "n: Input should be greater than or equal to 1"),
        ({"n": 3, "best_of": 2}, "best_of=2 must be at least n=3"),
        ({"n": 1, "best_of": 2, "stream": True}, "best_of cannot be streamed"),
    ],
)
def test_bad_choice_counts_are_400(
    client: TestClient, fake: FakeBackend, payload: dict, needle: str
) -> None:
    r = client.post("/v1/completions", json={"prompt": PROMPT, **payload})
    assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
    assert fake.calls == []


# ---------------------------------------------------------------- over real deployments

BLOCK_SIZE = 16
LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 3  # some full KV blocks


POLICIES = {  # the offloaded path (every request decodes on the executor), and plain PD
    "always": ("--offload-policy", "always", "--num-kv-blocks", "256", "--offload-blocks", "128"),
    "none": ("--offload-policy", "none", "--no-attention-executor", "--num-kv-blocks", "256"),
}


@pytest.fixture(scope="module", params=sorted(POLICIES))
def deployment(request) -> Iterator[Deployment]:
    d = Deployment(
        *POLICIES[request.param], "--block-size", str(BLOCK_SIZE), "--torch-threads", "1"
    )
    d.policy = request.param
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture
def oai(deployment: Deployment) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{deployment.url}/v1", api_key="-", max_retries=0) as client:
        yield client
    stats = deployment.wait_idle()  # after each test: no request left, every pool full
    assert stats["requests"]["active"] == 0


def _complete(oai: openai.OpenAI, **kwargs):
    return oai.completions.create(model="tiny", prompt=LONG_PROMPT, **{"max_tokens": 8, **kwargs})


def test_choice_i_is_the_request_with_seed_plus_i(oai: openai.OpenAI) -> None:
    fanned = _complete(oai, n=3, seed=1234, temperature=1.0)
    again = _complete(oai, n=3, seed=1234, temperature=1.0)
    texts = [c.text for c in sorted(fanned.choices, key=lambda c: c.index)]
    assert texts == [c.text for c in sorted(again.choices, key=lambda c: c.index)]
    assert len(set(texts)) > 1  # independent streams, not one stream thrice
    singles = [_complete(oai, seed=1234 + i, temperature=1.0) for i in range(3)]
    assert texts == [s.choices[0].text for s in singles]
    # As vLLM: the prompt counted once, every choice's completion tokens summed.
    assert fanned.usage.prompt_tokens == singles[0].usage.prompt_tokens
    assert fanned.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)


def test_greedy_choices_are_identical_in_chat_too(oai: openai.OpenAI) -> None:
    out = oai.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], n=2, max_tokens=6,
        temperature=0,
    )  # fmt: skip
    assert [c.index for c in out.choices] == [0, 1]
    assert out.choices[0].message.content == out.choices[1].message.content


def test_streamed_n3_matches_unstreamed(oai: openai.OpenAI) -> None:
    whole = _complete(oai, n=3, seed=99, temperature=1.0)
    texts = {0: "", 1: "", 2: ""}
    finished = set()
    usage = None
    for chunk in _complete(
        oai, n=3, seed=99, temperature=1.0, stream=True, stream_options={"include_usage": True}
    ):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason is not None:
                finished.add(c.index)
    assert texts == {c.index: c.text for c in whole.choices} and finished == {0, 1, 2}
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens

    chat = {0: "", 1: "", 2: ""}
    stream = oai.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], n=3, max_tokens=6, seed=5,
        stream=True,
    )  # fmt: skip
    for chunk in stream:
        for c in chunk.choices:
            chat[c.index] += c.delta.content or ""
    unstreamed = oai.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], n=3, max_tokens=6, seed=5
    )
    assert chat == {c.index: c.message.content for c in unstreamed.choices}


def test_best_of_returns_the_most_likely(oai: openai.OpenAI) -> None:
    candidates = _complete(oai, n=3, seed=42, temperature=1.0, logprobs=0)
    totals = [sum(c.logprobs.token_logprobs) for c in candidates.choices]
    best = _complete(oai, n=1, best_of=3, seed=42, temperature=1.0, logprobs=0)
    assert len(best.choices) == 1 and best.choices[0].index == 0
    assert best.choices[0].text == candidates.choices[totals.index(max(totals))].text
    assert sum(best.choices[0].logprobs.token_logprobs) == pytest.approx(max(totals))


def test_the_prompt_is_prefilled_once(deployment: Deployment, oai: openai.OpenAI) -> None:
    def prefilled() -> tuple[int, int]:
        stats = deployment.wait_idle()
        workers = stats["workers"].values()
        computed = sum(w["prompt_tokens_total"] for w in workers if w["role"] == "prefill")
        shared = sum(w["prefix_cache_hits"] for w in workers if w["role"] == "decode")
        return computed, shared

    before, decode_hits_before = prefilled()
    # A prompt of its own: one another test cached would skip its full blocks for child 0 too.
    prompt = "Prefilled once, shared by four: " + LONG_PROMPT
    # ignore_eos: a first token that ends child 0 at prefill would leave the decode worker
    # nothing to share (the later choices then start at once, and copy the whole prompt).
    out = oai.completions.create(model="tiny", prompt=prompt, n=4, temperature=1.0, max_tokens=2,
                                 extra_body={"ignore_eos": True})  # fmt: skip
    tokens = out.usage.prompt_tokens
    shared = (tokens - 1) // BLOCK_SIZE * BLOCK_SIZE  # the full blocks a prefix hit can skip
    assert shared > 0
    offloaded = deployment.policy == "always"
    expected_hits = 0 if offloaded else 3 * shared // BLOCK_SIZE
    expected = (before + tokens + 3 * (tokens - shared), decode_hits_before + expected_hits)
    # Workers' counters reach /stats with their next heartbeat, later on a loaded machine.
    deadline = time.monotonic() + 10
    while (counts := prefilled()) != expected and time.monotonic() < deadline:
        time.sleep(0.25)
    after, decode_hits_after = counts
    computed = after - before
    # Child 0 computes the whole prompt, the other three only what follows the shared blocks.
    assert computed == tokens + 3 * (tokens - shared), (computed, tokens)
    # Decoded on a decode worker's own pool (not offloaded), the three later choices share the
    # first one's full prompt blocks there too: none of them is copied again.
    assert decode_hits_after - decode_hits_before == expected_hits


def test_a_client_that_leaves_aborts_every_choice(deployment: Deployment) -> None:
    payload = {"prompt": LONG_PROMPT, "n": 3, "max_tokens": 1000, "ignore_eos": True,
               "stream": True}  # fmt: skip
    url = f"{deployment.url}/v1/completions"
    with httpx.stream("POST", url, json=payload, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # kept: a discarded iterator closes the connection when freed
        next(lines)
        assert deployment.stats()["requests"]["active"] == 3  # decoding, not yet done
    stats = deployment.wait_idle()  # every child aborted, every block back
    assert stats["requests"]["aborted"] >= 3


def test_bad_counts_are_400_on_a_deployment(oai: openai.OpenAI) -> None:
    for kwargs, needle in [
        ({"n": 17}, "n=17 is above this server's limit of 16"),
        ({"n": 2, "best_of": 1}, "best_of=1 must be at least n=2"),
        ({"best_of": 2, "stream": True}, "best_of cannot be streamed"),
    ]:
        with pytest.raises(openai.BadRequestError, match=needle):
            _complete(oai, **kwargs)
    raw = httpx.post(
        f"{oai.base_url}completions", json={"prompt": "x", "n": 0}, timeout=10
    )  # fmt: skip
    assert raw.status_code == 400 and "n:" in json.loads(raw.text)["error"]["message"]
