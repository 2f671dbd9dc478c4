"""Attention offloading's cost, measured in one run between real processes. Prints tables and
writes JSON.

1. Per-layer round trip, decode side to executor and back: the shared-memory counter channel
   (transport.attention_channel) against sending q, k, v and the output as raw ZeroMQ frames.
2. Decode step time of a real `LLMEngine` (decode worker, in this process) offloading 0%, 50% or
   100% of its rows to a real `ExecutorWorker` (a spawned process; this process plays router).

    python benchmarks/offload_roundtrip.py --models tiny smollm2
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing as mp
import os
import platform
import random
import statistics
import time
from pathlib import Path

import torch
import zmq

from transport.attention_channel import DecodeSideLink, ExecutorSideLink

SHAPES = {  # name: (num_heads, num_kv_heads, head_dim)
    "smollm2-135m": (9, 3, 64),
    "llama-7b": (32, 32, 128),
}
CONTEXT_LEN = 256  # tokens per row in the executor's pool when --executor-op attention


# Part 1: one layer's round trip ------------------------------------------------------------


def _executor_op(op: str, heads: int, kv_heads: int, head_dim: int, max_rows: int, device):
    """What the executor does with a layer's rows: a copy (transport cost alone), or paged decode
    attention over CONTEXT_LEN tokens per row with the real torch backend."""
    if op == "copy":
        return lambda q, k, v: q.clone()
    from attention.torch_backend import TorchAttention

    backend = TorchAttention(heads, kv_heads, head_dim, head_dim**-0.5)
    block = 16
    blocks_per_row = CONTEXT_LEN // block
    pool = torch.randn(2, max_rows * blocks_per_row, block, kv_heads, head_dim, device=device)
    tables = torch.arange(max_rows * blocks_per_row, dtype=torch.int32, device=device)
    tables = tables.view(max_rows, blocks_per_row)
    lens = torch.full((max_rows,), CONTEXT_LEN, dtype=torch.int32, device=device)

    def attend(q, k, v):
        n = q.shape[0]
        return backend.decode(q, pool[0], pool[1], lens[:n], tables[:n], CONTEXT_LEN)

    return attend


def _roundtrip_child(path: str, shape, rows_plan, op: str, device: str, endpoint, port_q) -> None:
    """The executor side: answers sum(rows_plan counts) layers, in order, each a one-layer step
    run as the executor worker runs one (begin_step, receive, respond, check)."""
    torch.set_num_threads(1)
    heads, kv_heads, head_dim = shape
    max_rows = max(r for r, _ in rows_plan)
    attend = _executor_op(op, heads, kv_heads, head_dim, max_rows, device)
    total = sum(count for _, count in rows_plan)
    if path == "zmq":
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PAIR)
        sock.setsockopt(zmq.RCVTIMEO, 30_000)
        port_q.put(sock.bind_to_random_port("tcp://127.0.0.1"))
        row_bytes = heads * head_dim * 4
        for _ in range(total):
            fq, fk, fv = sock.recv_multipart(copy=False)
            n = len(fq.buffer) // row_bytes
            q = torch.frombuffer(fq.buffer, dtype=torch.float32).view(n, heads, head_dim)
            k = torch.frombuffer(fk.buffer, dtype=torch.float32).view(n, kv_heads, head_dim)
            v = torch.frombuffer(fv.buffer, dtype=torch.float32).view(n, kv_heads, head_dim)
            if device != "cpu":
                q, k, v = q.to(device), k.to(device), v.to(device)
            out = attend(q, k, v).cpu().contiguous()
            sock.send(out.numpy(), copy=False)
        sock.close(0)
        ctx.term()
        return
    link = ExecutorSideLink(endpoint) if path == "shm" else _cuda_executor_link(endpoint)
    seq = 0
    for rows, count in rows_plan:
        for _ in range(count):
            seq += 1
            link.begin_step(seq - 1, rows, seq)  # step seq - 1 of one layer: seq_no seq
            q, k, v = link.receive(seq, 30.0)
            link.respond(seq, attend(q, k, v))
            link.check()
    link.close()


def _cuda_channel():
    return importlib.import_module("transport.cuda_attention_channel")


def _cuda_decode_link(max_rows: int, heads: int, kv_heads: int, head_dim: int, device: str):
    mod = _cuda_channel()
    return mod.CudaDecodeSideLink(max_rows, heads, kv_heads, head_dim, torch.float32, device)


def _cuda_executor_link(endpoint):
    return _cuda_channel().CudaExecutorSideLink(endpoint)


def _inputs(rows: int, shape, device: str):
    heads, kv_heads, head_dim = shape
    return (
        torch.randn(rows, heads, head_dim, device=device),
        torch.randn(rows, kv_heads, head_dim, device=device),
        torch.randn(rows, kv_heads, head_dim, device=device),
    )


def _summary(samples_ns: list[int]) -> dict:
    us = sorted(s / 1000 for s in samples_ns)
    return {
        "median_us": round(statistics.median(us), 1),
        "p99_us": round(us[min(len(us) - 1, int(0.99 * len(us)))], 1),
        "mean_us": round(statistics.fmean(us), 1),
    }


def measure_roundtrips(path: str, shape, batches, warmup, iters, op, device) -> dict[int, dict]:
    """Per batch size: the decode side's time from posting a layer's rows to holding its output."""
    heads, kv_heads, head_dim = shape
    plan = [(rows, warmup + iters) for rows in batches]
    ctx = mp.get_context("spawn")
    port_q = ctx.Queue()
    link = sock = zctx = None
    endpoint = None
    if path in ("shm", "cuda"):
        if path == "shm":
            link = DecodeSideLink(max(batches), heads, kv_heads, head_dim, torch.float32)
        else:
            link = _cuda_decode_link(max(batches), heads, kv_heads, head_dim, device)
        endpoint = link.endpoint
    child = ctx.Process(
        target=_roundtrip_child, args=(path, shape, plan, op, device, endpoint, port_q)
    )
    child.start()
    try:
        if path == "zmq":
            zctx = zmq.Context()
            sock = zctx.socket(zmq.PAIR)
            sock.setsockopt(zmq.RCVTIMEO, 30_000)  # a dead executor fails the run, not hangs it
            sock.connect(f"tcp://127.0.0.1:{port_q.get(timeout=60)}")
        results, seq = {}, 0
        for rows, count in plan:
            q, k, v = _inputs(rows, shape, device)
            samples = []
            for i in range(count):
                seq += 1
                start = time.perf_counter_ns()
                if link is not None:  # one step of one layer, as OffloadClient runs a step
                    link.begin_step(seq - 1, seq)
                    link.post(seq, q, k, v)
                    out = link.collect(seq, seq - 1, rows, 30.0)
                    link.check()
                else:
                    frames = [t.cpu().contiguous().numpy() for t in (q, k, v)]
                    sock.send_multipart(frames, copy=False)
                    raw = sock.recv(copy=False)
                    out = torch.frombuffer(raw.buffer, dtype=torch.float32)
                    out = out.view(rows, heads, head_dim).to(device)
                if device != "cpu":
                    torch.cuda.synchronize()
                if i >= warmup:
                    samples.append(time.perf_counter_ns() - start)
            assert out.shape == (rows, heads, head_dim)
            results[rows] = _summary(samples)
        child.join(timeout=60)
        return results
    finally:
        if child.is_alive():
            child.kill()
        if sock is not None:
            sock.close(0)
            zctx.term()
        if link is not None:
            link.close()


def run_roundtrips(args) -> tuple[list[dict], list[str]]:
    paths, notes = ["shm", "zmq"], []
    if args.device == "cuda":
        try:
            _cuda_channel()
            paths = ["cuda", "zmq"]
        except ImportError:
            notes.append("transport/cuda_attention_channel.py missing: GPU channel column skipped")
            paths = ["zmq"]
    rows = []
    for name, shape in SHAPES.items():
        by_path = {
            p: measure_roundtrips(
                p, shape, args.batches, args.warmup, args.iters, args.executor_op, args.device
            )  # fmt: skip
            for p in paths
        }
        for batch in args.batches:
            rows.append({"shape": name, "rows": batch, **{p: by_path[p][batch] for p in paths}})
    return rows, notes


def print_roundtrips(rows: list[dict]) -> None:
    paths = [p for p in ("shm", "cuda", "zmq") if p in rows[0]]
    head = "".join(f"{p + ' med':>11}{p + ' p99':>11}" for p in paths)
    print(f"{'shape':<14}{'rows':>5}{head}   (microseconds per layer round trip)")
    for r in rows:
        cells = "".join(f"{r[p]['median_us']:>11}{r[p]['p99_us']:>11}" for p in paths)
        print(f"{r['shape']:<14}{r['rows']:>5}{cells}")


# Part 2: decode steps with offloaded rows ------------------------------------------------


def _executor_child(model: str, router: str, offload_blocks: int) -> None:
    """A real attention executor, as `adrenaline attention` runs it, but on this process's router."""
    from attention.executor import AttentionExecutor
    from attention.executor_worker import ExecutorWorker
    from attention.torch_backend import TorchAttention
    from engine.config import ModelConfig
    from engine.model_source import resolve_model

    torch.set_num_threads(1)
    cfg = ModelConfig.from_model_dir(resolve_model(model))
    backend = TorchAttention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.head_dim**-0.5)

    def make_executor(pool, first_block, num_blocks):
        return AttentionExecutor(pool, backend, first_block, num_blocks)

    # The pool arrives as the prefill worker's would: AttachPool from this process's router.
    ExecutorWorker(
        "attention-0", "prefill-0", make_executor, router, "127.0.0.1", model, 4096
    ).run()


