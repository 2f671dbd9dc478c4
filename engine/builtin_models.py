"""The built-in `tiny` model: a small Llama config kept in the repo, seeded random weights and a
byte-level BPE tokenizer, written once in Hugging Face format and then loaded like any model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engine.config import ModelConfig
from engine.model import LlamaForCausalLM, checkpoint_tensors
from engine.tokenizer import CHATML_TEMPLATE

TINY_CONFIG = Path(__file__).parent / "builtin" / "tiny" / "config.json"
SPECIAL_TOKENS = ["<|pad|>", "<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"]
# A fixed corpus so the tokenizer's merges, and so every token id, never change.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. What is the capital of France? Paris is.",
    "Hello, world! Adrenaline offloads decode attention to the prefill GPU.",
    "Once upon a time there was a small model that generated text token by token.",
    "def main():\n    print('hello')\n    return 0\n",
    "1 2 3 4 5 6 7 8 9 10 100 1000 the of and to in is you that it he was for on are",
]
_WEIGHT_SEED = 1234
_WEIGHT_STD = 0.08


def materialize_tiny(cache_dir: Path) -> Path:
    config_bytes = TINY_CONFIG.read_bytes()
    digest = hashlib.sha256(config_bytes + repr((_CORPUS, _WEIGHT_SEED, _WEIGHT_STD)).encode())
    target = cache_dir / "models" / f"tiny-{digest.hexdigest()[:12]}"
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tiny-"))
    try:
        _write_tiny(tmp, json.loads(config_bytes))
        os.replace(tmp, target) if not target.exists() else shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _write_tiny(out: Path, hf_config: dict) -> None:
    (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    tokenizer = _train_tokenizer(hf_config["vocab_size"])
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": SPECIAL_TOKENS[1],
                "eos_token": SPECIAL_TOKENS[2],
                "pad_token": SPECIAL_TOKENS[0],
                "chat_template": CHATML_TEMPLATE,
            },
            indent=2,
        )
    )
    save_file(_random_weights(ModelConfig.from_hf_dict(hf_config)), str(out / "model.safetensors"))


def _train_tokenizer(vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    return tokenizer


def _random_weights(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, 1)
        shapes = {n: t.shape for n, t in checkpoint_tensors(model).items()}
    generator = torch.Generator().manual_seed(_WEIGHT_SEED)
    weights = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            weights[name] = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        else:
            weights[name] = _WEIGHT_STD * torch.randn(shape, generator=generator)
    return weights
