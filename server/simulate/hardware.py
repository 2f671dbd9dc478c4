"""What a simulated deployment runs: a model's shapes (a preset name or a Hugging Face
config.json, no weights) and a GPU's data-sheet limits. Efficiencies fitted to measurements
live in server/simulate/roofline.py; a CPU is described by an `adrenaline profile` instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from engine.config import ModelConfig

GIB = 1 << 30


class HardwareError(ValueError):
    """A model or device the simulator cannot describe, with what to pass instead."""


def _llama(layers, hidden, ffn, heads, kv_heads, vocab, max_len, tie=False, **extra) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "num_hidden_layers": layers,
        "hidden_size": hidden, "intermediate_size": ffn, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": max_len,
        "tie_word_embeddings": tie, **extra,
    }  # fmt: skip


# The public configs' shapes (Hugging Face hub config.json of each model).
MODEL_PRESETS = {
    "llama-2-7b": _llama(32, 4096, 11008, 32, 32, 32000, 4096),
    "llama-2-13b": _llama(40, 5120, 13824, 40, 40, 32000, 4096),
    "llama-2-70b": _llama(80, 8192, 28672, 64, 8, 32000, 4096),
    "llama-3-8b": _llama(32, 4096, 14336, 32, 8, 128256, 8192, rope_theta=500000.0),
    "smollm2": _llama(30, 576, 1536, 9, 3, 49152, 8192, tie=True, head_dim=64),
}
TINY_CONFIG = Path(__file__).resolve().parents[2] / "engine" / "builtin" / "tiny" / "config.json"


def model_config(name: str) -> ModelConfig:
    """A preset (see MODEL_PRESETS, and `tiny`), an HF directory or its config.json."""
    if name == "tiny":
        return ModelConfig.from_hf_dict(json.loads(TINY_CONFIG.read_text()))
    if name in MODEL_PRESETS:
        return ModelConfig.from_hf_dict(MODEL_PRESETS[name])
    path = Path(name)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        presets = ", ".join([*MODEL_PRESETS, "tiny"])
        raise HardwareError(f"--model {name}: not a preset ({presets}) nor an HF config.json")
    try:
        return ModelConfig.from_hf_dict(json.loads(path.read_text()))
    except (KeyError, ValueError) as exc:
        raise HardwareError(f"--model {name}: {path} is not a usable config ({exc})") from exc


@dataclass(frozen=True)
class ModelShape:
    """Per-layer matrix shapes and byte counts of a Llama-family model."""

    num_layers: int
    hidden: int
    ffn: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int
    dtype_bytes: int
    tied_embeddings: bool = False

    @classmethod
    def of(cls, cfg: ModelConfig, dtype_bytes: int) -> ModelShape:
        return cls(cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads,
                   cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size, dtype_bytes,
                   cfg.tie_word_embeddings)  # fmt: skip

    @property
    def q_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    def gemms(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each matrix of a layer, as Vidur names the operators."""
        return {
            "attn_pre_proj": (self.hidden, self.q_width + 2 * self.kv_width),
            "attn_post_proj": (self.q_width, self.hidden),
            "mlp_up_proj": (self.hidden, 2 * self.ffn),  # gate and up, fused
            "mlp_down_proj": (self.ffn, self.hidden),
        }

    @property
    def weight_bytes(self) -> int:
        per_layer = sum(i * o for i, o in self.gemms().values()) + 2 * self.hidden
        embeddings = (1 if self.tied_embeddings else 2) * self.vocab * self.hidden
        return (self.num_layers * per_layer + embeddings) * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers (what a KV block holds per token)."""
        return 2 * self.num_layers * self.kv_width * self.dtype_bytes

    def exchange_bytes(self, rows: int) -> int:
        """One layer's traffic for `rows` offloaded requests: q and new k, v to the executor,
        the attention output back."""
        return rows * (2 * self.q_width + 2 * self.kv_width) * self.dtype_bytes


@dataclass(frozen=True)
class GPU:
    name: str
    peak_flops: float  # dense bf16 FLOP/s, from the data sheet
    hbm_bandwidth: float  # bytes/s
    hbm_bytes: float  # as torch.cuda.mem_get_info reports the total
    fit: str  # the measured efficiencies it uses (server/simulate/fits/)
    num_sms: int


# Data-sheet limits (SXM parts); H200 has no measurements of its own: H100 compute and
# efficiencies with H200 memory bandwidth and capacity.
GPUS = {
    "a100-80g": GPU("A100-80GB SXM", 312e12, 2.039e12, 79.2 * GIB, "a100", 108),
    "h100": GPU("H100-80GB SXM", 989e12, 3.35e12, 79.1 * GIB, "h100", 132),
    "h200": GPU("H200-141GB SXM", 989e12, 4.8e12, 139.8 * GIB, "h100", 132),
}


def gpu(name: str) -> GPU:
    if name not in GPUS:
        raise HardwareError(f"--gpu {name}: choose one of {', '.join(GPUS)}")
    return GPUS[name]
