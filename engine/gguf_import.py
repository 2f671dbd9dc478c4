"""Convert a llama-architecture GGUF file into a Hugging Face-format model directory.

The engine only loads HF layouts; this dequantizes the GGUF's tensors to float32 under HF names,
undoes llama.cpp's rotary permutation of q/k, and rebuilds config, tokenizer and chat template.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer

from engine.gguf_tokenizer import build_tokenizer, tokenizer_config

SUPPORTED_ARCHITECTURES = ("llama",)
SUPPORTED_TOKENIZERS = ("gpt2",)

# GGUF names of the non-layer tensors, and of the per-layer ones after `blk.N.`.
GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_TENSORS = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
LAYER_NAME = re.compile(r"^blk\.(\d+)\.(.+)$")


class GGUFImportError(ValueError):
    """A GGUF file this importer cannot convert, with a message the user can act on."""


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> Path:
    """Write `out_dir` as an HF Llama directory equivalent to `gguf_path`; returns `out_dir`.

    The directory appears atomically (written aside, then renamed). If `out_dir` already holds a
    finished conversion, e.g. from a concurrent first use, that one is kept and ours discarded.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = open_reader(gguf_path)
    meta = read_metadata(reader)
    check_supported(meta, gguf_path)
    config = build_config(meta, {t.name for t in reader.tensors})
    state_dict = hf_state_dict(reader, config)
    tokenizer = build_tokenizer(meta)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
    try:
        write_hf_dir(tmp, config, state_dict, tokenizer, meta)
        publish(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def open_reader(gguf_path: Path) -> gguf.GGUFReader:
    if not gguf_path.is_file():
        raise GGUFImportError(f"GGUF file not found: {gguf_path}")
    try:
        return gguf.GGUFReader(gguf_path)
    except Exception as exc:  # the reader raises bare ValueError/struct errors on bad files
        raise GGUFImportError(f"{gguf_path} is not a readable GGUF file: {exc}") from exc


def read_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """All key/value fields as Python values (strings, numbers, lists)."""
    return {key: field.contents() for key, field in reader.fields.items()}


def check_supported(meta: dict[str, Any], gguf_path: Path) -> None:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFImportError(
            f"{gguf_path.name}: architecture {arch!r} is not supported; "
            f"supported: {list(SUPPORTED_ARCHITECTURES)}"
        )
    tokenizer_model = meta.get("tokenizer.ggml.model")
    if tokenizer_model not in SUPPORTED_TOKENIZERS:
        raise GGUFImportError(
            f"{gguf_path.name}: tokenizer model {tokenizer_model!r} is not supported; "
            f"supported: {list(SUPPORTED_TOKENIZERS)} (byte-level BPE)"
        )


def float32_value(value: float) -> float:
    # GGUF stores these as float32; its shortest spelling gives back e.g. 1e-05, not 9.9999997e-06.
    return float(str(np.float32(value)))


def build_config(meta: dict[str, Any], tensor_names: set[str]) -> dict[str, Any]:
    """The HF `config.json` of a llama GGUF."""
    arch = meta["general.architecture"]

    def key(name: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{name}", default)

    num_heads = int(key("attention.head_count"))
    hidden_size = int(key("embedding_length"))
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(key("vocab_size", len(meta["tokenizer.ggml.tokens"]))),
        "hidden_size": hidden_size,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(key("attention.head_count_kv", num_heads)),
        "head_dim": int(
            key("attention.key_length", key("rope.dimension_count", hidden_size // num_heads))
        ),
        "rms_norm_eps": float32_value(key("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float32_value(key("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(key("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    for name in ("bos", "eos", "padding"):
        token_id = meta.get(f"tokenizer.ggml.{name}_token_id")
        if token_id is not None:
            config[f"{'pad' if name == 'padding' else name}_token_id"] = int(token_id)
    return config


def hf_name(gguf_name: str) -> str:
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    match = LAYER_NAME.match(gguf_name)
    if match and match.group(2) in LAYER_TENSORS:
        return f"model.layers.{match.group(1)}.{LAYER_TENSORS[match.group(2)]}"
    raise GGUFImportError(
        f"tensor {gguf_name!r} has no Llama equivalent (rope scaling tensors, biases and "
        "fused projections are not supported)"
    )


def dequantize(tensor: Any) -> np.ndarray:
    """float32 array in numpy (HF) order; ggml lists dims fastest-first, so the shape is reversed."""
    qtype = gguf.GGMLQuantizationType(tensor.tensor_type)
    try:
        weights = gguf.quants.dequantize(tensor.data, qtype)
    except NotImplementedError as exc:
        raise GGUFImportError(
            f"tensor {tensor.name!r}: quant type {qtype.name} is not supported"
        ) from exc
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    return np.ascontiguousarray(weights.reshape(shape), dtype=np.float32)


def unpermute_rotary(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation, which interleaves each head's two rotary halves.

    weights: [num_heads * head_dim, hidden_size]
    """
    half = weights.shape[0] // num_heads // 2
    split = weights.reshape(num_heads, half, 2, *weights.shape[1:])
    return np.ascontiguousarray(split.swapaxes(1, 2).reshape(weights.shape))


def hf_state_dict(reader: gguf.GGUFReader, config: dict[str, Any]) -> dict[str, np.ndarray]:
    state_dict = {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        weights = dequantize(tensor)
        if name.endswith("q_proj.weight"):
            weights = unpermute_rotary(weights, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            weights = unpermute_rotary(weights, config["num_key_value_heads"])
        state_dict[name] = weights
    if "model.embed_tokens.weight" not in state_dict:
        raise GGUFImportError("GGUF file has no token_embd.weight tensor")
    return state_dict


def generation_config(meta: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    # Chat models often end a turn with a separate end-of-turn token; stop on both.
    stop_ids = [config.get("eos_token_id"), meta.get("tokenizer.ggml.eot_token_id")]
    stop_ids = list(dict.fromkeys(int(i) for i in stop_ids if i is not None))
    result: dict[str, Any] = {"eos_token_id": stop_ids[0] if len(stop_ids) == 1 else stop_ids}
    if "bos_token_id" in config:
        result["bos_token_id"] = config["bos_token_id"]
    return result


def write_hf_dir(
    path: Path,
    config: dict[str, Any],
    state_dict: dict[str, np.ndarray],
    tokenizer: Tokenizer,
    meta: dict[str, Any],
) -> None:
    write_json(path / "config.json", config)
    write_json(path / "generation_config.json", generation_config(meta, config))
    write_json(path / "tokenizer_config.json", tokenizer_config(meta, config))
    tokenizer.save(str(path / "tokenizer.json"))
    save_file(state_dict, str(path / "model.safetensors"), metadata={"format": "pt"})
    for file in path.iterdir():
        file.chmod(0o644)  # safetensors writes 0600; a shared cache must be readable by all


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def publish(tmp: Path, out_dir: Path) -> None:
    """Move the finished directory into place; a concurrent winner's complete copy is kept."""
    if (out_dir / "config.json").is_file():
        return
    try:
        os.rename(tmp, out_dir)  # atomic; replaces out_dir only if it is an empty directory
    except OSError as exc:
        if (out_dir / "config.json").is_file():
            return
        raise GGUFImportError(
            f"cannot write the converted model to {out_dir}: it exists and is not a converted "
            "model directory; remove it and retry"
        ) from exc
