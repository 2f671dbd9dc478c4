"""The tokenizer half of GGUF import: a byte-level BPE `tokenizers.Tokenizer` and its
tokenizer_config.json, rebuilt from the file's vocabulary, merges, token types and specials.
"""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

# llama.cpp's pre-tokenizer names whose split differs from GPT-2's regex; the rest use GPT-2's.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_PRE_TOKENIZERS = ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3")

TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4


def byte_level_vocab(tokens: list[str]) -> dict[str, int]:
    # A token spelled outside the byte alphabet (a mislabelled added token) is respelled, as
    # transformers does, so that every vocabulary entry is reachable by byte-level BPE.
    byte_map = bytes_to_unicode()
    alphabet = set(byte_map.values())
    return {
        token if set(token) <= alphabet else "".join(byte_map[b] for b in token.encode()): index
        for index, token in enumerate(tokens)
    }


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1))
    printable += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def pre_tokenizer(pre_type: str | None) -> pre_tokenizers.PreTokenizer:
    """Split text the way the vocabulary's merges were learned (llama.cpp's `tokenizer.ggml.pre`)."""
    if pre_type in LLAMA3_PRE_TOKENIZERS:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if pre_type == "smollm":
        # SmolLM's own tokenizer.json splits digits one by one before GPT-2's regex.
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def added_tokens(meta: dict[str, Any]) -> list[AddedToken]:
    """Control tokens (special) and user-defined tokens, which must never be split by BPE."""
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [TOKEN_TYPE_NORMAL] * len(tokens)
    alphabet = set(bytes_to_unicode().values())
    added = []
    for token, token_type in zip(tokens, types, strict=True):
        if token_type == TOKEN_TYPE_CONTROL and set(token) <= alphabet:
            added.append(AddedToken(token, normalized=False, special=True))
        elif token_type == TOKEN_TYPE_USER_DEFINED:
            added.append(AddedToken(token, normalized=False, special=False))
    return added


def build_tokenizer(meta: dict[str, Any]) -> Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` from the file's vocabulary and merges."""
    merges = [tuple(merge.split(" ", 1)) for merge in meta.get("tokenizer.ggml.merges") or []]
    model = BPE(
        vocab=byte_level_vocab(meta["tokenizer.ggml.tokens"]),
        merges=merges,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
    )
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizer(meta.get("tokenizer.ggml.pre"))
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = post_processor(meta)
    tokenizer.add_special_tokens([t for t in added_tokens(meta) if t.special])
    tokenizer.add_tokens([t for t in added_tokens(meta) if not t.special])
    return tokenizer


def post_processor(meta: dict[str, Any]) -> processors.PostProcessor:
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    if not meta.get("tokenizer.ggml.add_bos_token") or bos_id is None:
        return processors.ByteLevel(trim_offsets=False)
    bos = meta["tokenizer.ggml.tokens"][bos_id]
    return processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, int(bos_id))]
    )


def token_string(meta: dict[str, Any], key: str) -> str | None:
    token_id = meta.get(f"tokenizer.ggml.{key}")
    return None if token_id is None else meta["tokenizer.ggml.tokens"][token_id]


def tokenizer_config(meta: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token_string(meta, "bos_token_id"),
        "eos_token": token_string(meta, "eos_token_id"),
        "unk_token": token_string(meta, "unknown_token_id"),
        "pad_token": token_string(meta, "padding_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    if "tokenizer.chat_template" in meta:
        result["chat_template"] = meta["tokenizer.chat_template"]
    return result
