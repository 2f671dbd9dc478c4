"""Incremental detokenization gives what a full re-decode of the output gives, byte for byte, at
every step: over multi-byte UTF-8 (emoji, CJK, accents) cut at token boundaries, invalid byte
runs, special tokens, requests continued from outputs made elsewhere, and stop strings that
straddle tokens (through the engine's own finishing and streaming code).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from engine.llm import LLM
from engine.model_source import resolve_model
from engine.sequence import SamplingParams, Sequence, SequenceStatus
from engine.tokenizer import Tokenizer, detokenize, partial_stop_len

TEXTS = [
    "héllo wörld, ça va? naïve café",
    "世界你好，日本語のテキストです。한국어",
    "party 🎉 family 👩‍👩‍👧 flag 🇫🇷 ok 👍🏽!",
    "mixed: x² ≤ y³ — “quotes” ‘and’ … €100 ¥200",
]
PROMPT = [5, 6, 7]


@pytest.fixture(scope="module", params=["tiny", "smollm2"])
def tokenizer(request, adrenaline_cache: Path) -> Tokenizer:
    return Tokenizer(resolve_model(request.param, adrenaline_cache))


def token_sequences(tokenizer: Tokenizer, count: int, seed: int) -> list[list[int]]:
    """Encodings of multi-byte text, and random mixes of their tokens (cutting characters
    anywhere, leaving invalid byte runs) with random ids and special tokens."""
    encoded = [tokenizer.encode(t, add_special_tokens=False) for t in TEXTS]
    pool = sorted({t for ids in encoded for t in ids})
    rng = random.Random(seed)
    sequences = list(encoded)
    for _ in range(count):
        ids = [rng.choice(pool) for _ in range(rng.randint(1, 60))]
        for _ in range(rng.randint(0, 4)):
            ids.insert(rng.randrange(len(ids) + 1), rng.randrange(tokenizer.vocab_size))
        sequences.append(ids)
    return sequences


def test_every_step_equals_a_full_decode(tokenizer: Tokenizer) -> None:
    for outputs in token_sequences(tokenizer, 300, seed=0):
        seq = Sequence("r", PROMPT, SamplingParams())
        for n, token in enumerate(outputs, 1):
            seq.append_token(token, None)
            detokenize(tokenizer, seq)
            assert seq.text == tokenizer.decode(outputs[:n]), (outputs, n)


def test_a_continued_request_picks_up_mid_character(tokenizer: Tokenizer) -> None:
    # As engine._continue_from leaves it: outputs made elsewhere, their full decode, offsets 0.
    for outputs in token_sequences(tokenizer, 40, seed=1):
        for cut in range(1, len(outputs)):
            seq = Sequence("r", PROMPT + outputs[:cut], SamplingParams(), num_prompt_tokens=3)
            seq.text = tokenizer.decode(outputs[:cut])
            for n in range(cut + 1, len(outputs) + 1):
                seq.append_token(outputs[n - 1], None)
                detokenize(tokenizer, seq)
                assert seq.text == tokenizer.decode(outputs[:n])


def test_the_decode_window_stays_short(tokenizer: Tokenizer) -> None:
    text = " ".join(TEXTS) * 20
    outputs = tokenizer.encode(text, add_special_tokens=False)
    seq = Sequence("r", PROMPT, SamplingParams())
    widest = 0
    for token in outputs:
        seq.append_token(token, None)
        detokenize(tokenizer, seq)
        widest = max(widest, seq.num_output_tokens - seq.prefix_offset)
    assert seq.text == text
    assert widest <= 12  # a few tokens of context, never the whole output


def reference_stream(tokenizer, outputs, stops) -> tuple[list[str], str, int]:
    """Full re-decode every step, stop strings searched over the whole text: the streamed
    pieces, the final text and how many tokens were generated."""
    sent, pieces = 0, []
    for n in range(1, len(outputs) + 1):
        text = tokenizer.decode(outputs[:n])
        hits = [i for i in (text.find(s) for s in stops) if i != -1]
        finished = bool(hits) or n == len(outputs)
        text = text[: min(hits)] if hits else text
        visible = len(text)
        if not finished:
            visible -= 1 if text.endswith("\ufffd") else 0
            visible -= partial_stop_len(text[:visible], stops)
        visible = max(visible, sent)
        pieces.append(text[sent:visible])
        sent = visible
        if finished:
            return pieces, text, n
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def engine():
    return LLM("tiny", num_blocks=16, max_model_len=256).engine


def engine_stream(engine, tokenizer, outputs, stops) -> tuple[list[str], str, int]:
    engine.tokenizer = tokenizer
    params = SamplingParams(max_tokens=len(outputs), stop=stops, ignore_eos=True)
    seq = Sequence("r", PROMPT, params, status=SequenceStatus.RUNNING)
    engine.batcher.running.append(seq)
    pieces = []
    for token in outputs:
        seq.append_token(token, None)
        engine._check_finished(seq)
        out = engine._output(seq)
        pieces.append(out.new_text)
        if out.finished:
            return pieces, out.text, len(out.token_ids)
    raise AssertionError("never finished")


def test_stop_strings_across_tokens_as_a_full_decode_finds_them(engine, tokenizer) -> None:
    rng = random.Random(2)
    for outputs in token_sequences(tokenizer, 120, seed=3):
        full = tokenizer.decode(outputs)
        stops = ["\u2603 never"]
        for _ in range(rng.randint(1, 3)):
            start = rng.randrange(max(1, len(full)))
            stop = full[start : start + rng.randint(1, 4)].replace("\ufffd", "")
            if stop:
                stops.append(stop)
        expected = reference_stream(tokenizer, outputs, stops)
        assert engine_stream(engine, tokenizer, outputs, stops) == expected, (outputs, stops)
    assert not engine.batcher.running
