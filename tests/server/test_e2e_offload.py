"""Attention disaggregation end to end: prefill, decode, attention executor and router as real
processes. Offloaded decoding must give exactly the tokens local decoding gives (the offline
engine), in mixed batches, on the tiny Llama and on a Qwen2 built with transformers; pools
drain back to full; a killed executor ends its requests, not the server."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time

import httpx
import pytest
import torch

from engine.llm import LLM
from engine.model_source import resolve_model
from engine.sequence import SamplingParams
from tests.server.deployment import Deployment

PROMPTS = [f"prompt number {i} " * (1 + i % 5) for i in range(12)]
MAX_TOKENS = [6 + (i * 7) % 23 for i in range(12)]


def deploy(policy: str, *extra: str) -> Deployment:
    return Deployment(
        "--offload-policy", policy, "--num-kv-blocks", "256", "--offload-blocks", "256", *extra
    )


@pytest.fixture(scope="module")
def always():
    d = deploy("always")
    yield d
    d.stop()


@pytest.fixture(scope="module")
def half():
    d = deploy("ratio:0.5", "--heartbeat-timeout", "2")
    yield d
    d.stop()


@pytest.fixture(scope="module")
def offline() -> LLM:
    return LLM("tiny", num_blocks=256)


def expected(llm: LLM, prompts=PROMPTS, max_tokens=MAX_TOKENS) -> list[list[int]]:
    return [
        llm.generate([p], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))[0].token_ids
        for p, n in zip(prompts, max_tokens)
    ]


async def concurrent_generate(url: str, prompts, max_tokens, stagger_s: float = 0.02):
    """Staggered starts and different lengths: requests join and leave the batch at different
    steps, so offloaded and local rows mix in ever-changing batches."""

    async def one(client: httpx.AsyncClient, i: int) -> list[int]:
        await asyncio.sleep(i * stagger_s)
        body = {"max_tokens": max_tokens[i], "temperature": 0, "ignore_eos": True}
        if isinstance(prompts[i], str):
            body["prompt"] = prompts[i]
        else:
            body["prompt_token_ids"] = prompts[i]
        resp = await client.post(f"{url}/generate", json=body)
        assert resp.status_code == 200, resp.text
        return resp.json()["token_ids"]

    async with httpx.AsyncClient(timeout=120) as client:
        return await asyncio.gather(*(one(client, i) for i in range(len(prompts))))


@pytest.mark.parametrize("name", ["always", "half"])
def test_offloaded_tokens_equal_local_tokens_in_mixed_batches(name, offline, request):
    deployment: Deployment = request.getfixturevalue(name)
    before = deployment.stats()["requests"]["offloaded"]
    got = asyncio.run(concurrent_generate(deployment.url, PROMPTS, MAX_TOKENS))
    assert got == expected(offline)
    stats = deployment.wait_idle()
    offloaded = stats["requests"]["offloaded"] - before
    assert offloaded == (len(PROMPTS) if name == "always" else len(PROMPTS) // 2)
    executor = stats["workers"]["attention-0"]
    assert executor["requests_total"] >= offloaded
    assert executor["num_free_blocks"] == executor["num_blocks"]


def test_aborted_offloaded_requests_free_executor_and_decode_blocks(always):
    async def run() -> None:
        async with httpx.AsyncClient(timeout=60) as client:

            async def cut(i: int) -> None:
                body = {"prompt": f"abort me {i}", "max_tokens": 800, "stream": True,
                        "ignore_eos": True}  # fmt: skip
                async with client.stream("POST", f"{always.url}/generate", json=body) as resp:
                    lines = resp.aiter_lines()
                    for _ in range(3):
                        await anext(lines)

            await asyncio.gather(*(cut(i) for i in range(4)))

    before = always.stats()["requests"]["aborted"]
    asyncio.run(run())
    stats = always.wait_idle()
    assert stats["requests"]["aborted"] == before + 4
    assert (
        stats["workers"]["attention-0"]["num_free_blocks"]
        == stats["workers"]["attention-0"]["num_blocks"]
    )


def test_sigkill_of_the_executor_its_requests_recompute_locally_tokens_unchanged(half, offline):
    """Runs last on this deployment: it leaves the executor dead. The decode worker notices
    within its layer timeout, prefills the offloaded requests again itself and goes on: no
    error, no hang, and the same greedy tokens."""
    victim = half.stats()["workers"]["attention-0"]["pid"]
    prompts = [f"survivor {i} " * (1 + i) for i in range(6)]
    lengths = [600] * 6

    async def run() -> list[list[int]]:
        task = asyncio.create_task(concurrent_generate(half.url, prompts, lengths, 0.0))
        # The kill waits until some requests decode offloaded, so it lands mid-stream however
        # fast the machine decodes.
        async with httpx.AsyncClient(timeout=5) as client:
            while (await client.get(f"{half.url}/stats")).json()["requests"]["offloaded_now"] < 1:
                assert not task.done(), "the requests finished before any was offloaded"
                await asyncio.sleep(0.02)
        os.kill(victim, signal.SIGKILL)
        return await asyncio.wait_for(task, timeout=90)

    started = time.monotonic()
    got = asyncio.run(run())
    assert time.monotonic() - started < 90
    assert got == expected(offline, prompts, lengths)
    stats = half.wait_idle()
    assert not stats["workers"]["attention-0"]["alive"]
    assert stats["workers"]["decode-0"]["num_reclaimed"] >= 1
    assert stats["requests"]["failed"] == 0
    # New requests are served locally: the policy skips a dead executor.
    resp = httpx.post(f"{half.url}/generate", timeout=60,
                      json={"prompt": "after", "max_tokens": 5, "ignore_eos": True})  # fmt: skip
    assert resp.status_code == 200 and len(resp.json()["token_ids"]) == 5


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    """A random Qwen2 (q/k/v biases, grouped-query attention) saved by transformers."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen2Config(
        vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rope_theta=10000.0, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    out = tmp_path_factory.mktemp("qwen2")
    model.save_pretrained(out, safe_serialization=True)
    tiny = resolve_model("tiny")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / name, out / name)
    return out


