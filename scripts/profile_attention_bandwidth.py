"""Paged decode attention bandwidth against the executor's SM share (paper, technique 2): how
few SMs reach near-peak memory bandwidth, which is the share to give `adrenaline attention
--sm-share`. Each share runs in its own process, limited by attention.colocation before CUDA
initialises; prints a table, the smallest share within 90% of the peak, and writes JSON.

    python scripts/profile_attention_bandwidth.py --shares 0.1,0.2,0.3,0.5,0.7,1.0
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PEAK_FRACTION = 0.9


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shares", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0")
    p.add_argument("--backend", choices=["triton", "torch"], default="triton")
    p.add_argument("--batch", type=int, default=64, help="decoding sequences")
    p.add_argument("--seq-len", type=int, default=4096, help="cached tokens per sequence")
    p.add_argument("--num-heads", type=int, default=32)
    p.add_argument("--num-kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--out", default="attention_bandwidth.json")
    p.add_argument("--child-share", type=float, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def measure(args: argparse.Namespace, share: float) -> dict:
    """In a child process: apply the share, then time decode attention over a random cache."""
    from attention.colocation import limit_sm_share

    mechanism = limit_sm_share(share)  # first: MPS reads its limit when CUDA initialises
    import torch

    from attention.torch_backend import TorchAttention

    device, dtype = torch.device("cuda"), getattr(torch, args.dtype)
    blocks_per_seq = -(-args.seq_len // args.block_size)
    num_blocks = args.batch * blocks_per_seq
    cache_shape = (num_blocks, args.block_size, args.num_kv_heads, args.head_dim)
    k_cache = torch.randn(cache_shape, dtype=dtype, device=device)
    v_cache = torch.randn(cache_shape, dtype=dtype, device=device)
    tables = torch.randperm(num_blocks, device=device).view(args.batch, blocks_per_seq)
    seq_lens = torch.full((args.batch,), args.seq_len, dtype=torch.int32, device=device)
    q = torch.randn(args.batch, args.num_heads, args.head_dim, dtype=dtype, device=device)
    if args.backend == "triton":
        from attention.triton_backend import TritonAttention as Backend
    else:
        Backend = TorchAttention
    backend = Backend(args.num_heads, args.num_kv_heads, args.head_dim, args.head_dim**-0.5)

    def run() -> None:
        backend.decode(q, k_cache, v_cache, seq_lens, tables.int(), args.seq_len)

    for _ in range(3):
        run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(args.iters):
        run()
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1000 / args.iters
    kv_bytes = 2 * args.batch * args.seq_len * args.num_kv_heads * args.head_dim * dtype.itemsize
    return {
        "share": share,
        "mechanism": mechanism,
        "ms": seconds * 1000,
        "gb_per_s": kv_bytes / seconds / 1e9,
    }


def run_share(args: argparse.Namespace, argv: list[str], share: float) -> dict:
    cmd = [sys.executable, __file__, *argv, "--child-share", str(share)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"share {share} failed:\n{done.stderr.strip()}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child_share is not None:
        print(json.dumps(measure(args, args.child_share)))
        return 0
    import torch

    if not torch.cuda.is_available():
        print("profile_attention_bandwidth: needs a CUDA GPU (none found); decode attention "
              "bandwidth against SM share is a GPU measurement", file=sys.stderr)  # fmt: skip
        return 2
    from attention.colocation import check_share

    shares = sorted(check_share(float(s)) for s in args.shares.split(","))
    rows = [run_share(args, argv, share) for share in shares]
    peak = max(r["gb_per_s"] for r in rows)
    enough = next(r["share"] for r in rows if r["gb_per_s"] >= PEAK_FRACTION * peak)
    print(f"{'share':>6} {'mechanism':>14} {'ms':>9} {'GB/s':>9} {'of peak':>8}")
    for r in rows:
        print(f"{r['share']:>6.2f} {r['mechanism']:>14} {r['ms']:>9.3f} {r['gb_per_s']:>9.1f} "
              f"{r['gb_per_s'] / peak:>8.1%}")  # fmt: skip
    print(f"smallest share within {PEAK_FRACTION:.0%} of peak ({peak:.1f} GB/s): {enough}")
    if any(r["mechanism"] == "none" and r["share"] < 1.0 for r in rows):
        print("note: some shares were not enforced (no MPS daemon, no green contexts)")
    result = {"config": {k: v for k, v in vars(args).items() if k != "child_share"},
              "rows": rows, "peak_gb_per_s": peak, "smallest_share_at_90pct": enough}  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
