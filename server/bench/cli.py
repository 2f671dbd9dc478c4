"""`adrenaline bench`'s command line: one run against a running server (`client.py`), or with
`--compare` one fresh deployment per offload policy (`compare.py`). The one module that imports
both, so the comparison imports the client and never the reverse.
"""

from __future__ import annotations

import argparse
import logging

from server.bench.client import add_client_flags, http_client, run_client
from server.bench.compare import add_compare_flags, run_compare


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="benchmark a running server (like vllm bench serve)")
    add_bench_flags(p)
    return p


def add_bench_flags(p: argparse.ArgumentParser) -> None:
    """The benchmark's command line; `adrenaline simulate` takes the same one."""
    add_client_flags(p)
    add_compare_flags(p)


def run_bench(args: argparse.Namespace) -> int:
    """Runs the benchmark the flags describe; 0 if any request completed, 1 if none, 2 on bad flags."""
    http_client()  # before any work: a plain install without the bench extra stops here
    # One INFO line per request from httpx would bury the report.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if getattr(args, "compare", None):
        return run_compare(args)
    return run_client(args)
