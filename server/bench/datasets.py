"""Request sets for `adrenaline bench`: fixed-length `random`, ShareGPT-shaped `synthetic`,
OpenThoughts-shaped `reasoning`, and real `sharegpt` conversations. Pure functions of their
arguments and a seed; no network.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# Lognormal shape of ShareGPT-like traffic: the median is exp(mu); sigma sets the long tail.
SYNTHETIC_INPUT_MEDIAN = 200
SYNTHETIC_OUTPUT_MEDIAN = 150
SYNTHETIC_INPUT_SIGMA = 1.0
SYNTHETIC_OUTPUT_SIGMA = 0.8
# Reasoning traffic (the paper's OpenThoughts case: short problems, long chains of thought). Not
# measured from the dataset: a stand-in with outputs ten times the synthetic ones, sized so that
# prompt and output fit Llama-2's 4096-token context.
REASONING_INPUT_MEDIAN = 250
REASONING_OUTPUT_MEDIAN = 1500
REASONING_INPUT_SIGMA = 0.6
REASONING_OUTPUT_SIGMA = 0.6
# (input median, input sigma, output median, output sigma) of each lognormal dataset
SYNTHETIC_SHAPE = (SYNTHETIC_INPUT_MEDIAN, SYNTHETIC_INPUT_SIGMA, SYNTHETIC_OUTPUT_MEDIAN,
                   SYNTHETIC_OUTPUT_SIGMA)  # fmt: skip
REASONING_SHAPE = (REASONING_INPUT_MEDIAN, REASONING_INPUT_SIGMA, REASONING_OUTPUT_MEDIAN,
                   REASONING_OUTPUT_SIGMA)  # fmt: skip


class DatasetError(ValueError):
    """A dataset flag or file the benchmark cannot build requests from."""


@dataclass(frozen=True)
class BenchRequest:
    prompt: str | list[int]  # text, or token ids sent as-is
    prompt_len: int  # exact for token ids, estimated for text without a tokenizer
    output_len: int  # sent as max_tokens


def parse_vocab_range(spec: str) -> tuple[int, int]:
    """'100:300' -> (100, 300), the half-open range of token ids prompts are drawn from."""
    try:
        lo, hi = (int(part) for part in spec.split(":"))
    except ValueError as exc:
        raise DatasetError(f"--vocab-range must look like LO:HI, got {spec!r}") from exc
    if not 0 <= lo < hi:
        raise DatasetError(f"--vocab-range needs 0 <= LO < HI, got {spec!r}")
    return lo, hi


def _token_prompt(rng: np.random.Generator, length: int, vocab: tuple[int, int]) -> list[int]:
    return rng.integers(vocab[0], vocab[1], size=length).tolist()


def random_requests(
    num: int, input_len: int, output_len: int, vocab: tuple[int, int], seed: int
) -> list[BenchRequest]:
    if input_len < 1 or output_len < 1:
        raise DatasetError("--random-input-len and --random-output-len must be >= 1")
    rng = np.random.default_rng(seed)
    return [
        BenchRequest(_token_prompt(rng, input_len, vocab), input_len, output_len)
        for _ in range(num)
    ]


def lognormal_lengths(
    rng: np.random.Generator, num: int, median: float, sigma: float, lo: int, hi: int
) -> list[int]:
    draws = rng.lognormal(mean=np.log(median), sigma=sigma, size=num)
    return np.clip(np.rint(draws), lo, hi).astype(int).tolist()


def synthetic_requests(
    num: int, max_input_len: int, max_output_len: int, vocab: tuple[int, int], seed: int
) -> list[BenchRequest]:
    """ShareGPT-shaped lengths without the file: lognormal inputs in [4, max_input_len] and
    outputs in [1, max_output_len], prompts as random token ids."""
    return lognormal_requests(num, max_input_len, max_output_len, vocab, seed, SYNTHETIC_SHAPE)


def reasoning_requests(
    num: int, max_input_len: int, max_output_len: int, vocab: tuple[int, int], seed: int
) -> list[BenchRequest]:
    """OpenThoughts-shaped lengths: short lognormal inputs, long outputs, clipped alike."""
    return lognormal_requests(num, max_input_len, max_output_len, vocab, seed, REASONING_SHAPE)


def lognormal_requests(
    num: int,
    max_input_len: int,
    max_output_len: int,
    vocab: tuple[int, int],
    seed: int,
    shape: tuple[float, float, float, float],  # input median, sigma, output median, sigma
) -> list[BenchRequest]:
    rng = np.random.default_rng(seed)
    inputs, outputs = lognormal_request_lengths(rng, num, max_input_len, max_output_len, shape)
    return [
        BenchRequest(_token_prompt(rng, n_in, vocab), n_in, n_out)
        for n_in, n_out in zip(inputs, outputs)
    ]


def lognormal_request_lengths(
    rng: np.random.Generator,
    num: int,
    max_input_len: int,
    max_output_len: int,
    shape: tuple[float, float, float, float],
) -> tuple[list[int], list[int]]:
    """lognormal_requests' (prompt lengths, output lengths), drawn before its prompts from the
    same generator: `simulate` draws these alone."""
    if max_input_len < 4 or max_output_len < 1:
        raise DatasetError("--max-input-len must be >= 4 and --max-output-len >= 1")
    in_median, in_sigma, out_median, out_sigma = shape
    inputs = lognormal_lengths(rng, num, in_median, in_sigma, 4, max_input_len)
    outputs = lognormal_lengths(rng, num, out_median, out_sigma, 1, max_output_len)
    return inputs, outputs


def estimate_tokens(text: str) -> int:
    """About four characters a token for English under BPE tokenizers."""
    return len(text) // 4


def tokenizer_counter(path: str) -> Callable[[str], int]:
    """Token counter from a tokenizer.json (or an HF directory holding one)."""
    from tokenizers import Tokenizer

    file = Path(path)
    if file.is_dir():
        file = file / "tokenizer.json"
    if not file.is_file():
        raise DatasetError(f"--tokenizer: no tokenizer.json at {path}")
    tok = Tokenizer.from_file(str(file))
    return lambda text: len(tok.encode(text, add_special_tokens=False).ids)


def _first_turns(conv: dict) -> tuple[str, str] | None:
    turns = conv.get("conversations") or []
    human = next((t.get("value") for t in turns if t.get("from") == "human"), None)
    gpt = next((t.get("value") for t in turns if t.get("from") == "gpt"), None)
    if not human or not gpt:
        return None
    return human, gpt


def sharegpt_requests(
    path: str,
    num: int,
    max_input_len: int,
    max_output_len: int,
    seed: int,
    count_tokens: Callable[[str], int] = estimate_tokens,
) -> list[BenchRequest]:
    """First human turn as the prompt, the first gpt reply's length as max_tokens.

    Conversations with an empty turn or a prompt over max_input_len are skipped; outputs are
    clipped to max_output_len. A file with fewer usable conversations than `num` is cycled."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(f"--dataset-path {path}: {exc}") from exc
    if not isinstance(data, list):
        raise DatasetError(f"--dataset-path {path}: expected a JSON list of conversations")
    usable: list[BenchRequest] = []
    for conv in data:
        turns = _first_turns(conv) if isinstance(conv, dict) else None
        if turns is None:
            continue
        prompt_len, output_len = count_tokens(turns[0]), count_tokens(turns[1])
        if prompt_len < 1 or output_len < 1 or prompt_len > max_input_len:
            continue
        usable.append(BenchRequest(turns[0], prompt_len, min(output_len, max_output_len)))
    if not usable:
        raise DatasetError(f"--dataset-path {path}: no usable human/gpt conversation")
    order = np.random.default_rng(seed).permutation(len(usable))
    if len(usable) < num:
        log.warning("bench: %s has %d usable conversations, cycling for %d", path, len(usable), num)
    return [usable[order[i % len(usable)]] for i in range(num)]
