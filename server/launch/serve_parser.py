"""`adrenaline serve`'s command line, apart from the `adrenaline` command that carries it
(server/cli.py), so that the simulator reads a serve command line with the same parser and
defaults without importing the command that dispatches to it.
"""

from __future__ import annotations

import argparse
from typing import NoReturn

from engine.config import BatchConfig, CacheConfig, EngineConfig
from server.roles.flags import (
    add_executor_flags,
    add_router_flags,
    add_worker_process_flags,
)

DEFAULT_MODEL = "smollm2"


class ArgumentParser(argparse.ArgumentParser):
    """Errors in one line naming the flag (`adrenaline serve: error: --port: ...`), without the
    usage block, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_engine_flags(parser: argparse.ArgumentParser, default_model: str = DEFAULT_MODEL) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument(
        "--model",
        default=default_model,
        help="HF model directory, a .gguf file, 'smollm2' (embedded default) or 'tiny'",
    )
    g.add_argument("--load-format", choices=["auto", "safetensors", "dummy"], default="auto")
    g.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="default: bfloat16 on cuda, float32 on cpu",
    )
    g.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    g.add_argument(
        "--attention-backend", choices=["auto", "torch", "triton", "flash_attn"], default="auto"
    )
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument(
        "--num-kv-blocks",
        type=int,
        default=None,
        help="KV cache size in blocks (default: from memory)",
    )
    g.add_argument("--cpu-kv-cache-gib", type=float, default=1.0)
    g.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--max-model-len", type=int, default=2048)
    g.add_argument("--max-num-seqs", type=int, default=64)
    g.add_argument("--max-num-batched-tokens", type=int, default=2048)
    g.add_argument("--no-chunked-prefill", action="store_true")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--enforce-eager",
        action="store_true",
        help="run decode steps eagerly on CUDA instead of replaying captured CUDA graphs",
    )


def engine_config_from_args(
    args: argparse.Namespace, parser: argparse.ArgumentParser
) -> EngineConfig:
    positive = {
        "--block-size": args.block_size,
        "--max-model-len": args.max_model_len,
        "--max-num-seqs": args.max_num_seqs,
        "--max-num-batched-tokens": args.max_num_batched_tokens,
    }
    if args.num_kv_blocks is not None:
        positive["--num-kv-blocks"] = args.num_kv_blocks
    for flag, value in positive.items():
        if value < 1:
            parser.error(f"{flag}: must be a positive integer, got {value}")
    if not 0 < args.gpu_memory_utilization <= 1:
        parser.error(
            f"--gpu-memory-utilization: must be in (0, 1], got {args.gpu_memory_utilization}"
        )
    if not args.cpu_kv_cache_gib > 0:
        parser.error(f"--cpu-kv-cache-gib: must be above 0, got {args.cpu_kv_cache_gib}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is visible to torch")
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    return EngineConfig(
        model=args.model,
        load_format=args.load_format,
        dtype=dtype,
        device=args.device,
        attention_backend=args.attention_backend,
        seed=args.seed,
        enforce_eager=args.enforce_eager,
        cache=CacheConfig(
            block_size=args.block_size,
            num_blocks=args.num_kv_blocks,
            gpu_memory_utilization=args.gpu_memory_utilization,
            cpu_kv_cache_gib=args.cpu_kv_cache_gib,
            enable_prefix_caching=not args.no_prefix_caching,
        ),
        batch=BatchConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_model_len=args.max_model_len,
            enable_chunked_prefill=not args.no_chunked_prefill,
        ),
    )


def common_flags() -> argparse.ArgumentParser:
    """The flags every role takes, as a parent parser."""
    common = ArgumentParser(add_help=False)
    common.add_argument_group("logging").add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    return common


def add_serve_parser(sub, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    serve = sub.add_parser(
        "serve", parents=[common], help="start a router, prefill and decode workers here"
    )
    add_engine_flags(serve)
    add_router_flags(serve, control_default=None)
    add_worker_process_flags(serve)
    add_executor_flags(serve)
    serve.add_argument(
        "--no-attention-executor", action="store_true",
        help="start no executor beside the prefill workers (only the PD baseline runs)",
    )  # fmt: skip
    serve.add_argument(
        "--drain-timeout", type=float, default=30.0,
        help="on SIGTERM or Ctrl-C, seconds to finish the requests in flight (new ones get 503) "
        "before stopping; a second Ctrl-C stops at once",
    )  # fmt: skip
    return serve


def serve_parser() -> ArgumentParser:
    """A parser of `serve ...` alone, with the defaults `adrenaline serve` has."""
    parser = ArgumentParser(prog="adrenaline")
    add_serve_parser(parser.add_subparsers(dest="command", required=True), common_flags())
    return parser
