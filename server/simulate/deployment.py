"""From `adrenaline serve`'s flags (`--serve-args`) and the simulator's hardware flags to a
`Simulation`: the pool sizes the workers would allocate, the step cost model of the device, and
the offload policy the router would run.
"""

from __future__ import annotations

import argparse
import os
import shlex
from dataclasses import dataclass, replace

from engine.config import BatchConfig, ConfigError, ModelConfig
from scheduler.cost_model import CostModel, ProfileError, builtin_profile, fit_cost_model
from scheduler.offload_policy import OffloadPolicy
from scheduler.policies import parse_policy
from server.launch.serve_parser import serve_parser
from server.simulate.cluster import CpuCosts, SimConfig, Simulation
from server.simulate.hardware import GIB, GPU, HardwareError, ModelShape, gpu, model_config
from server.simulate.roofline import load_fit
from server.simulate.step_cost import Colocation, GpuStepCost, ProfileStepCost, StepWork

ACTIVATION_BYTES_PER_TOKEN_HIDDEN = 24  # a step's peak activations: bytes per token per hidden


@dataclass
class Hardware:
    cost: GpuStepCost | ProfileStepCost
    shape: ModelShape
    device: GPU | None  # None: a CPU described by its profile
    description: str


def parse_serve_args(text: str, policy: str | None = None) -> argparse.Namespace:
    """`adrenaline serve`'s parser, defaults and all; `policy` comes first, as `bench --compare`
    puts it before the serve args (which may override it)."""
    flags = ["--offload-policy", policy] if policy else []
    return serve_parser().parse_args(["serve", *flags, *shlex.split(text)])


def model_name(args: argparse.Namespace, serve: argparse.Namespace) -> str:
    return args.model or serve.model


# Per layer on a shared CPU, the hand-over between a decode worker and its executor (both spin
# on the shared-memory counters and yield): 14-214 us alone (benchmarks/offload_roundtrip.py),
# longer beside the server's other processes, which take a yielding spinner's core. Chosen so
# that the simulated layer wait matches the real decode worker's (sim_vs_real set s9: 0.71 ms
# against 0.73 ms at 10 req/s, 1.53 against 1.42 saturated; 150 us gave 0.51 and 1.27), then
# checked on a set measured after it (benchmarks/README).
CPU_SYNC_US = 300.0


def hardware(args: argparse.Namespace, serve: argparse.Namespace) -> Hardware:
    cfg = model_config(model_name(args, serve))
    if args.gpu:
        device = gpu(args.gpu)
        shape = ModelShape.of(cfg, 2)  # bf16 on GPU, as serve's default there
        share = args.sim_sm_share
        colocation = Colocation(
            executor_bandwidth=args.sim_executor_bandwidth,
            sm_share=share,
            prefill_slowdown=args.sim_prefill_slowdown or 1 / (1 - share),
            sync_ms=(10.0 if args.sim_sync_us is None else args.sim_sync_us) / 1000,
        )
        overhead = 0.3 if args.sim_step_overhead_ms is None else args.sim_step_overhead_ms
        cost = GpuStepCost(shape, device, load_fit(device.fit), colocation, overhead)
        return Hardware(cost, shape, device, f"{device.name} (roofline fitted to Vidur)")
    try:
        profile = CostModel.load(args.profile) if args.profile else builtin_profile()
    except ProfileError as exc:
        raise HardwareError(f"--profile: {exc}") from exc
    if profile.num_layers != cfg.num_layers:
        raise HardwareError(
            f"the profile was measured for {profile.model or '?'} ({profile.num_layers} layers),"
            f" not {model_name(args, serve)} ({cfg.num_layers}); pass --gpu, or a --profile from"
            " `adrenaline profile --model` of this model"
        )
    dtype = serve.dtype or "float32"
    shape = ModelShape.of(cfg, 4 if dtype == "float32" else 2)
    sync = CPU_SYNC_US if args.sim_sync_us is None else args.sim_sync_us
    # A CPU runs the torch backend, whose decode attention pads every row to the longest.
    cost = ProfileStepCost(profile, shape, sync_ms=sync / 1000,
                           padded_attention=profile.device == "cpu")  # fmt: skip
    where = args.profile or "the built-in CPU profile"
    return Hardware(cost, shape, None, f"CPU from {where} ({profile.model}, {profile.device})")


