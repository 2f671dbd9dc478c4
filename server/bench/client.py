"""`adrenaline bench`: a serving benchmark client in the manner of `vllm bench serve`.

Sends streamed requests on a Poisson schedule, times each chunk, and reports throughput,
TTFT/TPOT/ITL/E2EL percentiles and goodput (aggregated in `server.bench.metrics`). The schedule
and the bodies are pure functions; `benchmark` is the one async driver.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from server.bench.datasets import (
    REASONING_SHAPE,
    SYNTHETIC_SHAPE,
    BenchRequest,
    DatasetError,
    estimate_tokens,
    lognormal_request_lengths,
    parse_vocab_range,
    random_requests,
    reasoning_requests,
    sharegpt_requests,
    synthetic_requests,
    tokenizer_counter,
)
from server.bench.metrics import RequestRecord, aggregate, format_table, per_request_arrays
from server.extras import import_extra

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

ENDPOINTS = ("/v1/completions", "/generate")


def http_client():
    """httpx, the benchmark client's one dependency beyond the server's."""
    return import_extra("httpx", "bench", "adrenaline bench")


class BenchError(RuntimeError):
    """The benchmark cannot start: bad flags, or the server does not answer."""


def add_client_flags(p: argparse.ArgumentParser) -> None:
    """One benchmark run's flags; `server.bench.cli` adds `--compare`'s beside them."""
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    p.add_argument("--endpoint", choices=ENDPOINTS, default="/v1/completions")
    p.add_argument(
        "--model",
        default=None,
        help="model name sent in the body (default: first id of GET /v1/models)",
    )
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument(
        "--request-rate",
        type=float,
        default=math.inf,
        help="Poisson arrivals in req/s; inf sends all at once",
    )
    p.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    p.add_argument(
        "--dataset",
        choices=["synthetic", "reasoning", "random", "sharegpt"],
        default="synthetic",
        help="synthetic: ShareGPT-like lengths; reasoning: OpenThoughts-like long outputs",
    )
    p.add_argument("--dataset-path", default=None, help="ShareGPT JSON file for --dataset sharegpt")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer.json (or its directory) to count ShareGPT tokens; default len(text)//4",
    )
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument(
        "--max-input-len", type=int, default=1024, help="clip for synthetic/sharegpt prompts"
    )
    p.add_argument(
        "--max-output-len", type=int, default=1024, help="clip for synthetic/sharegpt outputs"
    )
    p.add_argument(
        "--vocab-range", default="100:300", help="token ids LO:HI (half-open) for token-id prompts"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo-ttft-ms", type=float, default=None)
    p.add_argument("--slo-tpot-ms", type=float, default=None)
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--save-result", default=None, metavar="FILE.json")
    p.add_argument("--disable-tqdm", action="store_true")
    p.add_argument(
        "--timeout", type=float, default=3600.0, help="seconds per request, whole stream"
    )


def auth_headers() -> dict[str, str]:
    """The API key from the environment (as vLLM's bench reads OPENAI_API_KEY), never a flag."""
    key = os.environ.get("ADRENALINE_API_KEY") or os.environ.get("OPENAI_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def arrival_times(num: int, rate: float, seed: int) -> list[float]:
    """Send offsets in seconds: the first at 0, then exponential gaps of mean 1/rate."""
    if math.isinf(rate):
        return [0.0] * num
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=max(num - 1, 0))
    return [0.0, *np.cumsum(gaps).tolist()][:num]


def request_body(endpoint: str, model: str | None, req: BenchRequest, ignore_eos: bool) -> dict:
    body: dict = {
        "max_tokens": req.output_len,
        "temperature": 0.0,
        "ignore_eos": ignore_eos,
        "stream": True,
    }
    if endpoint == "/generate":
        body["prompt_token_ids" if isinstance(req.prompt, list) else "prompt"] = req.prompt
        return body
    return {
        "model": model,
        "prompt": req.prompt,
        **body,
        "stream_options": {"include_usage": True},
    }


def decode_line(line: str, sse: bool) -> dict | None:
    """The JSON object of one stream line; None for blanks, SSE comments and `[DONE]`."""
    line = line.strip()
    if sse:
        if not line.startswith("data:"):
            return None
        line = line[len("data:") :].strip()
        if line == "[DONE]":
            return None
    return json.loads(line) if line else None


def has_content(chunk: dict) -> bool:
    # /v1/completions chunks carry `choices`; /generate lines carry `token_ids`/`text`.
    return bool(chunk.get("choices") or chunk.get("token_ids") or chunk.get("text"))


async def send_request(
    client: httpx.AsyncClient, url: str, body: dict, prompt_len: int, sse: bool
) -> RequestRecord:
    httpx = http_client()
    rec = RequestRecord(prompt_len=prompt_len)
    start = last = time.perf_counter()
    chunks, usage_tokens = 0, None
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                rec.error = f"HTTP {resp.status_code}: {text[:300]}"
                return rec
            async for line in resp.aiter_lines():
                now = time.perf_counter()
                chunk = decode_line(line, sse)
                if chunk is None:
                    continue
                if "error" in chunk:
                    rec.error = f"error in stream: {chunk['error']}"
                    return rec
                if has_content(chunk):
                    if chunks == 0:
                        rec.ttft = now - start
                    else:
                        rec.itl.append(now - last)
                    last, chunks = now, chunks + 1
                usage = chunk.get("usage")
                if usage:
                    usage_tokens = usage.get("completion_tokens", usage_tokens)
                    rec.prompt_len = usage.get("prompt_tokens", rec.prompt_len)
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        rec.error = f"{type(exc).__name__}: {exc}"
        return rec
    rec.e2el = time.perf_counter() - start
    rec.output_tokens = usage_tokens if usage_tokens is not None else chunks
    rec.success = chunks > 0
    if not rec.success:
        rec.error = "stream ended without content"
    return rec


def _progress_bar(total: int, disable: bool):
    if disable:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total)


