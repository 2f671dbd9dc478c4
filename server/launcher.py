"""`adrenaline serve`: one router, N prefill and M decode workers on this machine, each its own
process. Prints the URL once `/health` answers 200; SIGINT or SIGTERM stops every child.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

STARTUP_TIMEOUT_S = 600.0
STOP_GRACE_S = 10.0


def role_command(role: str) -> list[str]:
    """`adrenaline ROLE` when the console script is installed, so `ps` shows the role."""
    script = Path(sys.executable).parent / "adrenaline"
    if script.exists():
        return [str(script), role]
    found = shutil.which("adrenaline")
    return [found, role] if found else [sys.executable, "-m", "server.cli", role]


def argv_for_groups(parser: argparse.ArgumentParser, titles: set[str], args) -> list[str]:
    """Re-emits the flags of the named argument groups whose values differ from the default."""
    argv: list[str] = []
    for group in parser._action_groups:
        if group.title not in titles:
            continue
        for action in group._group_actions:
            value = getattr(args, action.dest)
            if value == action.default or value is None:
                continue
            flag = action.option_strings[-1]
            if isinstance(action, argparse._StoreTrueAction):
                argv.append(flag)
            else:
                argv += [flag, str(value)]
    return argv


class Deployment:
    def __init__(self) -> None:
        self.children: list[tuple[str, subprocess.Popen]] = []

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        # Same process group as `serve`: a signal to the group reaches every role.
        proc = subprocess.Popen(argv, env={**os.environ, **(env or {})})
        self.children.append((name, proc))

    def dead(self) -> list[str]:
        return [
            f"{name} (exit {p.returncode})" for name, p in self.children if p.poll() is not None
        ]

    def stop(self) -> None:
        for _, proc in self.children:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for _, proc in self.children:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_healthy(url: str, deployment: Deployment, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        dead = deployment.dead()
        if dead:
            raise RuntimeError(f"a process exited during start-up: {', '.join(dead)}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the server did not become healthy within {timeout_s:.0f}s")


def run_serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from engine.model_source import resolve_model

    # Resolved once here so the children do not all download and convert it at once.
    model_dir = str(resolve_model(args.model))
    engine_argv = argv_for_groups(parser, {"engine", "logging"}, args)
    engine_argv = _replace_flag(engine_argv, "--model", model_dir)
    workers = args.num_prefill + args.num_decode
    threads = args.torch_threads or max(1, (os.cpu_count() or 1) // workers)
    gpus = _visible_gpus() if args.device == "cuda" else []
    deployment = Deployment()
    executors = not args.no_attention_executor
    router_argv = role_command("router") + argv_for_groups(parser, {"router", "logging"}, args) + [
        "--model", model_dir, "--served-model-name", args.served_model_name or args.model,
        "--block-size", str(args.block_size),
        "--num-attention", str(args.num_prefill if executors else 0),
    ]  # fmt: skip
    try:
        deployment.spawn("router", router_argv)
        for i, role in enumerate(["prefill"] * args.num_prefill + ["decode"] * args.num_decode):
            index = i if role == "prefill" else i - args.num_prefill
            argv = (
                role_command(role)
                + engine_argv
                + [
                    "--router",
                    args.control,
                    "--instance",
                    f"{role}-{index}",
                    "--kv-transfer",
                    args.kv_transfer,
                    "--torch-threads",
                    str(threads),
                ]
            )
            if role == "prefill":
                # The prefill worker's pool holds its executor's share too (none without one).
                argv += argv_for_groups(parser, {"attention executor"}, args)
                argv += [] if executors else ["--offload-blocks", "0"]
            env = {"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]} if gpus else None
            deployment.spawn(f"{role}-{index}", argv, env)
            if role == "prefill" and executors:
                # Beside its prefill worker: same host, same device.
                deployment.spawn(f"attention-{index}", role_command("attention") + engine_argv + [
                    "--router", args.control, "--instance", f"attention-{index}",
                    "--colocated-with", f"prefill-{index}",
                ], env)  # fmt: skip
        _stop_on_signals(deployment)
        url = f"http://{args.host}:{args.port}"
        wait_healthy(url, deployment, STARTUP_TIMEOUT_S)
        print(f"Adrenaline is serving {args.model} at {url}", flush=True)
        while True:
            time.sleep(1.0)
            for name in deployment.dead():
                print(f"warning: {name} stopped; /health reports it", file=sys.stderr, flush=True)
                deployment.children = [(n, p) for n, p in deployment.children if p.poll() is None]
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        deployment.stop()


def _stop_on_signals(deployment: Deployment) -> None:
    def handler(signum, _frame):
        raise KeyboardInterrupt  # unwinds to run_serve's finally, which stops the children

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


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
