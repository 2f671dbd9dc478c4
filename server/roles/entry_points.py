"""Entry points of the processes a deployment runs: the router, a prefill worker, a decode
worker. Each is its own OS process whose command line names its role (`adrenaline decode ...`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import torch

from engine.config import EngineConfig, ModelConfig, parse_dtype
from engine.model_source import resolve_model
from engine.runner import kv_block_bytes
from server.roles.offload_client import OffloadClient
from transport.security import (
    KEY_ENV,
    ClusterKey,
    ClusterKeyError,
    InsecureBindError,
    load_cluster_key,
)

log = logging.getLogger(__name__)


DEFAULT_CONTROL = "tcp://127.0.0.1:5557"


def add_router_flags(
    parser: argparse.ArgumentParser, control_default: str | None = DEFAULT_CONTROL
) -> None:
    """`control_default` None (serve): each deployment picks a private control address."""
    g = parser.add_argument_group("router")
    g.add_argument("--host", default="127.0.0.1", help="HTTP address to bind")
    g.add_argument("--port", type=int, default=8000)
    picked = "an ipc socket in a private directory, one per deployment"
    g.add_argument(
        "--control",
        default=control_default,
        help="ZeroMQ address the router binds and the workers connect to, tcp://HOST:PORT or "
        f"ipc://PATH (default: {control_default or picked})",
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
        "--stuck-timeout",
        type=float,
        default=120.0,
        help="seconds one engine step may run before its worker is reported stuck and its "
        "requests move to other workers (a slow step is never taken for a dead worker)",
    )
    g.add_argument(
        "--max-migrations",
        type=int,
        default=3,
        help="times a request may move to other workers after its worker dies or is stuck; "
        "beyond that it ends with a 503",
    )
    g.add_argument(
        "--api-key",
        default=os.environ.get("ADRENALINE_API_KEY"),
        help="require 'Authorization: Bearer KEY' on the generation APIs, /stats and /admin/ "
        "(default: $ADRENALINE_API_KEY, which keeps the key off the command line)",
    )
    g.add_argument(
        "--max-request-bytes",
        type=int,
        default=16 * 1024 * 1024,
        help="largest request body accepted; a larger one gets 413 (default: 16 MiB)",
    )
    g.add_argument(
        "--max-n",
        type=int,
        default=16,
        help="most choices one OpenAI request may ask for (n, and best_of); more get a 400 "
        "(default: 16)",
    )
    g.add_argument("--served-model-name", default=None)
    g.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE|NAME",
        help="Jinja chat template to use instead of the model's: a file, or a built-in name "
        "(hermes-tools: ChatML that renders `tools` and tool calls, Hermes/Qwen2.5 style)",
    )
    add_cluster_key_flag(g)
    g.add_argument(
        "--offload-policy",
        default="load-aware",
        help="load-aware (offload while the executor's attention hides behind decode work, "
        "its pool has room and TPOT meets --slo-tpot-ms), none (PD disaggregation), always, "
        "or ratio:R (share R of requests decode their attention on the executor beside "
        "their prefill worker)",
    )
    g.add_argument(
        "--slo-tpot-ms",
        type=float,
        default=None,
        help="load-aware: offload no request whose predicted time per output token exceeds this",
    )
    g.add_argument(
        "--profile",
        default=None,
        metavar="FILE",
        help="load-aware: cost profile from `adrenaline profile` (default: a built-in CPU one)",
    )
    g.add_argument(
        "--num-attention", type=int, default=0, help="attention executors /health waits for"
    )


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
    add_cluster_key_flag(g)
    g.add_argument(
        "--kv-host",
        default="127.0.0.1",
        help="address prefill workers reach this decode worker's KV at (gloo/nccl)",
    )
    g.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds to finish this worker's requests before exiting (the router "
        "moves what is left to other workers)",
    )


def add_cluster_key_flag(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--cluster-key",
        default=None,
        metavar="FILE",
        help="the deployment's secret, from `adrenaline keygen`: only holders join the control "
        "plane (ZeroMQ CURVE) and gloo/NCCL links; every role needs the same one (default: "
        f"${KEY_ENV}, the key's text; without either, control sockets bind on loopback only)",
    )


def load_role_key(args: argparse.Namespace, role: str) -> ClusterKey | None:
    try:
        return load_cluster_key(args.cluster_key)
    except ClusterKeyError as exc:
        raise SystemExit(f"adrenaline {role}: error: --cluster-key: {exc}") from exc


def run_router(args: argparse.Namespace) -> int:
    import uvicorn

    from engine.model_source import resolve_model
    from engine.tokenizer import Tokenizer, load_chat_template
    from scheduler.cost_model import CostModel, ProfileError
    from scheduler.offload_policy import PolicyError
    from scheduler.policies import parse_policy
    from server.api.app import create_app
    from server.router.core import Router

    try:
        cost_model = CostModel.load(args.profile) if args.profile else None
    except ProfileError as exc:
        raise SystemExit(f"adrenaline router: error: --profile: {exc}") from exc
    try:
        policy = parse_policy(args.offload_policy, cost_model, args.slo_tpot_ms)
    except PolicyError as exc:
        raise SystemExit(f"adrenaline router: error: --offload-policy: {exc}") from exc
    template = load_chat_template(args.chat_template) if args.chat_template else None
    tokenizer = Tokenizer(resolve_model(args.model), chat_template=template)
    cluster_key = load_role_key(args, "router")
    try:
        router = Router(
            model_name=args.served_model_name or args.model,
            tokenizer=tokenizer,
            control_address=args.control,
            expect_prefill=args.num_prefill,
            expect_decode=args.num_decode,
            max_pending=args.max_pending,
            heartbeat_timeout_s=args.heartbeat_timeout,
            stuck_timeout_s=args.stuck_timeout,
            max_migrations=args.max_migrations,
            block_size=args.block_size,
            offload_policy=policy,
            expect_attention=args.num_attention,
            cluster_key=cluster_key,
        )
    except InsecureBindError as exc:
        raise SystemExit(f"adrenaline router: error: --control: {exc}") from exc
    app = create_app(
        router, api_key=args.api_key, max_request_bytes=args.max_request_bytes, max_n=args.max_n
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def run_worker(role: str, args: argparse.Namespace, config: EngineConfig) -> int:
    from engine.engine import LLMEngine
    from server.roles.worker import Worker
    from transport.kv_transfer import KVSender, create_pool_host

    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    instance = args.instance or f"{role}-{os.getpid()}"
    cluster_key = load_role_key(args, role)
    kv_host = None
    cfg = ModelConfig.from_model_dir(resolve_model(config.model))

    def pool_factory(shape, dtype, device):
        nonlocal kv_host
        if role == "decode":
            kv_host = create_pool_host(
                args.kv_transfer, shape, dtype, device, instance, args.kv_host, cluster_key
            )
            return kv_host.pool
        # A prefill worker's pool is shared with its attention executor, which owns the extra
        # blocks at its tail; offloaded requests' prompt KV stays where prefill wrote it.
        extra = offload_pool_blocks(args, cfg, config, torch.device(device), dtype)
        full = (*shape[:2], shape[2] + extra, *shape[3:])
        kind = "cuda_ipc" if torch.device(device).type == "cuda" else "shm"
        kv_host = create_pool_host(kind, full, dtype, device, instance)
        kv_host.endpoint.update(offload_base=shape[2], offload_blocks=extra)
        return kv_host.pool

    offload = None
    if role == "decode":
        offload = OffloadClient(
            instance, cfg.num_layers, config.batch.max_num_seqs, cfg.num_heads,
            cfg.num_kv_heads, cfg.head_dim, parse_dtype(config.dtype), torch.device(config.device),
            cluster_key=cluster_key,
        )  # fmt: skip
    engine = LLMEngine(config, kv_pool_factory=pool_factory, remote=offload)
    sender = KVSender(engine.runner.kv_pool, instance, cluster_key) if role == "prefill" else None
    worker = Worker(
        role, instance, engine, args.router, config.model, kv_host=kv_host, kv_sender=sender,
        offload=offload, drain_timeout_s=args.drain_timeout, cluster_key=cluster_key,
    )  # fmt: skip
    worker.run()
    return 0


def add_executor_flags(parser: argparse.ArgumentParser) -> None:
    # Given to a prefill worker: its pool grows by this many blocks, owned by its executor.
    g = parser.add_argument_group("attention executor")
    g.add_argument(
        "--offload-blocks",
        type=int,
        default=None,
        help="blocks of the prefill worker's pool its attention executor owns, for offloaded "
        "requests' growing KV (default: --offload-memory-fraction of the GPU, or "
        "--offload-kv-gib on CPU; 0 without an executor)",
    )
    g.add_argument(
        "--offload-memory-fraction",
        type=float,
        default=0.3,
        help="share of the GPU's memory the offload pool takes",
    )
    g.add_argument("--offload-kv-gib", type=float, default=0.5, help="offload pool size on CPU")


def add_attention_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("attention")
    g.add_argument("--router", default="tcp://127.0.0.1:5557", help="the router's control address")
    g.add_argument("--instance", default=None, help="unique name (default: attention-pid)")
    add_cluster_key_flag(g)
    g.add_argument(
        "--colocated-with",
        required=True,
        help="instance name of the prefill worker sharing this device",
    )
    g.add_argument(
        "--bind-host", default="127.0.0.1", help="address decode workers reach this executor at"
    )
    g.add_argument(
        "--sm-share",
        type=float,
        default=1.0,
        help="share of the GPU's SMs this executor may use, in (0, 1] (1: no limit); "
        "enforced with CUDA MPS or a green context (scripts/profile_attention_bandwidth.py)",
    )


def run_attention(args: argparse.Namespace, config: EngineConfig) -> int:
    from attention.colocation import SmShareError, limit_sm_share, mps_environment
    from attention.executor import AttentionExecutor
    from attention.executor_worker import ExecutorWorker, warm_up
    from attention.selector import select_backend

    try:
        missing = mps_environment(args.sm_share)
        if missing:
            # MPS reads the share when CUDA first initialises, which checking --device may have
            # done already: start this process again with it in its environment.
            log.info("restarting with %s for MPS", missing)
            os.execve(sys.executable, sys.orig_argv, {**os.environ, **missing})
        limit_sm_share(args.sm_share, torch.device(config.device))
    except SmShareError as exc:
        raise SystemExit(f"adrenaline attention: error: --sm-share: {exc}") from exc
    torch.set_num_threads(1)  # decode attention is bandwidth-bound; leave the cores to prefill
    instance = args.instance or f"attention-{os.getpid()}"
    cluster_key = load_role_key(args, "attention")
    cfg = ModelConfig.from_model_dir(resolve_model(config.model))
    device, dtype = torch.device(config.device), parse_dtype(config.dtype)
    backend_cls = select_backend(config.attention_backend, device, dtype, config.cache.block_size)
    backend = backend_cls(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.head_dim**-0.5)
    # Before registering: a first step that JIT-compiles would outlast the per-layer timeout.
    warm_up(backend, device, dtype, config.cache.block_size, config.batch.max_num_seqs,
            config.batch.max_model_len)  # fmt: skip

    def make_executor(pool: torch.Tensor, first_block: int, num_blocks: int) -> AttentionExecutor:
        return AttentionExecutor(pool, backend, first_block, num_blocks)

    try:
        worker = ExecutorWorker(
            instance, args.colocated_with, make_executor, args.router, args.bind_host,
            config.model, config.batch.max_model_len, device, cluster_key,
        )  # fmt: skip
    except InsecureBindError as exc:
        raise SystemExit(f"adrenaline attention: error: --bind-host: {exc}") from exc
    worker.run()
    return 0


def offload_pool_blocks(args, cfg: ModelConfig, config: EngineConfig, device, dtype) -> int:
    if args.offload_blocks is not None:
        return args.offload_blocks
    block_bytes = kv_block_bytes(cfg, config.cache.block_size, dtype)
    if device.type == "cuda":
        budget = (
            args.offload_memory_fraction * torch.cuda.get_device_properties(device).total_memory
        )
    else:
        budget = args.offload_kv_gib * (1 << 30)
    return max(1, int(budget // block_bytes))
