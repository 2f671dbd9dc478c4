"""GPU check part: decode step time of the real engine and its model bandwidth utilization (MBU:
weights plus KV read per step, over step time, against the measured copy ceiling), with and
without CUDA graphs, for SmolLM2-135M's and Llama-2-7B's shapes with dummy bf16 weights.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

from scripts.gpu_check.report import Table

SHAPES = {  # Hugging Face config.json fields
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         rope_theta=100000.0, tie_word_embeddings=True),
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                       rope_theta=10000.0, tie_word_embeddings=False),
}  # fmt: skip
BATCHES = (1, 16, 64)
PROMPT_LEN = 1024
WARMUP_STEPS, TIMED_STEPS = 3, 20


def write_shape_dir(out: Path, fields: dict) -> Path:
    """A model directory for --load-format dummy: config.json and a word-level tokenizer with
    one token per id, so any sampled id decodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    out.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rms_norm_eps": 1e-5,
              "max_position_embeddings": 8192, "bos_token_id": 1, "eos_token_id": 2,
              "torch_dtype": "bfloat16", **fields}  # fmt: skip
    (out / "config.json").write_text(json.dumps(config, indent=2))
    vocab = {f"t{i}": i for i in range(fields["vocab_size"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": "t1", "eos_token": "t2"}))
    return out


def cuda_graphs_missing() -> str | None:
    """None when the engine captures CUDA graphs and enforce_eager turns them off, else why not."""
    import engine
    from engine.config import EngineConfig

    if "enforce_eager" not in EngineConfig.__dataclass_fields__:
        return "EngineConfig has no enforce_eager option"
    sources = (p.read_text() for p in Path(engine.__file__).parent.glob("*.py"))
    if not any("CUDAGraph" in text or "cuda.graph(" in text for text in sources):
        return "the engine captures no CUDA graphs yet (enforce_eager is accepted, nothing else)"
    return None


def timed_decode_steps(engine, batch: int, vocab: int, seed: int) -> list[float]:
    """Seconds of each engine.step() in which all `batch` requests decode, after warm-up."""
    from engine.sequence import SamplingParams

    rng = random.Random(seed)
    params = SamplingParams(max_tokens=WARMUP_STEPS + TIMED_STEPS + 2, temperature=0,
                            ignore_eos=True)  # fmt: skip
    produced = {}
    for i in range(batch):
        request_id = f"gpu-check-{seed}-{i}"
        engine.add_request(request_id, [rng.randrange(3, vocab) for _ in range(PROMPT_LEN)], params)
        produced[request_id] = 0
    times = []
    while engine.has_unfinished():
        decoding = all(n > 0 for n in produced.values())
        start = time.perf_counter()
        outs = engine.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        for out in outs:
            produced[out.request_id] = len(out.token_ids)
        if decoding and len(outs) == batch:
            times.append(elapsed)
    return times[WARMUP_STEPS : WARMUP_STEPS + TIMED_STEPS]


def weight_bytes(model: torch.nn.Module) -> int:
    """Every distinct parameter once (tied embeddings once; an untied input embedding is counted
    though a step reads only its rows: about 2% of Llama-2-7B)."""
    seen = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    return sum(seen.values())


def measure_shape(
    name: str, model_dir: Path, eager: bool, ceiling: float, device: str = "cuda"
) -> list[list]:
    from engine.config import ModelConfig
    from engine.llm import LLM

    cfg = ModelConfig.from_model_dir(model_dir)
    blocks_per_seq = -(-(PROMPT_LEN + WARMUP_STEPS + TIMED_STEPS + 8) // 16)
    llm = LLM(str(model_dir), load_format="dummy", dtype="bfloat16", device=device,
              enforce_eager=eager, num_blocks=max(BATCHES) * blocks_per_seq + 16,
              max_num_seqs=max(BATCHES), max_model_len=PROMPT_LEN + 64,
              max_num_batched_tokens=8192)  # fmt: skip
    weights = weight_bytes(llm.engine.runner.model)
    kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2
    rows = []
    for batch in BATCHES:
        ms = sorted(t * 1000 for t in timed_decode_steps(llm.engine, batch, cfg.vocab_size, batch))
        median = ms[len(ms) // 2]
        context = PROMPT_LEN + WARMUP_STEPS + TIMED_STEPS // 2
        read = weights + batch * context * kv_per_token
        mbu = read / (median / 1000) / 1e9 / ceiling
        rows.append([name, "eager" if eager else "cuda graphs", batch, f"{median:.2f}",
                     f"{ms[-1]:.2f}", f"{read / 1e9:.2f}", f"{mbu:.0%}"])  # fmt: skip
    backend = llm.engine.runner.backend.name
    del llm
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return [row + [backend] for row in rows]


def decode_step(context: dict, part_dir: Path) -> dict:
    from scripts.gpu_check.kernels import copy_ceiling_gb_per_s

    ceiling = context.get("device", {}).get("copy_gb_per_s") or copy_ceiling_gb_per_s()
    missing = cuda_graphs_missing()
    modes = [True] if missing else [True, False]
    rows = []
    for name, fields in SHAPES.items():
        model_dir = write_shape_dir(part_dir / name, fields)
        for eager in modes:
            rows += measure_shape(name, model_dir, eager, ceiling)
        if missing:
            rows.append([name, "cuda graphs", "-", "not available", "-", "-", "-", "-"])
    columns = ["shape", "mode", "batch", "median ms", "max ms", "GB read/step", "MBU", "attention"]
    note = (f"Prompt {PROMPT_LEN} random tokens, greedy; {TIMED_STEPS} steps after {WARMUP_STEPS} "
            f"warm-up, each engine.step() (schedule, model, sampling, detokenize) by the host "
            f"clock after a synchronize; MBU against the {ceiling:.0f} GB/s copy ceiling.")  # fmt: skip
    summary = "; ".join(f"{r[0]} {r[1]} batch {r[2]}: {r[3]} ms, MBU {r[6]}"
                        for r in rows if r[2] == max(BATCHES))  # fmt: skip
    if missing:
        summary += f"; CUDA graphs not available: {missing}"
    return {
        "summary": summary,
        "tables": [Table("decode step, dummy bf16 weights", columns, rows, note)],
        "data": {"rows": rows, "cuda_graphs_missing": missing, "copy_gb_per_s": ceiling},
    }
