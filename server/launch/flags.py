"""Checks the flags of `adrenaline serve` and `adrenaline router` before any child process
starts: a value that cannot work ends in one line naming the flag (exit status 2), never in a
child's traceback or a half-started deployment.
"""

from __future__ import annotations

import argparse
import errno
import socket
import stat
from pathlib import Path

from transport.security import ClusterKeyError, load_cluster_key

UNIX_PATH_MAX = 107  # bytes of sun_path, less the terminating NUL


class FlagError(ValueError):
    """A flag's value cannot work; the message starts with the flag's name."""


def check_router_flags(args: argparse.Namespace) -> None:
    for flag, value in (
        ("--num-prefill", args.num_prefill),
        ("--num-decode", args.num_decode),
        ("--max-pending", args.max_pending),
        ("--block-size", args.block_size),
        ("--max-n", args.max_n),
    ):
        if value < 1:
            raise FlagError(f"{flag}: must be at least 1, got {value}")
    if args.num_attention < 0:
        raise FlagError(f"--num-attention: must be 0 or more, got {args.num_attention}")
    if not args.heartbeat_timeout > 0:
        raise FlagError(
            f"--heartbeat-timeout: must be above 0 seconds, got {args.heartbeat_timeout}"
        )
    if not args.stuck_timeout > args.heartbeat_timeout:
        raise FlagError(
            f"--stuck-timeout: must exceed --heartbeat-timeout ({args.heartbeat_timeout} s), "
            f"got {args.stuck_timeout}"
        )
    if args.max_migrations < 0:
        raise FlagError(f"--max-migrations: must be 0 or more, got {args.max_migrations}")
    if args.max_request_bytes < 1024:
        raise FlagError(f"--max-request-bytes: must be at least 1024, got {args.max_request_bytes}")
    if args.slo_tpot_ms is not None and not args.slo_tpot_ms > 0:
        raise FlagError(f"--slo-tpot-ms: must be above 0, got {args.slo_tpot_ms}")
    check_offload_policy(args.offload_policy, args.profile, args.slo_tpot_ms)
    if args.chat_template is not None:
        check_chat_template(args.chat_template)
    check_http_port(args.host, args.port)


def check_serve_flags(args: argparse.Namespace) -> Path:
    """Every serve flag; returns the resolved model directory the children load."""
    check_router_flags(args)
    if args.control is not None:
        check_control(args.control, args.port)
    try:
        load_cluster_key(args.cluster_key)
    except ClusterKeyError as exc:
        raise FlagError(f"--cluster-key: {exc}") from exc
    if not args.drain_timeout >= 0:
        raise FlagError(f"--drain-timeout: must be 0 or more seconds, got {args.drain_timeout}")
    if args.torch_threads < 0:
        raise FlagError(
            f"--torch-threads: must be 0 (torch's default) or more, got {args.torch_threads}"
        )
    if args.offload_blocks is not None and args.offload_blocks < 0:
        raise FlagError(f"--offload-blocks: must be 0 or more, got {args.offload_blocks}")
    check_kv_transfer(args.kv_transfer, args.device)
    check_attention_backend(args.attention_backend, args.device, args.block_size)
    return check_model(args.model)


def check_attention_backend(name: str, device: str, block_size: int) -> None:
    import torch

    from attention.selector import AttentionBackendError, select_backend

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    try:
        select_backend(name, torch.device(device), dtype, block_size)
    except AttentionBackendError as exc:
        raise FlagError(f"--attention-backend: {exc}") from exc


def check_offload_policy(policy: str, profile: str | None, slo_tpot_ms: float | None) -> None:
    from scheduler.cost_model import CostModel, ProfileError
    from scheduler.offload_policy import PolicyError
    from scheduler.policies import parse_policy

    try:
        cost_model = CostModel.load(profile) if profile else None
    except ProfileError as exc:
        raise FlagError(f"--profile: {exc}") from exc
    try:
        parse_policy(policy, cost_model, slo_tpot_ms)
    except PolicyError as exc:
        raise FlagError(f"--offload-policy: {exc}") from exc


def check_chat_template(name_or_path: str) -> None:
    from engine.tokenizer import ChatTemplateError, load_chat_template

    try:
        load_chat_template(name_or_path)
    except ChatTemplateError as exc:
        raise FlagError(f"--chat-template: {exc}") from exc


def check_http_port(host: str, port: int) -> None:
    if not 1 <= port <= 65535:
        raise FlagError(f"--port: must be in 1..65535, got {port}")
    try:
        _try_bind(host, port)
    except socket.gaierror as exc:
        raise FlagError(f"--host: cannot resolve {host!r}: {exc.strerror}") from exc
    except OSError as exc:
        raise FlagError(f"--port: cannot bind {host}:{port}: {_bind_reason(exc)}") from exc


def check_control(address: str, http_port: int) -> None:
    """An address the router can bind and every worker on this host can connect to."""
    scheme, sep, rest = address.partition("://")
    if sep and scheme == "tcp":
        host, _, port_text = rest.rpartition(":")
        if not host or host == "*" or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise FlagError(
                f"--control: expected tcp://HOST:PORT with a host workers can connect to and a "
                f"port in 1..65535, got {address!r}"
            )
        if int(port_text) == http_port:
            raise FlagError(f"--control: port {port_text} is also --port")
        try:
            _try_bind(host.strip("[]"), int(port_text))
        except OSError as exc:
            raise FlagError(f"--control: cannot bind {address}: {_bind_reason(exc)}") from exc
    elif sep and scheme == "ipc":
        _check_ipc_path(address, Path(rest))
    else:
        raise FlagError(f"--control: expected tcp://HOST:PORT or ipc://PATH, got {address!r}")


def check_kv_transfer(kind: str, device: str) -> None:
    needs = {"shm": "cpu", "gloo": "cpu", "cuda_ipc": "cuda", "nccl": "cuda"}.get(kind)
    if needs is not None and needs != device:
        raise FlagError(f"--kv-transfer {kind}: needs --device {needs}, got --device {device}")


def check_model(name: str) -> Path:
    """Resolves `name` once (downloading or converting it if needed) and reads its config."""
    from engine.config import ModelConfig
    from engine.model_source import resolve_model

    try:
        model_dir = resolve_model(name)
        ModelConfig.from_model_dir(model_dir)
    except KeyError as exc:
        raise FlagError(f"--model: {name}: config.json has no {exc}") from exc
    except (ValueError, OSError) as exc:  # ModelNotFoundError, GGUFImportError, ConfigError
        raise FlagError(f"--model: {exc}") from exc
    return model_dir


def _try_bind(host: str, port: int) -> None:
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    with socket.socket(family, kind, proto) as sock:
        # As uvicorn and ZeroMQ bind: a connection in TIME_WAIT is no conflict, a listener is.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)


def _bind_reason(exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "already in use (by another server or another deployment)"
    return exc.strerror or str(exc)


def _check_ipc_path(address: str, path: Path) -> None:
    if not str(path) or len(str(path).encode()) > UNIX_PATH_MAX:
        raise FlagError(f"--control: an ipc path of 1..{UNIX_PATH_MAX} bytes, got {address!r}")
    if not path.parent.is_dir():
        raise FlagError(f"--control: {address}: directory {path.parent} does not exist")
    if not path.exists():
        return
    if not stat.S_ISSOCK(path.stat().st_mode):
        raise FlagError(f"--control: {address}: {path} exists and is not a socket")
    # ZeroMQ replaces an existing ipc socket file on bind: refuse one a live router listens on.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return  # a stale socket file: nothing listens there
    raise FlagError(f"--control: {address} is in use by another process")