def pool_blocks(serve, hw: Hardware, max_model_len: int) -> tuple[int, int, int]:
    """(prefill, decode, executor) KV blocks, as each worker would size its pool."""
    block_bytes = hw.shape.kv_bytes_per_token * serve.block_size
    device = hw.device
    if serve.no_attention_executor:
        offload = 0
    elif serve.offload_blocks is not None:
        offload = serve.offload_blocks
    elif device is not None:
        offload = int(serve.offload_memory_fraction * device.hbm_bytes // block_bytes)
    else:
        offload = int(serve.offload_kv_gib * GIB // block_bytes)
    if serve.num_kv_blocks is not None:
        decode = prefill = serve.num_kv_blocks
    elif device is not None:
        activations = (serve.max_num_batched_tokens * hw.shape.hidden
                       * ACTIVATION_BYTES_PER_TOKEN_HIDDEN)  # fmt: skip
        budget = (
            serve.gpu_memory_utilization * device.hbm_bytes - hw.shape.weight_bytes - activations
        )
        decode = int(budget // block_bytes)
        # The executor's share comes out of the prefill worker's budget (see the README).
        prefill = int((budget - offload * block_bytes) // block_bytes)
    else:
        decode = prefill = int(serve.cpu_kv_cache_gib * GIB // block_bytes)
    for role, blocks in (("prefill", prefill), ("decode", decode)):
        if blocks * serve.block_size < max_model_len:
            raise ConfigError(
                f"the {role} worker's KV cache ({blocks} blocks of {serve.block_size}) cannot "
                f"hold one sequence of max_model_len={max_model_len}; lower --max-model-len, "
                "--offload-memory-fraction or raise --gpu-memory-utilization / --num-kv-blocks"
            )
    return prefill, decode, offload


def policy_model(serve, hw: Hardware, batch: BatchConfig) -> CostModel:
    """What the router's load-aware policy is given: serve's --profile, else on a GPU what
    `adrenaline profile` would fit there (the same grid, timed by the cost model), else the
    built-in profile a real deployment falls back to."""
    if serve.profile:
        return CostModel.load(serve.profile)
    if hw.device is None:
        return builtin_profile()
    from server.profile_grid import GRIDS

    grid, cost = GRIDS["full"], hw.cost
    decode, attention, prefill = [], [], []
    for b in grid.batches:
        for c in grid.context:
            kv = b * (c + 1 + grid.steps // 2)
            work = StepWork(tokens=b, sampled=b, local_rows=b, local_kv=kv)
            decode.append((b, kv, cost.step(work).ms))
            attention.append((b * (c + 1), b, cost.attention_ms(b, b * (c + 1))))
    for n in grid.prompts:
        prefill.append((n, cost.step(StepWork(tokens=n, sampled=1, prefill=[(n, 0)])).ms))
    return fit_cost_model(hw.shape.num_layers, decode, attention, prefill, device="simulated")


def cpu_costs(args: argparse.Namespace) -> CpuCosts:
    return CpuCosts(
        cores=args.sim_cpu_cores or float(os.cpu_count() or 1),
        background=args.sim_cpu_background,
        competitors=args.sim_cpu_competitors,
        router_token_s=args.sim_router_token_us / 1e6,
        client_token_s=args.sim_client_token_us / 1e6,
        router_request_s=args.sim_router_request_ms / 1000,
        client_request_s=args.sim_client_request_ms / 1000,
    )


def build(
    args: argparse.Namespace, serve: argparse.Namespace, hw: Hardware
) -> tuple[Simulation, OffloadPolicy]:
    cfg: ModelConfig = model_config(model_name(args, serve))
    max_model_len = min(serve.max_model_len, cfg.max_position_embeddings)
    batch = BatchConfig(
        max_num_seqs=serve.max_num_seqs,
        max_num_batched_tokens=serve.max_num_batched_tokens,
        max_model_len=max_model_len,
        enable_chunked_prefill=not serve.no_chunked_prefill,
    )
    prefill, decode, offload = pool_blocks(serve, hw, max_model_len)
    policy = parse_policy(serve.offload_policy, policy_model(serve, hw, batch), serve.slo_tpot_ms)
    config = SimConfig(
        batch=batch, num_prefill=serve.num_prefill, num_decode=serve.num_decode,
        block_size=serve.block_size, prefill_blocks=prefill, decode_blocks=decode,
        offload_blocks=offload, max_pending=serve.max_pending, hop_s=args.sim_hop_ms / 1000,
        http_s=args.sim_http_ms / 1000, keep_itls=bool(args.save_result and not args.compare
                                                       and args.num_prompts <= 20000),
    )  # fmt: skip
    if hw.device is None:  # every role shares this machine's cores
        config = replace(config, cpu=cpu_costs(args))
    sim = Simulation(config, hw.cost, hw.shape, policy)
    sim.router.check_books = args.sim_check_books
    return sim, policy
