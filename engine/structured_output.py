"""Structured outputs: a request's grammar (JSON schema, regex, choice, EBNF, structural tag)
turned into an xgrammar grammar, compiled once per (kind, spec) against the tokenizer, a matcher
per sequence that any worker rebuilds by replaying the tokens already generated (hand-off,
migration and recompute need no state to move), and the token bitmask applied to a batch.

xgrammar is imported on first use: it pulls in transformers, seconds of start-up no plain
request should pay.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from engine.grammar_state import GrammarSpec, GrammarState
from engine.sequence import InvalidRequestError

if TYPE_CHECKING:
    import xgrammar

    from engine.sequence import Sequence
    from engine.tokenizer import Tokenizer


KINDS = ("json_schema", "json_object", "regex", "choice", "grammar", "structural_tag")
COMPILED_CACHE_SIZE = 256  # compiled grammars kept per process, least recently used dropped
# xgrammar's own cache of compiled pieces; bounded, as every request may bring a new schema.
COMPILER_CACHE_BYTES = 256 << 20
# xgrammar prefixes its C++ errors with "[12:39:41] /project/cpp/file.cc:94: ".
_CPP_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")


class InvalidGrammarError(InvalidRequestError):
    """A schema, regex or grammar xgrammar cannot compile (HTTP 400, with its message)."""


@dataclass(frozen=True)
class StructuredOutput:
    kind: str  # one of KINDS
    spec: str  # JSON schema or structural tag as JSON text; regex; EBNF; choices as a JSON list


@functools.lru_cache(maxsize=COMPILED_CACHE_SIZE)
def build_grammar(kind: str, spec: str) -> xgrammar.Grammar:
    """The xgrammar grammar for (kind, spec), independent of any tokenizer: building it is how
    the router validates a request before anything is queued."""
    import xgrammar

    try:
        return _grammar_of(xgrammar, kind, spec)
    except (RuntimeError, ValueError, TypeError) as exc:
        message = _CPP_PREFIX.sub("", str(exc)).strip()
        raise InvalidGrammarError(f"invalid {kind} for structured output: {message}") from exc


def _grammar_of(xgr: Any, kind: str, spec: str) -> xgrammar.Grammar:
    # Compact JSON (", " and ": " between items, no other whitespace): a small model left free
    # to emit whitespace can fill its whole budget with newlines.
    if kind == "json_schema":
        return xgr.Grammar.from_json_schema(spec, any_whitespace=False)
    if kind == "json_object":
        return xgr.Grammar.from_json_schema(
            '{"type": "object"}', any_whitespace=False, strict_mode=False
        )
    if kind == "regex":
        return xgr.Grammar.from_regex(spec)
    if kind == "choice":
        return xgr.Grammar.from_ebnf(choice_ebnf(json.loads(spec)))
    if kind == "grammar":
        return xgr.Grammar.from_ebnf(spec)
    if kind == "structural_tag":
        return xgr.Grammar.from_structural_tag(spec)
    raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")


def choice_ebnf(choices: list[str]) -> str:
    if not choices or not all(isinstance(c, str) for c in choices):
        raise ValueError("choices must be a non-empty list of strings")
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class GrammarCache:
    """Compiles grammars against one tokenizer's vocabulary, caching per (kind, spec)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_token_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size  # the model's logits width, which may pad the vocabulary
        self._stop_token_ids = list(stop_token_ids)
        self._compile = functools.lru_cache(maxsize=COMPILED_CACHE_SIZE)(self._compile_uncached)

    @functools.cached_property
    def _compiler(self) -> xgrammar.GrammarCompiler:
        import xgrammar

        info = tokenizer_info(self._tokenizer, self._vocab_size, self._stop_token_ids)
        return xgrammar.GrammarCompiler(
            info, max_threads=min(8, os.cpu_count() or 1), cache_limit_bytes=COMPILER_CACHE_BYTES
        )

    def _compile_uncached(self, kind: str, spec: str) -> xgrammar.CompiledGrammar:
        return self._compiler.compile_grammar(build_grammar(kind, spec))

    def new_state(self, structured: GrammarSpec) -> GrammarState:
        """A fresh matcher for `structured`; raises InvalidGrammarError if it cannot compile."""
        import xgrammar

        return GrammarState(
            xgrammar.GrammarMatcher(self._compile(structured.kind, structured.spec))
        )


def tokenizer_info(
    tokenizer: Tokenizer, vocab_size: int, stop_token_ids: list[int]
) -> xgrammar.TokenizerInfo:
    """xgrammar's view of our `tokenizers` vocabulary. The encoding (byte-level BPE as in
    SmolLM2 and Llama 3, SentencePiece byte fallback as in Llama 2, or raw) is read from the
    tokenizer.json by xgrammar's own detector, the one its from_huggingface uses."""
    import xgrammar

    backend = tokenizer.backend
    vocab = backend.get_vocab(with_added_tokens=True)
    encoded = [""] * max(vocab_size, max(vocab.values()) + 1)
    for token, index in vocab.items():
        encoded[index] = token
    metadata = xgrammar.TokenizerInfo._detect_metadata_from_hf(backend.to_str())
    return xgrammar.TokenizerInfo(
        encoded[:vocab_size],
        vocab_type=metadata["vocab_type"],
        vocab_size=vocab_size,
        stop_token_ids=stop_token_ids,
        add_prefix_space=metadata["add_prefix_space"],
    )


def mask_logits(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """logits: [rows, vocab] float32, one row per sequence in `seqs`. Sets the logits of tokens
    a row's grammar forbids to -inf, in place, all rows at once; rows without a grammar are
    left as they are, and a batch without any costs one pass over `seqs`."""
    rows = [i for i, seq in enumerate(seqs) if seq.grammar is not None]
    if not rows:
        return
    import xgrammar

    # [batch, vocab / 32]: `indices` picks the same rows of logits and bitmask.
    bitmask = xgrammar.allocate_token_bitmask(len(seqs), logits.shape[-1])
    for i in rows:
        state = seqs[i].grammar
        state.sync(seqs[i].output_token_ids)
        if not state.done:
            state.matcher.fill_next_token_bitmask(bitmask, i)
    xgrammar.apply_token_bitmask_inplace(
        logits, bitmask.to(logits.device, non_blocking=True), indices=rows
    )
