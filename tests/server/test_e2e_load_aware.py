"""The default load-aware policy end to end: whichever requests it offloads, greedy tokens equal
the offline engine's; with a profile that makes the executor look free, it does offload."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from engine.llm import LLM
from engine.sequence import SamplingParams
from scheduler.cost_model import CostModel, builtin_profile
from tests.server.deployment import Deployment

PROMPTS = [f"prompt number {i} " * (1 + i % 5) for i in range(10)]
MAX_TOKENS = [6 + (i * 7) % 23 for i in range(10)]


@pytest.fixture(scope="module")
def offline() -> LLM:
    return LLM("tiny", num_blocks=256)


async def generate_all(url: str) -> list[list[int]]:
    async def one(client: httpx.AsyncClient, i: int) -> list[int]:
        await asyncio.sleep(i * 0.02)
        body = {"prompt": PROMPTS[i], "max_tokens": MAX_TOKENS[i], "temperature": 0,
                "ignore_eos": True}  # fmt: skip
        resp = await client.post(f"{url}/generate", json=body)
        assert resp.status_code == 200, resp.text
        return resp.json()["token_ids"]

    async with httpx.AsyncClient(timeout=120) as client:
        return await asyncio.gather(*(one(client, i) for i in range(len(PROMPTS))))


@pytest.mark.parametrize("profile", ["builtin", "free-executor"])
def test_load_aware_keeps_greedy_tokens_identical(profile, offline, tmp_path):
    flags = ["--offload-policy", "load-aware", "--num-kv-blocks", "256", "--offload-blocks", "256"]
    if profile == "free-executor":
        path = tmp_path / "profile.json"
        CostModel(**{**builtin_profile().__dict__, "attention": (0.0, 0.0, 0.0)}).save(path)
        flags += ["--profile", str(path)]
    expected = [
        offline.generate([p], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))[0]
        .token_ids
        for p, n in zip(PROMPTS, MAX_TOKENS)
    ]  # fmt: skip
    d = Deployment(*flags)
    try:
        assert asyncio.run(generate_all(d.url)) == expected
        stats = d.wait_idle()
        assert stats["offload_policy"] == "load-aware"
        if profile == "free-executor":
            assert stats["requests"]["offloaded"] > 0
    finally:
        d.stop()
