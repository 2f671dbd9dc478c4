"""Offline generation throughput: our engine against transformers `generate`, same model, same
prompts, same machine, measured in one run (with --repeats, in turns, the fastest of each
counting). Prints a table and writes JSON.

    python benchmarks/offline_throughput.py --model smollm2 --num-prompts 16 --output-len 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from collections.abc import Callable
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


def ours(model: str, prompts, output_len: int, dtype: str, device: str) -> Callable[[], list]:
    """A warmed-up run of our engine over `prompts`, returning each prompt's output ids."""
    llm = LLM(model, dtype=dtype, device=device, max_num_seqs=len(prompts))
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    llm.generate([prompts[0][:8]], SamplingParams(max_tokens=2, temperature=0))  # warm-up
    return lambda: [o.token_ids for o in llm.generate(prompts, params)]


def transformers_generate(
    model_dir: Path, prompts, output_len: int, dtype: str, device: str
) -> Callable[[], list]:
    """The same with transformers' batched `generate` (left padded, never stopping early)."""
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

    @torch.inference_mode()
    def run() -> list:
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=output_len, do_sample=False, pad_token_id=pad
        )
        return out[:, width:].tolist()

    with torch.inference_mode():
        model.generate(
            ids[:1, -8:], attention_mask=mask[:1, -8:], max_new_tokens=2, do_sample=False
        )
    return run


def measure(runs: dict[str, Callable[[], list]], repeats: int) -> dict[str, dict]:
    """Each engine `repeats` times, taking turns so that a busy spell on a shared machine
    hits both; the fastest run of each counts."""
    results: dict[str, dict] = {name: {"all_seconds": []} for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            outputs = run()
            results[name]["all_seconds"].append(round(time.perf_counter() - start, 3))
            results[name]["outputs"] = outputs
    for r in results.values():
        r["seconds"] = min(r["all_seconds"])
        r["generated_tokens"] = sum(len(o) for o in r["outputs"])
    return results


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
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs of each engine, in turns; the fastest counts"
    )
    parser.add_argument("--output-json", default="results/offline_throughput.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model_dir = resolve_model(args.model)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    prompts = make_prompts(
        vocab, args.num_prompts, args.min_input_len, args.max_input_len, args.seed
    )
    runs = {
        "adrenaline": ours(args.model, prompts, args.output_len, args.dtype, args.device),
        "transformers": transformers_generate(
            model_dir, prompts, args.output_len, args.dtype, args.device
        ),
    }
    results = measure(runs, args.repeats)
    mine, ref = results["adrenaline"], results["transformers"]
    rows = []
    for name, r in results.items():
        rows.append(
            {
                "engine": name,
                "seconds": round(r["seconds"], 3),
                "generated_tokens": r["generated_tokens"],
                "tokens_per_second": round(r["generated_tokens"] / r["seconds"], 1),
                "all_seconds": r["all_seconds"],
            }
        )
    speedup = rows[0]["tokens_per_second"] / rows[1]["tokens_per_second"]
    matching = sum(a == b for a, b in zip(mine["outputs"], ref["outputs"]))
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
        "machine": {
            "platform": platform.platform(),
            "torch_threads": torch.get_num_threads(),
            "load_average_after": os.getloadavg(),  # other jobs on the machine skew timings
        },
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