@pytest.mark.parametrize("policy, offloaded", [("none", 0), ("ratio:0.5", 3), ("always", 6)])
def test_qwen2_tokens_are_the_same_under_every_policy(qwen2_dir, policy, offloaded):
    prompts = [[5 + i, 40, 41, 42 + i] * (2 + i) for i in range(6)]
    max_tokens = [12, 5, 20, 9, 16, 7]
    offline = LLM(str(qwen2_dir), num_blocks=64, max_model_len=512)
    want = expected(offline, prompts, max_tokens)
    d = Deployment(
        "--offload-policy", policy, "--num-kv-blocks", "64", "--offload-blocks", "64",
        "--max-model-len", "512", model=str(qwen2_dir),
    )  # fmt: skip
    try:
        assert asyncio.run(concurrent_generate(d.url, prompts, max_tokens)) == want
        assert d.wait_idle()["requests"]["offloaded"] == offloaded
    finally:
        d.stop()


def test_one_decode_worker_offloads_to_two_executors_at_once(offline):
    """Two prefill workers, each with its executor; one decode worker's batch holds offloaded
    rows of both executors in the same steps."""
    d = deploy("always", "--num-prefill", "2")
    try:
        got = asyncio.run(concurrent_generate(d.url, PROMPTS, MAX_TOKENS, stagger_s=0.0))
        assert got == expected(offline)
        stats = d.wait_idle()
        served = [stats["workers"][f"attention-{i}"]["requests_total"] for i in range(2)]
        assert all(n > 0 for n in served) and sum(served) == len(PROMPTS), served
    finally:
        d.stop()
