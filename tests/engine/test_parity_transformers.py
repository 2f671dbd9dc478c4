"""Parity with Hugging Face transformers: small random Llama / Qwen2 / Mistral checkpoints give the
same prefill logits and the same greedy tokens through our engine (batched, chunked, prefix-cached,
preempted), and SmolLM2's real weights give the same greedy tokens as transformers' GGUF loader.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from engine.batcher import ScheduledBatch  # noqa: E402
from engine.llm import LLM  # noqa: E402
from engine.model_source import resolve_model  # noqa: E402
from engine.sequence import SamplingParams, Sequence  # noqa: E402

VOCAB = 320
MAX_TOKENS = 24
PROMPT_LENS = (3, 17, 33, 50)
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
# name -> (config class, extra config fields, max_shard_size or None, init seed). The seeds are
# chosen so that no greedy step is a near-tie (top-2 logit margin > 0.01 against ~1e-5 error).
VARIANTS = {
    "llama": (transformers.LlamaConfig, dict(num_hidden_layers=2), None, 0),
    "llama3-tied-sharded": (
        transformers.LlamaConfig,
        dict(num_hidden_layers=3, rope_scaling=LLAMA3_SCALING, tie_word_embeddings=True),
        "100KB",
        3,
    ),
    "qwen2": (transformers.Qwen2Config, dict(num_hidden_layers=2, rope_theta=1e6), None, 2),
    "mistral": (
        transformers.MistralConfig,
        dict(num_hidden_layers=2, sliding_window=4096),
        None,
        2,
    ),
}
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)


def random_prompt(length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (length,), generator=generator).tolist()


# The two longer prompts share their first 32 tokens (two 16-token blocks) with each other.
_SHARED = random_prompt(32, seed=100)
PROMPTS = [
    random_prompt(3, seed=1),
    random_prompt(17, seed=2),
    _SHARED + random_prompt(1, seed=3),
    _SHARED + random_prompt(18, seed=4),
]
assert [len(p) for p in PROMPTS] == list(PROMPT_LENS)


@dataclass
class Reference:
    name: str
    model_dir: Path
    hf_model: torch.nn.Module

    def greedy(self, prompt: list[int], max_tokens: int = MAX_TOKENS) -> list[int]:
        input_ids = torch.tensor([prompt])
        with torch.no_grad():
            out = self.hf_model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=False,
                max_new_tokens=max_tokens,
            )
        return out[0, len(prompt) :].tolist()


def build_reference(name: str, out_dir: Path) -> Reference:
    config_cls, extra, shard_size, seed = VARIANTS[name]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config_cls(**COMMON, **extra))
    model = model.float().eval()
    with torch.no_grad():
        # Larger final-norm gains make logits peaked, so argmax is never a near-tie that float32
        # rounding could flip; random q/k/v biases make Qwen2's bias path count.
        model.model.norm.weight.mul_(8.0)
        for name_, param in model.named_parameters():
            if name_.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
                param.normal_(0.0, 0.5)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(out_dir, safe_serialization=True, **kwargs)
    tiny = resolve_model("tiny")
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / file, out_dir / file)
    # Nothing stops early: our runs pass ignore_eos.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return Reference(name, out_dir, model)


@pytest.fixture(scope="module", params=list(VARIANTS))
def reference(request, tmp_path_factory) -> Reference:
    return build_reference(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def expected(reference: Reference) -> list[list[int]]:
    return [reference.greedy(p) for p in PROMPTS]


def make_llm(reference: Reference, **kwargs) -> LLM:
    options = dict(
        num_blocks=64,
        block_size=16,
        max_num_batched_tokens=256,
        max_num_seqs=4,
        max_model_len=256,
        dtype="float32",
    )
    options.update(kwargs)
    return LLM(str(reference.model_dir), **options)


def assert_all_blocks_free(llm: LLM) -> None:
    stats = llm.engine.stats()
    assert stats["num_free_blocks"] == stats["num_blocks"]
    assert stats["num_running"] == stats["num_waiting"] == 0


def generate_greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    outputs = llm.generate(prompts, GREEDY)
    assert all(o.finish_reason == "length" for o in outputs)
    return [o.token_ids for o in outputs]


def test_sharded_checkpoint_has_index(reference: Reference) -> None:
    files = {p.name for p in reference.model_dir.glob("*.safetensors*")}
    if VARIANTS[reference.name][2]:
        assert "model.safetensors.index.json" in files
        assert len(files) > 2
    else:
        assert files == {"model.safetensors"}


def test_prefill_logits_match(reference: Reference) -> None:
    llm = make_llm(reference)
    prompt = PROMPTS[-1]
    seq = Sequence("logits", prompt, GREEDY)
    llm.engine.block_manager.allocate(seq)
    with torch.inference_mode():
        hidden, _, _ = llm.engine.runner.forward(ScheduledBatch(entries=[(seq, len(prompt))]))
        ours = llm.engine.runner.model.logits(hidden)
    llm.engine.block_manager.free(seq)
    with torch.no_grad():
        theirs = reference.hf_model(torch.tensor([prompt])).logits[0].float()
    assert ours.shape == theirs.shape == (len(prompt), VOCAB)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-5)
    assert_all_blocks_free(llm)


def test_greedy_batch_matches(reference: Reference, expected: list[list[int]]) -> None:
    llm = make_llm(reference)
    assert generate_greedy(llm, PROMPTS) == expected
    assert_all_blocks_free(llm)


def test_chunked_prefill_matches(reference: Reference, expected: list[list[int]]) -> None:
    llm = make_llm(reference, max_num_batched_tokens=16)
    assert generate_greedy(llm, PROMPTS) == expected
    assert_all_blocks_free(llm)


def test_prefix_cache_hits_match(reference: Reference, expected: list[list[int]]) -> None:
    llm = make_llm(reference)
    assert generate_greedy(llm, PROMPTS) == expected
    assert llm.engine.stats()["prefix_cache_hits"] == 0  # one batch: nothing was computed before
    # New prompts continuing a cached prefix: 40 shared tokens hit two 16-token blocks.
    followups = [PROMPTS[3][:40] + random_prompt(9, seed=5), PROMPTS[3][:40]]
    outputs = llm.generate(PROMPTS + followups, GREEDY)
    assert llm.engine.stats()["prefix_cache_hits"] > 0
    # Whole 16-token blocks are reused, always leaving at least one prompt token to compute.
    assert [o.num_cached_tokens for o in outputs] == [0, 16, 32, 48, 32, 32]
    assert [o.token_ids for o in outputs[:4]] == expected
    assert [o.token_ids for o in outputs[4:]] == [reference.greedy(p) for p in followups]
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_preemption_matches(
    reference: Reference, expected: list[list[int]], prefix_caching: bool
) -> None:
    # 12 blocks of 8 hold the longest request (74 tokens) but not all four (28 blocks) at once.
    llm = make_llm(
        reference,
        num_blocks=12,
        block_size=8,
        max_model_len=96,
        enable_prefix_caching=prefix_caching,
    )
    assert generate_greedy(llm, PROMPTS) == expected
    assert llm.engine.stats()["num_preemptions"] > 0
    assert_all_blocks_free(llm)


def test_bfloat16_smoke(tmp_path: Path) -> None:
    reference = build_reference("llama", tmp_path)
    expected_first = [reference.greedy(p, 1)[0] for p in PROMPTS]
    llm = make_llm(reference, dtype="bfloat16")
    outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert [len(o.token_ids) for o in outputs] == [4] * len(PROMPTS)
    first = [o.token_ids[0] for o in outputs]
    # bf16 rounding may flip a close call; most first tokens still agree with float32.
    assert sum(a == b for a, b in zip(first, expected_first)) >= len(PROMPTS) - 1
    assert_all_blocks_free(llm)


# Real weights ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_llm(smollm2_dir: Path) -> LLM:
    return LLM(str(smollm2_dir), num_blocks=64, block_size=16, max_model_len=512, dtype="float32")


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers_gguf(
    smollm2_llm: LLM, smollm2_transformers: torch.nn.Module, smollm2_dir: Path
) -> None:
    ref = Reference("smollm2", smollm2_dir, smollm2_transformers)
    texts = ["The capital of France is", "def fibonacci(n):\n    "]
    prompts = [smollm2_llm.tokenizer.encode(t) for t in texts]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    outputs = smollm2_llm.generate(prompts, params)
    assert [o.token_ids for o in outputs] == [ref.greedy(p, 16) for p in prompts]
    assert_all_blocks_free(smollm2_llm)


@pytest.mark.slow
def test_smollm2_chat_knows_paris(smollm2_llm: LLM) -> None:
    out = smollm2_llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0, max_tokens=30),
    )
    assert "Paris" in out.text
    assert_all_blocks_free(smollm2_llm)
