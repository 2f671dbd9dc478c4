"""`adrenaline serve`: one router, N prefill and M decode workers on this machine, each its own
process. Prints the URL once `/health` answers 200; SIGINT or SIGTERM drains the router, then
stops every child. Internal addresses are private, so deployments differ only by `--port`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from server.launch.router_admin import POLL_S, drain, healthy, local_url
from transport.security import (
    KEY_ENV,
    ClusterKey,
    ClusterKeyError,
    generate_cluster_key,
    load_cluster_key,
)

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 600.0
STOP_GRACE_S = 10.0
PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


class StartupError(RuntimeError):
    """A child died, or /health never answered, before the deployment was up."""


def role_command(role: str) -> list[str]:
    """`adrenaline ROLE` when the console script is installed, so `ps` shows the role."""
    script = Path(sys.executable).parent / "adrenaline"
    if script.exists():
        return [str(script), role]
    found = shutil.which("adrenaline")
    return [found, role] if found else [sys.executable, "-m", "server.cli", role]


def argv_for_groups(
    parser: argparse.ArgumentParser, titles: set[str], args, skip: frozenset[str] = frozenset()
) -> list[str]:
    """Re-emits the flags of the named argument groups whose values differ from the default,
    except the dests in `skip`."""
    argv: list[str] = []
    for group in parser._action_groups:
        if group.title not in titles:
            continue
        for action in group._group_actions:
            value = getattr(args, action.dest)
            if action.dest in skip or value == action.default or value is None:
                continue
            flag = action.option_strings[-1]
            if isinstance(action, argparse._StoreTrueAction):
                argv.append(flag)
            else:
                argv += [flag, str(value)]
    return argv


class Signals:
    """SIGINT and SIGTERM, counted rather than raised (a child is never left half-spawned):
    the first drains the deployment, a second stops it at once."""

    def __init__(self) -> None:
        self.count = 0
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._count)

    def _count(self, _signum, _frame) -> None:
        self.count += 1


class Deployment:
    def __init__(self, env: dict[str, str] | None = None) -> None:
        """`env`: given to every child (secrets go there, never on a command line)."""
        self.children: list[tuple[str, subprocess.Popen]] = []
        self._reported: set[str] = set()
        self.env = env or {}

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        proc = subprocess.Popen(
            argv,
            env={**os.environ, **self.env, **(env or {})},
            stdin=subprocess.DEVNULL,
            preexec_fn=own_group_dying_with(os.getpid()),
        )
        self.children.append((name, proc))

    def remove_segments(self) -> None:
        """The shared memory (KV pools, per-layer channels) that stopped children left behind:
        a SIGKILL skips their own cleanup. Names carry the creator's pid, so only ours go."""
        from transport.attention_channel import SEGMENT_PREFIX as CHANNEL_PREFIX
        from transport.shm_transfer import SEGMENT_PREFIX as POOL_PREFIX
        from transport.shm_transfer import remove_segments_of

        pids = {proc.pid for _, proc in self.children}
        removed = remove_segments_of(pids, (POOL_PREFIX, CHANNEL_PREFIX))
        if removed:
            log.info("removed shared memory of stopped children: %s", ", ".join(removed))

    def exited(self, name: str) -> bool:
        return any(n == name and p.poll() is not None for n, p in self.children)

    def dead(self) -> list[str]:
        return [
            f"{name} (exit {p.returncode})" for name, p in self.children if p.poll() is not None
        ]

    def newly_dead(self) -> list[str]:
        fresh = [d for d in self.dead() if d not in self._reported]
        self._reported.update(fresh)
        return fresh

    def stop(self, signals: Signals) -> None:
        """Workers and executors first, the router last: SIGTERM, then SIGKILL after
        STOP_GRACE_S, or at once when a signal (a second one, or any after a failed start)
        says so."""
        start = signals.count

        def hurry() -> bool:
            return signals.count >= 2 or signals.count > start

        others = [p for n, p in self.children if n != "router"]
        routers = [p for n, p in self.children if n == "router"]
        for procs in (others, routers):
            _stop_procs(procs, hurry)


def own_group_dying_with(
    parent: int, death_signal: signal.Signals = signal.SIGKILL
) -> Callable[[], None]:
    """Runs in the child between fork and exec. Its own process group: a Ctrl-C at the terminal
    reaches only serve, which drains before it stops the children. PR_SET_PDEATHSIG: a serve
    that is killed takes its children with it."""

    def setup() -> None:
        os.setpgid(0, 0)
        if _LIBC is not None:
            _LIBC.prctl(PR_SET_PDEATHSIG, int(death_signal))
        if os.getppid() != parent:  # serve died before prctl took effect
            os._exit(1)

    return setup


def _stop_procs(procs: list[subprocess.Popen], hurry: Callable[[], bool]) -> None:
    for proc in procs:
        if proc.poll() is None and not hurry():
            proc.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline and not hurry():
        time.sleep(0.05)
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        try:  # whatever it started itself (e.g. multiprocessing's resource tracker)
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def wait_healthy(url: str, deployment: Deployment, timeout_s: float, signals: Signals) -> bool:
    """True once /health answers 200; False when a signal came first."""
    deadline = time.monotonic() + timeout_s
    while not signals.count:
        dead = deployment.dead()
        if dead:
            raise StartupError(f"{', '.join(dead)} died during start-up; stopped the others")
        if healthy(url):
            return True
        if time.monotonic() >= deadline:
            raise StartupError(f"the server did not become healthy within {timeout_s:.0f}s")
        time.sleep(POLL_S)
    return False