async def benchmark(
    url: str,
    bodies: list[dict],
    prompt_lens: list[int],
    offsets: list[float],
    max_concurrency: int | None,
    timeout: float,
    sse: bool = True,
    show_progress: bool = True,
) -> tuple[list[RequestRecord], float]:
    """Sends body i at `offsets[i]` seconds after start; returns the records and the duration.

    `sse`: the stream is Server-Sent Events (/v1/completions), else NDJSON lines (/generate)."""
    limit = max_concurrency or len(bodies)
    gate = asyncio.Semaphore(limit)
    bar = _progress_bar(len(bodies), disable=not show_progress)
    httpx = http_client()
    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
    async with httpx.AsyncClient(
        timeout=httpx.Timeout(timeout), limits=limits, headers=auth_headers()
    ) as client:
        start = time.perf_counter()

        async def one(i: int) -> RequestRecord:
            await asyncio.sleep(max(0.0, start + offsets[i] - time.perf_counter()))
            async with gate:
                try:
                    coro = send_request(client, url, bodies[i], prompt_lens[i], sse)
                    rec = await asyncio.wait_for(coro, timeout)
                except asyncio.TimeoutError:
                    rec = RequestRecord(prompt_lens[i], error=f"timed out after {timeout}s")
            if bar is not None:
                bar.update(1)
            return rec

        records = await asyncio.gather(*(one(i) for i in range(len(bodies))))
        duration = time.perf_counter() - start
    if bar is not None:
        bar.close()
    return list(records), duration


def build_requests(args: argparse.Namespace) -> list[BenchRequest]:
    n, seed = args.num_prompts, args.seed
    if args.dataset == "sharegpt":
        if not args.dataset_path:
            raise DatasetError("--dataset sharegpt needs --dataset-path FILE.json")
        count = tokenizer_counter(args.tokenizer) if args.tokenizer else estimate_tokens
        return sharegpt_requests(
            args.dataset_path, n, args.max_input_len, args.max_output_len, seed, count
        )
    vocab = parse_vocab_range(args.vocab_range)
    if args.dataset == "random":
        return random_requests(n, args.random_input_len, args.random_output_len, vocab, seed)
    if args.dataset == "reasoning":
        return reasoning_requests(n, args.max_input_len, args.max_output_len, vocab, seed)
    return synthetic_requests(n, args.max_input_len, args.max_output_len, vocab, seed)


