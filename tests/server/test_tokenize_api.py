"""vLLM's small endpoints and options: /tokenize, /detokenize and /version over the tiny
tokenizer (in process), then a real deployment with an API key and `--chat-template
hermes-tools`: /ping and /version open, /tokenize behind the key, tools rendered by the template,
and `stream_options.continuous_usage_stats` putting usage on every streamed chunk.
"""

from __future__ import annotations

import json
import time
from importlib.metadata import version

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from engine.model_source import resolve_model
from engine.tokenizer import ChatTemplateError, Tokenizer, load_chat_template
from server.api.app import install_error_handlers
from server.api.tokenize_routes import tokenize_routes
from server.launch.flags import FlagError, check_chat_template
from tests.server.deployment import Deployment

PROMPT = "Hello world, how are you?"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
KEY = "tokenize-test-key"


class Backend:
    model_name = "tiny-test"
    max_model_len = 256

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer


@pytest.fixture(scope="module")
def tiny_dir(adrenaline_cache):
    return resolve_model("tiny", adrenaline_cache)


@pytest.fixture(scope="module")
def client(tiny_dir) -> TestClient:
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(tokenize_routes(Backend(Tokenizer(tiny_dir))))
    return TestClient(app)


def test_tokenize_a_prompt_and_back(client: TestClient, tiny_dir) -> None:
    tok = Tokenizer(tiny_dir)
    resp = client.post("/tokenize", json={"model": "tiny-test", "prompt": PROMPT})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body == {"count": len(tok.encode(PROMPT)), "max_model_len": 256,
                    "tokens": tok.encode(PROMPT)}  # fmt: skip
    plain = client.post("/tokenize", json={"prompt": PROMPT, "add_special_tokens": False}).json()
    assert plain["tokens"] == tok.encode(PROMPT, add_special_tokens=False)
    strs = client.post("/tokenize", json={"prompt": PROMPT, "return_token_strs": True}).json()
    assert strs["token_strs"] == [tok.id_to_token(t) for t in body["tokens"]]
    back = client.post("/detokenize", json={"model": "tiny-test", "tokens": plain["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": PROMPT}


def test_tokenize_messages_through_the_chat_template(client: TestClient, tiny_dir) -> None:
    tok = Tokenizer(tiny_dir)
    resp = client.post("/tokenize", json={"messages": MESSAGES})
    assert resp.status_code == 200, resp.text
    rendered = tok.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert resp.json()["tokens"] == tok.encode(rendered, add_special_tokens=False)
    # The model continues the last message: the text stops right after its content.
    partial = [*MESSAGES, {"role": "assistant", "content": "The answer is"}]
    cont = client.post("/tokenize", json={"messages": partial, "continue_final_message": True})
    assert cont.status_code == 200, cont.text
    text = client.post("/detokenize", json={"tokens": cont.json()["tokens"]}).json()["prompt"]
    assert text.endswith("The answer is") and PROMPT in text


@pytest.mark.parametrize(
    "path, body, status",
    [
        ("/tokenize", {"model": "other", "prompt": "x"}, 404),
        ("/detokenize", {"model": "other", "tokens": [1]}, 404),
        ("/tokenize", {"prompt": 5}, 400),
        ("/tokenize", {"prompt": "x", "add_special_tokens": "yes"}, 400),
        ("/tokenize", {"prompt": "x", "chat_template_kwargs": {}}, 400),
        ("/tokenize", {"messages": []}, 400),
        (
            "/tokenize",
            {"messages": MESSAGES, "add_generation_prompt": True, "continue_final_message": True},
            400,
        ),  # fmt: skip
        ("/tokenize", ["not", "an", "object"], 400),
        ("/detokenize", {"tokens": [10**9]}, 400),
        ("/detokenize", {"tokens": [-1]}, 400),
        ("/detokenize", {"tokens": "1 2 3"}, 400),
        ("/detokenize", {"tokens": [1.5]}, 400),
    ],
)
def test_bad_input_is_a_4xx_naming_the_field(client: TestClient, path, body, status) -> None:
    resp = client.post(path, content=json.dumps(body))
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["message"]


def test_out_of_vocabulary_token_names_its_index(client: TestClient, tiny_dir) -> None:
    vocab = Tokenizer(tiny_dir).vocab_size
    resp = client.post("/detokenize", json={"tokens": [1, vocab]})
    assert resp.status_code == 400
    assert f"tokens.1: token id {vocab}" in resp.json()["error"]["message"]


def test_version(client: TestClient) -> None:
    assert client.get("/version").json() == {"version": version("adrenaline")}


def test_chat_template_flag_takes_a_builtin_name_or_a_file(tmp_path) -> None:
    assert "<tools>" in load_chat_template("hermes-tools")
    good = tmp_path / "t.jinja"
    good.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert load_chat_template(str(good)) == good.read_text()
    broken = tmp_path / "broken.jinja"
    broken.write_text("line one\n{% for m in messages %}{{ m.content }}")
    with pytest.raises(FlagError, match=r"--chat-template: .*broken.jinja: line 2"):
        check_chat_template(str(broken))
    with pytest.raises(ChatTemplateError, match="built-in name: hermes-tools"):
        load_chat_template("no-such-template")


@pytest.fixture(scope="module")
def deployment():
    d = Deployment("--api-key", KEY, "--chat-template", "hermes-tools", "--num-kv-blocks", "128",
                   "--offload-blocks", "64", "--torch-threads", "1")  # fmt: skip
    try:
        yield d
    finally:
        d.stop()


def test_open_probes_and_keyed_tokenizer(deployment: Deployment) -> None:
    for method in ("GET", "POST"):
        assert httpx.request(method, f"{deployment.url}/ping").status_code == 200
    assert httpx.get(f"{deployment.url}/version").json() == {"version": version("adrenaline")}
    for path, body in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1]})):
        assert httpx.post(f"{deployment.url}{path}", json=body).status_code == 401


