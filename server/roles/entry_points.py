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
    ClusterKey,
    ClusterKeyError,
    InsecureBindError,
    load_cluster_key,
)

log = logging.getLogger(__name__)


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
