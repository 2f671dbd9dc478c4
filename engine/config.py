"""Frozen configuration objects, built once from CLI flags or the offline API and passed down.

`ModelConfig` mirrors the fields of a Hugging Face Llama-family config.json that the model needs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}

# Names map to torch attribute names, resolved in parse_dtype, so that importing the config
# (as `adrenaline simulate` and `bench` do) does not import torch.
DTYPES = {
    "float32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "float16": "float16",
    "half": "float16",
}


class ConfigError(ValueError):
    """A configuration the engine cannot run, with a message the user can act on."""


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    import torch

    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ConfigError(f"unsupported dtype {name!r}; choose one of {sorted(set(DTYPES))}")
    return getattr(torch, DTYPES[name])


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    rope_scaling: dict | None = None
    sliding_window: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None

    @classmethod
    def from_hf_dict(cls, cfg: dict) -> ModelConfig:
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ConfigError(
                f"unsupported architecture {archs or cfg.get('model_type')!r}; "
                f"supported: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        num_heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        rope = cfg.get("rope_parameters") or {}  # transformers >= 5 nests theta and scaling here
        return cls(
            architecture=SUPPORTED_ARCHITECTURES[arch],
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or hidden // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=cfg.get("rope_theta") or rope.get("rope_theta", 10000.0),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # Qwen2 always carries q/k/v biases; Llama may via attention_bias.
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(cfg.get("attention_bias", False)),
            rope_scaling=cfg.get("rope_scaling") or rope or None,
            sliding_window=cfg.get("sliding_window")
            if cfg.get("use_sliding_window", True)
            else None,
            eos_token_ids=eos_ids,
            bos_token_id=cfg.get("bos_token_id"),
        )

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> ModelConfig:
        model_dir = Path(model_dir)
        path = model_dir / "config.json"
        if not path.is_file():
            raise ConfigError(
                f"{model_dir} has no config.json; is it a Hugging Face model directory?"
            )
        cfg = cls.from_hf_dict(json.loads(path.read_text()))
        gen_path = model_dir / "generation_config.json"
        if gen_path.is_file():
            eos = json.loads(gen_path.read_text()).get("eos_token_id")
            if eos is not None:
                ids = tuple(eos) if isinstance(eos, list) else (eos,)
                cfg = replace(cfg, eos_token_ids=tuple(dict.fromkeys(ids + cfg.eos_token_ids)))
        return cfg


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    # Either an explicit block count, or derived from memory at start-up (see runner).
    num_blocks: int | None = None
    gpu_memory_utilization: float = 0.85
    cpu_kv_cache_gib: float = 1.0
    enable_prefix_caching: bool = True


@dataclass(frozen=True)
class BatchConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True


@dataclass(frozen=True)
class EngineConfig:
    model: str = "tiny"
    load_format: str = "auto"  # auto | safetensors | dummy
    dtype: str = "float32"
    device: str = "cpu"
    attention_backend: str = "auto"  # auto | torch | triton | flash_attn
    seed: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    # On CUDA, decode steps replay graphs captured per batch-size bucket unless enforce_eager.
    enforce_eager: bool = False
    # Pads decode steps to a graph's bucket even without graphs (CPU, enforce_eager): the same
    # bookkeeping a replay needs, run eagerly. Off by default: padding rows cost compute there.
    pad_decode: bool = False
