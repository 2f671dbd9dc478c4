"""GGUF import: a hand-written tiny llama GGUF round-trips, errors are clear, SmolLM2 matches transformers."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from engine.gguf_import import GGUFImportError, convert_gguf_to_hf
from engine.gguf_tokenizer import bytes_to_unicode
from engine.model_source import ModelNotFoundError, resolve_model, smollm2_gguf

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS = 32, 4, 2, 8, 64, 2
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
Q8 = gguf.GGMLQuantizationType.Q8_0
F16 = gguf.GGMLQuantizationType.F16
F32 = gguf.GGMLQuantizationType.F32

# HF name -> (GGUF name, how it is stored). Layer 0 keeps q/k exact to check the unpermute bit-exactly.
LAYOUT = {
    "model.embed_tokens.weight": ("token_embd.weight", F32),
    "model.norm.weight": ("output_norm.weight", F32),
}
for _i, (_q, _k) in enumerate([(F32, F32), (Q8, F16)]):
    LAYOUT |= {
        f"model.layers.{_i}.self_attn.q_proj.weight": (f"blk.{_i}.attn_q.weight", _q),
        f"model.layers.{_i}.self_attn.k_proj.weight": (f"blk.{_i}.attn_k.weight", _k),
        f"model.layers.{_i}.self_attn.v_proj.weight": (f"blk.{_i}.attn_v.weight", F16),
        f"model.layers.{_i}.self_attn.o_proj.weight": (f"blk.{_i}.attn_output.weight", Q8),
        f"model.layers.{_i}.mlp.gate_proj.weight": (f"blk.{_i}.ffn_gate.weight", Q8),
        f"model.layers.{_i}.mlp.up_proj.weight": (f"blk.{_i}.ffn_up.weight", F16),
        f"model.layers.{_i}.mlp.down_proj.weight": (f"blk.{_i}.ffn_down.weight", Q8),
        f"model.layers.{_i}.input_layernorm.weight": (f"blk.{_i}.attn_norm.weight", F32),
        f"model.layers.{_i}.post_attention_layernorm.weight": (f"blk.{_i}.ffn_norm.weight", F32),
    }


def vocab() -> list[str]:
    merged = ["".join(m.split(" ")) for m in MERGES]
    return SPECIALS + sorted(set(bytes_to_unicode().values())) + merged


def hf_shapes(vocab_size: int) -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (vocab_size, HIDDEN), "model.norm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
            p + "mlp.gate_proj.weight": (FFN, HIDDEN),
            p + "mlp.up_proj.weight": (FFN, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, FFN),
            p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,),
        }
    return shapes


def llama_cpp_permute(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k for rotary."""
    return (
        weights.reshape(num_heads, 2, weights.shape[0] // num_heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def add_tensor(
    writer: gguf.GGUFWriter, name: str, hf_name: str, weights: np.ndarray, qtype
) -> None:
    if "q_proj" in hf_name:
        weights = llama_cpp_permute(weights, HEADS)
    elif "k_proj" in hf_name:
        weights = llama_cpp_permute(weights, KV_HEADS)
    if qtype == F32:
        writer.add_tensor(name, weights)
    elif qtype == F16:
        writer.add_tensor(name, weights.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(weights, qtype), raw_dtype=qtype)


def write_llama_gguf(path: Path, tied: bool = False, arch: str = "llama", tokenizer: str = "gpt2"):
    """A tiny llama GGUF as llama.cpp would write it; returns the original HF tensors."""
    tokens = vocab()
    rng = np.random.default_rng(0)
    originals = {
        n: rng.standard_normal(s).astype(np.float32) for n, s in hf_shapes(len(tokens)).items()
    }
    if not tied:
        originals["lm_head.weight"] = rng.standard_normal((len(tokens), HIDDEN)).astype(np.float32)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_tokenizer_model(tokenizer)
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(CHAT_TEMPLATE)
    layout = LAYOUT | {"lm_head.weight": ("output.weight", F16)}
    for hf_name, weights in originals.items():
        name, qtype = layout[hf_name]
        add_tensor(writer, name, hf_name, weights, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return originals


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_llama_gguf(path)


@pytest.fixture(scope="module")
def tiny_hf(tiny_gguf, tmp_path_factory) -> Path:
    return convert_gguf_to_hf(tiny_gguf[0], tmp_path_factory.mktemp("hf") / "tiny")


def test_tensors_round_trip(tiny_gguf, tiny_hf: Path) -> None:
    originals = tiny_gguf[1]
    converted = load_file(str(tiny_hf / "model.safetensors"))
    assert set(converted) == set(originals)
    layout = LAYOUT | {"lm_head.weight": ("output.weight", F16)}
    for name, original in originals.items():
        got = converted[name]
        assert got.dtype == np.float32 and got.shape == original.shape, name
        qtype = layout[name][1]
        if qtype == F32:
            np.testing.assert_array_equal(got, original, err_msg=name)
        else:
            # Q8_0 keeps 8 bits per 32-value block (scale = max/127); F16 about 3 decimal digits.
            atol = np.abs(original).max() / 127 if qtype == Q8 else 1e-2
            np.testing.assert_allclose(got, original, atol=atol, rtol=1e-3, err_msg=name)


def test_rotary_permutation_is_undone(tiny_gguf, tiny_hf: Path) -> None:
    originals = tiny_gguf[1]
    converted = load_file(str(tiny_hf / "model.safetensors"))
    for name in (
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
    ):
        heads = HEADS if "q_proj" in name else KV_HEADS
        assert not np.array_equal(llama_cpp_permute(originals[name], heads), originals[name])
        np.testing.assert_array_equal(converted[name], originals[name])


def test_config(tiny_hf: Path) -> None:
    config = json.loads((tiny_hf / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (
        HIDDEN,
        FFN,
        LAYERS,
    )
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (
        HEADS,
        KV_HEADS,
        HEAD_DIM,
    )
    assert config["vocab_size"] == len(vocab())
    assert config["rms_norm_eps"] == 1e-5 and config["rope_theta"] == 10000.0
    assert config["max_position_embeddings"] == 256
    assert config["tie_word_embeddings"] is False
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert json.loads((tiny_hf / "generation_config.json").read_text())["eos_token_id"] == 2
    tok_config = json.loads((tiny_hf / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == CHAT_TEMPLATE
    assert (tok_config["bos_token"], tok_config["eos_token"]) == ("<|im_start|>", "<|im_end|>")


def test_tied_embeddings(tmp_path: Path) -> None:
    write_llama_gguf(tmp_path / "tied.gguf", tied=True)
    out = convert_gguf_to_hf(tmp_path / "tied.gguf", tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in load_file(str(out / "model.safetensors"))


def test_tokenizer_round_trip(tiny_hf: Path) -> None:
    tokenizer = Tokenizer.from_file(str(tiny_hf / "tokenizer.json"))
    tokens = vocab()
    ids = tokenizer.encode("hello world").ids
    assert [tokens[i] for i in ids] == ["hello", "Ġworld"]
    assert tokenizer.decode(ids) == "hello world"
    text = "<|im_start|>héllo, wörld!\n<|im_end|>"
    encoded = tokenizer.encode(text).ids
    assert encoded[0] == 1 and encoded[-1] == 2
    assert tokenizer.decode(encoded, skip_special_tokens=False) == text


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(GGUFImportError, match="not found"):
        convert_gguf_to_hf(tmp_path / "absent.gguf", tmp_path / "out")


def test_unsupported_architecture(tmp_path: Path) -> None:
    write_llama_gguf(tmp_path / "bert.gguf", arch="bert")
    with pytest.raises(GGUFImportError, match="architecture 'bert'"):
        convert_gguf_to_hf(tmp_path / "bert.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_tokenizer(tmp_path: Path) -> None:
    write_llama_gguf(tmp_path / "spm.gguf", tokenizer="llama")
    with pytest.raises(GGUFImportError, match="tokenizer model 'llama'"):
        convert_gguf_to_hf(tmp_path / "spm.gguf", tmp_path / "out")


def test_not_a_gguf(tmp_path: Path) -> None:
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(GGUFImportError, match="not a readable GGUF"):
        convert_gguf_to_hf(tmp_path / "junk.gguf", tmp_path / "out")


def test_resolve_gguf_converts_once(tiny_gguf, tmp_path: Path) -> None:
    first = resolve_model(str(tiny_gguf[0]), tmp_path)
    assert first.parent == tmp_path / "gguf" and first.name.startswith("tiny-")
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert resolve_model(str(tiny_gguf[0]), tmp_path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert resolve_model(str(first), tmp_path) == first


def test_resolve_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path), tmp_path)
    with pytest.raises(ModelNotFoundError, match="not found"):
        resolve_model(str(tmp_path / "absent.gguf"), tmp_path)
    with pytest.raises(ModelNotFoundError, match="built-in name"):
        resolve_model("meta-llama/Llama-3-8B", tmp_path)


@pytest.mark.slow
def test_smollm2_matches_transformers(smollm2_dir: Path, adrenaline_cache: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF")
    gguf_path = smollm2_gguf(adrenaline_cache)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    ).state_dict()
    ours = load_file(str(smollm2_dir / "model.safetensors"))
    assert set(ours) == set(reference) - {"lm_head.weight"}  # tied: only the embedding is stored
    for name, weights in ours.items():
        torch.testing.assert_close(torch.from_numpy(weights), reference[name], atol=1e-6, rtol=0)

    text = "What is the capital of France?"
    ref_tokenizer = transformers.AutoTokenizer.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name
    )
    our_tokenizer = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    assert our_tokenizer.encode(text).ids == ref_tokenizer(text)["input_ids"]