def build_lengths(args: argparse.Namespace) -> tuple[list[int], list[int]]:
    """The prompt and output lengths of build_requests' requests (what `simulate` needs): the
    lognormal datasets' without drawing their prompts' token ids."""
    if args.dataset not in ("synthetic", "reasoning"):
        requests = build_requests(args)
        return [r.prompt_len for r in requests], [r.output_len for r in requests]
    parse_vocab_range(args.vocab_range)  # the flag errors bench gives
    shape = REASONING_SHAPE if args.dataset == "reasoning" else SYNTHETIC_SHAPE
    rng = np.random.default_rng(args.seed)
    return lognormal_request_lengths(
        rng, args.num_prompts, args.max_input_len, args.max_output_len, shape
    )


def resolve_model(base_url: str, timeout: float) -> str:
    httpx = http_client()
    try:
        resp = httpx.get(
            f"{base_url}/v1/models", timeout=min(timeout, 30.0), headers=auth_headers()
        )
        resp.raise_for_status()
        return resp.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BenchError(
            f"could not read the model from {base_url}/v1/models ({reason}); pass --model"
        ) from exc


def check_args(args: argparse.Namespace) -> None:
    if args.num_prompts < 1:
        raise BenchError("--num-prompts must be >= 1")
    if not args.request_rate > 0:
        raise BenchError("--request-rate must be > 0 (inf sends all at once)")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise BenchError("--max-concurrency must be >= 1")
    if not args.timeout > 0:
        raise BenchError("--timeout must be > 0")
    if args.plot and not args.compare:
        raise BenchError("--plot goes with --compare")


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def save_result(
    path: str,
    args: argparse.Namespace,
    model: str | None,
    result: dict,
    records: list[RequestRecord],
) -> None:
    saved = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "backend": "adrenaline",
        "url": args.url,
        "endpoint": args.endpoint,
        "model": model,
        "dataset": args.dataset,
        "num_prompts": args.num_prompts,
        "request_rate": _jsonable(args.request_rate),
        "max_concurrency": args.max_concurrency,
        "slo_ttft_ms": args.slo_ttft_ms,
        "slo_tpot_ms": args.slo_tpot_ms,
        **result,
        "args": {k: _jsonable(v) for k, v in vars(args).items() if not callable(v)},
        **per_request_arrays(records),
    }
    Path(path).write_text(json.dumps(saved, indent=2))


def run_client(args: argparse.Namespace) -> int:
    """One benchmark run against `--url`; 0 if any request completed, 1 if none, 2 on bad flags."""
    base_url = args.url.rstrip("/")
    try:
        check_args(args)
        requests = build_requests(args)
        model = args.model
        if model is None and args.endpoint == "/v1/completions":
            model = resolve_model(base_url, args.timeout)
    except (BenchError, DatasetError) as exc:
        print(f"adrenaline bench: error: {exc}", file=sys.stderr)
        return 2
    bodies = [request_body(args.endpoint, model, r, args.ignore_eos) for r in requests]
    offsets = arrival_times(len(requests), args.request_rate, args.seed)
    records, duration = asyncio.run(
        benchmark(
            base_url + args.endpoint,
            bodies,
            [r.prompt_len for r in requests],
            offsets,
            args.max_concurrency,
            args.timeout,
            sse=args.endpoint != "/generate",
            show_progress=not args.disable_tqdm,
        )
    )
    result = aggregate(records, duration, args.slo_ttft_ms, args.slo_tpot_ms)
    print(format_table(result, args.request_rate, args.max_concurrency), flush=True)
    for error in sorted({r.error for r in records if r.error})[:5]:
        log.warning("bench: failed request: %s", error)
    if args.save_result:
        save_result(args.save_result, args, model, result, records)
    return 0 if result["completed"] else 1
