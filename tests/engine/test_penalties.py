"""Logit adjustments and log-probabilities on the tiny model, against references computed here
from the runner's own logits: logit_bias, min_tokens, the three penalties, top logprobs and
prompt logprobs, alone and batched with requests that use none of them.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from engine.batcher import ScheduledBatch
from engine.llm import LLM
from engine.sequence import InvalidRequestError, SamplingParams, Sequence

PROMPT = [5, 9, 33, 120, 7, 5, 9, 33, 200, 201, 17, 5]
EOS = 2


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("tiny", num_blocks=64, block_size=16, max_model_len=256, max_num_seqs=8)


def greedy(max_tokens: int = 12, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **kwargs)


def reference_logits(llm: LLM, tokens: list[int]) -> torch.Tensor:
    """[len(tokens), vocab]: the raw logits after every position, by one fresh prefill."""
    seq = Sequence("reference", tokens, greedy())
    llm.engine.block_manager.allocate(seq, use_prefix_cache=False)
    try:
        with torch.inference_mode():
            hidden, _, _ = llm.engine.runner.forward(ScheduledBatch([(seq, len(tokens))]))
            return llm.engine.runner.model.logits(hidden)
    finally:
        llm.engine.block_manager.free(seq)


def assert_idle(llm: LLM) -> None:
    stats = llm.engine.stats()
    assert stats["num_free_blocks"] == stats["num_blocks"] and not llm.engine.requests


def test_top_logprobs_match_log_softmax(llm: LLM) -> None:
    out = llm.generate([PROMPT], greedy(logprobs=True, top_logprobs=5))[0]
    reference = torch.log_softmax(reference_logits(llm, PROMPT + out.token_ids), -1)
    for i, (token, logprob, top) in enumerate(zip(out.token_ids, out.logprobs, out.top_logprobs)):
        row = reference[len(PROMPT) - 1 + i]
        values, ids = row.topk(5)
        assert [t for t, _ in top] == ids.tolist() and top[0][0] == token
        torch.testing.assert_close(torch.tensor([v for _, v in top]), values, atol=1e-4, rtol=0)
        assert abs(logprob - row[token].item()) < 1e-4
    assert_idle(llm)


def test_prompt_logprobs_match_and_survive_chunks_and_prefix_cache() -> None:
    # Chunks of 8 tokens, and the second request's prompt is in the prefix cache.
    llm = LLM("tiny", num_blocks=64, block_size=4, max_model_len=256, max_num_batched_tokens=8)
    prompt = PROMPT * 2
    params = greedy(2, prompt_logprobs=3)
    first, second = (llm.generate([prompt], params)[0] for _ in range(2))
    reference = torch.log_softmax(reference_logits(llm, prompt), -1)
    assert len(first.prompt_logprobs) == len(prompt) - 1
    for p, (logprob, rank, top) in enumerate(first.prompt_logprobs):
        row, token = reference[p], prompt[p + 1]
        assert abs(logprob - row[token].item()) < 1e-4
        assert rank == int((row > row[token]).sum()) + 1
        assert [t for t, _ in top] == row.topk(3).indices.tolist()
    for (lp1, rank1, top1), (lp2, rank2, top2) in zip(
        first.prompt_logprobs, second.prompt_logprobs
    ):
        assert (
            abs(lp1 - lp2) < 1e-5
            and rank1 == rank2
            and [t for t, _ in top1] == [t for t, _ in top2]
        )
    assert len(second.prompt_logprobs) == len(first.prompt_logprobs)
    assert llm.generate([prompt], greedy(2))[0].prompt_logprobs is None
    assert_idle(llm)


def test_logit_bias_turns_greedy_to_the_runner_up(llm: LLM) -> None:
    logits = reference_logits(llm, PROMPT)[-1]
    best, runner_up = logits.topk(2).indices.tolist()
    out = llm.generate([PROMPT], greedy(1, logit_bias={best: -100}))[0]
    assert out.token_ids == [runner_up]
    lifted = int(logits.argmin())
    assert llm.generate([PROMPT], greedy(1, logit_bias={lifted: 100}))[0].token_ids == [lifted]


def penalized_reference(llm: LLM, steps: int, presence: float, frequency: float, repetition: float):
    """Greedy decoding with the penalties applied by hand to fresh logits at every step."""
    outputs: list[int] = []
    for _ in range(steps):
        logits = reference_logits(llm, PROMPT + outputs)[-1].clone()
        for token in set(PROMPT + outputs):
            value = logits[token]
            logits[token] = value / repetition if value > 0 else value * repetition
        for token, count in Counter(outputs).items():
            logits[token] -= frequency * count + presence
        outputs.append(int(logits.argmax()))
    return outputs


@pytest.mark.parametrize(
    ("presence", "frequency", "repetition"),
    [(0.0, 1.5, 1.0), (1.0, 0.0, 1.0), (0.0, 0.0, 1.8), (0.5, -0.5, 1.2)],
)
def test_penalties_reproduce_reference_loop(llm, presence, frequency, repetition) -> None:
    params = greedy(
        10, presence_penalty=presence, frequency_penalty=frequency, repetition_penalty=repetition
    )
    plain = llm.generate([PROMPT], greedy(10))[0].token_ids
    # Batched with a request that uses none: each gets exactly what it gets alone.
    penalized, unchanged = llm.generate([PROMPT, PROMPT], [params, greedy(10)])
    expected = penalized_reference(llm, 10, presence, frequency, repetition)
    assert penalized.token_ids == expected and expected != plain
    assert unchanged.token_ids == plain
    assert_idle(llm)


def test_min_tokens_bars_eos_and_stop_tokens(llm: LLM) -> None:
    eager = {"temperature": 0, "max_tokens": 12}
    eos_first = SamplingParams(logit_bias={EOS: 100}, **eager)
    assert llm.generate([PROMPT], eos_first)[0].token_ids == [EOS]
    out = llm.generate([PROMPT], SamplingParams(logit_bias={EOS: 100}, min_tokens=5, **eager))[0]
    assert len(out.token_ids) == 6 and out.token_ids[-1] == EOS and EOS not in out.token_ids[:5]
    assert out.finish_reason == "stop"
    stop = SamplingParams(logit_bias={77: 100}, stop_token_ids=[77], min_tokens=3, **eager)
    out = llm.generate([PROMPT], stop)[0]
    assert out.token_ids[-1] == 77 and len(out.token_ids) == 4
    assert_idle(llm)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"presence_penalty": 2.5},
        {"frequency_penalty": -2.1},
        {"repetition_penalty": 0.0},
        {"min_tokens": 20},
        {"logit_bias": {3: 101.0}},
        {"top_logprobs": 21},
        {"prompt_logprobs": -1},
    ],
)
def test_out_of_range_params_are_refused(kwargs) -> None:
    with pytest.raises(InvalidRequestError):
        SamplingParams(max_tokens=16, **kwargs)


def test_logit_bias_outside_the_vocabulary_is_refused(llm: LLM) -> None:
    vocab = llm.engine.model_config.vocab_size
    with pytest.raises(InvalidRequestError, match="logit_bias"):
        llm.generate([PROMPT], greedy(2, logit_bias={vocab: 1.0}))
    assert_idle(llm)
