"""Entry points of the processes a deployment runs: the router, a prefill worker, a decode
worker. Each is its own OS process whose command line names its role (`adrenaline decode ...`).
"""

from __future__ import annotations

import argparse
import logging
import os

import torch

from engine.config import EngineConfig

log = logging.getLogger(__name__)


def add_router_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("router")
    g.add_argument("--host", default="127.0.0.1", help="HTTP address to bind")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument(
        "--control",
        default="tcp://127.0.0.1:5557",
        help="ZeroMQ address the router binds and the workers connect to",
    )
    g.add_argument("--num-prefill", type=int, default=1, help="prefill workers /health waits for")
    g.add_argument("--num-decode", type=int, default=1, help="decode workers /health waits for")
    g.add_argument(
        "--max-pending", type=int, default=512, help="requests in flight before new ones get 429"
    )
    g.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=3.0,
        help="seconds without a heartbeat before a worker is marked dead",
    )
    g.add_argument(
        "--api-key",
        default=os.environ.get("ADRENALINE_API_KEY"),
        help="require 'Authorization: Bearer KEY' on the generation APIs",
    )
    g.add_argument("--served-model-name", default=None)


def add_worker_process_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("worker process")
    g.add_argument(
        "--kv-transfer",
        choices=["auto", "shm", "gloo", "cuda_ipc", "nccl"],
        default="auto",
        help="how prefill KV reaches a decode worker (auto: shm on "
        "CPU, cuda_ipc on GPU; gloo/nccl across hosts)",
    )
    g.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="CPU threads per worker (0: torch's default; serve splits the cores)",
    )


def add_worker_flags(parser: argparse.ArgumentParser) -> None:
    add_worker_process_flags(parser)
    g = parser.add_argument_group("worker")
    g.add_argument("--router", default="tcp://127.0.0.1:5557", help="the router's control address")
    g.add_argument("--instance", default=None, help="unique worker name (default: role-pid)")
    g.add_argument(
        "--kv-host",
        default="127.0.0.1",
        help="address prefill workers reach this decode worker's KV at (gloo/nccl)",
    )


def run_router(args: argparse.Namespace) -> int:
    import uvicorn

    from engine.model_source import resolve_model
    from engine.tokenizer import Tokenizer
    from server.app import create_app
    from server.router import Router

    tokenizer = Tokenizer(resolve_model(args.model))
    router = Router(
        model_name=args.served_model_name or args.model,
        tokenizer=tokenizer,
        control_address=args.control,
        expect_prefill=args.num_prefill,
        expect_decode=args.num_decode,
        max_pending=args.max_pending,
        heartbeat_timeout_s=args.heartbeat_timeout,
        block_size=args.block_size,
    )
    app = create_app(router, api_key=args.api_key)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def run_worker(role: str, args: argparse.Namespace, config: EngineConfig) -> int:
    from engine.engine import LLMEngine
    from server.worker import Worker
    from transport.kv_transfer import KVSender, create_pool_host

    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    instance = args.instance or f"{role}-{os.getpid()}"
    kv_host = None

    def pool_factory(shape, dtype, device):
        nonlocal kv_host
        kv_host = create_pool_host(args.kv_transfer, shape, dtype, device, instance, args.kv_host)
        return kv_host.pool

    engine = LLMEngine(config, kv_pool_factory=pool_factory if role == "decode" else None)
    sender = KVSender(engine.runner.kv_pool, instance) if role == "prefill" else None
    worker = Worker(
        role, instance, engine, args.router, config.model, kv_host=kv_host, kv_sender=sender
    )
    worker.run()
    return 0