def keyed(deployment: Deployment, path: str, body: dict) -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEY}"}
    return httpx.post(f"{deployment.url}{path}", json=body, headers=headers, timeout=60)


def test_chat_template_flag_renders_tools(deployment: Deployment, tiny_dir) -> None:
    resp = keyed(deployment, "/tokenize", {"messages": MESSAGES, "tools": TOOLS})
    assert resp.status_code == 200, resp.text
    tok = Tokenizer(tiny_dir, chat_template=load_chat_template("hermes-tools"))
    rendered = tok.apply_chat_template(MESSAGES, tools=TOOLS)
    assert resp.json()["tokens"] == tok.encode(rendered, add_special_tokens=False)
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in rendered
    without = keyed(deployment, "/tokenize", {"messages": MESSAGES}).json()["tokens"]
    assert "<tools>" not in tok.decode(without, skip_special_tokens=False)


def streamed_usage(deployment: Deployment, path: str, body: dict) -> list[dict | None]:
    usages = []
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{deployment.url}{path}", json=body, headers=headers,
                      timeout=60) as resp:  # fmt: skip
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                usages.append(json.loads(line[6:]).get("usage"))
    return usages


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_continuous_usage_stats_on_every_chunk(deployment: Deployment, path: str) -> None:
    max_tokens = 6
    prompt = {"prompt": PROMPT} if path == "/v1/completions" else {"messages": MESSAGES}
    tokenized = keyed(deployment, "/tokenize", prompt).json()["count"]
    body = {**prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}  # fmt: skip
    options = {"include_usage": True, "continuous_usage_stats": True}
    usages = streamed_usage(deployment, path, {**body, "stream_options": options})
    assert len(usages) > 1 and all(u is not None for u in usages)
    # The totals so far, chunk by chunk (a delta may hold several tokens).
    done = [u["completion_tokens"] for u in usages]
    assert done == sorted(done) and done[-1] == max_tokens
    if path == "/v1/chat/completions":
        assert done[0] == 0  # the role chunk, before any token
    assert {u["prompt_tokens"] for u in usages} == {tokenized}
    assert all(u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] for u in usages)
    # include_usage alone: only the last chunk carries it.
    last_only = streamed_usage(
        deployment, path, {**body, "stream_options": {"include_usage": True}}
    )
    assert (
        all(u is None for u in last_only[:-1]) and last_only[-1]["completion_tokens"] == max_tokens
    )
    assert_idle(deployment)


def assert_idle(deployment: Deployment, timeout: float = 10.0) -> None:
    """No request left active and every live worker's KV pool full again (/stats, keyed)."""
    start = time.monotonic()
    while True:
        stats = httpx.get(f"{deployment.url}/stats", headers={"Authorization": f"Bearer {KEY}"})
        waited = time.monotonic() - start
        workers = [w for w in stats.json()["workers"].values() if w["alive"]]
        # Only heartbeats sent after this call began count: older ones predate the load.
        idle = stats.json()["requests"]["active"] == 0 and all(
            w["seconds_since_heartbeat"] < waited and w["num_free_blocks"] == w["num_blocks"]
            for w in workers
        )
        if idle:
            return
        assert waited < timeout, f"not idle after {timeout}s: {stats.json()}"
        time.sleep(0.2)
