"""The `adrenaline` command: `serve` starts a whole deployment here; `router`, `prefill` and
`decode` start one role each (for deployments across hosts); `generate` runs the engine
offline; `bench` measures a running server; `simulate` answers bench's command line with a
simulated deployment; `profile` measures this device for the load-aware offload policy.

Flags map one-to-one onto the frozen config dataclasses; a bad flag value exits with an error
that names the flag.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from engine.config import ConfigError, EngineConfig
from server.bench.cli import add_bench_parser, run_bench
from server.extras import MissingExtraError
from server.launch.flags import FlagError, check_model, check_router_flags, check_serve_flags
from server.launch.serve_parser import (
    DEFAULT_MODEL,
    ArgumentParser,
    add_engine_flags,
    add_serve_parser,
    common_flags,
    engine_config_from_args,
)
from server.profile_grid import add_profile_flags
from server.roles.flags import (
    add_attention_flags,
    add_executor_flags,
    add_router_flags,
    add_worker_flags,
)
from server.simulate.cli import add_simulate_parser, run_simulate


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="adrenaline", description=__doc__)
    common = common_flags()
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", parents=[common], help="generate text offline with the engine")
    add_engine_flags(gen)
    gen.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--sampling-seed", type=int, default=None)
    gen.add_argument("--json", action="store_true", help="print one JSON object per prompt")

    attention = sub.add_parser(
        "attention", parents=[common],
        help="start an attention executor beside a prefill worker (same host and device)",
    )  # fmt: skip
    add_engine_flags(attention)
    add_attention_flags(attention)

    add_serve_parser(sub, common)

    router = sub.add_parser(
        "router", parents=[common], help="start the router (HTTP API, admission, placement)"
    )
    router.add_argument("--model", default=DEFAULT_MODEL, help="model whose tokenizer to use")
    router.add_argument("--block-size", type=int, default=16)
    add_router_flags(router)

    for role in ("prefill", "decode"):
        worker = sub.add_parser(
            role, parents=[common], help=f"start a {role} worker that joins a router"
        )
        add_engine_flags(worker)
        add_worker_flags(worker)
        if role == "prefill":
            add_executor_flags(worker)

    profile = sub.add_parser(
        "profile", parents=[common], help="measure this device and write a cost profile"
    )
    add_engine_flags(profile)
    add_profile_flags(profile)

    add_bench_parser(sub)
    add_simulate_parser(sub)
    keygen = sub.add_parser("keygen", help="write a new cluster key file for --cluster-key")
    keygen.add_argument("--output", default="adrenaline-cluster.key", metavar="FILE",
                        help="where to write it (mode 600; never overwritten)")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(args, "log_level", "INFO"),
        format=f"%(asctime)s %(levelname)s [{args.command} %(process)d %(name)s] %(message)s",
    )
    sub_parser = parser._subparsers._group_actions[0].choices[args.command]  # for errors
    if args.command == "keygen":
        return run_keygen(args.output, sub_parser)
    if args.command in ("bench", "simulate"):
        try:
            return run_bench(args) if args.command == "bench" else run_simulate(args)
        except MissingExtraError as exc:
            sub_parser.error(str(exc))
    # Imported once dispatched, since they import torch: `bench` and `simulate` start without it.
    from attention.selector import AttentionBackendError
    from server.launch.serve import run_serve
    from server.profile import run_profile
    from server.roles.entry_points import run_attention, run_router, run_worker

    try:
        if args.command == "router":
            check_router_flags(args)
            check_model(args.model)
            return run_router(args)
        config = engine_config_from_args(args, sub_parser)
        if args.command == "generate":
            return run_generate(args, config, sub_parser)
        if args.command == "serve":
            return run_serve(args, sub_parser, check_serve_flags(args))
        if args.command == "attention":
            return run_attention(args, config)
        if args.command == "profile":
            return run_profile(args, config)
        return run_worker(args.command, args, config)
    except (ConfigError, FlagError) as exc:
        sub_parser.error(str(exc))
    except AttentionBackendError as exc:
        sub_parser.error(f"--attention-backend: {exc}")
    return 0


def run_keygen(output: str, parser: argparse.ArgumentParser) -> int:
    from transport.security import ClusterKeyError, write_cluster_key

    try:
        write_cluster_key(output)
    except ClusterKeyError as exc:
        parser.error(str(exc))
    path = os.path.abspath(output)
    print(f"wrote a new cluster key to {path} (readable only by you); copy it to every node "
          f"and start each role with --cluster-key {path}")  # fmt: skip
    return 0


def run_generate(args, config: EngineConfig, parser: argparse.ArgumentParser) -> int:
    from engine.llm import LLM
    from engine.sequence import InvalidRequestError, SamplingParams

    try:
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            min_p=args.min_p,
            seed=args.sampling_seed,
        )
    except InvalidRequestError as exc:
        parser.error(str(exc))
    llm = LLM(config=config)
    prompts: list = args.prompt
    if args.chat:
        prompts = [
            llm.tokenizer.encode(
                llm.tokenizer.apply_chat_template([{"role": "user", "content": p}]),
                add_special_tokens=False,
            )
            for p in prompts
        ]
    for prompt, out in zip(args.prompt, llm.generate(prompts, params)):
        if args.json:
            print(
                json.dumps(
                    {
                        "prompt": prompt,
                        "text": out.text,
                        "token_ids": out.token_ids,
                        "finish_reason": out.finish_reason,
                    }
                )
            )
        else:
            print(out.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
