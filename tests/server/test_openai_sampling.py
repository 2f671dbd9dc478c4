"""Penalties, logit_bias, min_tokens and log-probabilities through a real deployment and the
official `openai` client, offloaded (`--offload-policy always`) and local (`none`): every
request crosses the prefill -> decode hand-off, and what comes back must be what a direct
computation over the offline engine's logits predicts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import httpx
import openai
import pytest
import torch

from engine.batcher import ScheduledBatch
from engine.llm import LLM
from engine.sequence import SamplingParams, Sequence
from tests.server.deployment import Deployment

PROMPT = [5, 9, 33, 120, 7, 5, 9, 33, 200, 201, 17, 5]
EOS, VOCAB = 2, 384


@pytest.fixture(scope="module", params=["always", "none"])
def deployment(request) -> Iterator[Deployment]:
    d = Deployment("--offload-policy", request.param, "--num-kv-blocks", "128",
                   "--offload-blocks", "128")  # fmt: skip
    yield d
    d.stop()


@pytest.fixture(scope="module")
def oai(deployment: Deployment) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{deployment.url}/v1", api_key="x", max_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def offline() -> LLM:
    return LLM("tiny", num_blocks=64, max_model_len=256)


def log_softmax_after(llm: LLM, tokens: list[int]) -> torch.Tensor:
    """[len(tokens), vocab]: the offline engine's log-distribution after every position."""
    seq = Sequence("reference", tokens, SamplingParams(temperature=0))
    llm.engine.block_manager.allocate(seq, use_prefix_cache=False)
    try:
        with torch.inference_mode():
            hidden, _, _ = llm.engine.runner.forward(ScheduledBatch([(seq, len(tokens))]))
            return torch.log_softmax(llm.engine.runner.model.logits(hidden), -1)
    finally:
        llm.engine.block_manager.free(seq)


def text(llm: LLM, token: int) -> str:
    return llm.tokenizer.decode([token], skip_special_tokens=False)


def complete(oai: openai.OpenAI, **kwargs):
    return oai.completions.create(model="tiny", prompt=PROMPT, temperature=0, **kwargs)


def test_top_logprobs_match_the_offline_logits(oai, offline) -> None:
    choice = complete(oai, max_tokens=5, logprobs=5, extra_body={"ignore_eos": True}).choices[0]
    expected = offline.generate([PROMPT], SamplingParams(max_tokens=5, temperature=0,
                                                          ignore_eos=True))[0]  # fmt: skip
    assert choice.logprobs.tokens == [text(offline, t) for t in expected.token_ids]
    reference = log_softmax_after(offline, PROMPT + expected.token_ids)
    for i, (token, alternatives) in enumerate(
        zip(expected.token_ids, choice.logprobs.top_logprobs)
    ):
        row = reference[len(PROMPT) - 1 + i]
        assert choice.logprobs.token_logprobs[i] == pytest.approx(row[token].item(), abs=1e-4)
        # Keyed by text, so tokens that decode alike (byte pieces) share a key: the best stays.
        best = {}
        for t in [*row.topk(5).indices.tolist(), token]:
            best.setdefault(text(offline, t), row[t].item())
        assert alternatives == pytest.approx(best, abs=1e-4)


def test_chat_top_logprobs_match_the_offline_logits(oai, offline) -> None:
    messages = [{"role": "user", "content": "Hi there"}]
    rendered = offline.tokenizer.apply_chat_template(messages)
    prompt = offline.tokenizer.encode(rendered, add_special_tokens=False)
    answer = oai.chat.completions.create(model="tiny", messages=messages, max_tokens=4,
                                         temperature=0, logprobs=True, top_logprobs=5)  # fmt: skip
    entries = answer.choices[0].logprobs.content
    reference = log_softmax_after(offline, prompt + [0] * len(entries))
    outputs = []
    for i, entry in enumerate(entries):
        # Each position's reference needs the tokens actually sampled before it.
        row = log_softmax_after(offline, prompt + outputs)[-1] if i else reference[len(prompt) - 1]
        values, ids = row.topk(5)
        assert [t.token for t in entry.top_logprobs] == [text(offline, t) for t in ids.tolist()]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(values.tolist(), abs=1e-4)
        outputs.append(ids[0].item())
        assert entry.token == text(offline, outputs[-1])


def test_chat_top_logprobs_stream_like_the_answer(oai, offline) -> None:
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": "Hi there"}],
                  max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)  # fmt: skip
    whole = oai.chat.completions.create(**kwargs).choices[0].logprobs.content
    streamed = [
        entry
        for chunk in oai.chat.completions.create(stream=True, **kwargs)
        if chunk.choices and chunk.choices[0].logprobs
        for entry in chunk.choices[0].logprobs.content
    ]
    assert [e.token for e in streamed] == [e.token for e in whole] and len(whole) >= 1
    for a, b in zip(streamed, whole):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5) and len(a.top_logprobs) == 3
        assert [t.token for t in a.top_logprobs] == [t.token for t in b.top_logprobs]
        assert b.top_logprobs[0].logprob >= b.top_logprobs[1].logprob >= b.top_logprobs[2].logprob


