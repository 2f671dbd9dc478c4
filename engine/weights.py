"""Builds the model on its device and fills it: from Hugging Face safetensors (single or sharded),
or with deterministic dummy weights for running a model's shapes without its checkpoint. Both go
through the checkpoint's own tensor names, so merged projections are filled part by part.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open

from engine.config import ModelConfig
from engine.model import LlamaForCausalLM, checkpoint_tensors
from engine.rope import RotaryEmbedding

log = logging.getLogger(__name__)

# Checkpoint entries that carry no weights of ours (older exports store rotary tables).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class WeightLoadError(RuntimeError):
    """The checkpoint does not fit the model: a missing file, tensor or a shape mismatch."""


def build_model(
    cfg: ModelConfig,
    model_dir: Path | None,
    load_format: str,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
    seed: int = 0,
) -> LlamaForCausalLM:
    # Built on the meta device first so no memory is touched twice for a large model.
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, max_positions)
    model = model.to(dtype).to_empty(device=device)
    # Rotary tables are computed, not loaded, and stay in float32.
    model.rope = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling).to(
        device
    )
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if load_format == "dummy":
        fill_dummy_weights(model, seed)
    elif load_format in ("auto", "safetensors"):
        if model_dir is None:
            raise WeightLoadError("a model directory is needed to load safetensors weights")
        load_safetensors(model, model_dir)
    else:
        raise WeightLoadError(
            f"unknown load format {load_format!r}; use auto, safetensors or dummy"
        )
    return model.eval()


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (model_dir / s).is_file()]
        if missing:
            raise WeightLoadError(f"{model_dir}: shards listed in the index are missing: {missing}")
        return [model_dir / s for s in shards]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise WeightLoadError(
            f"{model_dir} has no *.safetensors weights; pass --load-format dummy to run without them"
        )
    return files


@torch.no_grad()
def load_safetensors(model: LlamaForCausalLM, model_dir: Path) -> None:
    params = checkpoint_tensors(model, remove_duplicate=False)
    loaded: set[str] = set()
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if name not in params:
                    if not name.endswith(_IGNORED_SUFFIXES):
                        log.warning("ignoring checkpoint tensor %s not used by the model", name)
                    continue
                tensor = f.get_tensor(name)
                param = params[name]
                if tuple(tensor.shape) != tuple(param.shape):
                    raise WeightLoadError(
                        f"shape mismatch for {name}: checkpoint {tuple(tensor.shape)}, "
                        f"model expects {tuple(param.shape)} (is config.json the right one?)"
                    )
                param.copy_(tensor.to(param.dtype))
                loaded.add(name)
    if model.config.tie_word_embeddings:
        loaded.add("lm_head.weight")
    missing = sorted(set(params) - loaded)
    if missing:
        raise WeightLoadError(f"checkpoint in {model_dir} lacks tensors: {missing[:8]}")


@torch.no_grad()
def fill_dummy_weights(model: LlamaForCausalLM, seed: int) -> None:
    # Generated on the CPU from one seed so every device and process gets the same weights,
    # drawn per checkpoint tensor in checkpoint order (the same weights as before merging).
    generator = torch.Generator().manual_seed(seed)
    for name, param in checkpoint_tensors(model).items():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
            continue
        values = torch.empty(param.shape, dtype=torch.float32).normal_(
            0.0, 0.02, generator=generator
        )
        param.copy_(values.to(param.dtype))
