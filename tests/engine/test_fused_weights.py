"""Merged projections from every loader: q/k/v (with Qwen2's biases) and gate/up are one weight
each, filled from the checkpoint's separate tensors (HF safetensors, a converted GGUF, the tiny
model) or from the same dummy draws as unmerged tensors, and the logits are transformers'.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_gguf_import import write_llama_gguf

from engine.batcher import ScheduledBatch
from engine.config import ModelConfig
from engine.gguf_import import convert_gguf_to_hf
from engine.llm import LLM
from engine.model import MergedLinear, checkpoint_tensors
from engine.model_source import resolve_model
from engine.sequence import SamplingParams, Sequence
from engine.weights import build_model

transformers = pytest.importorskip("transformers")


def assert_merged(model: torch.nn.Module, cfg: ModelConfig) -> None:
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    assert not leaves & {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    for layer in model.model.layers:
        assert isinstance(layer.self_attn.qkv_proj, MergedLinear)
        assert layer.self_attn.qkv_proj.weight.shape == (cfg.hidden_size, qkv)
        assert (layer.self_attn.qkv_proj.bias is not None) == cfg.qkv_bias
        assert layer.mlp.gate_up_proj.weight.shape == (cfg.hidden_size, 2 * cfg.intermediate_size)


def prefill_logits(llm: LLM, prompt: list[int]) -> torch.Tensor:
    seq = Sequence("logits", prompt, SamplingParams(temperature=0))
    llm.engine.block_manager.allocate(seq)
    with torch.inference_mode():
        hidden, _, _ = llm.engine.runner.forward(ScheduledBatch(entries=[(seq, len(prompt))]))
        logits = llm.engine.runner.model.logits(hidden)
    llm.engine.block_manager.free(seq)
    return logits


def assert_loads_like_the_checkpoint(model_dir: Path) -> None:
    llm = LLM(str(model_dir), num_blocks=32, max_model_len=128)
    model, cfg = llm.engine.runner.model, llm.engine.model_config
    assert_merged(model, cfg)
    stored = load_file(str(model_dir / "model.safetensors"))
    ours = checkpoint_tensors(model, remove_duplicate=False)
    for name, tensor in stored.items():
        assert torch.equal(ours[name], tensor), name
    reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir).float().eval()
    prompt = list(range(3, 40))
    with torch.no_grad():
        expected = reference(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(prefill_logits(llm, prompt), expected, atol=1e-4, rtol=1e-5)


def test_tiny_loads_merged(adrenaline_cache: Path) -> None:
    assert_loads_like_the_checkpoint(resolve_model("tiny", adrenaline_cache))


@pytest.mark.parametrize("tied", [False, True])
def test_converted_gguf_loads_merged(tmp_path: Path, tied: bool) -> None:
    write_llama_gguf(tmp_path / "model.gguf", tied=tied)
    hf_dir = convert_gguf_to_hf(tmp_path / "model.gguf", tmp_path / "hf")
    assert_loads_like_the_checkpoint(hf_dir)


QWEN2_LIKE = dict(
    architectures=["Qwen2ForCausalLM"],
    model_type="qwen2",
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=True,
)


def test_dummy_weights_are_the_unmerged_draws() -> None:
    cfg = ModelConfig.from_hf_dict(QWEN2_LIKE)
    assert cfg.qkv_bias and cfg.tie_word_embeddings
    model = build_model(cfg, None, "dummy", torch.float32, torch.device("cpu"), 64, seed=7)
    assert_merged(model, cfg)
    # What filling the unmerged Hugging Face layout tensor by tensor draws, written out by hand.
    hidden, q, kv, ffn = 32, 4 * 8, 2 * 8, 48
    layout = [("model.embed_tokens.weight", (96, hidden))]
    for i in range(2):
        p = f"model.layers.{i}."
        for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            layout += [(f"{p}self_attn.{name}.weight", (rows, hidden))]
            layout += [(f"{p}self_attn.{name}.bias", (rows,))]
        layout += [(f"{p}self_attn.o_proj.weight", (hidden, q))]
        layout += [
            (f"{p}mlp.gate_proj.weight", (ffn, hidden)),
            (f"{p}mlp.up_proj.weight", (ffn, hidden)),
        ]
        layout += [(f"{p}mlp.down_proj.weight", (hidden, ffn))]
        layout += [
            (f"{p}input_layernorm.weight", None),
            (f"{p}post_attention_layernorm.weight", None),
        ]
    layout += [("model.norm.weight", None)]
    generator = torch.Generator().manual_seed(7)
    ours = checkpoint_tensors(model)
    assert list(ours) == [name for name, _ in layout]
    for name, shape in layout:
        if shape is None:
            expected = torch.ones(hidden)
        else:
            expected = torch.empty(shape).normal_(0.0, 0.02, generator=generator)
        assert torch.equal(ours[name], expected), name
    assert model.lm_head.weight is model.model.embed_tokens.weight