class StepBench:
    """A decode engine with an offload client, one executor process, and the router's part."""

    def __init__(self, model: str, max_batch: int, prompt_len: int, steps: int) -> None:
        from engine.engine import LLMEngine
        from engine.llm import build_engine_config
        from server.roles.offload_client import OffloadClient

        self.prompt_len, self.steps = prompt_len, steps
        blocks = max_batch * ((prompt_len + steps + 16) // 16 + 1) + 8
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        address = f"tcp://127.0.0.1:{self.router.bind_to_random_port('tcp://127.0.0.1')}"
        self.child = mp.get_context("spawn").Process(
            target=_executor_child, args=(model, address, blocks)
        )
        self.child.start()
        config = build_engine_config(
            model, num_blocks=blocks, max_num_seqs=max_batch, max_model_len=4096,
            attention_backend="torch",
        )  # fmt: skip
        cfg_args = (max_batch, *self._heads(model), torch.float32)
        self.client = OffloadClient("decode-0", self._layers(model), *cfg_args)
        self.engine = LLMEngine(config, remote=self.client)
        self.client.connect("attention-0", self._attach_prefill_pool(model, blocks))
        self.vocab = self.engine.model_config.vocab_size
        self.counter = 0

    def _attach_prefill_pool(self, model: str, executor_blocks: int) -> str:
        """Stands in for the prefill worker: a shared pool whose tail the executor owns."""
        from transport.messages import AttachPool, Register, encode
        from transport.shm_transfer import ShmPoolHost

        heads, kv_heads, head_dim = self._heads(model)
        self.lent_blocks = executor_blocks  # the prefill part, lent round-robin (timing only)
        self.next_lent = 0
        shape = (self._layers(model), 2, self.lent_blocks + executor_blocks, 16, kv_heads,
                 head_dim)  # fmt: skip
        self.prefill_pool = ShmPoolHost(shape, torch.float32, "prefill-0")
        self.prefill_pool.endpoint.update(
            offload_base=self.lent_blocks, offload_blocks=executor_blocks
        )
        address = self._recv(Register).attention_address
        self.router.send_multipart([b"attention-0", encode(AttachPool(self.prefill_pool.endpoint))])
        while not self._recv(Register).kv_endpoint:
            pass
        return address

    def _lend(self, prompt_len: int) -> list[int]:
        n = -(-prompt_len // 16)
        if self.next_lent + n > self.lent_blocks:
            self.next_lent = 0
        first, self.next_lent = self.next_lent, self.next_lent + n
        return list(range(first, first + n))

    @staticmethod
    def _heads(model: str):
        from engine.config import ModelConfig
        from engine.model_source import resolve_model

        cfg = ModelConfig.from_model_dir(resolve_model(model))
        return cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    @staticmethod
    def _layers(model: str) -> int:
        from engine.config import ModelConfig
        from engine.model_source import resolve_model

        return ModelConfig.from_model_dir(resolve_model(model)).num_layers

    def _recv(self, kind, timeout_s: float = 60.0):
        from transport.messages import decode

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.router.poll(100):
                _, raw = self.router.recv_multipart()
                msg = decode(raw)
                if isinstance(msg, kind):
                    return msg
        raise TimeoutError(f"no {kind.__name__} from the executor")

    def run(self, batch: int, offloaded: int, warmup: int) -> list[float]:
        """Seconds per decode step, each step carrying all `batch` rows, `offloaded` of them
        offloaded; the first `warmup` steps are not counted."""
        from engine.engine import Handoff
        from engine.sequence import SamplingParams
        from transport.messages import (
            DecodeReserved,
            ReserveDecode,
            SamplingSpec,
            encode,
        )

        rng = random.Random(batch * 100 + offloaded)
        max_tokens = warmup + self.steps + 1
        spec = SamplingSpec(max_tokens, 0.0, 1.0, -1, 0.0, None, [], [], True, False)
        for i in range(batch):
            self.counter += 1
            rid = f"bench-{self.counter}"
            prompt = [rng.randrange(10, self.vocab - 10) for _ in range(self.prompt_len)]
            params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
            first = rng.randrange(10, self.vocab - 10)
            handoff = Handoff(prompt, [first], None, params, 0)
            if i < offloaded:
                # The prompt's KV (zeros: timing only) "lies" in the prefill blocks it lends.
                lent = self._lend(len(prompt))
                reserve = ReserveDecode(
                    request_id=rid, prompt_token_ids=prompt, output_token_ids=[first],
                    output_logprobs=None, text_sent=0, sampling=spec,
                    prefill_instance="prefill-0", transfer_id=self.counter, executor="attention-0",
                    lent_blocks=lent,
                )  # fmt: skip
                self.router.send_multipart([b"attention-0", encode(reserve)])
                reply = self._recv(DecodeReserved)
                assert reply.error is None, reply.error
                self.engine.start_offloaded(rid, handoff, "attention-0")
            else:
                self.engine.reserve_prefilled(rid, handoff)
                self.engine.start_prefilled(rid)
        times = []
        while self.engine.has_unfinished():
            start = time.perf_counter()
            outs = self.engine.step()
            times.append(time.perf_counter() - start)
            assert outs and len(outs) == batch, "every step must carry the whole batch"
        # An executor failure would show as a short step above, or as requests taken back.
        assert getattr(self.engine, "num_reclaimed", 0) == 0, "the executor failed a step"
        return times[warmup : warmup + self.steps]

    def close(self) -> None:
        from transport.messages import Shutdown, encode

        self.router.send_multipart([b"attention-0", encode(Shutdown())])
        self.child.join(timeout=10)
        if self.child.is_alive():
            self.child.kill()
        self.client.close()
        self.prefill_pool.close()
        self.router.close(0)
        self.ctx.term()


def run_steps(args) -> list[dict]:
    torch.set_num_threads(1)  # the decode worker's core; the executor has the other
    rows = []
    for model in args.models:
        bench = StepBench(model, max(args.batches_step), args.prompt_len, args.steps)
        cells: dict[tuple[int, int], list[float]] = {}
        try:
            # Rounds interleave the cells so that drifting load from other processes spreads
            # over all of them instead of skewing one.
            for _ in range(args.rounds):
                for batch in args.batches_step:
                    for fraction in (0.0, 0.5, 1.0):
                        offloaded = round(batch * fraction)
                        times = bench.run(batch, offloaded, args.step_warmup)
                        cells.setdefault((batch, offloaded), []).extend(times)
        finally:
            bench.close()
        for (batch, offloaded), times in cells.items():
            ms = sorted(t * 1000 for t in times)
            rows.append({
                "model": model, "batch": batch, "offloaded": offloaded,
                "offloaded_pct": round(100 * offloaded / batch), "steps": len(ms),
                "mean_ms": round(statistics.fmean(ms), 3),
                "median_ms": round(statistics.median(ms), 3),
                "p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 3),
            })  # fmt: skip
    for r in rows:
        base = next(b for b in rows if b["model"] == r["model"] and b["batch"] == r["batch"])
        r["mean_vs_local"] = round(r["mean_ms"] / base["mean_ms"], 2)
        r["median_vs_local"] = round(r["median_ms"] / base["median_ms"], 2)
    return rows


def print_steps(rows: list[dict]) -> None:
    print(
        f"{'model':<9}{'batch':>6}{'offl.':>7}{'mean ms':>10}{'median':>9}{'p90':>9}"
        f"{'mean/0%':>9}{'med/0%':>8}"
    )
    for r in rows:
        print(
            f"{r['model']:<9}{r['batch']:>6}{str(r['offloaded_pct']) + '%':>7}{r['mean_ms']:>10}"
            f"{r['median_ms']:>9}{r['p90_ms']:>9}{r['mean_vs_local']:>9}{r['median_vs_local']:>8}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--iters", type=int, default=2000, help="timed round trips per cell")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--executor-op", choices=["copy", "attention"], default="copy")
    parser.add_argument(
        "--models", nargs="*", default=["tiny"], help="smollm2 adds about 4 minutes on 2 cores"
    )
    parser.add_argument("--batches-step", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40, help="timed decode steps per cell")
    parser.add_argument("--step-warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved sweeps per model")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--skip-roundtrip", action="store_true")
    parser.add_argument("--output-json", default="results/offload_roundtrip.json")
    args = parser.parse_args()

    machine = {"platform": platform.platform(), "cpus": os.cpu_count(),
               "loadavg_at_start": os.getloadavg()}  # fmt: skip
    print(f"machine: {machine}, device {args.device}")
    result: dict = {"args": vars(args), "machine": machine}
    if not args.skip_roundtrip:
        rows, notes = run_roundtrips(args)
        print(
            f"\n1. One layer's round trip between two processes, measured on the decode side from "
            f"writing q, k, v to holding the output ({args.iters} timed after {args.warmup} "
            f"warm-up; executor op: {args.executor_op}; float32; each side one torch thread).\n"
            "   shm: shared memory + counters (transport.attention_channel); zmq: PAIR over "
            "loopback TCP, q, k, v as three raw frames, output as one."
        )
        for note in notes:
            print(f"   note: {note}")
        print_roundtrips(rows)
        result["roundtrip"] = {"rows": rows, "notes": notes}
    if args.models:
        if args.device == "cuda":
            print("\n2. decode steps: CPU only for now (the executor process uses the shm channel)")
        print(
            f"\n2. Decode step time of a real LLMEngine (this process, 1 torch thread) whose "
            f"offloaded rows go to a real ExecutorWorker (spawned, 1 thread, torch backend) over "
            f"the shm channel; greedy, prompt {args.prompt_len} tokens (zero KV), every step "
            f"carries the whole batch; {args.rounds} rounds x {args.steps} steps per cell, each "
            f"after {args.step_warmup} warm-up steps; engine.step() wall time (schedule, model, "
            "sampling)."
        )
        steps = run_steps(args)
        print_steps(steps)
        result["decode_steps"] = steps
    # Other processes on the machine skew both tables: record how busy it was.
    machine["loadavg_at_end"] = os.getloadavg()
    print(f"load average at end: {machine['loadavg_at_end']}")
    out = Path(args.output_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
