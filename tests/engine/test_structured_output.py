"""Structured outputs on the offline engine (tiny model): constrained outputs parse and follow
their grammar; the bitmask leaves rows without a grammar as they were; a matcher rebuilt after
a hand-off or a migration continues exactly as one that never moved; bad grammars are refused."""

from __future__ import annotations

import json
import re

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models

from engine.engine import Resume
from engine.llm import LLM
from engine.sequence import SamplingParams, Sequence
from engine.structured_output import InvalidGrammarError, StructuredOutput, mask_logits
from engine.tokenizer import Tokenizer
from tests.engine.test_handoff import run_disaggregated

SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "tag": {"enum": ["red", "green"]},
    },
    "required": ["ok", "n", "tag"],
}
JSON_SCHEMA = StructuredOutput("json_schema", json.dumps(SCHEMA))
PROMPTS = [[5, 9, 33, 120, 7], list(range(40, 77)), [300, 301, 302] * 7]
SEEDED = dict(temperature=0.9, seed=11)


@pytest.fixture(scope="module")
def engines() -> tuple[LLM, LLM]:
    kwargs = dict(num_blocks=64, block_size=16, max_model_len=256, max_num_seqs=8)
    return LLM("tiny", **kwargs), LLM("tiny", **kwargs)


def follows_schema(value) -> bool:
    return (
        isinstance(value, dict)
        and set(value) == {"ok", "n", "tag"}
        and isinstance(value["ok"], bool)
        and type(value["n"]) is int
        and 0 <= value["n"] <= 99
        and value["tag"] in ("red", "green")
    )


def generate(llm: LLM, structured: StructuredOutput, max_tokens: int = 60, **kw):
    params = SamplingParams(max_tokens=max_tokens, structured=structured, **kw)
    return llm.generate(PROMPTS, params)


@pytest.mark.parametrize("sampling", [dict(temperature=0), SEEDED])
def test_json_schema_output_follows_the_schema(engines, sampling):
    for out in generate(engines[0], JSON_SCHEMA, **sampling):
        assert out.finish_reason == "stop", out.text
        assert follows_schema(json.loads(out.text)), out.text


def test_choice_regex_and_json_object(engines):
    llm = engines[0]
    choices = ["yes", "no way", "maybe"]
    choice = StructuredOutput("choice", json.dumps(choices))
    assert all(o.text in choices for o in generate(llm, choice, **SEEDED))
    pattern = r"[a-c]{3}-[0-9]{1,3}"
    for out in generate(llm, StructuredOutput("regex", pattern), **SEEDED):
        assert out.finish_reason == "stop" and re.fullmatch(pattern, out.text), out.text
    # Any object: a random model rarely closes one, but every prefix it writes is one's start.
    for out in generate(llm, StructuredOutput("json_object", ""), max_tokens=8, temperature=0):
        assert out.text.startswith("{"), out.text


def test_rows_without_a_grammar_are_untouched(engines):
    engine = engines[0].engine
    seqs = [Sequence(f"s{i}", [1, 2, 3], SamplingParams()) for i in range(3)]
    for i in (0, 2):
        seqs[i].grammar = engine.grammars.new_state(JSON_SCHEMA)
    logits = torch.randn(3, engine.model_config.vocab_size)
    before = logits.clone()
    mask_logits(logits, seqs)
    assert torch.equal(logits[1], before[1])
    for i in (0, 2):
        allowed = torch.isfinite(logits[i])
        # Only "{" may open the object; what is allowed keeps its logit.
        assert engine.tokenizer.decode(allowed.nonzero().flatten().tolist()) == "{"
        assert torch.equal(logits[i][allowed], before[i][allowed])


def test_handoff_and_migration_continue_the_grammar(engines):
    prefill, decode = engines
    params = SamplingParams(max_tokens=60, structured=JSON_SCHEMA, **SEEDED)
    prompts = PROMPTS[:2]
    whole = [o.token_ids for o in prefill.generate(prompts, params)]
    # The decode worker replays the first token through a fresh matcher.
    assert run_disaggregated(prefill, decode, prompts, params) == whole
    # A migrated request replays all it generated before, then samples what it would have.
    engine = decode.engine
    for i, (prompt, tokens) in enumerate(zip(prompts, whole)):
        moved = SamplingParams(**vars(params))
        engine.add_request(
            f"m{i}", prompt, moved, resume=Resume(tokens[: len(tokens) // 2], None, 0)
        )
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    for i, tokens in enumerate(whole):
        assert done[f"m{i}"].token_ids == tokens
        assert follows_schema(json.loads(done[f"m{i}"].text))


@pytest.mark.parametrize(
    "kind, spec, message",
    [
        ("json_schema", '{"type": "bogus"}', "Unsupported type"),
        ("regex", "a(b", "parenthesis"),
        ("grammar", "root ::= undefined_rule", "not defined"),
        ("choice", "[]", "non-empty"),
    ],
)
def test_bad_grammar_is_refused_before_queueing(engines, kind, spec, message):
    engine = engines[0].engine
    with pytest.raises(InvalidGrammarError, match=message):
        params = SamplingParams(structured=StructuredOutput(kind, spec))
        engine.add_request("bad", [1, 2, 3], params)
    assert not engine.has_unfinished() and "bad" not in engine.requests


def test_vocabulary_encoding_is_detected(engines, tmp_path):
    from engine.structured_output import tokenizer_info

    tiny = engines[0].engine
    info = tokenizer_info(tiny.tokenizer, tiny.model_config.vocab_size, [0])
    assert info.vocab_type.name == "BYTE_LEVEL"
    # Llama-2 style: SentencePiece pieces with "▁" for a space and <0x..> byte tokens.
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<0x0A>": 3, "▁a": 4, "b": 5}
    spm = HFTokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    spm.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    spm.save(str(tmp_path / "tokenizer.json"))
    info = tokenizer_info(Tokenizer(tmp_path), 6, [2])
    assert info.vocab_type.name == "BYTE_FALLBACK"