def test_echo_and_prompt_logprobs(oai, offline) -> None:
    choice = complete(oai, max_tokens=2, logprobs=2, echo=True,
                      extra_body={"prompt_logprobs": 1, "ignore_eos": True}).choices[0]  # fmt: skip
    prompt_text = offline.tokenizer.decode(PROMPT)
    assert choice.text.startswith(prompt_text) and len(choice.text) > len(prompt_text)
    lp = choice.logprobs
    assert len(lp.tokens) == len(PROMPT) + 2 and lp.token_logprobs[0] is None
    assert lp.text_offset[: len(PROMPT) + 1] == [
        sum(len(text(offline, t)) for t in PROMPT[:i]) for i in range(len(PROMPT))
    ] + [len(prompt_text)]
    reference = log_softmax_after(offline, PROMPT)
    predicted = [reference[p, PROMPT[p + 1]].item() for p in range(len(PROMPT) - 1)]
    assert lp.token_logprobs[1 : len(PROMPT)] == pytest.approx(predicted, abs=1e-4)
    prompt_logprobs = choice.model_extra["prompt_logprobs"]
    assert prompt_logprobs[0] is None and len(prompt_logprobs) == len(PROMPT)
    for p, entry in enumerate(prompt_logprobs[1:]):
        own = entry[str(PROMPT[p + 1])]
        assert own["logprob"] == pytest.approx(predicted[p], abs=1e-4)
        assert own["rank"] == int((reference[p] > reference[p, PROMPT[p + 1]]).sum()) + 1


def test_logit_bias_turns_greedy_to_the_runner_up(oai, offline) -> None:
    best, runner_up = log_softmax_after(offline, PROMPT)[-1].topk(2).indices.tolist()
    assert complete(oai, max_tokens=1).choices[0].text == text(offline, best)
    biased = complete(oai, max_tokens=1, logit_bias={str(best): -100})
    assert biased.choices[0].text == text(offline, runner_up)


def test_penalties_follow_the_reference_loop(oai, offline) -> None:
    frequency, presence, steps = 1.5, 0.5, 8
    outputs: list[int] = []
    for _ in range(steps):  # greedy over penalized offline logits, by hand
        logits = log_softmax_after(offline, PROMPT + outputs)[-1].clone()
        for token, count in Counter(outputs).items():
            logits[token] -= frequency * count + presence
        outputs.append(int(logits.argmax()))
    plain = complete(oai, max_tokens=steps, extra_body={"ignore_eos": True}).choices[0]
    penalized = complete(oai, max_tokens=steps, frequency_penalty=frequency,
                         presence_penalty=presence, extra_body={"ignore_eos": True})  # fmt: skip
    assert penalized.choices[0].text == offline.tokenizer.decode(outputs) != plain.text


def test_min_tokens_holds_off_eos(oai) -> None:
    eos_first = complete(oai, max_tokens=10, logit_bias={str(EOS): 100})
    assert eos_first.usage.completion_tokens == 1
    held = complete(oai, max_tokens=10, logit_bias={str(EOS): 100}, extra_body={"min_tokens": 4})
    assert held.usage.completion_tokens == 5 and held.choices[0].finish_reason == "stop"


def test_generate_reports_alternatives(deployment) -> None:
    body = {"prompt_token_ids": PROMPT, "max_tokens": 3, "temperature": 0, "ignore_eos": True,
            "logprobs": True, "top_logprobs": 2, "prompt_logprobs": 0}  # fmt: skip
    answer = httpx.post(f"{deployment.url}/generate", json=body, timeout=30).json()
    assert len(answer["top_logprobs"]) == 3 and all(len(t) == 2 for t in answer["top_logprobs"])
    assert answer["top_logprobs"][0][0][0] == answer["token_ids"][0]
    assert answer["prompt_logprobs"][0] is None and len(answer["prompt_logprobs"]) == len(PROMPT)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"logprobs": 21},
        {"logit_bias": {str(VOCAB): 1}},
        {"logit_bias": {"not-a-token": 1}},
        {"presence_penalty": 3},
        {"frequency_penalty": -2.5},
        {"extra_body": {"repetition_penalty": 0}},
        {"extra_body": {"min_tokens": 9}},
    ],
)
def test_bad_input_is_a_400_and_leaves_nothing(oai, deployment, kwargs) -> None:
    with pytest.raises(openai.BadRequestError):
        complete(oai, max_tokens=8, **kwargs)
    deployment.wait_idle()


def test_chat_top_logprobs_above_20_is_a_400(oai, deployment) -> None:
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                    logprobs=True, top_logprobs=21)  # fmt: skip
    assert deployment.wait_idle()["requests"]["active"] == 0
