"""The engine loop on the built-in tiny model: finishing rules (stop strings, stop tokens, length,
EOS), seeded sampling across batches, abort, request validation, logprobs and load errors.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engine.batcher import ScheduledBatch
from engine.engine import LLMEngine
from engine.llm import LLM
from engine.model_source import ModelNotFoundError, resolve_model
from engine.sequence import InvalidRequestError, SamplingParams, Sequence
from engine.weights import WeightLoadError

PROMPT = "What is the capital of France?"
OTHER_PROMPTS = ["Hello, world!", "The quick brown fox", "Once upon a time"]


@pytest.fixture
def llm() -> LLM:
    return LLM("tiny", num_blocks=64, block_size=16, max_model_len=256, max_num_seqs=8)


def greedy(max_tokens: int = 24, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, **kwargs)


def assert_idle(llm: LLM) -> None:
    stats = llm.engine.stats()
    assert stats["num_free_blocks"] == stats["num_blocks"]
    assert stats["num_running"] == stats["num_waiting"] == 0
    assert not llm.engine.requests


def stream(engine: LLMEngine, request_id: str) -> list:
    """Steps the engine to the end, returning every output of `request_id` in order."""
    outputs = []
    while engine.has_unfinished():
        outputs.extend(o for o in engine.step() if o.request_id == request_id)
    return outputs


def ascii_window(text: str, start: int = 3) -> int:
    """Index of the first 2-character printable ASCII window at or after `start`."""
    for i in range(start, len(text) - 1):
        if all(c.isascii() and c.isprintable() for c in text[i : i + 2]):
            return i
    raise AssertionError(f"no ASCII window in {text!r}")


def test_max_tokens_finishes_with_length(llm: LLM) -> None:
    out = llm.generate(PROMPT, greedy(7, ignore_eos=True))[0]
    assert len(out.token_ids) == 7
    assert out.finish_reason == "length"
    assert out.finished
    assert out.text == llm.tokenizer.decode(out.token_ids)
    assert_idle(llm)


def test_stop_string_cuts_text(llm: LLM) -> None:
    full = llm.generate(PROMPT, greedy(ignore_eos=True))[0]
    at = ascii_window(full.text)
    stop = full.text[at : at + 2]
    first = full.text.find(stop)
    out = llm.generate(PROMPT, greedy(ignore_eos=True, stop=[stop, "never-generated"]))[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[:first]
    assert stop not in out.text
    assert out.token_ids == full.token_ids[: len(out.token_ids)]
    assert len(out.token_ids) < len(full.token_ids)
    assert_idle(llm)


def test_stop_string_spanning_two_tokens(llm: LLM) -> None:
    full = llm.generate(PROMPT, greedy(ignore_eos=True))[0]
    decode = llm.tokenizer.decode
    boundaries = [len(decode(full.token_ids[:k])) for k in range(1, len(full.token_ids))]
    at = next(
        b
        for b in boundaries
        if b >= 1 and full.text[b - 1 : b + 1].isascii() and full.text[b - 1 : b + 1].isprintable()
    )
    stop = full.text[at - 1 : at + 1]  # last character of one token, first of the next
    out = llm.generate(PROMPT, greedy(ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[: full.text.find(stop)]


def test_streamed_text_never_shows_the_stop_string(llm: LLM) -> None:
    full = llm.generate(PROMPT, greedy(ignore_eos=True))[0]
    at = ascii_window(full.text)
    stop = full.text[at : at + 2]
    prompt_ids = llm.tokenizer.encode(PROMPT)
    llm.engine.add_request("s", prompt_ids, greedy(ignore_eos=True, stop=[stop]))
    outputs = stream(llm.engine, "s")
    streamed = "".join(o.new_text for o in outputs)
    assert streamed == outputs[-1].text == full.text[: full.text.find(stop)]
    assert [t for o in outputs for t in o.new_token_ids] == outputs[-1].token_ids
    assert [o.finished for o in outputs] == [False] * (len(outputs) - 1) + [True]


def test_stop_token_ids(llm: LLM) -> None:
    full = llm.generate(PROMPT, greedy(ignore_eos=True))[0]
    stop_token = full.token_ids[3]
    first = full.token_ids.index(stop_token)
    out = llm.generate(PROMPT, greedy(ignore_eos=True, stop_token_ids=[stop_token]))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == full.token_ids[: first + 1]  # the stop token is kept, as in vLLM
    assert_idle(llm)


def test_eos_stops_unless_ignored(llm: LLM) -> None:
    full = llm.generate(PROMPT, greedy(ignore_eos=True))[0]
    # Random weights never pick the real EOS; make a token they do pick the model's EOS.
    eos = full.token_ids[2]
    first = full.token_ids.index(eos)
    cfg = llm.engine.model_config
    llm.engine.model_config = replace(cfg, eos_token_ids=(*cfg.eos_token_ids, eos))
    stopped = llm.generate(PROMPT, greedy())[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == full.token_ids[: first + 1]
    ignored = llm.generate(PROMPT, greedy(ignore_eos=True))[0]
    assert ignored.finish_reason == "length"
    assert ignored.token_ids == full.token_ids
    assert_idle(llm)


def test_max_model_len_finishes_with_length() -> None:
    llm = LLM("tiny", num_blocks=4, block_size=16, max_model_len=20)
    out = llm.generate([[5] * 17], greedy(50, ignore_eos=True))[0]
    assert out.finish_reason == "length"
    assert len(out.token_ids) == 3  # 17 + 3 = max_model_len
    assert_idle(llm)


def test_greedy_is_batch_invariant(llm: LLM) -> None:
    alone = llm.generate(PROMPT, greedy(16, ignore_eos=True))[0]
    batched = llm.generate([*OTHER_PROMPTS, PROMPT], greedy(16, ignore_eos=True))
    assert batched[-1].token_ids == alone.token_ids
    assert_idle(llm)


def test_seeded_sampling_alone_and_batched() -> None:
    # Without prefix caching the second run recomputes the prompt exactly as the first did.
    llm = LLM("tiny", num_blocks=64, max_model_len=256, enable_prefix_caching=False)
    seeded = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.95, seed=1234)
    alone = llm.generate(PROMPT, seeded)[0]
    mates = [
        SamplingParams(max_tokens=5, temperature=1.0),  # finishes early, changing the batch
        SamplingParams(max_tokens=20, temperature=0.8, seed=7),
        SamplingParams(max_tokens=16, temperature=0),
    ]
    batched = llm.generate([*OTHER_PROMPTS, PROMPT], [*mates, seeded])
    assert batched[-1].token_ids == alone.token_ids
    reseeded = replace(seeded, seed=1235)
    assert llm.generate(PROMPT, reseeded)[0].token_ids != alone.token_ids
    assert_idle(llm)


def test_unseeded_requests_differ() -> None:
    llm = LLM("tiny", num_blocks=64, max_model_len=256)
    params = SamplingParams(max_tokens=16, temperature=1.0)
    first, second = llm.generate([PROMPT, PROMPT], params)
    assert first.token_ids != second.token_ids


def test_abort_mid_generation_frees_blocks(llm: LLM) -> None:
    engine = llm.engine
    prompt_ids = llm.tokenizer.encode(PROMPT)
    engine.add_request("a", prompt_ids, greedy(100, ignore_eos=True))
    engine.add_request("b", prompt_ids + [5] * 40, greedy(100, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.stats()["num_free_blocks"] < engine.stats()["num_blocks"]
    assert engine.abort("a")
    assert not engine.abort("a")  # already gone
    assert "a" not in engine.requests
    outputs = [o for _ in range(2) for o in engine.step()]
    assert {o.request_id for o in outputs} == {"b"}
    assert engine.abort("b")
    assert not engine.has_unfinished()
    assert_idle(llm)


def test_abort_waiting_request() -> None:
    llm = LLM("tiny", num_blocks=64, max_model_len=256, max_num_seqs=1)
    engine = llm.engine
    engine.add_request("run", [5, 6, 7], greedy(50))
    engine.add_request("wait", [8, 9, 10], greedy(50))
    engine.step()
    assert engine.stats()["num_waiting"] == 1
    assert engine.abort("wait")
    assert engine.abort("run")
    assert_idle(llm)


def test_invalid_requests(llm: LLM) -> None:
    engine = llm.engine
    vocab = engine.model_config.vocab_size
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request("empty", [], greedy())
    with pytest.raises(InvalidRequestError, match="context"):
        engine.add_request("long", [5] * engine.max_model_len, greedy())
    with pytest.raises(InvalidRequestError, match=r"\[0, "):
        engine.add_request("oov", [5, vocab], greedy())
    with pytest.raises(InvalidRequestError):
        engine.add_request("negative", [-1, 5], greedy())
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    params = greedy()
    params.max_tokens = 0  # mutated after construction: caught when the request is added
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        engine.add_request("zero", [5, 6], params)
    for bad in (dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-2), dict(min_p=1.5)):
        with pytest.raises(InvalidRequestError):
            SamplingParams(**bad)
    with pytest.raises(InvalidRequestError, match="stop"):
        SamplingParams(stop=[""])
    engine.add_request("dup", [5, 6], greedy(2))
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request("dup", [5, 6], greedy(2))
    with pytest.raises(InvalidRequestError):
        llm.generate([[]], greedy())
    # Nothing rejected was queued; only "dup" runs.
    finished = [o.request_id for o in stream(engine, "dup") if o.finished]
    assert finished == ["dup"]
    assert_idle(llm)


def test_logprobs_match_log_softmax() -> None:
    # No prefix caching: the check below recomputes every position of the finished sequence.
    llm = LLM("tiny", num_blocks=64, max_model_len=256, enable_prefix_caching=False)
    prompt_ids = llm.tokenizer.encode(PROMPT)
    out = llm.generate([prompt_ids], greedy(8, ignore_eos=True, logprobs=True))[0]
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids) == 8
    assert all(lp <= 0 for lp in out.logprobs)
    # Recompute every position in one prefill and compare.
    tokens = prompt_ids + out.token_ids
    seq = Sequence("check", tokens, greedy())
    llm.engine.block_manager.allocate(seq)
    with torch.inference_mode():
        hidden, _, _ = llm.engine.runner.forward(ScheduledBatch(entries=[(seq, len(tokens))]))
        logits = llm.engine.runner.model.logits(hidden)
    llm.engine.block_manager.free(seq)
    positions = torch.arange(len(prompt_ids) - 1, len(tokens) - 1)
    reference = torch.log_softmax(logits[positions], -1)
    reference = reference.gather(1, torch.tensor(out.token_ids)[:, None]).squeeze(1)
    torch.testing.assert_close(torch.tensor(out.logprobs), reference, atol=1e-4, rtol=0)
    no_logprobs = llm.generate([prompt_ids], greedy(4))[0]
    assert no_logprobs.logprobs is None
    assert_idle(llm)


def test_sampled_logprobs_length() -> None:
    llm = LLM("tiny", num_blocks=64, max_model_len=256)
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=3, logprobs=True)
    out = llm.generate(PROMPT, params)[0]
    assert len(out.logprobs) == len(out.token_ids) == 6
    assert all(lp <= 0 for lp in out.logprobs)


def test_missing_model_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="not found"):
        LLM(str(tmp_path / "no-such-model"))
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        LLM(str(tmp_path))


def test_missing_weights_is_a_clear_error(tmp_path: Path) -> None:
    tiny = resolve_model("tiny")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / name, tmp_path / name)
    with pytest.raises(WeightLoadError, match="safetensors"):
        LLM(str(tmp_path), num_blocks=64, max_model_len=256)
    config = json.loads((tiny / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported architecture"):
        LLM(str(tmp_path))


def test_unknown_option_is_rejected() -> None:
    with pytest.raises(TypeError, match="unknown engine option"):
        LLM("tiny", num_blockz=4)


def test_dummy_load_format_runs() -> None:
    llm = LLM("tiny", load_format="dummy", num_blocks=32, max_model_len=256)
    outs = llm.generate([PROMPT, *OTHER_PROMPTS], greedy(5, ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [5] * 4
    assert all(o.finish_reason == "length" for o in outs)
    real = LLM("tiny", num_blocks=32, max_model_len=256)
    assert real.generate(PROMPT, greedy(5, ignore_eos=True))[0].token_ids != outs[0].token_ids
    assert_idle(llm)


def test_chat_uses_template(llm: LLM) -> None:
    out = llm.chat([{"role": "user", "content": "Hi"}], greedy(4, ignore_eos=True))
    template = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert template.endswith("<|im_start|>assistant\n")
    assert out.prompt_token_ids == llm.tokenizer.encode(template, add_special_tokens=False)
    assert len(out.token_ids) == 4


def test_rejected_batch_queues_nothing(llm: LLM) -> None:
    with pytest.raises(InvalidRequestError):
        llm.generate([[5, 6], []], greedy(4))
    assert_idle(llm)
