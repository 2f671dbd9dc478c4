"""The roles' command-line flags, apart from their entry points so that parsers import no torch."""

from __future__ import annotations

import argparse
import os

from transport.security import KEY_ENV

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
