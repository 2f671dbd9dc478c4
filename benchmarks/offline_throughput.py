"""Offline generation throughput: our engine against transformers `generate`, same model, same
prompts, same machine, measured in one run. Prints a table and writes JSON.

    python benchmarks/offline_throughput.py --model smollm2 --num-prompts 16 --output-len 64
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

import torch

from engine.llm import LLM
from engine.model_source import resolve_model
from engine.sequence import SamplingParams


def make_prompts(vocab: int, num: int, min_len: int, max_len: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    # Ids from the middle of the vocabulary: ordinary tokens, no specials.
    return [
        [rng.randrange(100, vocab - 100) for _ in range(rng.randint(min_len, max_len))]
        for _ in range(num)
    ]


def run_ours(model: str, prompts, output_len: int, dtype: str, device: str) -> dict:
    llm = LLM(model, dtype=dtype, device=device, max_num_seqs=len(prompts))
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    llm.generate([prompts[0][:8]], SamplingParams(max_tokens=2, temperature=0))  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    generated = sum(len(o.token_ids) for o in outs)
    return {
        "seconds": elapsed,
        "generated_tokens": generated,
        "outputs": [o.token_ids for o in outs],
    }


def run_transformers(model_dir: Path, prompts, output_len: int, dtype: str, device: str) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device)
    model.eval()
    # Like ignore_eos: never stop early, and never suppress EOS either (min_new_tokens would).
    model.generation_config.eos_token_id = None
    pad = 0
    width = max(len(p) for p in prompts)
    # Left padding so every row's last prompt token lines up, as batched generate expects.
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    with torch.inference_mode():
        model.generate(
            ids[:1, -8:], attention_mask=mask[:1, -8:], max_new_tokens=2, do_sample=False
        )
        start = time.perf_counter()
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=output_len,
            do_sample=False,
            pad_token_id=pad,
        )
        elapsed = time.perf_counter() - start
    generated = out[:, width:].numel()
    return {"seconds": elapsed, "generated_tokens": generated, "outputs": out[:, width:].tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--min-input-len", type=int, default=32)
    parser.add_argument("--max-input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-json", default="results/offline_throughput.json")
    args = parser.parse_args()

    model_dir = resolve_model(args.model)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    prompts = make_prompts(
        vocab, args.num_prompts, args.min_input_len, args.max_input_len, args.seed
    )
    ours = run_ours(args.model, prompts, args.output_len, args.dtype, args.device)
    ref = run_transformers(model_dir, prompts, args.output_len, args.dtype, args.device)
    rows = []
    for name, r in (("adrenaline", ours), ("transformers", ref)):
        rows.append(
            {
                "engine": name,
                "seconds": round(r["seconds"], 3),
                "generated_tokens": r["generated_tokens"],
                "tokens_per_second": round(r["generated_tokens"] / r["seconds"], 1),
            }
        )
    speedup = rows[0]["tokens_per_second"] / rows[1]["tokens_per_second"]
    matching = sum(a == b for a, b in zip(ours["outputs"], ref["outputs"]))
    print(
        f"model={args.model} prompts={args.num_prompts} input={args.min_input_len}-"
        f"{args.max_input_len} output={args.output_len} dtype={args.dtype} device={args.device}"
    )
    print(f"{'engine':<14}{'seconds':>10}{'tokens':>10}{'tok/s':>10}")
    for r in rows:
        print(
            f"{r['engine']:<14}{r['seconds']:>10}{r['generated_tokens']:>10}"
            f"{r['tokens_per_second']:>10}"
        )
    print(f"speedup {speedup:.2f}x; greedy outputs identical for {matching}/{len(prompts)} prompts")
    result = {
        "args": vars(args),
        "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads()},
        "rows": rows,
        "speedup": speedup,
        "identical_outputs": matching,
    }
    out = Path(args.output_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