def run_serve(args: argparse.Namespace, parser: argparse.ArgumentParser, model_dir: Path) -> int:
    """`model_dir`: resolved once (server.launch.flags), so the children never all download and
    convert it at once."""
    signals = Signals()
    deployment = Deployment(env={KEY_ENV: serve_cluster_key(args.cluster_key).to_text()})
    url = local_url(args.host, args.port)
    with control_address(args.control) as control:
        try:
            spawn_roles(deployment, args, parser, str(model_dir), control)
            if not wait_healthy(url, deployment, STARTUP_TIMEOUT_S, signals):
                return 0
            print(f"Adrenaline is serving {args.model} at {url}", flush=True)
            watch(deployment, signals)

            def give_up() -> bool:  # a second signal, or nothing left to drain
                return signals.count >= 2 or deployment.exited("router")

            return 0 if drain(url, args.api_key, args.drain_timeout, give_up) else 1
        except StartupError as exc:
            print(f"adrenaline serve: error: {exc}", file=sys.stderr, flush=True)
            return 1
        finally:
            deployment.stop(signals)
            deployment.remove_segments()


def serve_cluster_key(path: str | None) -> ClusterKey:
    """The key given (--cluster-key, else $ADRENALINE_CLUSTER_KEY), else a new one for this
    deployment alone: even on one host, no process serve did not start can join it."""
    try:
        given = load_cluster_key(path)
    except ClusterKeyError as exc:
        raise SystemExit(f"adrenaline serve: error: --cluster-key: {exc}") from exc
    return given or ClusterKey.parse(generate_cluster_key(), "a new key")


def decode_kv_transfer(requested: str, decode_gpu: str, prefill_gpus: list[str]) -> str:
    """A decode worker's KV transport: `auto` becomes NCCL when any prefill worker runs on
    another GPU, because each role sees only its own GPU (CUDA_VISIBLE_DEVICES), so CUDA IPC
    could not open the other's memory; on one shared GPU `auto` stays (CUDA IPC)."""
    if requested != "auto" or all(gpu == decode_gpu for gpu in prefill_gpus):
        return requested
    return "nccl"


def spawn_roles(
    deployment: Deployment,
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    model_dir: str,
    control: str,
) -> None:
    engine_argv = argv_for_groups(parser, {"engine", "logging"}, args)
    engine_argv = _replace_flag(engine_argv, "--model", model_dir)
    workers = args.num_prefill + args.num_decode
    threads = args.torch_threads or max(1, (os.cpu_count() or 1) // workers)
    gpus = _visible_gpus() if args.device == "cuda" else []
    executors = not args.no_attention_executor
    # The API key goes through the environment: a command line is visible in `ps`.
    router_flags = argv_for_groups(
        parser, {"router", "logging"}, args, frozenset({"api_key", "control", "cluster_key"})
    )
    router_argv = role_command("router") + router_flags + [
        "--control", control,
        "--model", model_dir, "--served-model-name", args.served_model_name or args.model,
        "--block-size", str(args.block_size),
        "--num-attention", str(args.num_prefill if executors else 0),
    ]  # fmt: skip
    deployment.spawn("router", router_argv, {"ADRENALINE_API_KEY": args.api_key or ""})
    prefill_gpus = [gpus[i % len(gpus)] for i in range(args.num_prefill)] if gpus else []
    for i, role in enumerate(["prefill"] * args.num_prefill + ["decode"] * args.num_decode):
        index = i if role == "prefill" else i - args.num_prefill
        kv_transfer = args.kv_transfer
        if role == "decode" and gpus:
            kv_transfer = decode_kv_transfer(kv_transfer, gpus[i % len(gpus)], prefill_gpus)
        argv = role_command(role) + engine_argv + [
            "--router", control, "--instance", f"{role}-{index}",
            "--kv-transfer", kv_transfer, "--torch-threads", str(threads),
        ]  # fmt: skip
        if role == "prefill":
            # The prefill worker's pool holds its executor's share too (none without one).
            argv += argv_for_groups(parser, {"attention executor"}, args)
            argv += [] if executors else ["--offload-blocks", "0"]
        env = {"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]} if gpus else None
        deployment.spawn(f"{role}-{index}", argv, env)
        if role == "prefill" and executors:
            # Beside its prefill worker: same host, same device.
            deployment.spawn(f"attention-{index}", role_command("attention") + engine_argv + [
                "--router", control, "--instance", f"attention-{index}",
                "--colocated-with", f"prefill-{index}",
            ], env)  # fmt: skip


@contextlib.contextmanager
def control_address(given: str | None) -> Iterator[str]:
    """The router's control address: the one given, else an ipc socket in a private directory
    (0700, removed at exit), so no two deployments on a host ever share one."""
    if given is not None:
        yield given
        return
    # sun_path holds 107 bytes: a long $TMPDIR would not fit the socket's path.
    parent = None if len(tempfile.gettempdir()) < 64 else "/tmp"
    private = tempfile.mkdtemp(prefix="adrenaline-", dir=parent)
    try:
        yield f"ipc://{private}/control"
    finally:
        shutil.rmtree(private, ignore_errors=True)


def watch(deployment: Deployment, signals: Signals) -> None:
    """Until a signal: a child that exits is noticed within POLL_S and logged once."""
    while not signals.count:
        for name in deployment.newly_dead():
            log.warning("%s stopped; /health reports it", name)
        time.sleep(POLL_S)


def _replace_flag(argv: list[str], flag: str, value: str) -> list[str]:
    out, skip = [], False
    for i, item in enumerate(argv):
        if skip:
            skip = False
            continue
        if item == flag:
            skip = i + 1 < len(argv)
            continue
        out.append(item)
    return out + [flag, value]


def _visible_gpus() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return [g for g in visible.split(",") if g]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]
